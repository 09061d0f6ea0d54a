"""DEO's dual-stem Swin (tiny test size; Swin-B is in test_official_weights.py)."""

from __future__ import annotations

import pytest
import torch

from deo_cli.errors import UsageError
from deo_cli.models import build_encoder, get_model_spec, matmul
from deo_cli.models.swin import DeoSwin


@pytest.fixture(autouse=True)
def mkl_products():
    """torch.mm's (MKL's) input-gradient products, as torchvision's blocks take them: these tests
    compare with torchvision bit for bit (the faster-kernel choice is tests/models/test_matmul.py's)."""
    with matmul.pinned():
        yield


@pytest.fixture
def swin():
    torch.manual_seed(0)
    return build_encoder("deo_swin_test", weights=None)


def test_module_names_match_the_official_layout(swin):
    keys = swin.state_dict().keys()
    assert {k.split(".")[1] for k in keys if k.startswith("features.")} == {str(i) for i in range(7)}
    assert {k for k in keys if k.startswith(("conv_ms", "conv_rgb", "norm"))} == {
        "conv_ms.0.weight", "conv_ms.0.bias", "conv_ms.2.weight", "conv_ms.2.bias",
        "conv_rgb.0.weight", "conv_rgb.0.bias", "conv_rgb.2.weight", "conv_rgb.2.bias",
        "norm.weight", "norm.bias",
    }  # fmt: skip
    assert swin.conv_ms[0].in_channels == 10 and swin.conv_rgb[0].in_channels == 3
    assert swin.conv_ms[0].kernel_size == (4, 4) and swin.conv_ms[0].stride == (4, 4)
    assert swin.conv_ms[2].eps == 1e-5


def test_routing_by_channel_count(swin):
    x10, x3 = torch.randn(2, 10, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before10, before3 = swin(x10), swin(x3)
        swin.conv_rgb[0].weight.add_(1.0)  # touching the RGB stem changes only 3-band output
        after10, after3 = swin(x10), swin(x3)
    assert all(torch.equal(a, b) for a, b in zip(before10, after10, strict=True))
    assert not torch.allclose(before3[0], after3[0])
    with pytest.raises(UsageError, match="input has 5 bands but deo_swin_test takes 10 .*B04"):
        swin(torch.randn(1, 5, 64, 64))
    with pytest.raises(UsageError, match="4-D batch"):
        swin(torch.randn(10, 64, 64))


@pytest.mark.parametrize("size", [(64, 64), (70, 66), (33, 97)])
def test_any_input_size_gives_the_documented_grid(swin, size):
    h, w = size
    grid = swin.feature_grid(h, w)
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    assert grid[0] == (ceil(h, 4), ceil(w, 4))
    for prev, nxt in zip(grid, grid[1:]):
        assert nxt == (ceil(prev[0], 2), ceil(prev[1], 2))
    with torch.no_grad():
        maps = swin(torch.randn(1, 10, h, w))
    assert [tuple(m.shape[-2:]) for m in maps] == grid
    assert [m.shape[1] for m in maps] == list(swin.feature_channels) == [16, 32, 64, 128]


def test_padding_is_right_bottom_zeros(swin):
    x = torch.randn(1, 10, 62, 61)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 2))
    with torch.no_grad():
        a, b = swin(x), swin(padded)
    assert all(torch.equal(m, n) for m, n in zip(a, b, strict=True))


def test_pooled_is_final_norm_then_average(swin):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps, pooled = swin.forward_with_pooled(x)
        alone = swin.forward_pooled(x)
        want = swin.norm(maps[-1].permute(0, 2, 3, 1)).mean(dim=(1, 2))
    assert pooled.shape == (2, 128)
    torch.testing.assert_close(pooled, want)
    torch.testing.assert_close(alone, pooled)
    assert all(torch.equal(m, n) for m, n in zip(maps, swin(x), strict=True))


def test_drop_path_only_in_train_mode():
    torch.manual_seed(0)
    swin = build_encoder("deo_swin_test", weights=None, drop_path_rate=0.5)
    x = torch.randn(2, 10, 64, 64)
    with torch.no_grad():
        assert not swin.training  # build_encoder returns eval mode
        assert torch.equal(swin(x)[-1], swin(x)[-1])
        swin.train()
        assert not torch.equal(swin(x)[-1], swin(x)[-1])


def test_swin_b_and_t_configuration():
    with torch.device("meta"):
        b = build_encoder("deo_swin_b", weights=None)
        t = build_encoder("deo_swin_t", weights=None)
    blk_b, blk_t = b.features[0][0], t.features[0][0]
    assert blk_b.attn.window_size == [12, 12] and blk_t.attn.window_size == [7, 7]
    assert [len(b.features[i]) for i in (0, 2, 4, 6)] == [2, 2, 18, 2]
    assert [b.features[i][0].attn.num_heads for i in (0, 2, 4, 6)] == [4, 8, 16, 32]
    assert [len(t.features[i]) for i in (0, 2, 4, 6)] == [2, 2, 6, 2]
    # torchvision scales stochastic depth linearly; the last block has the configured rate.
    assert b.features[6][-1].stochastic_depth.p == pytest.approx(0.5)
    assert t.features[6][-1].stochastic_depth.p == pytest.approx(0.2)
    assert b.feature_channels == (128, 256, 512, 1024) and t.feature_channels == (96, 192, 384, 768)
    assert isinstance(b, DeoSwin) and get_model_spec("deo_swin_b").pooled_dim == b.pooled_dim == 1024


@pytest.mark.parametrize("side", [12, 16, 5, 3])  # shifted; shifted and padded; window > map (qkv first)
def test_window_attention_is_torchvisions_bit_for_bit(swin, side):
    from torchvision.models.swin_transformer import ShiftedWindowAttention, shifted_window_attention

    from deo_cli.models.swin import WindowAttention

    attn = swin.features[0][1].attn  # a shifted block (shift 3, window 6)
    assert type(attn) is WindowAttention and isinstance(attn, ShiftedWindowAttention)
    x = torch.randn(2, side, side, 16)
    outs, grads = [], []
    for reference in (False, True):
        swin.zero_grad()
        xi = x.clone().requires_grad_()
        if reference:  # torchvision's own function on the same parameters
            y = shifted_window_attention(
                xi, attn.qkv.weight, attn.proj.weight, attn.get_relative_position_bias(), attn.window_size,
                attn.num_heads, shift_size=attn.shift_size, qkv_bias=attn.qkv.bias, proj_bias=attn.proj.bias,
            )  # fmt: skip
        else:
            y = attn(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in attn.parameters()])
    assert outs[0].shape == (2, side, side, 16) and torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0][0], grads[1][0])  # the input's gradient
    for a, b in zip(grads[0][1:], grads[1][1:], strict=True):
        if side % 6 == 0:  # nothing padded: torchvision's operations, the same sums
            assert torch.equal(a, b)
        else:  # the projections skip padded tokens: weight gradients summed in another order
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)  # sums of ~500 terms of size ~1


@pytest.mark.parametrize(("batch", "side", "p"), [(6, 14, 0.5), (5, 8, 0.4), (3, 7, 0.9), (4, 14, 0.0)])
def test_block_in_training_has_torchvisions_numbers(batch, side, p):
    """Stochastic depth, the recomputed norms and GELU, the window gathers: the same outputs,
    input gradients and random draws as torchvision's block, bit for bit; the weight gradients too
    where nothing is padded or dropped (a dropped sample's rows are left out of the sums)."""
    from torchvision.models.swin_transformer import SwinTransformerBlock

    from deo_cli.models.swin import SwinBlock

    torch.manual_seed(0)
    block = SwinTransformerBlock(
        32, 2, [7, 7], [3, 3], stochastic_depth_prob=p, norm_layer=torch.nn.LayerNorm
    )
    block.attn.__class__ = type(build_encoder("deo_swin_test", weights=None).features[0][1].attn)
    x = torch.randn(batch, side, side, 32)
    outs, grads, draws = [], [], []
    for cls in (SwinTransformerBlock, SwinBlock):
        block.__class__ = cls
        block.zero_grad()
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        y = block(xi)
        draws.append(torch.rand(3))  # the generator is left where torchvision leaves it
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [q.grad.clone() for q in block.parameters()])
    assert torch.equal(outs[0], outs[1]) and torch.equal(draws[0], draws[1])
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1:], grads[1][1:], strict=True):
        if side % 7 == 0 and p == 0.0:  # nothing padded or dropped: torchvision's operations, the same sums
            assert torch.equal(a, b)
        else:  # padded tokens and dropped samples left out: weight gradients summed in another order
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    if p == 0.9:  # most samples dropped: one dropped from both branches is its input unchanged
        assert any(torch.equal(outs[1][i], x[i]) for i in range(batch))


def test_forward_many_runs_same_size_inputs_together_with_the_separate_numbers(monkeypatch):
    from deo_cli.models import swin as swin_module

    """Student-style inputs (multispectral and RGB crops of two sizes) through ``forward_many``:
    in training on the CPU the crops of one size share the trunk, yet every map, pooled vector and
    random draw equals running them one by one (as the official step does), in order."""
    torch.manual_seed(0)
    swin = build_encoder("deo_swin_test", weights=None, drop_path_rate=0.5).train()
    # the globals' last stage has 10 x 4 x 4 = 160 tokens (merged); the locals' 12 (each alone)
    g, loc = torch.randn(10, 10, 128, 128), torch.randn(12, 10, 32, 32)
    inputs, need_maps = [g, loc, g[:, :3], loc[:, :3]], [False, False, True, False]
    monkeypatch.setattr(swin_module, "MAX_MERGED_TOKENS", 32768)  # merging on (off by default)
    runs, trunk_batches = [], []
    trunk = swin._trunk
    swin._trunk = lambda x, maps: (trunk_batches.append(len(x)), trunk(x, maps))[1]
    for together in (False, True):
        torch.manual_seed(1)
        if together:
            out = swin.forward_many(inputs, need_maps)
        else:
            out = [
                swin.forward_with_pooled(x) if m else ([], swin.forward_pooled(x))
                for x, m in zip(inputs, need_maps, strict=True)
            ]
        runs.append((out, torch.rand(3)))
    (alone, after_alone), (merged, after_merged) = runs
    assert trunk_batches == [10, 12, 10, 12] + [20, 12, 12]  # one by one; globals together, locals alone
    monkeypatch.setattr(swin_module, "MAX_MERGED_TOKENS", 20 * 32 * 32 - 1)  # globals too large together
    trunk_batches.clear()
    swin.forward_many(inputs, need_maps)
    assert trunk_batches == [10, 10, 12, 12]  # each alone (the draws were made first, in order)
    assert torch.equal(after_alone, after_merged)  # the generator is left where the separate passes leave it
    for (maps_a, pooled_a), (maps_m, pooled_m), m in zip(alone, merged, need_maps, strict=True):
        assert torch.equal(pooled_a, pooled_m)
        assert len(maps_m) == (4 if m else 0)
        for a, b in zip(maps_a, maps_m, strict=True):
            assert a.shape == b.shape and torch.equal(a, b)
    # the draws mattered: another seed gives other numbers
    torch.manual_seed(2)
    assert not torch.equal(swin.forward_many(inputs, need_maps)[0][1], merged[0][1])


# even; odd (padded); one row
@pytest.mark.parametrize("shape", [(2, 8, 8, 16), (3, 7, 9, 16), (1, 1, 5, 16)])
def test_patch_merging_is_torchvisions_bit_for_bit(swin, shape):
    from torchvision.models.swin_transformer import PatchMerging as Reference

    from deo_cli.models.swin import PatchMerging

    merge = swin.features[1]
    assert type(merge) is PatchMerging and isinstance(merge, Reference)
    x = torch.randn(*shape)
    runs = []
    for cls in (Reference, PatchMerging):
        merge.__class__ = cls
        merge.zero_grad()
        xi = x.clone().requires_grad_()
        y = merge(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        runs.append([y.detach(), xi.grad] + [p.grad.clone() for p in merge.parameters()])
    merge.__class__ = PatchMerging
    assert runs[0][0].shape == (shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, 32)
    for a, b in zip(*runs, strict=True):  # outputs, input and weight gradients: the same bits
        assert torch.equal(a, b)


# window 6, shift 3: padded to 12 (projections on the real tokens); no padding; padded, too few rows to skip it
@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 12, 12), (1, 7, 7)])
def test_block_keeps_less_for_the_backward_pass_with_the_same_bits(shape):
    """Both norms' outputs and the GELU's are recomputed in the backward pass: outputs and every
    gradient equal the block computed as torchvision does bit for bit, and the tensors kept for
    the backward pass are smaller by all three."""
    from torchvision.models.swin_transformer import SwinTransformerBlock

    from deo_cli.models.swin import SwinBlock

    torch.manual_seed(0)
    block = build_encoder("deo_swin_test", weights=None).features[2][1].eval()  # no stochastic depth
    x = torch.randn(*shape, 32)
    runs, kept = [], []
    for cls in (SwinTransformerBlock, SwinBlock):
        block.__class__ = cls
        block.zero_grad()
        xi = x.clone().requires_grad_()
        saved = {}

        def pack(t, saved=saved):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = block(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        runs.append([y.detach(), xi.grad] + [p.grad.clone() for p in block.parameters()])
        kept.append(sum(saved.values()))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    tokens = shape[0] * shape[1] * shape[2]
    hidden, normed = tokens * 4 * 32 * 4, tokens * 32 * 4  # GELU output (4 widths), a norm output; 4 bytes
    assert kept[1] <= kept[0] - hidden - 2 * normed


@pytest.mark.parametrize("side", [14, 8])
def test_block_with_every_sample_dropped_has_zero_weight_gradients(side):
    """Stochastic depth at rate 1: both branches dropped for every sample; the block is the identity,
    its weight gradients are zeros (not missing: the optimiser still decays those weights), as
    torchvision's."""
    from deo_cli.models.swin import SwinBlock

    torch.manual_seed(0)
    block = build_encoder("deo_swin_test", weights=None).features[2][0]
    assert type(block) is SwinBlock
    block.stochastic_depth.p = 1.0
    block.train()
    x = torch.randn(3, side, side, block.norm1.normalized_shape[0], requires_grad=True)
    y = block(x)
    y.sum().backward()
    assert torch.equal(y, x) and torch.equal(x.grad, torch.ones_like(x))
    for name, q in block.named_parameters():
        assert q.grad is not None and not q.grad.any(), name
