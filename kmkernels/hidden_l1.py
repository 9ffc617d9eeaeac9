"""Layer-normalised L1 distance between student and teacher hidden states.

    hidden = (1/L) * sum_l  sum_{n,d} |h_s^l - h_t^l| / sum_{n,d} |h_t^l|

One scalar per layer (mean|h_s - h_t| / mean|h_t| over the kept positions, not a per-token
normalisation), averaged over layers. The embedding output, which the reference code also
averaged in, is identically zero under LoRA and is left out (a constant factor L/(L+1)).
A layer whose teacher norm is 0 (e.g. no kept position) contributes 0 and no gradient.

The Triton path reads each layer's h_s and h_t once in forward (per-block partial sums, reduced
deterministically, no atomics) and once more in backward to write sign(h_s - h_t) * g / (L Z_l):
5 tensor passes in all, the floor for a backward that does not keep a sign buffer alive.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .utils import HAS_TRITON, check_operands, flatten_mask, resolve_backend

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _l1_partial_kernel(
        HS_PTRS, HT_PTRS, HS0, HT0, ROW_KEEP, PART,
        N, H, stride_s, stride_t, NBLK, L_TOTAL, LAYER0,
        BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, HAS_MASK: tl.constexpr,
    ):
        """Grid (row blocks, layers of the group). Per row block and layer: sum|hs - ht| and sum|ht|
        over BLOCK_N rows x all of H in fp32, stored at PART[0 or 1, LAYER0 + layer, block].
        HS_PTRS / HT_PTRS hold each layer's data address; HS0 / HT0 (layer 0) give the dtypes."""
        pid = tl.program_id(0)
        j = tl.program_id(1)
        hs = tl.load(HS_PTRS + j).to(tl.pointer_type(HS0.dtype.element_ty))
        ht = tl.load(HT_PTRS + j).to(tl.pointer_type(HT0.dtype.element_ty))
        rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < N
        if HAS_MASK:
            row_ok = row_ok & (tl.load(ROW_KEEP + rows, mask=rows < N, other=0) != 0)
        acc_d = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
        acc_n = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            m = row_ok[:, None] & (cols[None, :] < H)
            s = tl.load(hs + rows[:, None] * stride_s + cols[None, :], mask=m, other=0.0).to(tl.float32)
            t = tl.load(ht + rows[:, None] * stride_t + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc_d += tl.abs(s - t)
            acc_n += tl.abs(t)
        slot = (LAYER0 + j).to(tl.int64) * NBLK + pid
        tl.store(PART + slot, tl.sum(tl.sum(acc_d, axis=1), axis=0))
        tl.store(PART + L_TOTAL * NBLK + slot, tl.sum(tl.sum(acc_n, axis=1), axis=0))

    @triton.jit
    def _l1_grad_kernel(
        HS_PTRS, HT_PTRS, HS0, HT0, ROW_KEEP, G, SCALE,
        N, H, stride_s, stride_t, stride_gl, stride_g,
        BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, HAS_MASK: tl.constexpr,
    ):
        """Grid (row blocks, column blocks, layers of the group). G[j] = sign(hs - ht) * SCALE[j] on
        kept rows, 0 elsewhere; G is [layers, N, H] in the student dtype."""
        j = tl.program_id(2)
        hs = tl.load(HS_PTRS + j).to(tl.pointer_type(HS0.dtype.element_ty))
        ht = tl.load(HT_PTRS + j).to(tl.pointer_type(HT0.dtype.element_ty))
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        inb = (rows[:, None] < N) & (cols[None, :] < H)
        s = tl.load(hs + rows[:, None] * stride_s + cols[None, :], mask=inb, other=0.0).to(tl.float32)
        t = tl.load(ht + rows[:, None] * stride_t + cols[None, :], mask=inb, other=0.0).to(tl.float32)
        d = s - t
        g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)) * tl.load(SCALE + j)
        if HAS_MASK:
            keep = tl.load(ROW_KEEP + rows, mask=rows < N, other=0) != 0
            g = tl.where(keep[:, None], g, 0.0)
        g_base = G + j.to(tl.int64) * stride_gl
        tl.store(g_base + rows[:, None] * stride_g + cols[None, :], g.to(G.dtype.element_ty), mask=inb)


def _blocks(H: int, backward: bool) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_H, num_warps). From an H100 sweep on [8192, 4096] bf16 (bench/tune_blocks.py):
    forward one row per program with H in one or two 2048-wide steps (2.34 TB/s), backward 8 x 2048
    tiles (2.73 TB/s); 8 warps for the wide tiles."""
    bh = 16
    while bh < H and bh < 2048:
        bh *= 2
    bn = 1 if not backward else max(1, min(8, 16384 // bh))
    return bn, bh, 8 if bh >= 1024 else 4


def _runs(hs, ht) -> List[List[int]]:
    """Runs of consecutive layers that one launch can serve: same H, dtypes and row strides
    (all layers in one run, usually; mixed hidden sizes split them)."""
    runs: List[List[int]] = []
    key = None
    for l, (s, t) in enumerate(zip(hs, ht)):
        k = (s.shape[1], s.dtype, t.dtype, s.stride(0), t.stride(0))
        if runs and k == key:
            runs[-1].append(l)
        else:
            runs.append([l])
            key = k
    return runs


def _ptr_table(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64 data addresses on the tensors' device. Pinned + non_blocking on CUDA: a pageable
    host-to-device copy would make the host wait for the GPU."""
    dev = tensors[0].device
    table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, pin_memory=dev.type == "cuda")
    return table.to(dev, non_blocking=True)


def _layer_sums(hs, ht, row_keep, backend) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum|s - t|, sum|t|) over kept rows of every layer: two fp32 [L] tensors."""
    N = hs[0].shape[0]
    if backend == "torch":
        d, z = [], []
        for s, t in zip(hs, ht):
            dl = (s.float() - t.float()).abs().sum(-1)
            zl = t.float().abs().sum(-1)
            if row_keep is not None:
                k = row_keep.to(torch.float32)
                dl, zl = dl * k, zl * k
            d.append(dl.sum())
            z.append(zl.sum())
        return torch.stack(d), torch.stack(z)
    L = len(hs)
    bn = _blocks(hs[0].shape[1], False)[0]  # the row block does not depend on H
    nblk = triton.cdiv(N, bn) if N > 0 else 0
    # One buffer of per-block partials for all layers and one launch per group of alike layers
    # (one in all, usually): at 32 layers, per-layer launches cost as much as the reads.
    part = torch.zeros((2, L, max(nblk, 1)), device=hs[0].device, dtype=torch.float32)
    if nblk > 0:
        for run in _runs(hs, ht):
            s0, t0 = hs[run[0]], ht[run[0]]
            _, bh, warps = _blocks(s0.shape[1], False)
            _l1_partial_kernel[(nblk, len(run))](
                _ptr_table([hs[l] for l in run]), _ptr_table([ht[l] for l in run]), s0, t0,
                row_keep if row_keep is not None else s0, part, N, s0.shape[1], s0.stride(0), t0.stride(0),
                nblk, L, run[0], BLOCK_N=bn, BLOCK_H=bh, HAS_MASK=row_keep is not None, num_warps=warps,
            )
    sums = part.sum(-1)  # deterministic: fixed-order reduction of per-block partials
    return sums[0], sums[1]


def _layer_grads(hs, ht, row_keep, scales, backend, needed) -> List[Optional[torch.Tensor]]:
    """sign(h_s - h_t) * scales[l] on kept rows, 0 elsewhere, per layer in h_s's dtype (None where
    not needed). ``scales``: fp32 [L]."""
    L = len(hs)
    grads: List[Optional[torch.Tensor]] = [None] * L
    if backend == "torch":
        for l in range(L):
            if not needed[l]:
                continue
            g = torch.sub(hs[l].float(), ht[l].float()).sign_().mul_(scales[l])
            if row_keep is not None:
                g.mul_(row_keep.to(torch.float32)[:, None])
            grads[l] = g.to(hs[l].dtype)
        return grads
    N = hs[0].shape[0]
    for run in _runs(hs, ht):
        if not all(needed[l] for l in run):  # a layer without gradient splits the run (rare)
            split = [[l] for l in run if needed[l]]
        else:
            split = [run]
        for part in split:
            s0, t0 = hs[part[0]], ht[part[0]]
            H = s0.shape[1]
            g = torch.empty((len(part), N, H), device=s0.device, dtype=s0.dtype)  # one allocation per run
            if N > 0:
                bn, bh, warps = _blocks(H, True)
                _l1_grad_kernel[(triton.cdiv(N, bn), triton.cdiv(H, bh), len(part))](
                    _ptr_table([hs[l] for l in part]), _ptr_table([ht[l] for l in part]), s0, t0,
                    row_keep if row_keep is not None else s0, g, scales[part[0]:part[-1] + 1],
                    N, H, s0.stride(0), t0.stride(0), g.stride(0), g.stride(1),
                    BLOCK_N=bn, BLOCK_H=bh, HAS_MASK=row_keep is not None, num_warps=warps,
                )
            for j, l in enumerate(part):
                grads[l] = g[j]
    return grads


class HiddenL1Function(torch.autograd.Function):
    """Inputs: row_keep (int8 [N] or None), teacher_norms (fp32 [L] or None), L, backend, then L student
    tensors [N, H_l] and L teacher tensors [N, H_l]. Output: fp32 scalar.

    Saves only the inputs (no per-layer |h_s - h_t| temporaries, unlike plain autograd) and
    recomputes sign(h_s - h_t) in backward.
    """

    @staticmethod
    def forward(ctx, row_keep, teacher_norms, L: int, backend: str, *hiddens):
        hs, ht = hiddens[:L], hiddens[L:]
        diff, norm = _layer_sums(hs, ht, row_keep, backend)
        if teacher_norms is not None:
            norm = teacher_norms.to(device=diff.device, dtype=torch.float32)
        per_layer = torch.where(norm > 0, diff / torch.where(norm > 0, norm, 1.0), 0.0)
        ctx.save_for_backward(row_keep if row_keep is not None else torch.empty(0), norm, *hiddens)
        ctx.L, ctx.backend, ctx.has_mask = L, backend, row_keep is not None
        return per_layer.mean()

    @staticmethod
    def backward(ctx, grad_out):
        row_keep, norm, *hiddens = ctx.saved_tensors
        row_keep = row_keep if ctx.has_mask else None
        L = ctx.L
        hs, ht = hiddens[:L], hiddens[L:]
        # d loss / d h_s^l = sign(h_s - h_t) * g / (L * Z_l); zero where Z_l == 0.
        scales = torch.where(norm > 0, grad_out.float() / (L * torch.where(norm > 0, norm, 1.0)), 0.0)
        grads = _layer_grads(hs, ht, row_keep, scales, ctx.backend, ctx.needs_input_grad[4:4 + L])
        return (None, None, None, None, *grads, *([None] * L))


def _as_layer_list(x, name: str):
    if isinstance(x, torch.Tensor):
        if x.dim() < 2:
            raise ValueError(f"{name} as a tensor must be [L, ..., H], got shape {tuple(x.shape)}")
        return list(x.unbind(0))
    if not isinstance(x, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in x):
        raise ValueError(f"{name} must be a sequence of tensors [..., H] or one [L, ..., H] tensor")
    return list(x)


def hidden_l1(
    student_hiddens: Sequence[torch.Tensor],
    teacher_hiddens: Union[Sequence[torch.Tensor], torch.Tensor],
    *,
    mask: Optional[torch.Tensor] = None,
    teacher_norms: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean over layers of sum|h_s - h_t| / sum|h_t| (sums over kept positions and hidden dims).
    A layer whose sum|h_t| is 0 (no position kept, or an all-zero teacher) adds 0 and no gradient.

    Args:
        student_hiddens: L tensors [..., H_l] (H may differ per layer; leading shapes equal).
        teacher_hiddens: L tensors of the same shapes, or one [L, ..., H] tensor. No gradient.
        mask: bool, leading shape; False positions are left out of both sums.
        teacher_norms: optional fp32 [L] precomputed sum|h_t| over the kept positions
            (the teacher cache stores them), used instead of recomputing.
        backend: 'auto' | 'triton' | 'torch'.
    Returns:
        fp32 scalar. Gradients go to the student hiddens only.
    """
    hs = _as_layer_list(student_hiddens, "student_hiddens")
    ht = _as_layer_list(teacher_hiddens, "teacher_hiddens")
    if len(hs) == 0:
        raise ValueError("student_hiddens is empty: need at least one layer")
    if len(hs) != len(ht):
        raise ValueError(f"layer counts differ: {len(hs)} student_hiddens vs {len(ht)} teacher_hiddens")
    lead = hs[0].shape[:-1]
    for l, (s, t) in enumerate(zip(hs, ht)):
        if s.shape != t.shape:
            raise ValueError(f"layer {l}: student_hiddens shape {tuple(s.shape)} != teacher_hiddens shape {tuple(t.shape)}")
        if s.shape[:-1] != lead:
            raise ValueError(f"layer {l}: leading shape {tuple(s.shape[:-1])} differs from layer 0's {tuple(lead)}")
    # Float tensors on one device for every layer: the Triton path reads them through one table of addresses.
    check_operands("hidden_l1", [(f"student_hiddens[{l}]", s) for l, s in enumerate(hs)]
                     + [(f"teacher_hiddens[{l}]", t) for l, t in enumerate(ht)])
    if teacher_norms is not None:
        if not isinstance(teacher_norms, torch.Tensor) or tuple(teacher_norms.shape) != (len(hs),):
            raise ValueError(f"teacher_norms must be a [L]={len(hs)} tensor, got {getattr(teacher_norms, 'shape', teacher_norms)}")
    be = resolve_backend(backend, hs[0].device)
    keep = flatten_mask(mask, lead)
    hs2 = [s.reshape(-1, s.shape[-1]) for s in hs]
    ht2 = [t.detach().reshape(-1, t.shape[-1]) for t in ht]
    hs2 = [x if x.stride(-1) == 1 else x.contiguous() for x in hs2]
    ht2 = [x if x.stride(-1) == 1 else x.contiguous() for x in ht2]
    row_keep = keep.to(device=hs2[0].device, dtype=torch.int8).contiguous() if keep is not None else None
    return HiddenL1Function.apply(row_keep, teacher_norms, len(hs2), be, *hs2, *ht2)


class HiddenL1(nn.Module):
    """Module form of :func:`hidden_l1`."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, student_hiddens, teacher_hiddens, mask=None, teacher_norms=None):
        return hidden_l1(student_hiddens, teacher_hiddens, mask=mask, teacher_norms=teacher_norms, backend=self.backend)
