"""DEO's dual-stem Swin Transformer (docs/method.md §2.5), built from torchvision's Swin blocks.

The trunk is torchvision's ``SwinTransformer`` with its patch-embedding block deleted, exactly
as in the official release: torchvision, not timm, because timm's Swin pads and masks a 56x56
grid with window 12 differently and does not reproduce the official network (docs/design.md §2).
Two stems replace the patch embedding, each ``Conv2d(k=4, s=4) -> permute to NHWC ->
LayerNorm(eps=1e-5)``: ``conv_ms`` (10 bands) and ``conv_rgb`` (3 bands).

Module names equal the official ``feat_extr`` module's, so the released ``DEO_swin_b.pth`` maps
onto this module by stripping prefixes only (docs/method.md §2.13)::

    features.{0..6}.*     stages 1-4 at indices 0, 2, 4, 6; patch merging at 1, 3, 5
    conv_ms.{0,2}.*       multispectral stem (conv, layer norm)
    conv_rgb.{0,2}.*      RGB stem
    norm.*                final LayerNorm (pooled vector only)

The official code builds torchvision's ``swin_b()`` (window 7) while its README says the release
uses window 12, so the window is not assumed: :func:`swin_shape` reads it (and the width,
depths and heads) from a checkpoint's tensors and the network is built to match
(:func:`deo_cli.models.build.fit_swin_to_checkpoint`).

Output grid for an ``H`` x ``W`` input (zero-padded right/bottom to a multiple of 4 inside
``forward``; odd grids are padded by torchvision's patch merging): stage 1 is
``ceil(H/4)``, and each later stage is ``ceil(previous/2)``. At 224 px: 56, 28, 14, 7; at
250 px: 63, 32, 16, 8. Stochastic depth (0.5 for Swin-B, 0.2 for Swin-T, torchvision's
defaults, docs/method.md §2.5/§2.9) is active only in ``train()`` mode.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import PatchMerging as TorchvisionPatchMerging
from torchvision.models.swin_transformer import ShiftedWindowAttention, SwinTransformer, SwinTransformerBlock
from torchvision.ops.misc import Permute

from deo_cli.models import matmul
from deo_cli.models.encoder import DeoEncoder, ceil_div
from deo_cli.models.registry import DEO_SWIN_B_WEIGHTS, register_model
from deo_cli.sensors import DEO_S2_MANIFEST

#: Indices of the four stages inside ``features`` (after deleting the patch embedding).
STAGE_INDICES = (0, 2, 4, 6)
PATCH_SIZE = 4


def _stem(in_chans: int, embed_dim: int) -> nn.Sequential:
    """Conv 4x4 stride 4, permute to NHWC, LayerNorm(eps 1e-5) (docs/method.md §2.5)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, embed_dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE),
        Permute([0, 2, 3, 1]),
        nn.LayerNorm(embed_dim, eps=1e-5),
    )


#: Fewest real tokens for which the projections skip the padded ones (below, torchvision's order):
#: MKL's matrix product gives each row the same bits whatever the number of rows from about this
#: many rows on (fewer rows can take another kernel: e.g. 9 or 48-128 rows of width 1024).
MIN_ROWS_TO_SKIP_PADDING = 160
#: Most stage-1 tokens (all inputs together) that :meth:`DeoSwin.forward_many` runs through the
#: trunk as one batch; 0 (the default): every input alone. A merged pass is the separate passes to
#: the bit only where the matrix products give each row the same bits whatever the number of rows,
#: and on a Sapphire Rapids Xeon MKL does not for wide inputs (1,536 or 3,072 columns: 180 rows
#: against 360 differ in the last bits), so DEO's student merged at batch 2 (25,088 tokens for its
#: global crops) computes a loss 2e-5 away from the official one. What merging gains is within this
#: machine's noise: batch 2, 3.40 against 3.59 s a step in one A/B on 2 cores, 3.46 against 3.30
#: and 3.42 s in another; batch 8, 12.9 against 12.75 s.
MAX_MERGED_TOKENS = 0
#: Shifted-window attention masks by (padded height, padded width, window, shift, dtype, device).
_MASKS: dict[tuple, Tensor] = {}


def _shift_mask(
    pad_h: int, pad_w: int, window: tuple[int, int], shift: tuple[int, int], like: Tensor
) -> Tensor:
    """torchvision's shifted-window mask ``(1, nW, 1, N, N)`` (0 inside a region, -100 across
    regions), built once per shape instead of at every block call."""
    key = (pad_h, pad_w, window, shift, like.dtype, like.device)
    mask = _MASKS.get(key)
    if mask is None:
        wh, ww = window
        m = torch.zeros((pad_h, pad_w), dtype=like.dtype, device=like.device)
        count = 0
        for h in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
            for w in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
                m[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        m = m.view(pad_h // wh, wh, pad_w // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
        m = m.unsqueeze(1) - m.unsqueeze(2)
        m = m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)
        mask = _MASKS[key] = m.unsqueeze(1).unsqueeze(0)
    return mask


def _layer_norm(x: Tensor, weight, bias, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``layer_norm`` over the last dimension with its statistics (the kernel ``F.layer_norm`` runs)."""
    return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _layer_norm_backward(ctx, grad_y: Tensor, x: Tensor, mean, rstd, weight, bias):
    """The gradients of :func:`_layer_norm` for ``x``, ``weight`` and ``bias`` (the first three
    inputs of ``ctx``'s Function), as autograd computes them."""
    return torch.ops.aten.native_layer_norm_backward(
        grad_y, x, (x.shape[-1],), mean, rstd, weight, bias, ctx.needs_input_grad[:3]
    )


#: Kept samples of a batch as ``(start, stop)`` ranges (stochastic depth's draw): ``None``, all kept.
Runs = tuple[tuple[int, int], ...] | None


def _kept_runs(draw: Tensor) -> Runs:
    """The ranges of samples a stochastic-depth ``draw`` (``(B, 1, ...)``, 0 where dropped) keeps;
    ``None`` when it keeps every sample."""
    kept = (draw.reshape(-1) != 0).tolist()
    if all(kept):
        return None
    runs, start = [], None
    for i, k in enumerate(kept + [False]):
        if k and start is None:
            start = i
        elif not k and start is not None:
            runs.append((start, i))
            start = None
    return tuple(runs)


def _row_slices(runs: Runs, rows: int, batch: int) -> list[slice] | None:
    """``runs`` of samples as slices of ``rows`` sample-major rows (``batch`` samples)."""
    if runs is None:
        return None
    per = rows // batch
    return [slice(a * per, b * per) for a, b in runs]


#: Fewest rows per kept run (on average) for which a weight gradient is summed run by run, and an
#: input gradient computed run by run, instead of one product over all rows (the dropped rows are
#: zero, so both give the same numbers): products of few rows are slow, each reads the whole weight.
#: Measured on 2 cores (AMD EPYC): 60-row runs made an input gradient 1.7x slower than the full
#: product, 230-row runs 5 % slower; weight gradients gained from 60-row runs on.
MIN_RUN_ROWS_WEIGHT = 64
MIN_RUN_ROWS_INPUT = 512


def _worth_runs(rows: list[slice] | None, least: int) -> bool:
    return rows is not None and sum(r.stop - r.start for r in rows) >= least * len(rows)


def _grad_weight(grad2d: Tensor, inp2d: Tensor, rows: list[slice] | None) -> Tensor:
    """``grad2d.t() @ inp2d`` (a linear layer's weight gradient), over ``rows`` only when given
    (the other rows of ``grad2d`` are zero: samples stochastic depth dropped) and long enough."""
    if not rows and rows is not None:  # every sample dropped
        return grad2d.new_zeros(grad2d.shape[1], inp2d.shape[1])
    if not _worth_runs(rows, MIN_RUN_ROWS_WEIGHT):
        return grad2d.t().mm(inp2d)
    out = None
    for r in rows:
        if out is None:
            out = grad2d[r].t().mm(inp2d[r])
        else:
            out.addmm_(grad2d[r].t(), inp2d[r])
    return out


def _grad_input(grad2d: Tensor, weight: Tensor, rows: list[slice] | None) -> Tensor:
    """``grad2d @ weight`` (a linear layer's input gradient); with ``rows``, computed there only
    and zero elsewhere (where ``grad2d`` is zero). The result has one size whatever ``rows``: the
    allocator sees the same blocks at every step."""
    if not rows and rows is not None:  # every sample dropped
        return grad2d.new_zeros(grad2d.shape[0], weight.shape[1])
    if not _worth_runs(rows, MIN_RUN_ROWS_INPUT):
        return matmul.input_grad(grad2d, weight)
    out = grad2d.new_empty(grad2d.shape[0], weight.shape[1])
    end = 0
    for r in rows:
        out[end : r.start].zero_()
        torch.mm(grad2d[r], weight, out=out[r])
        end = r.stop
    out[end:].zero_()
    return out


class _NormLinear(torch.autograd.Function):
    """``linear(arrange(layer_norm(x)), weight, bias)`` keeping only ``x`` and the norm's statistics
    for the backward pass, where the norm's output is recomputed (the same function on the same
    values: the same bits) and rearranged again.

    ``arrange`` moves the tokens without computing anything (zero padding, the window shift, the
    split into windows) and ``unarrange`` takes a gradient in that arrangement back to ``x``'s
    (cropping, shifting back, joining the windows). Autograd would keep the arranged norm output
    for the weight gradient: the block's width per token, a tenth of what a Swin block keeps.
    The backward pass runs the operations autograd runs for ``addmm`` and ``layer_norm``.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, ln_w, ln_b, eps: float, weight: Tensor, bias, arrange, unarrange, keep: Runs = None
    ) -> Tensor:
        y, mean, rstd = _layer_norm(x, ln_w, ln_b, eps)
        ctx.save_for_backward(x, mean, rstd, ln_w, ln_b, weight)
        ctx.eps, ctx.has_bias, ctx.arrange, ctx.unarrange = eps, bias is not None, arrange, unarrange
        ctx.keep, ctx.batch = keep, x.shape[0]
        return F.linear(arrange(y), weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, mean, rstd, ln_w, ln_b, weight = ctx.saved_tensors
        y = ctx.arrange(_layer_norm(x, ln_w, ln_b, ctx.eps)[0])
        grad2d = grad.reshape(-1, grad.shape[-1])
        rows = _row_slices(ctx.keep, grad2d.shape[0], ctx.batch)
        grad_w = _grad_weight(grad2d, y.reshape(-1, y.shape[-1]), rows)
        grad_b = grad2d.sum(0) if ctx.has_bias else None
        grad_y = ctx.unarrange(_grad_input(grad2d, weight, rows).view(y.shape))
        grad_x, grad_ln_w, grad_ln_b = _layer_norm_backward(ctx, grad_y, x, mean, rstd, ln_w, ln_b)
        return grad_x, grad_ln_w, grad_ln_b, None, grad_w, grad_b, None, None, None


class _Linear(torch.autograd.Function):
    """``F.linear`` whose backward pass computes the gradients on the rows of the kept samples only
    (``keep``; the output gradient is zero on the others: stochastic depth dropped them)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias, keep: Runs, batch: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.keep, ctx.batch, ctx.has_bias = keep, batch, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        rows = _row_slices(ctx.keep, grad2d.shape[0], ctx.batch)
        grad_w = _grad_weight(grad2d, x.reshape(-1, x.shape[-1]), rows)
        grad_b = grad2d.sum(0) if ctx.has_bias else None
        return _grad_input(grad2d, weight, rows).view(x.shape), grad_w, grad_b, None, None


def _linear(x: Tensor, layer: nn.Linear, keep: Runs, batch: int) -> Tensor:
    """``layer(x)`` (``x``: rows of ``batch`` samples, sample-major); its weight and input
    gradients skip the samples ``keep`` leaves out, and the input gradient takes the faster
    kernel (:func:`deo_cli.models.matmul.input_grad`)."""
    if keep is None and not (torch.is_grad_enabled() and matmul.active(x, layer.weight)):
        return F.linear(x, layer.weight, layer.bias)
    return _Linear.apply(x, layer.weight, layer.bias, keep, batch)


def _to_windows(x: Tensor, window: tuple[int, int], shift: tuple[int, int]) -> Tensor:
    """``(B, H, W, C)`` (multiples of the window) -> shifted windows ``(B * nW, wh * ww, C)``."""
    B, pad_H, pad_W, width = x.shape
    wh, ww = window
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(B, pad_H // wh, wh, pad_W // ww, ww, width)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B * (pad_H // wh) * (pad_W // ww), wh * ww, width)


def _from_windows(
    x: Tensor, B: int, pad_H: int, pad_W: int, window: tuple[int, int], shift: tuple[int, int]
) -> Tensor:
    """The inverse of :func:`_to_windows`: ``(B * nW, wh * ww, C)`` -> ``(B, H, W, C)``."""
    wh, ww = window
    width = x.shape[-1]
    x = x.view(B, pad_H // wh, pad_W // ww, wh, ww, width)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, width)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x


#: Token orders of shifted windows by (batch, height, width, window, shift, device): :class:`_WindowOrder`.
_ORDERS: dict[tuple, _WindowOrder] = {}


class _WindowOrder:
    """Where each token of a ``B x H x W`` map sits in torchvision's shifted windows, as row indices.

    torchvision pads the map to a multiple of the window, shifts it (``torch.roll``, which copies the
    tensor once per shifted dimension) and splits it into windows (a permuting copy), and after the
    attention undoes the three. Each direction is one row gather here (``index_select`` of whole
    rows): the same values moved, a third to a fifth of the copying, the gradient of one the
    other. Rows: ``to_rows``, for each row of the windows ``(B * nW * wh * ww)``, the map row
    ``(B * H * W)`` it holds (0 where it holds padding); ``pad_rows``, the padding rows of the
    windows; ``from_rows``, for each map row, its row in the windows.
    """

    def __init__(self, B: int, H: int, W: int, window: tuple[int, int], shift: tuple[int, int], device):
        wh, ww = window
        pad_H, pad_W = H + (-H) % wh, W + (-W) % ww
        # window order (window row, window column, row in window, column in window): the shifted map's
        # position, which holds the padded map's token shift later (torch.roll by -shift)
        h = (torch.arange(pad_H).view(pad_H // wh, 1, wh, 1) + shift[0]) % pad_H
        w = (torch.arange(pad_W).view(1, pad_W // ww, 1, ww) + shift[1]) % pad_W
        real = ((h < H) & (w < W)).reshape(-1)
        source = (h * W + w).reshape(-1)
        n, n_pad = H * W, pad_H * pad_W
        position = torch.arange(n_pad)
        back = torch.empty(n, dtype=torch.long)
        back[source[real]] = position[real]
        batch = torch.arange(B).view(B, 1)
        self.to_rows = (torch.where(real, source, 0) + batch * n).reshape(-1).to(device)
        self.pad_rows = (position[~real] + batch * n_pad).reshape(-1).to(device)
        self.from_rows = (back + batch * n_pad).reshape(-1).to(device)

    def to_windows(self, rows: Tensor, fill: Tensor | None) -> Tensor:
        """Map rows ``(B * H * W, C)`` -> window rows ``(B * nW * wh * ww, C)``; padding is ``fill`` (or 0)."""
        out = rows.index_select(0, self.to_rows)
        if self.pad_rows.numel():
            if fill is None:
                out.index_fill_(0, self.pad_rows, 0.0)
            else:
                out[self.pad_rows] = fill
        return out

    def from_windows(self, rows: Tensor) -> Tensor:
        """Window rows -> the map's rows (padding cut away)."""
        return rows.index_select(0, self.from_rows)


def _window_order(
    B: int, H: int, W: int, window: tuple[int, int], shift: tuple[int, int], device
) -> _WindowOrder:
    key = (B, H, W, window, shift, device)
    order = _ORDERS.get(key)
    if order is None:
        if len(_ORDERS) > 256:  # many input sizes (inference on varied tiles): start over
            _ORDERS.clear()
        order = _ORDERS[key] = _WindowOrder(B, H, W, window, shift, device)
    return order


class _ToWindows(torch.autograd.Function):
    """:meth:`_WindowOrder.to_windows` with its gradient (the rows gathered back; ``fill``'s: the
    padding rows' sum)."""

    @staticmethod
    def forward(ctx, rows: Tensor, fill: Tensor | None, order: _WindowOrder) -> Tensor:
        ctx.order = order
        return order.to_windows(rows, fill)

    @staticmethod
    def backward(ctx, grad: Tensor):
        order = ctx.order
        grad_fill = grad.index_select(0, order.pad_rows).sum(0) if ctx.needs_input_grad[1] else None
        return order.from_windows(grad), grad_fill, None


class _FromWindows(torch.autograd.Function):
    """:meth:`_WindowOrder.from_windows` with its gradient (zero on the padding rows)."""

    @staticmethod
    def forward(ctx, rows: Tensor, order: _WindowOrder) -> Tensor:
        ctx.order = order
        return order.from_windows(rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.order.to_windows(grad, None), None


def shifted_window_attention(
    x: Tensor,
    qkv: nn.Linear,
    proj: nn.Linear,
    relative_position_bias: Tensor,
    window_size: Sequence[int],
    num_heads: int,
    shift_size: Sequence[int],
    norm: nn.LayerNorm | None = None,
    keep: Runs = None,
) -> Tensor:
    """torchvision's ``shifted_window_attention`` (Swin v1, no dropout): the same forward values,
    bit for bit, with less work. With ``norm``, ``x`` is the block's input before its first norm,
    which is recomputed in the backward pass instead of kept (:class:`_NormLinear`). With ``keep``
    (and ``norm``), the gradients of the two projections are computed for those samples only (the
    others' output gradient is zero: stochastic depth dropped this branch for them).

    - Query, key and value are taken with ``unbind`` (torchvision's ``qkv[0], qkv[1], qkv[2]``
      each zero-fill a full-size gradient in the backward pass, which then adds the three and
      copies the sum into qkv's layout).
    - A map that is not a multiple of the window is zero-padded by torchvision, and the
      projections run on the padded tokens too: ``qkv`` gives exactly its bias there, ``proj``'s
      output there is cut away. Here both run on the real tokens only: ``qkv`` before the padding
      (its bias fills the padded tokens), ``proj`` after the windows are put back and cut to the
      map (a 96 px crop's stages: 576 of 784, 144 of 196, 36 of 49 and 9 of 49 tokens). Linear
      layers compute every token on its own, so the values are the same (from
      :data:`MIN_ROWS_TO_SKIP_PADDING` real tokens on; fewer keep torchvision's order); the weight
      gradients of these two layers are summed in another order (the same to rounding).
    - The shifted-window mask is built once per shape (:func:`_shift_mask`).
    - On the CPU in eager mode the padding, the shift and the split into windows are one row gather,
      and so is the way back (:class:`_WindowOrder`); elsewhere torchvision's pad, roll and reshape.
    """
    B, H, W, C = x.shape
    wh, ww = window_size
    pad_r, pad_b = (ww - W % ww) % ww, (wh - H % wh) % wh
    pad_H, pad_W = H + pad_b, W + pad_r
    skip = bool(pad_r or pad_b) and B * H * W >= MIN_ROWS_TO_SKIP_PADDING
    # a window at least as large as the map needs no shift (torchvision's rule)
    shift = (0 if wh >= pad_H else shift_size[0], 0 if ww >= pad_W else shift_size[1])
    num_windows = (pad_H // wh) * (pad_W // ww)
    # on the CPU in eager mode, the padding, the shift and the windows are one row gather each way
    order = (
        _window_order(B, H, W, (wh, ww), shift, x.device)
        if x.device.type == "cpu" and not torch.compiler.is_compiling()
        else None
    )
    windows = (B * num_windows, wh * ww)
    if norm is None:
        keep = None
    if skip:  # the projection on the real tokens; the padded ones get its bias (what 0 gives)
        if norm is not None:
            x = _NormLinear.apply(
                x, norm.weight, norm.bias, norm.eps, qkv.weight, qkv.bias, _same, _same, keep
            )
        else:
            x = F.linear(x, qkv.weight, qkv.bias)
        if order is not None:
            qkv_out = _ToWindows.apply(x.reshape(-1, x.shape[-1]), qkv.bias, order).view(*windows, -1)
        else:
            fill = qkv.bias if qkv.bias is not None else x.new_zeros(x.shape[-1])
            if pad_r:
                x = torch.cat([x, fill.expand(B, H, pad_r, x.shape[-1])], dim=2)
            if pad_b:
                x = torch.cat([x, fill.expand(B, pad_b, pad_W, x.shape[-1])], dim=1)
            qkv_out = _to_windows(x, (wh, ww), shift)
    elif norm is not None and order is not None:  # the norm and the window gather inside _NormLinear

        def arrange(y: Tensor) -> Tensor:
            return order.to_windows(y.reshape(-1, C), None).view(*windows, C)

        def unarrange(g: Tensor) -> Tensor:
            return order.from_windows(g.reshape(-1, C)).view(B, H, W, C)

        qkv_out = _NormLinear.apply(
            x, norm.weight, norm.bias, norm.eps, qkv.weight, qkv.bias, arrange, unarrange, keep
        )
    elif order is not None:
        qkv_out = F.linear(
            _ToWindows.apply(x.reshape(-1, C), None, order).view(*windows, C), qkv.weight, qkv.bias
        )
    else:
        if norm is not None:
            x = norm(x)
        if pad_r or pad_b:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        qkv_out = F.linear(_to_windows(x, (wh, ww), shift), qkv.weight, qkv.bias)
    n, t = qkv_out.size(0), qkv_out.size(1)
    # the views torchvision takes (qkv[0], qkv[1], qkv[2] of permute(2, 0, 3, 1, 4)), taken by unbind
    # along the 3: the backward pass stacks the three gradients straight into qkv's own layout
    q, k, v = (y.transpose(1, 2) for y in qkv_out.reshape(n, t, 3, num_heads, C // num_heads).unbind(2))
    q = q * (C // num_heads) ** -0.5
    attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        attn = attn.view(n // num_windows, num_windows, num_heads, t, t)
        attn = attn + _shift_mask(pad_H, pad_W, (wh, ww), shift, attn)
        attn = attn.view(-1, num_heads, t, t)
    attn = F.softmax(attn, dim=-1)
    x = attn.matmul(v).transpose(1, 2).reshape(n, t, C)
    if not skip:
        x = _linear(x, proj, keep, B)
    if order is not None:
        x = _FromWindows.apply(x.reshape(-1, C), order).view(B, H, W, C)
        return _linear(x, proj, keep, B) if skip else x  # skip: the real tokens only
    x = _from_windows(x, B, pad_H, pad_W, (wh, ww), shift)
    if skip:  # the real tokens only through the output projection
        return F.linear(x[:, :H, :W, :].contiguous(), proj.weight, proj.bias)  # contiguous: addmm as before
    return x[:, :H, :W, :].contiguous()


def _same(x: Tensor) -> Tensor:
    return x


class WindowAttention(ShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttention`` (same parameters and names) computed by
    :func:`shifted_window_attention`."""

    def forward(self, x: Tensor, norm: nn.LayerNorm | None = None, keep: Runs = None) -> Tensor:
        """Attention on ``x``; with ``norm``, on ``norm(x)``, the norm's output recomputed in the
        backward pass instead of kept, and the projections' gradients computed for the samples
        ``keep`` names only (:func:`shifted_window_attention`)."""
        if self.attention_dropout or self.dropout:  # never in DEO's Swins; torchvision's own code
            return super().forward(x if norm is None else norm(x))
        return shifted_window_attention(
            x,
            self.qkv,
            self.proj,
            self.get_relative_position_bias(),
            self.window_size,
            self.num_heads,
            self.shift_size,
            norm,
            keep,
        )


class _NormMlp(torch.autograd.Function):
    """``linear(gelu(linear(layer_norm(x), w1, b1)), w2, b2)``, torchvision's ``norm2`` and MLP,
    keeping only ``x``, the norm's statistics and the first layer's output ``h`` for the backward
    pass.

    Autograd keeps the norm's output (for the first layer's weight gradient) and both the GELU's
    input and output (the GELU's own gradient, the second layer's weight gradient): the norm's
    output (the block's width per token) and the GELU's output (four times that) are the largest
    tensors a Swin block keeps that the backward pass can recompute. Here both are recomputed
    from what is kept (the same functions on the same values: the same bits), with the
    operations autograd runs for ``layer_norm``, ``addmm`` and ``gelu``: about a quarter less
    memory kept per block for one more layer norm and GELU.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, ln_w, ln_b, eps: float, w1: Tensor, b1, w2: Tensor, b2, keep: Runs = None
    ) -> Tensor:
        y, mean, rstd = _layer_norm(x, ln_w, ln_b, eps)
        h = F.linear(y, w1, b1)
        ctx.save_for_backward(x, mean, rstd, ln_w, ln_b, w1, w2, h)
        ctx.eps, ctx.has_bias, ctx.keep = eps, (b1 is not None, b2 is not None), keep
        return F.linear(F.gelu(h), w2, b2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, mean, rstd, ln_w, ln_b, w1, w2, h = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        hidden = h.shape[-1]
        rows = _row_slices(ctx.keep, grad2d.shape[0], x.shape[0])
        grad_w2 = _grad_weight(grad2d, F.gelu(h).reshape(-1, hidden), rows)
        grad_b2 = grad2d.sum(0) if ctx.has_bias[1] else None
        grad_h = torch.ops.aten.gelu_backward(_grad_input(grad2d, w2, rows).view(h.shape), h).reshape(
            -1, hidden
        )
        y = _layer_norm(x, ln_w, ln_b, ctx.eps)[0]
        grad_w1 = _grad_weight(grad_h, y.reshape(-1, y.shape[-1]), rows)
        grad_b1 = grad_h.sum(0) if ctx.has_bias[0] else None
        grad_y = _grad_input(grad_h, w1, rows).view(x.shape)
        grad_x, grad_ln_w, grad_ln_b = _layer_norm_backward(ctx, grad_y, x, mean, rstd, ln_w, ln_b)
        return grad_x, grad_ln_w, grad_ln_b, None, grad_w1, grad_b1, grad_w2, grad_b2, None


class SwinBlock(SwinTransformerBlock):
    """torchvision's ``SwinTransformerBlock`` (same parameters and names) that keeps less for the
    backward pass and can take its stochastic-depth draws from outside.

    When it trains on the CPU, both norms' outputs and the GELU's are recomputed in the backward
    pass (:class:`_NormLinear`, :class:`_NormMlp`). Stochastic depth: torchvision multiplies each
    residual branch by a per-sample draw (0 when dropped, ``1 / survival`` when kept); the block
    computes ``x + branch(x) * draw`` as torchvision does, with the draw made before the branch
    (nothing in the branch draws, so the generator gives the same numbers) when it trains on the
    CPU, so that the backward pass knows the dropped samples: their rows of the branch's output
    gradient are zero, and the projections' and the MLP's weight and input gradients are computed
    on the kept samples' rows only (:func:`_grad_weight`, :func:`_grad_input`; a tenth of the
    trunk's backward arithmetic at Swin-T's rates; the same forward values and input gradients,
    weight gradients summed over fewer rows). A merged pass of several inputs
    (:meth:`DeoSwin.forward_many`) draws every block's masks first, in the separate passes' order,
    and hands each block its share in ``drawn``.

    (Computing the forward branch for the kept samples only as well changes the tensors' sizes at
    every step: glibc's heap fragments, the process grew 0.4 GiB a step at batch 8 and the page
    faults cost more than the arithmetic saved, so it was taken out. The backward pass's products
    write into tensors of one size whatever the draw.)
    """

    #: Stochastic depth's draws for this block's two residuals, made beforehand (one merged pass
    #: of several inputs, :meth:`DeoSwin.forward_many`); ``None``: drawn in the block.
    drawn: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        x = self._residual(x, self._attention, 0)
        return self._residual(x, self._mlp, 1)

    def _recomputes(self, x: Tensor, norm: nn.Module) -> bool:
        """Whether a branch recomputes ``norm``'s output (and the GELU's) in the backward pass:
        when it trains on the CPU, eagerly, with a plain layer norm."""
        return (
            torch.is_grad_enabled()
            and x.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and type(norm) is nn.LayerNorm
            and norm.normalized_shape == (x.shape[-1],)
        )

    def _attention(self, x: Tensor, keep: Runs) -> Tensor:
        """torchvision's ``norm1`` and attention; the norm's output recomputed in the backward pass
        when :meth:`_recomputes` (:class:`_NormLinear`), and the projections' gradients computed
        for the samples ``keep`` names only."""
        if type(self.attn) is WindowAttention and self._recomputes(x, self.norm1):
            return self.attn(x, self.norm1, keep)
        return self.attn(self.norm1(x))

    def _mlp(self, x: Tensor, keep: Runs) -> Tensor:
        """torchvision's ``norm2`` and MLP (linear, GELU, dropout, linear, dropout); when it trains on
        the CPU without dropout, the norm's and the GELU's outputs are recomputed in the backward
        pass (:class:`_NormMlp`)."""
        fc1, act, drop1, fc2, drop2 = self.mlp
        norm = self.norm2
        if (
            not self._recomputes(x, norm)
            or (self.training and (drop1.p > 0 or drop2.p > 0))
            or type(act) is not nn.GELU
            or act.approximate != "none"
        ):
            return self.mlp(norm(x))
        return _NormMlp.apply(
            x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias, keep
        )

    def draws_first(self, x: Tensor) -> bool:
        """Whether a merged pass draws this block's stochastic depth for ``x`` beforehand: in
        training with a non-zero rate, on the CPU, eagerly."""
        sd = self.stochastic_depth
        return (
            sd.training
            and sd.p > 0.0
            and x.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and sd.mode == "row"
        )

    def draw(self, batch: int, like: Tensor) -> Tensor:
        """torchvision's stochastic depth draw for ``batch`` samples (``torchvision.ops.stochastic_depth``):
        ``(batch, 1, 1, 1)``, ``1 / survival`` where kept, 0 where dropped."""
        survival = 1.0 - self.stochastic_depth.p
        noise = torch.empty((batch,) + (1,) * (like.ndim - 1), dtype=like.dtype, device=like.device)
        noise = noise.bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return noise

    def _residual(self, x: Tensor, branch, which: int) -> Tensor:
        draw = self.drawn[which] if self.drawn is not None else None
        if draw is None and torch.is_grad_enabled() and self.draws_first(x):
            draw = self.draw(len(x), x)  # what torchvision draws after the branch: nothing else draws
        if draw is None:
            return x + self.stochastic_depth(branch(x, None))
        return x + branch(x, _kept_runs(draw)) * draw


class PatchMerging(TorchvisionPatchMerging):
    """torchvision's ``PatchMerging`` (same parameters and names) gathering each 2 x 2 block of
    tokens with one view and one copy.

    torchvision takes the four tokens as four strided slices and concatenates them; in the
    backward pass each slice's gradient is zero-filled at full size and the four are added. The
    same tokens in the same order (top-left, bottom-left, top-right, bottom-right along the
    channels) come from a reshape here, whose gradient is one permuted copy. The values are the
    same; only data movement differs.
    """

    def forward(self, x: Tensor) -> Tensor:
        *lead, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h, w = h + h % 2, w + w % 2
        x = x.view(*lead, h // 2, 2, w // 2, 2, c)
        n = len(lead)  # (..., h/2, row in block, w/2, column in block, c) -> (..., h/2, w/2, column, row, c)
        x = x.permute(*range(n), n, n + 2, n + 3, n + 1, n + 4).reshape(*lead, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


@dataclass(frozen=True)
class SwinShape:
    """A Swin's architecture as its tensors show it (:func:`swin_shape`)."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    mlp_ratio: float
    in_chans: int | None = None  # bands of the multispectral stem (None: the file has none)

    @property
    def size(self) -> tuple:
        """What decides the tensors' names and widths (all but the window)."""
        return (self.embed_dim, self.depths, self.num_heads, self.mlp_ratio)

    def describe(self) -> str:
        """``"Swin embed 128, depths 2,2,18,2, heads 4,8,16,32, window 7"`` (plus a non-default MLP ratio)."""
        text = (
            f"Swin embed {self.embed_dim}, depths {','.join(map(str, self.depths))}, "
            f"heads {','.join(map(str, self.num_heads))}, window {self.window_size}"
        )
        return text if self.mlp_ratio == 4.0 else f"{text}, mlp ratio {self.mlp_ratio:g}"


_BLOCK = re.compile(r"^features\.(\d+)\.(\d+)\.attn\.relative_position_bias_table$")


def swin_shape(state_dict: Mapping[str, Tensor]) -> SwinShape | None:
    """Read a Swin's architecture from a state dict in :class:`DeoSwin`'s names (prefixes stripped).

    The window ``w`` from each block's ``relative_position_bias_table`` (``(2w - 1)^2`` rows), the
    heads of a stage from its columns, the depths from the block indices under
    ``features.{0,2,4,6}``, the width from the first block's ``norm1`` and the MLP ratio from
    its first MLP layer. ``None`` when the dict is not a four-stage torchvision-style Swin;
    ``ValueError`` when its tables fit no square window or the window differs between blocks
    (torchvision builds one window for all stages).
    """
    tables: dict[int, dict[int, Tensor]] = {}
    for key, value in state_dict.items():
        m = _BLOCK.match(key)
        if m:
            tables.setdefault(int(m.group(1)), {})[int(m.group(2))] = value
    if sorted(tables) != list(STAGE_INDICES) or any(
        sorted(blocks) != list(range(len(blocks))) for blocks in tables.values()
    ):
        return None
    windows = set()
    for blocks in tables.values():
        for table in blocks.values():
            side = math.isqrt(int(table.shape[0])) if table.ndim == 2 else 0
            if side * side != table.shape[0] or side % 2 == 0:
                raise ValueError(
                    f"a relative position table of shape {tuple(table.shape)} fits no square window"
                )
            windows.add((side + 1) // 2)
    if len(windows) != 1:
        raise ValueError(f"the attention windows differ between blocks ({sorted(windows)})")
    norm = state_dict.get("features.0.0.norm1.weight")
    fc1 = state_dict.get("features.0.0.mlp.0.weight")
    if norm is None or fc1 is None:
        return None
    embed = int(norm.shape[0])
    stem = state_dict.get("conv_ms.0.weight")
    return SwinShape(
        embed_dim=embed,
        depths=tuple(len(tables[i]) for i in STAGE_INDICES),
        num_heads=tuple(int(tables[i][0].shape[1]) for i in STAGE_INDICES),
        window_size=windows.pop(),
        mlp_ratio=int(fc1.shape[0]) / embed,
        in_chans=int(stem.shape[1]) if stem is not None and stem.ndim == 4 else None,
    )


class DeoSwin(DeoEncoder):
    """Dual-stem Swin Transformer returning the four stage maps (NCHW, no final norm).

    Args:
        in_chans: bands of the multispectral stem (10 for DEO).
        embed_dim: stage-1 width (128 for Swin-B, 96 for Swin-T).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window (12 for DEO's Swin-B, docs/method.md §2.5; a checkpoint's
            own window is read from its tensors when it is loaded, :func:`swin_shape`).
        drop_path_rate: stochastic depth of the last block (torchvision scales it linearly).
        mlp_ratio: MLP width over block width.
    """

    ms_stem_name = "conv_ms"
    rgb_stem_name = "conv_rgb"

    def __init__(
        self,
        in_chans: int = 10,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int = 12,
        drop_path_rate: float = 0.5,
        mlp_ratio: float = 4.0,
    ):
        super().__init__(in_chans=in_chans, stem_stride=PATCH_SIZE)
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError("DeoSwin needs four stages (depths and num_heads of length 4)")
        trunk = SwinTransformer(
            patch_size=[PATCH_SIZE, PATCH_SIZE],
            embed_dim=embed_dim,
            depths=list(depths),
            num_heads=list(num_heads),
            window_size=[window_size, window_size],
            mlp_ratio=mlp_ratio,
            stochastic_depth_prob=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-5),
        )
        del trunk.features[0]  # the 3-band patch embedding; the stems replace it
        for m in trunk.modules():
            if type(m) is ShiftedWindowAttention:
                m.__class__ = WindowAttention  # same numbers, less copying (shifted_window_attention)
            elif type(m) is SwinTransformerBlock:
                m.__class__ = SwinBlock  # same numbers, dropped samples' branches not computed
            elif type(m) is TorchvisionPatchMerging:
                m.__class__ = PatchMerging  # same numbers, one copy instead of four slices
        self.features = trunk.features
        self.norm = trunk.norm
        self.conv_ms = _stem(in_chans, embed_dim)
        self.conv_rgb = _stem(3, embed_dim)
        self._channels = tuple(embed_dim * 2**i for i in range(4))

    @property
    def feature_channels(self) -> tuple[int, ...]:
        return self._channels

    @property
    def feature_strides(self) -> tuple[int, ...]:
        return (4, 8, 16, 32)

    @property
    def pooled_dim(self) -> int:
        return self._channels[-1]

    def feature_grid(self, height: int, width: int) -> list[tuple[int, int]]:
        h, w = ceil_div(height, PATCH_SIZE), ceil_div(width, PATCH_SIZE)
        grid = [(h, w)]
        for _ in range(3):
            h, w = ceil_div(h, 2), ceil_div(w, 2)
            grid.append((h, w))
        return grid

    def _forward_levels(
        self, x: Tensor, stem: nn.Module, need_maps: bool, need_pooled: bool
    ) -> tuple[list[Tensor], Tensor | None]:
        x, maps = self._trunk(stem(x), need_maps)  # the stem gives NHWC, as torchvision's blocks want
        pooled = self.norm(x).mean(dim=(1, 2)) if need_pooled else None
        return maps, pooled

    def _trunk(self, x: Tensor, need_maps: bool) -> tuple[Tensor, list[Tensor]]:
        maps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if need_maps and i in STAGE_INDICES:
                maps.append(x.permute(0, 3, 1, 2))
        return x, maps

    def forward_many(
        self, inputs: Sequence[Tensor], need_maps: Sequence[bool]
    ) -> list[tuple[list[Tensor], Tensor]]:
        """Same-size inputs through the trunk as one batch (each through its own stem), with the
        numbers and random draws of running every input alone, in order.

        In training on the CPU every block's stochastic depth is drawn first, input by input in
        the given order, exactly as the separate passes would draw it, and each merged pass takes
        its inputs' draws. A merged batch's rows go through the same row-wise operations (matrix
        products from :data:`MIN_ROWS_TO_SKIP_PADDING` rows on, layer norms, softmax, GELU); the
        pooled vector is averaged input by input. Same-size inputs of at most
        :data:`MAX_MERGED_TOKENS` stage-1 tokens together share a pass (twice the rows per matrix
        product, half the operator calls); the default, 0, runs every input alone, because a
        matrix product's rows need not keep their bits at another number of rows (see there).
        An input with fewer than :data:`MIN_ROWS_TO_SKIP_PADDING` tokens in its last stage runs
        alone (a smaller matrix product may take another kernel, whose rows differ in the last
        bits: 12 rows against 24 of width 512 do on a Sapphire Rapids Xeon). Elsewhere
        (evaluation, GPU, ``torch.compile``) the inputs run one by one.
        """
        blocks = [m for m in self.features.modules() if isinstance(m, SwinBlock)]
        if MAX_MERGED_TOKENS <= 0 or not inputs or not any(b.draws_first(inputs[0]) for b in blocks):
            return super().forward_many(inputs, need_maps)
        xs = [self.pad_input(x) for x in inputs]
        draws = [{b: (b.draw(len(x), x), b.draw(len(x), x)) for b in blocks if b.draws_first(x)} for x in xs]
        by_size: dict[tuple, list[int]] = {}
        for i, x in enumerate(xs):
            last_h, last_w = self.feature_grid(*x.shape[2:])[-1]
            # a matrix product of fewer rows can take another kernel (MIN_ROWS_TO_SKIP_PADDING):
            # an input that small in its last stage runs alone
            alone = len(x) * last_h * last_w < MIN_ROWS_TO_SKIP_PADDING
            by_size.setdefault(("alone", i) if alone else tuple(x.shape[2:]), []).append(i)
        groups = []
        for members in by_size.values():
            first_h, first_w = self.feature_grid(*xs[members[0]].shape[2:])[0]
            if sum(len(xs[i]) for i in members) * first_h * first_w > MAX_MERGED_TOKENS:
                groups += [[i] for i in members]  # large enough alone
            else:
                groups.append(members)
        out: list = [None] * len(xs)
        for members in groups:
            stemmed = [self.stem_for(inputs[i])(xs[i]) for i in members]
            tokens = stemmed[0] if len(stemmed) == 1 else torch.cat(stemmed)
            for b in blocks:
                if b in draws[members[0]]:
                    b.drawn = tuple(torch.cat([draws[i][b][r] for i in members]) for r in (0, 1))
            try:
                x, maps = self._trunk(tokens, any(need_maps[i] for i in members))
            finally:
                for b in blocks:
                    b.drawn = None
            normed = self.norm(x)
            start = 0
            for i in members:
                rows = slice(start, start + len(xs[i]))
                start = rows.stop
                levels = [m[rows] for m in maps] if need_maps[i] else []
                out[i] = (levels, normed[rows].mean(dim=(1, 2)))
        return out


@register_model(
    "deo_swin_b",
    family="swin",
    feature_channels=(128, 256, 512, 1024),
    feature_strides=(4, 8, 16, 32),
    pooled_dim=1024,
    input_size=224,
    default_layer=3,
    distill_levels=(2, 3),
    default_weights=DEO_SWIN_B_WEIGHTS,
    description="DEO Swin-B (87 M parameters, window 12), the paper's main model (docs/method.md §2.5)",
)
def deo_swin_b(**kwargs) -> DeoSwin:
    """Swin-B: embed 128, depths 2,2,18,2, heads 4,8,16,32, window 12, drop path 0.5."""
    args = dict(
        in_chans=DEO_S2_MANIFEST.num_bands,
        embed_dim=128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        window_size=12,
        drop_path_rate=0.5,
    )
    return DeoSwin(**{**args, **kwargs})


@register_model(
    "deo_swin_t",
    family="swin",
    feature_channels=(96, 192, 384, 768),
    feature_strides=(4, 8, 16, 32),
    pooled_dim=768,
    input_size=224,
    default_layer=3,
    distill_levels=(2, 3),
    description="DEO Swin-T (torchvision defaults: window 7, drop path 0.2), the ablation size",
)
def deo_swin_t(**kwargs) -> DeoSwin:
    """Swin-T: embed 96, depths 2,2,6,2, heads 3,6,12,24, window 7, drop path 0.2."""
    args = dict(
        in_chans=DEO_S2_MANIFEST.num_bands,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        drop_path_rate=0.2,
    )
    return DeoSwin(**{**args, **kwargs})


@register_model(
    "deo_swin_test",
    family="swin",
    feature_channels=(16, 32, 64, 128),
    feature_strides=(4, 8, 16, 32),
    pooled_dim=128,
    input_size=64,
    default_layer=3,
    distill_levels=(2, 3),
    description="tiny Swin for tests (same code paths: two stems, shifted and padded windows)",
    test_only=True,
)
def deo_swin_test(**kwargs) -> DeoSwin:
    """Tiny Swin (about 0.6 M parameters): embed 16, depths 2,2,2,2, window 6."""
    args = dict(
        in_chans=DEO_S2_MANIFEST.num_bands,
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 2, 4),
        window_size=6,
        drop_path_rate=0.1,
    )
    return DeoSwin(**{**args, **kwargs})
