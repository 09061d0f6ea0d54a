"""AdamW groups, DINO-style per-parameter clipping and DEO's schedules (docs/method.md §2.9)."""

import numpy as np
import pytest
import torch
from torch import nn

from deo_cli.train.optim import (
    apply_schedules,
    build_optimizer,
    build_schedules,
    clip_gradients,
    param_groups,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)
        self.table = nn.Parameter(torch.zeros(5, 2))  # 2-D, not a bias: decayed (as DINO)


def test_no_weight_decay_on_biases_and_norms():
    m = Tiny()
    decay, no_decay = param_groups(m)
    names = {id(p): n for n, p in m.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["conv.weight", "fc.weight", "table"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "conv.bias",
        "fc.bias",
        "norm.bias",
        "norm.weight",
    ]
    assert no_decay["weight_decay"] == 0.0
    opt = build_optimizer(m, device=torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults.get("fused")  # the fused kernel on the CPU too
    assert not build_optimizer(m, fused=False, device=torch.device("cpu")).defaults.get("fused")


def test_clipping_is_per_parameter_not_global():
    m = Tiny()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    m.fc.weight.grad.fill_(10.0)  # norm sqrt(8) * 10 = 28.3
    m.conv.bias.grad.fill_(0.5)  # norm 1.0
    before = clip_gradients(m, 3.0)
    assert before.max().item() == pytest.approx(np.sqrt(8) * 10, rel=1e-5)
    assert m.fc.weight.grad.norm().item() == pytest.approx(3.0, rel=1e-4)
    assert m.conv.bias.grad.norm().item() == pytest.approx(1.0, rel=1e-6)  # below the limit: untouched
    assert torch.equal(m.conv.bias.grad, torch.full((4,), 0.5))


def test_schedules_follow_the_paper():
    s = build_schedules(
        lr=5e-4,
        min_lr=1e-6,
        warmup_epochs=10,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum=0.996,
        momentum_end=1.0,
        epochs=100,
        steps_per_epoch=20,
        global_batch=512,
    )
    assert s.total_steps == 2000
    assert (
        s.lr[0] == 0.0 and s.lr[199] == pytest.approx(1e-3) and s.lr[200] == pytest.approx(1e-3)
    )  # 5e-4 x 512/256
    assert np.all(np.diff(s.lr[:200]) > 0) and np.all(np.diff(s.lr[200:]) <= 0)
    assert s.lr[-1] == pytest.approx(1e-6, abs=1e-8)
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(0.4, abs=1e-5)
    assert s.momentum[0] == pytest.approx(0.996) and s.momentum[-1] == pytest.approx(1.0, abs=1e-7)
    opt = build_optimizer(Tiny())
    lr, wd = apply_schedules(opt, s, 1500)
    assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] == lr == s.lr[1500]
    assert opt.param_groups[0]["weight_decay"] == wd == s.weight_decay[1500]
    assert opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("fused", [True, False])
def test_optimizer_state_is_allocated_up_front_and_changes_nothing(fused):
    """build_optimizer creates AdamW's state before the first step (zero moments, step 0, weights
    untouched, no gradients left), and the steps that follow give exactly the weights of an
    optimiser whose state was created lazily."""
    torch.manual_seed(0)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    before = {k: v.clone() for k, v in a.state_dict().items()}
    opt_a = build_optimizer(a, fused=fused, device=torch.device("cpu"))
    opt_b = torch.optim.AdamW(param_groups(b), lr=0.0, weight_decay=0.0, fused=fused or None)
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())
    assert all(p.grad is None for p in a.parameters())
    for p in a.parameters():
        state = opt_a.state[p]
        assert float(state["step"]) == 0.0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    x = torch.randn(2, 3, 6, 6)
    for step in range(3):
        for m, opt in ((a, opt_a), (b, opt_b)):
            for g in opt.param_groups:
                g["lr"], g["weight_decay"] = 1e-2 * (step + 1), 0.04 if g is opt.param_groups[0] else 0.0
            opt.zero_grad(set_to_none=True)
            (m.fc(m.norm(m.conv(x).mean(dim=(2, 3)))).square().sum() + m.table.sum()).backward()
            opt.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
