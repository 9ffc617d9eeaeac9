"""Grouped per-document LoRA: every row of a batch goes through its own adapter, with autograd.

    y[n] = scaling[d] * (x[n] @ A_d^T) @ B_d^T,   d = adapter_ids[n]   (d = -1: y[n] = 0)

which is exactly PEFT's LoRA delta. Shapes: x [N, in], A [D, r, in], B [D, out, r].

Kernels (Triton; the same ones serve training and no-grad serving):
  * Rows are grouped by adapter through a sorted index (``order``), never by copying x
    (the vLLM/Punica design). A tile table maps each program to (segment, first row, last row);
    it is built on the device with no host sync and a fixed upper bound on the number of tiles.
    Rows with id -1 form one extra "zero" segment whose tiles just write zeros.
  * ``_seg_gemm_kernel``: Y[row] = scale[d] * X[row] @ W_d^T, gathering rows through ``order``.
    With W = A it is the shrink (x -> h, K = in), with W = B the expand (h -> y, K = r); with
    transposed strides it gives dH = s * dy @ B and dX = dH @ A in backward.
  * ``_seg_outer_kernel``: OUT_d = scale[d] * sum_{rows of d} L[row]^T R[row], the per-adapter
    reductions dA = dH^T x and dB = s * dy^T h, both in one launch, accumulated in fp32 in
    registers, one program per output tile, so they are deterministic (no atomics).
  * A and B may be fp32 master weights under 16-bit activations (what training holds): the
    kernels round them to the activations' dtype in registers, as autocast would, and write dA,
    dB in fp32, with no cast kernels per layer.
The torch path loops over the adapters present (fp32 math) and is the oracle's neighbour. A layer
whose input is [B, T, in] with one slot per sequence (training, generation) takes two bmm calls
instead (``_sequence_lora_torch``); without autocast on a plain nn.Linear its adds go inside the
base GEMMs' outputs, forward and backward (``SequenceLoRALinearFunction``).

An MoE block's experts, 3-D weights in transformers 5, get slots of their own (``GroupedLoRAExperts``):
PEFT's ``target_parameters`` LoRA, W_e + s B_e A_e, computed as s B_e (A_e x) per routed row where the
experts are built on transformers' experts interface, else in weight space one slot's W + delta at a time.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint
from torch import nn

from .utils import HAS_TRITON, check_operands, naming_file_on_error, resolve_backend

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _seg_gemm_kernel(
        X, W, Y, ORDER, TILE_SEG, TILE_R0, TILE_R1, SCALE,
        N_OUT, K, ZERO_SEG,
        stride_xm, stride_xk, stride_wd, stride_wn, stride_wk, stride_ym, stride_yn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """Grid: (max_tiles, cdiv(N_OUT, BLOCK_N)). Programs past the real tile count exit."""
        tile = tl.program_id(0)
        seg = tl.load(TILE_SEG + tile)
        if seg < 0:
            return
        r0 = tl.load(TILE_R0 + tile)
        r1 = tl.load(TILE_R1 + tile)
        offs_r = r0 + tl.arange(0, BLOCK_M)
        row_ok = offs_r < r1
        rows = tl.load(ORDER + offs_r, mask=row_ok, other=0).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        out_mask = row_ok[:, None] & (offs_n[None, :] < N_OUT)
        y_ptrs = Y + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
        if seg == ZERO_SEG:  # rows without an adapter
            tl.store(y_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=Y.dtype.element_ty), mask=out_mask)
            return
        offs_k = tl.arange(0, BLOCK_K)
        w_base = W + seg.to(tl.int64) * stride_wd
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(X + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
            w = tl.load(w_base + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=(kk[:, None] < K) & (offs_n[None, :] < N_OUT), other=0.0)
            if UPCAST:
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                # fp32 master weights are rounded to the activations' dtype here, in registers,
                # which is what autocast does to them, without a cast kernel per layer and call
                acc += tl.dot(x, w.to(x.dtype))
        if HAS_SCALE:
            acc = acc * tl.load(SCALE + seg)
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _outer_tile(
        L, R, OUT, ORDER, start, count, SCALE, d, P, Q, tile, TILES_Q,
        stride_lm, stride_lp, stride_rm, stride_rq, stride_od, stride_op, stride_oq,
        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
        HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One [BLOCK_P, BLOCK_Q] tile of OUT[d] = scale[d] * sum over the segment's rows of L[row]^T R[row]."""
        offs_p = (tile // TILES_Q) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_q = (tile % TILES_Q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        for m0 in range(0, count, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < count
            rows = tl.load(ORDER + start + offs_m, mask=m_ok, other=0).to(tl.int64)
            lt = tl.load(L + rows[None, :] * stride_lm + offs_p[:, None] * stride_lp,
                         mask=m_ok[None, :] & (offs_p[:, None] < P), other=0.0)  # [BP, BM]
            r = tl.load(R + rows[:, None] * stride_rm + offs_q[None, :] * stride_rq,
                        mask=m_ok[:, None] & (offs_q[None, :] < Q), other=0.0)  # [BM, BQ]
            if UPCAST:
                acc += tl.dot(lt.to(tl.float32), r.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(lt, r)
        if HAS_SCALE:
            acc = acc * tl.load(SCALE + d)
        tl.store(OUT + d.to(tl.int64) * stride_od + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq,
                 acc.to(OUT.dtype.element_ty), mask=(offs_p[:, None] < P) & (offs_q[None, :] < Q))

    @triton.jit
    def _seg_outer_kernel(
        ORDER, SEG_START, SEG_COUNT,
        L1, R1, OUT1, SCALE1, P1, Q1, TILES_Q1, NUM_TILES1,
        s1_lm, s1_lp, s1_rm, s1_rq, s1_od, s1_op, s1_oq,
        L2, R2, OUT2, SCALE2, P2, Q2, TILES_Q2,
        s2_lm, s2_lp, s2_rm, s2_rq, s2_od, s2_op, s2_oq,
        BM1: tl.constexpr, BP1: tl.constexpr, BQ1: tl.constexpr, HAS_SCALE1: tl.constexpr, UPCAST1: tl.constexpr,
        BM2: tl.constexpr, BP2: tl.constexpr, BQ2: tl.constexpr, HAS_SCALE2: tl.constexpr, UPCAST2: tl.constexpr,
        TWO: tl.constexpr,
    ):
        """Per-adapter reductions, up to two problems (dA and dB) in one launch.

        Grid: (D, NUM_TILES1 + tiles of problem 2). fp32 accumulation in registers, one program per
        output tile (deterministic, no atomics); empty segments write 0.
        """
        d = tl.program_id(0)
        t = tl.program_id(1)
        start = tl.load(SEG_START + d)
        count = tl.load(SEG_COUNT + d)
        if t < NUM_TILES1:
            _outer_tile(L1, R1, OUT1, ORDER, start, count, SCALE1, d, P1, Q1, t, TILES_Q1,
                        s1_lm, s1_lp, s1_rm, s1_rq, s1_od, s1_op, s1_oq, BM1, BP1, BQ1, HAS_SCALE1, UPCAST1)
        elif TWO:
            _outer_tile(L2, R2, OUT2, ORDER, start, count, SCALE2, d, P2, Q2, t - NUM_TILES1, TILES_Q2,
                        s2_lm, s2_lp, s2_rm, s2_rq, s2_od, s2_op, s2_oq, BM2, BP2, BQ2, HAS_SCALE2, UPCAST2)


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    b = lo
    while b < n and b < hi:
        b *= 2
    return b


# ----------------------------------------------------------------------------------------------
# Segment table: rows sorted by adapter, tiles of BLOCK_M rows within each adapter
# ----------------------------------------------------------------------------------------------
@dataclass
class Segments:
    """Rows grouped by adapter. Built once per batch and shared by every LoRA layer.

    order: int32 [N] row indices sorted by adapter (id -1 rows last, as segment D).
    seg_start, seg_count: int32 [D + 1] (segment D holds the rows without adapter).
    tile_seg, tile_r0, tile_r1: int32 [max_tiles]; tile_seg = -1 marks unused programs.
    """
    num_adapters: int
    block_m: int
    order: torch.Tensor
    seg_start: torch.Tensor
    seg_count: torch.Tensor
    tile_seg: torch.Tensor
    tile_r0: torch.Tensor
    tile_r1: torch.Tensor


SEG_BLOCK_M = 64  # rows per tile of the shrink / expand kernels (H100 sweep, bench/tune_blocks.py)


def build_segments(adapter_ids: torch.Tensor, num_adapters: int, block_m: int = SEG_BLOCK_M) -> Segments:
    """Sort rows by adapter and cut each adapter's rows into tiles, on device, without a host sync."""
    ids = adapter_ids.reshape(-1).to(torch.int64)
    N, D = ids.numel(), num_adapters
    dev = ids.device
    key = torch.where(ids < 0, torch.full_like(ids, D), ids)
    # narrow keys: the radix sort makes one pass per key byte (8 for int64, 2 for int16)
    order = torch.argsort(key.to(torch.int16) if D < 2**15 - 1 else key, stable=True)
    counts = torch.zeros(D + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    seg_start = torch.cumsum(counts, 0) - counts
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    tile_start = tile_end - tiles
    max_tiles = max(1, (N + block_m - 1) // block_m + min(D + 1, N))  # each segment wastes < 1 tile
    p = torch.arange(max_tiles, device=dev)
    seg = torch.searchsorted(tile_end, p, right=True)
    valid = seg <= D
    seg_c = seg.clamp(max=D)
    r0 = seg_start[seg_c] + (p - tile_start[seg_c]) * block_m
    r1 = torch.minimum(r0 + block_m, seg_start[seg_c] + counts[seg_c])
    i32 = torch.int32
    return Segments(D, block_m, order.to(i32), seg_start.to(i32), counts.to(i32),
                    torch.where(valid, seg_c, -1).to(i32), r0.to(i32), r1.to(i32))


def _gemm_config(n_out: int, k: int, upcast: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of _seg_gemm_kernel; rows per tile come from the
    segment table (SEG_BLOCK_M)."""
    bn = _block(n_out, 16, 64 if upcast else 128)
    if upcast:  # fp32 operands: smaller tiles keep the ieee dot within registers / shared memory
        return bn, _block(k, 16, 64), 4, 2
    if n_out <= 64:
        # shrink (n_out = r): a long K loop over x; deep K tiles and 3 stages keep enough bytes in
        # flight (H100 sweep, bench/tune_blocks.py: 1.78 TB/s at N=8192, 4096->16, D=32)
        return bn, _block(k, 16, 256 if bn <= 32 else 128), 4, 3
    # expand (K = r): one K step, wide output tiles, 8 warps to store them (1.98 TB/s)
    return bn, _block(k, 16, 64), 8, 1


def _outer_config(P: int, Q: int, upcast: bool) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_P, BLOCK_Q) of _seg_outer_kernel. 16-bit: 128-row steps and 128-wide tiles
    (H100 sweep: 1.75 TB/s for dA and dB at D=32)."""
    hi, bm = (64, 32) if upcast else (128, 128)
    return bm, _block(P, 16, hi), _block(Q, 16, hi)


def _seg_gemm(x, w, w_strides, n_out, k, seg: Segments, scale: Optional[torch.Tensor], out: torch.Tensor):
    """out[row] = scale[d] * x[row] @ W_d^T, W_d[n, k] at w + d*sd + n*sn + k*sk (strides given)."""
    N = x.shape[0]
    if N == 0 or n_out == 0:
        return out
    sd, sn, sk = w_strides
    upcast = x.dtype == torch.float32  # 16-bit x: W (its dtype or fp32) is rounded to x's dtype in the kernel
    bn, bk, warps, stages = _gemm_config(n_out, k, upcast)
    grid = (seg.tile_seg.numel(), triton.cdiv(n_out, bn))
    _seg_gemm_kernel[grid](
        x, w, out, seg.order, seg.tile_seg, seg.tile_r0, seg.tile_r1, scale if scale is not None else x,
        n_out, k, seg.num_adapters,
        x.stride(0), x.stride(1), sd, sn, sk, out.stride(0), out.stride(1),
        BLOCK_M=seg.block_m, BLOCK_N=bn, BLOCK_K=bk, HAS_SCALE=scale is not None, UPCAST=upcast,
        num_warps=warps, num_stages=stages,
    )
    return out


def _seg_outer(problems, seg: Segments):
    """For each (lmat, rmat, scale, out) in ``problems`` (one or two, one launch):
    out[d] = scale[d] * lmat[rows_d]^T @ rmat[rows_d]; out [D, P, Q] (fp32 masters stay fp32)."""
    problems = [pb for pb in problems if pb[3].numel() > 0]
    if not problems:
        return
    D = problems[0][3].shape[0]
    args, consts, tiles = [], [], []
    for lmat, rmat, scale, out in problems:
        _, P, Q = out.shape
        upcast = lmat.dtype != rmat.dtype or lmat.dtype == torch.float32
        bm, bp, bq = _outer_config(P, Q, upcast)
        tq = triton.cdiv(Q, bq)
        tiles.append(triton.cdiv(P, bp) * tq)
        args.append([lmat, rmat, out, scale if scale is not None else lmat, P, Q, tq])
        args[-1] += [lmat.stride(0), lmat.stride(1), rmat.stride(0), rmat.stride(1),
                     out.stride(0), out.stride(1), out.stride(2)]
        consts.append(dict(BM=bm, BP=bp, BQ=bq, HAS_SCALE=scale is not None, UPCAST=upcast))
    two = len(problems) == 2
    if not two:  # the second problem's slots are never read
        args.append(args[0])
        consts.append(consts[0])
    a1, a2 = args
    _seg_outer_kernel[(D, sum(tiles))](
        seg.order, seg.seg_start, seg.seg_count,
        *a1[:7], tiles[0], *a1[7:], *a2,
        **{f"{k}{i}": v for i, c in ((1, consts[0]), (2, consts[1])) for k, v in c.items()},
        TWO=two, num_warps=4, num_stages=2,
    )


class GroupedLoRAFunction(torch.autograd.Function):
    """Triton grouped LoRA. x [N, in] (fp32/fp16/bf16); A [D, r, in], B [D, out, r] in x's dtype or
    fp32 (master weights: rounded to x's dtype inside the kernels, their grads written in fp32);
    scaling fp32 [D]."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling, seg: Segments):
        N = x.shape[0]
        D, r, din = lora_a.shape
        dout = lora_b.shape[1]
        # shrink: h = x @ A_d^T, kept in x's dtype (as PEFT does between lora_A and lora_B)
        h = torch.empty((N, r), device=x.device, dtype=x.dtype)
        _seg_gemm(x, lora_a, (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)), r, din, seg, None, h)
        # expand: y = scaling_d * h @ B_d^T; rows with id -1 get zeros
        y = torch.empty((N, dout), device=x.device, dtype=x.dtype)
        _seg_gemm(h, lora_b, (lora_b.stride(0), lora_b.stride(1), lora_b.stride(2)), dout, r, seg, scaling, y)
        ctx.save_for_backward(x, lora_a, lora_b, scaling, h)
        ctx.seg = seg
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_a, lora_b, scaling, h = ctx.saved_tensors
        seg = ctx.seg
        dy = dy.contiguous()
        N, din = x.shape
        D, r, _ = lora_a.shape
        dout = lora_b.shape[1]
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        dx = da = db = None
        outer = []
        if need_x or need_a:
            # dH = s_d * dy @ B_d: W_d[n=r, k=out] = B[d, k, n]; every row is written (id -1: zeros)
            dh = torch.empty((N, r), device=x.device, dtype=x.dtype)
            _seg_gemm(dy, lora_b, (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)), r, dout, seg, scaling, dh)
            if need_x:
                # dX = dH @ A_d: W_d[n=in, k=r] = A[d, k, n]; id -1 rows get zeros
                dx = torch.empty_like(x)
                _seg_gemm(dh, lora_a, (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)), din, r, seg, None, dx)
            if need_a:
                da = torch.empty_like(lora_a)
                outer.append((dh, x, None, da))
        if need_b:
            db = torch.empty_like(lora_b)
            outer.append((dy, h, scaling, db))
        _seg_outer(outer, seg)  # dA = dH^T x and dB = s * dy^T h in one launch
        return dx, da, db, None, None


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the torch paths' LoRA matmuls: the autocast dtype under autocast (the matmuls would
    be cast to it anyway), else at least fp32."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(x.dtype, torch.float32)


def _grouped_lora_torch(x, lora_a, lora_b, adapter_ids, scaling):
    """Rows grouped by adapter (a no-op when the ids are already sorted, as in a batch of whole
    sequences in slot order), one contiguous matmul pair per adapter present, fp32 math (the
    autocast dtype under autocast, where the matmuls would be cast to it anyway); autograd
    does the rest. split/cat keep the backward at one pass over x: a loop of per-adapter
    index_adds or slices copied or zero-filled the whole [N, *] tensor once per adapter, which was
    half of a CPU training step at D=8."""
    ids = adapter_ids.reshape(-1)
    D, dout = lora_a.shape[0], lora_b.shape[1]
    counts = torch.bincount(ids + 1, minlength=D + 1)  # [no adapter, adapter 0, ...]
    ordered = (ids[1:] >= ids[:-1]).all().reshape(1) if ids.numel() > 1 else counts.new_ones(1)
    stats = torch.cat([counts, ordered.to(counts.dtype)]).tolist()  # one host sync
    counts, ordered = stats[:-1], bool(stats[-1])
    math = _math_dtype(x)
    if ordered:
        xs = x.to(math)
    else:
        order = torch.argsort(ids, stable=True)
        xs = x.index_select(0, order).to(math)
    parts = torch.split(xs, counts)
    pieces = [xs.new_zeros((counts[0], dout))]
    present = [d for d in range(D) if counts[d + 1]]
    # With no adapter present, one empty slice keeps the output in the graph (zero grads, not errors).
    for d in present or [0]:
        y_d = (parts[d + 1] @ lora_a[d].to(math).T) @ lora_b[d].to(math).T * scaling[d]
        pieces.append(y_d.to(math))
    ys = torch.cat(pieces)
    if not ordered:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        ys = ys.index_select(0, inverse)
    return ys.to(x.dtype)


def _check_lora_args(x, lora_a, lora_b, adapter_ids, scaling):
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be [N, in], got {getattr(x, 'shape', type(x).__name__)}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b), ("adapter_ids", adapter_ids)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(f"lora_a must be [D, r, in] and lora_b [D, out, r], got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    D, r, din = lora_a.shape
    if D == 0:
        raise ValueError("lora_a holds no adapters (D=0); every row's delta would be zero, so skip the call")
    if lora_b.shape[0] != D or lora_b.shape[2] != r:
        raise ValueError(f"lora_b must be [D={D}, out, r={r}], got {tuple(lora_b.shape)}")
    if x.shape[1] != din:
        raise ValueError(f"x [N, in] has in={x.shape[1]} but lora_a [D, r, in] has in={din}")
    if adapter_ids.shape != (x.shape[0],):
        raise ValueError(f"adapter_ids must be [N]={x.shape[0]}, got {tuple(adapter_ids.shape)}")
    if adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex or adapter_ids.dtype == torch.bool:
        raise ValueError(f"adapter_ids must be an integer tensor, got {adapter_ids.dtype}")
    if isinstance(scaling, torch.Tensor) and scaling.shape not in ((D,), ()):
        raise ValueError(f"scaling must be a float or a [D]={D} tensor, got shape {tuple(scaling.shape)}")
    check_operands("grouped_lora", [("x", x), ("lora_a", lora_a), ("lora_b", lora_b)])  # ids and scaling are moved


def _scaling_vector(scaling, D, device) -> torch.Tensor:
    if isinstance(scaling, torch.Tensor):
        return scaling.to(device=device, dtype=torch.float32).expand(D).contiguous()
    return torch.full((D,), float(scaling), device=device, dtype=torch.float32)


def grouped_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scaling: Union[float, torch.Tensor] = 1.0,
    *,
    backend: str = "auto",
    segments: Optional[Segments] = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """Per-row LoRA delta ``scaling[d] * (x @ A_d^T) @ B_d^T`` with d = adapter_ids[row].

    Args:
        x: [N, in], fp32/fp16/bf16. lora_a: [D, r, in]; lora_b: [D, out, r] (cast to x's dtype).
        adapter_ids: int [N]; -1 means no adapter (the row gets zeros).
        scaling: float or fp32 [D] (PEFT's alpha / r per slot).
        backend: 'auto' | 'triton' | 'torch'.
        segments: a precomputed :func:`build_segments` for these ids (shared across layers).
        check_ids: validate that ids lie in [-1, D) (one host sync; the layers skip it).
    Returns:
        [N, out] in x's dtype. Gradients flow to x, lora_a and lora_b (dA, dB accumulated in fp32).
    """
    _check_lora_args(x, lora_a, lora_b, adapter_ids, scaling)
    D = lora_a.shape[0]
    if check_ids and adapter_ids.numel() > 0:
        lo, hi = int(adapter_ids.min()), int(adapter_ids.max())
        if lo < -1 or hi >= D:
            raise ValueError(f"adapter_ids must lie in [-1, {D - 1}] for D={D} adapters, got values in [{lo}, {hi}]")
    be = resolve_backend(backend, x.device)
    scale = _scaling_vector(scaling, D, x.device)
    if be == "torch":
        return _grouped_lora_torch(x, lora_a, lora_b, adapter_ids, scale)
    # fp32 master weights go to the kernels as they are (rounded in registers, grads in fp32)
    a = lora_a if lora_a.dtype in (x.dtype, torch.float32) else lora_a.to(x.dtype)
    b = lora_b if lora_b.dtype in (x.dtype, torch.float32) else lora_b.to(x.dtype)
    seg = segments if segments is not None else build_segments(adapter_ids.to(x.device), D)
    return GroupedLoRAFunction.apply(x.contiguous() if x.stride(-1) != 1 else x, a, b, scale, seg)


# ----------------------------------------------------------------------------------------------
# Module, model surgery, PEFT interop
# ----------------------------------------------------------------------------------------------
# PEFT's shorthand: every linear layer but the output head. A KM adapts all of them (Llama's q/k/v/o and
# gate/up/down projections; Phi-3's fused qkv_proj and gate_up_proj, which a list of Llama's names missed).
ALL_LINEAR = "all-linear"
DEFAULT_TARGETS = (ALL_LINEAR,)


def _sequence_lora_torch(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, seq_slot: torch.Tensor,
                         seq_scale: torch.Tensor) -> torch.Tensor:
    """LoRA delta for x [B, T, in] when each sequence uses one slot (the training and generation
    layouts): each sequence's A and B are gathered, then two batched matmuls do every sequence at
    once. seq_slot: int64 [B] (slot, any valid one where a sequence has none); seq_scale: fp32 [B]
    (alpha / r of the slot, 0 where the sequence has no adapter). Returns [B, T, out] in x's dtype.

    The row-grouped path (_grouped_lora_torch) is the general one and the oracle; on a CPU it runs
    two small matmuls per adapter and layer in forward and four in backward (~10k calls per step
    at D=8 on SmolLM2), which this path replaces with two bmm calls. Math in the autocast dtype
    under autocast, else in at least fp32. The gather's backward sums each slot's sequences in
    that same dtype before the fp32 master weights receive it."""
    dev = x.device.type
    math = _math_dtype(x)
    a = lora_a.index_select(0, seq_slot).to(math)  # [B, r, in]
    b = lora_b.index_select(0, seq_slot).to(math)  # [B, out, r]
    with torch.autocast(dev, enabled=False):  # the operands already hold the math dtype
        h = torch.bmm(x.to(math), a.transpose(1, 2))  # [B, T, r]
        y = torch.bmm(h * seq_scale.to(math)[:, None, None], b.transpose(1, 2))
    return y.to(x.dtype)


class SequenceLoRALinearFunction(torch.autograd.Function):
    """A frozen nn.Linear plus each sequence's LoRA delta, with the delta's adds done inside the GEMMs:
    the expand writes into the base output (``baddbmm_``) and, in backward, dH @ A into the base's dX.
    Same math as ``F.linear(x, W, bias) + _sequence_lora_torch(...)``, less two passes over
    [B, T, out] and [B, T, in] and their buffers: SmolLM2's seven projections' fwd+bwd ~15% faster in
    fp32 on a 2-core AVX2 CPU (``bench/results/lora_fused_cpu.md``). One layer gives the same bits
    as the separate adds there; in a model an input's gradient then sums two users' contributions
    (gate and up read one x) where it summed four, in another order, so KMs differ in the last bits.

    For the torch path without autocast, where x, W and the adapters share one dtype (fp32 training
    on a CPU without native bf16, fp64). x [B, T, in]; weight [out, in] frozen; bias [out] or None;
    lora_a [D, r, in], lora_b [D, out, r]; seq_slot int64 [B]; seq_scale fp32 [B] (0: no adapter).
    Returns [B, T, out]; grads for x (when it needs one), lora_a and lora_b."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, seq_slot, seq_scale):
        a = lora_a.index_select(0, seq_slot)  # [B, r, in]
        b = lora_b.index_select(0, seq_slot)  # [B, out, r]
        scale = seq_scale.to(x.dtype)[:, None, None]
        h = torch.bmm(x, a.transpose(1, 2)) * scale  # [B, T, r], the scale applied where it is r wide
        out = nn.functional.linear(x, weight, bias)
        out.baddbmm_(h, b.transpose(1, 2))
        ctx.save_for_backward(x, weight, a, b, h, seq_slot, scale)
        ctx.slots = lora_a.shape[0]
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b, h, seq_slot, scale = ctx.saved_tensors
        dy = dy.contiguous()
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dh = torch.bmm(dy, b) * scale if need_x or need_a else None  # [B, T, r]; dB reads h, not dh
        dx = None
        if need_x:
            dx = dy.matmul(weight)
            dx.baddbmm_(dh, a)
        # per-sequence grads, summed into each sequence's slot as index_select's backward sums them
        # (frozen adapters, as under a Knowledge Extractor's training, get none)
        g_a = g_b = None
        if need_a:
            da = torch.bmm(dh.transpose(1, 2), x)  # [B, r, in]
            g_a = da.new_zeros((ctx.slots,) + da.shape[1:]).index_add_(0, seq_slot, da)
        if need_b:
            db = torch.bmm(dy.transpose(1, 2), h)  # [B, out, r]
            g_b = db.new_zeros((ctx.slots,) + db.shape[1:]).index_add_(0, seq_slot, db)
        return dx, None, None, g_a, g_b, None, None


def fuses_into_linear(base: nn.Module, x: torch.Tensor, lora_a: torch.Tensor) -> bool:
    """Whether SequenceLoRALinearFunction computes ``base(x) + delta`` for this layer and input: a
    plain, frozen, hook-free nn.Linear (a subclass or a hook may do more than F.linear), no autocast,
    and one dtype for x, the weight and the adapters (a mixed one rounds the delta first)."""
    w = base.weight
    return (type(base) is nn.Linear and not w.requires_grad
            and not (base.bias is not None and base.bias.requires_grad)
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not torch.is_autocast_enabled(x.device.type)
            and x.dtype == w.dtype == lora_a.dtype)


class AdapterIds:
    """Per-model state shared by every GroupedLoRALinear: the current per-sequence ids and the
    segment table for the row layout last seen (built once per forward, not once per layer)."""

    def __init__(self, num_adapters: int, backend: str):
        self.num_adapters = num_adapters
        self.backend = backend
        self.seq_ids: Optional[torch.Tensor] = None
        self.any_active = False
        # tokens per sequence of the forward under way, as the last [B, T, in] input showed them: a layer
        # that reads the batch flattened to [B * T, in] (Qwen2-MoE's shared expert) comes after one that
        # does not (the attention's projections) in every decoder layer
        self.tokens: Optional[int] = None
        self._cache: Dict[Tuple, Tuple[torch.Tensor, Optional[Segments]]] = {}

    def set(self, ids: Optional[torch.Tensor]):
        if ids is not None:
            ids = torch.as_tensor(ids)
            if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(f"adapter ids must be an integer tensor [B] (one per sequence), got {ids.dtype} {tuple(ids.shape)}")
            if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.num_adapters):
                raise ValueError(f"adapter ids must lie in [-1, {self.num_adapters - 1}], got {ids.tolist()}")
        self.seq_ids = ids
        self.tokens = None
        self._cache.clear()
        self.any_active = bool((ids >= 0).any()) if ids is not None else False

    def sequences(self, batch: int, device, scaling: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence slot [B] (int64; 0 where a sequence has none) and scale [B] (fp32; 0 there)."""
        if self.seq_ids is None:
            raise ValueError("no adapter ids set: call set_adapter_ids(model, ids) before the forward pass")
        if self.seq_ids.numel() != batch:
            raise ValueError(f"adapter ids were set for {self.seq_ids.numel()} sequences but the batch has {batch}")
        key = ("seq", batch, str(device))
        hit = self._cache.get(key)
        if hit is None:
            ids = self.seq_ids.to(device)
            hit = self._cache[key] = (ids.clamp_min(0), (ids >= 0).to(torch.float32))
        slot, active = hit
        return slot, scaling.index_select(0, slot) * active

    def note_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward pre-hook of the model (and of its decoder): the tokens per sequence, from its
        input_ids [B, T] or inputs_embeds [B, T, H], before any layer runs. A layer that reads the batch
        flattened may come before every [B, T, in] one (JetMoE's attention router, first in its
        decoder layer, failed on that)."""
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            self.tokens = x.shape[1]

    def _unflattened(self, n: int) -> Tuple[int, int]:
        """[B, T] of a layer input of ``n`` rows, for one read flattened to [B * T, in] in row-major order
        (``x.view(-1, in)`` of [B, T, in]); one sequence's rows are all its own whatever their order.
        Rows that are neither (an MoE expert's routed tokens) cannot be told apart: a ValueError."""
        B = self.seq_ids.numel()
        if B == 1:
            return (1, n)
        if self.tokens is not None and n == B * self.tokens:
            return (B, self.tokens)
        raise ValueError(f"read {n} rows for {B} sequences"
                         + (f" of {self.tokens} tokens" if self.tokens is not None else "")
                         + ": not the batch's tokens in order (an MoE expert's routed tokens?), so one adapter per "
                           "sequence cannot be told apart there; leave that layer out of the LoRA targets")

    def rows(self, lead_shape: torch.Size, device, backend: str) -> Tuple[torch.Tensor, Optional[Segments]]:
        """Row ids [prod(lead_shape)] for an input of leading shape [B, T] (or [B]; or [B * T], the
        batch's tokens flattened in order, see ``_unflattened``), plus segments."""
        key = (tuple(lead_shape), str(device), backend)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if self.seq_ids is None:
            raise ValueError("no adapter ids set: call set_adapter_ids(model, ids) before the forward pass")
        if len(lead_shape) == 1 and lead_shape[0] != self.seq_ids.numel():
            lead_shape = self._unflattened(lead_shape[0])
        B = lead_shape[0] if len(lead_shape) else 1
        if self.seq_ids.numel() != B:
            raise ValueError(f"adapter ids were set for {self.seq_ids.numel()} sequences but the batch has {B}")
        per_seq = int(math.prod(lead_shape[1:])) if len(lead_shape) > 1 else 1
        row_ids = self.seq_ids.to(device).repeat_interleave(per_seq)
        seg = build_segments(row_ids, self.num_adapters) if backend == "triton" else None
        self._cache[key] = (row_ids, seg)
        return row_ids, seg


def is_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is transformers' Conv1D (GPT-2's projections): a linear layer whose weight is
    stored transposed, [in, out]. Checked against the class itself, which is loaded wherever a model
    holds one (kmkernels does not import transformers for it)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return conv1d is not None and isinstance(m, conv1d)


def linear_features(m: nn.Module) -> Optional[Tuple[int, int]]:
    """(in, out) features of an ``nn.Linear`` or a transformers Conv1D, None for any other module."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if is_conv1d(m):
        return m.weight.shape[0], m.weight.shape[1]
    return None


class GroupedLoRALinear(nn.Module):
    """An ``nn.Linear`` (or GPT-2's Conv1D, a linear layer with its weight stored [in, out]), frozen,
    plus D LoRA slots; each sequence uses the slot set in ``ids``.

    Parameters: lora_A [D, r, in], lora_B [D, out, r], fp32 (fp64 on an fp64 base) whatever the
    base dtype; buffer ``scaling`` fp32 [D] (alpha / r of
    each slot; slots holding a smaller rank are zero-padded and keep their own alpha / r).
    The adapter's shapes and its delta do not depend on how the base stores its weight.
    """

    def __init__(self, base: nn.Module, num_adapters: int, rank: int, alpha: float, ids: AdapterIds):
        super().__init__()
        features = linear_features(base)
        if features is None:
            raise ValueError(f"GroupedLoRALinear wraps nn.Linear or transformers' Conv1D, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = features
        self.fan_in_fan_out = is_conv1d(base)  # PEFT's name for a base weight stored [in, out]
        self.num_adapters, self.rank, self.alpha = num_adapters, rank, alpha
        # Adapter weights in at least fp32 whatever the base dtype (PEFT's autocast_adapter_dtype):
        # AdamW updates of ~lr * 1e-3 vanish in bf16. The kernels cast them to the activations' dtype.
        dev, dt = base.weight.device, torch.promote_types(base.weight.dtype, torch.float32)
        self.lora_A = nn.Parameter(torch.zeros(num_adapters, rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(num_adapters, self.out_features, rank, device=dev, dtype=dt))
        self.register_buffer("scaling", torch.full((num_adapters,), alpha / rank, dtype=torch.float32, device=dev))
        self._ids = ids

    # The base layer's weight and bias, read through the wrapper as through PEFT's LoRA layers: models
    # read a projection's `.weight` for its dtype or shape, and Jamba's Mamba computes
    # `dt_proj.weight @ x` itself (which, there as with PEFT, bypasses the adapter: its slot's B stays 0).
    # Without them such a model failed: "'GroupedLoRALinear' object has no attribute 'weight'".
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    @torch.no_grad()
    def reset_slot(self, slot: int, generator: torch.Generator):
        """PEFT init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.rand(self.rank, self.in_features, generator=generator, dtype=torch.float32) * (2 * bound) - bound
        self.lora_A[slot].copy_(a)
        self.lora_B[slot].zero_()
        self.scaling[slot] = self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = resolve_backend(self._ids.backend, x.device)
        if x.dim() == 3:
            self._ids.tokens = x.shape[1]  # for a later layer that reads the batch flattened
            if backend == "torch":
                # [B, T, in] with one slot per sequence: two bmm calls (see _sequence_lora_torch)
                slot, scale = self._ids.sequences(x.shape[0], x.device, self.scaling)  # checks the ids
                if not self._ids.any_active and not torch.is_grad_enabled():
                    return self.base(x)  # the teacher pass: no sequence has an adapter
                if fuses_into_linear(self.base, x, self.lora_A):
                    return SequenceLoRALinearFunction.apply(x, self.base.weight, self.base.bias, self.lora_A,
                                                            self.lora_B, slot, scale)
                out = self.base(x)
                return out + _sequence_lora_torch(x, self.lora_A, self.lora_B, slot, scale).to(out.dtype)
        out = self.base(x)
        try:
            row_ids, seg = self._ids.rows(x.shape[:-1], x.device, backend)
        except ValueError as e:  # name the layer, so that it can be left out of the targets
            name = getattr(self, "module_name", None)
            raise ValueError(f"{'the LoRA layer ' + name if name else 'a LoRA layer'} {e}") from None
        x2 = x.reshape(-1, self.in_features)
        delta = grouped_lora(x2, self.lora_A, self.lora_B, row_ids, self.scaling, backend=backend,
                             segments=seg, check_ids=False)
        return out + delta.reshape(out.shape).to(out.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.num_adapters}, rank={self.rank}"


# An MoE block's experts in transformers 5 are one module holding each projection of every expert as a
# 3-D parameter ([E, out, in]; [E, in, out] where it says ``is_transposed``), not as linear layers: PEFT
# adapts them through ``target_parameters`` (its ParamWrapper), and a KM must too, or on Mixtral, OLMoE or
# Qwen3-MoE it adapts the attention alone. Only experts whose forward takes the batch's tokens in order
# (hidden_states [N, H] with its routing, N = B * T) can give each sequence its own slot.
_EXPERTS_ARGS = ("hidden_states",)


def experts_parameters(m: nn.Module) -> List[str]:
    """Names of ``m``'s own 3-D parameters, in registration order, if ``m`` is an MoE experts module that
    takes the batch's tokens in order: forward(hidden_states, <routing>, <routing>) (Mixtral's
    top_k_index and top_k_weights; GPT-OSS's router_indices and routing_weights), every 3-D parameter
    [num_experts, ., .]. Otherwise []: torch's own layers (a convolution's weight is 3-D), and experts
    that take tokens already sorted by expert (JetMoE's, Llama 4's)."""
    if type(m).__module__.startswith("torch."):
        return []
    params = [(n, p) for n, p in m.named_parameters(recurse=False) if p.dim() == 3]
    if not params or len({p.shape[0] for _, p in params}) != 1:
        return []
    try:
        args = [a for a in inspect.signature(type(m).forward).parameters.values() if a.name != "self"]
    except (TypeError, ValueError):
        return []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(args) != 3 or args[0].name not in _EXPERTS_ARGS or any(a.kind not in positional for a in args):
        return []
    return [n for n, _ in params]


def _experts_interface_projections(m: nn.Module) -> Optional[Tuple[str, str]]:
    """(up, down) parameter names where ``m`` is built on transformers' experts interface
    (``use_experts_implementation``, whose flags say how its weights are laid out and gated) with those
    weights, "gate_up_proj" or "up_proj" and "down_proj"; else None."""
    flags = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_is_expert_parallel", "_apply_gate")
    if not all(hasattr(m, f) for f in flags) or not isinstance(getattr(m, "num_experts", None), int):
        return None
    try:
        from transformers.integrations import moe as hf_moe
    except ImportError:
        return None
    if not hasattr(hf_moe, "_grouped_linear"):  # what the forward runs the experts' own weights with
        return None
    up = "gate_up_proj" if m.has_gate else "up_proj"
    params = dict(m.named_parameters(recurse=False))
    if up not in params or "down_proj" not in params or params[up].dim() != 3:
        return None
    return up, "down_proj"


class GroupedLoRAExpertWeight(nn.Module):
    """D LoRA slots on one 3-D expert parameter W: [E, out, in], or [E, in, out] (``transposed``). As
    PEFT's ``target_parameters`` LoRA, expert e's weight in slot d is W_e + scaling[d] * B_{d,e} A_{d,e}
    (transposed where W is).

    Parameters: lora_A [D, E, r, in], lora_B [D, E, out, r], fp32 (fp64 on an fp64 base); buffer
    ``scaling`` fp32 [D]. PEFT stores one slot as lora_A [E * r, in] (row e * r + j) and lora_B
    [out, r * E] (column j * E + e): ``peft_tensors`` and ``load_slot`` convert.
    """

    def __init__(self, weight: torch.Tensor, num_adapters: int, rank: int, alpha: float, transposed: bool):
        super().__init__()
        E, a, b = weight.shape
        self.num_experts, self.transposed = E, transposed
        self.in_features, self.out_features = (a, b) if transposed else (b, a)
        self.num_adapters, self.rank, self.alpha = num_adapters, rank, alpha
        dev, dt = weight.device, torch.promote_types(weight.dtype, torch.float32)
        self.lora_A = nn.Parameter(torch.zeros(num_adapters, E, rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(num_adapters, E, self.out_features, rank, device=dev, dtype=dt))
        self.register_buffer("scaling", torch.full((num_adapters,), alpha / rank, dtype=torch.float32, device=dev))

    @torch.no_grad()
    def reset_slot(self, slot: int, generator: torch.Generator):
        """PEFT init (as GroupedLoRALinear's, each expert's A drawn U(-1/sqrt(in), 1/sqrt(in))), B = 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.rand(self.num_experts, self.rank, self.in_features, generator=generator, dtype=torch.float32)
        self.lora_A[slot].copy_(a * (2 * bound) - bound)
        self.lora_B[slot].zero_()
        self.scaling[slot] = self.alpha / self.rank

    def delta(self, slot: int, dtype: torch.dtype) -> torch.Tensor:
        """Slot ``slot``'s weight delta in W's layout and ``dtype``, with autograd to its A and B."""
        d = torch.bmm(self.lora_B[slot], self.lora_A[slot]) * self.scaling[slot]  # [E, out, in]
        return (d.transpose(1, 2) if self.transposed else d).to(dtype)

    def peft_tensors(self, slot: int, r: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Slot ``slot``'s first ``r`` ranks as PEFT's ParamWrapper stores them: A [E * r, in], B [out, r * E]."""
        a = self.lora_A[slot, :, :r].detach().reshape(self.num_experts * r, self.in_features)
        b = self.lora_B[slot, :, :, :r].detach().permute(1, 2, 0).reshape(self.out_features, r * self.num_experts)
        return a, b

    def peft_shapes(self, r: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        return (self.num_experts * r, self.in_features), (self.out_features, r * self.num_experts)

    @torch.no_grad()
    def load_slot(self, slot: int, a: Optional[torch.Tensor], b: Optional[torch.Tensor], r: int):
        """Set slot ``slot`` from PEFT's A [E * r, in] and B [out, r * E] (None: a zero delta)."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if a is not None:
            self.lora_A[slot, :, :r].copy_(a.reshape(self.num_experts, r, self.in_features))
            self.lora_B[slot, :, :, :r].copy_(b.reshape(self.out_features, r, self.num_experts).permute(2, 0, 1))


def _experts_lora_torch(x: torch.Tensor, u: GroupedLoRAExpertWeight, slot: torch.Tensor,
                        counts: List[int]) -> torch.Tensor:
    """The LoRA delta of routed rows x [S, in], sorted by expert (``counts`` rows each), row i on slot
    ``slot[i]`` (-1: none), one expert at a time: every slot's shrink at once (x @ [A_{1,e}; ...; A_{D,e}]^T,
    [S_e, D * r]), masked to the row's own slot and scaled, then expanded through [B_{1,e} ... B_{D,e}].
    D times the LoRA's FLOPs for E matmul pairs in place of one per (slot, expert) pair present: the
    torch path's loop over D * E adapters ran 1.7x slower than the weight-space path on a CPU."""
    D, E, r = u.lora_A.shape[0], u.num_experts, u.rank
    a = u.lora_A.permute(1, 0, 2, 3).reshape(E, D * r, u.in_features)  # [E, D * r, in]
    b = u.lora_B.permute(1, 2, 0, 3).reshape(E, u.out_features, D * r)  # [E, out, D * r]
    dt = _math_dtype(x)
    own = slot.clamp_min(0)
    scale = u.scaling.index_select(0, own) * (slot >= 0)
    mask = (torch.nn.functional.one_hot(own, D).to(torch.float32) * scale[:, None]).repeat_interleave(r, dim=1)
    outs = []
    rest = x.shape[0] - sum(counts)  # rows of no expert (an id outside [0, E)), sorted last: no delta
    for e, (x_e, m_e) in enumerate(zip(x.split(counts + [rest]), mask.split(counts + [rest]))):
        if x_e.shape[0] and e < E:
            h = (x_e.to(dt) @ a[e].T.to(dt)) * m_e.to(dt)
            outs.append(h @ b[e].T.to(dt))
        else:
            outs.append(x.new_zeros((x_e.shape[0], u.out_features), dtype=dt))
    return torch.cat(outs)


class GroupedLoRAExperts(nn.Module):
    """An MoE experts module (see ``experts_parameters``), frozen, plus D LoRA slots on each of its 3-D
    parameters (``adapters``, by parameter name); each sequence's tokens use the slot set in ``ids``.

    Experts built on transformers' experts interface (``use_experts_implementation``: Mixtral, Qwen-MoE,
    DeepSeek, OLMoE, GPT-OSS, ...) run in activation space: their routed rows, sorted by expert, go
    through the experts' weights as transformers' grouped_mm implementation does, and each row gets
    its LoRA delta s B_e (A_e x): on the torch path one expert at a time (``_experts_lora_torch``), on
    the Triton path through ``grouped_lora``, one adapter per (slot, expert) pair. No weight-sized
    tensor is made.

    Any other experts module runs in weight space, as PEFT does: the tokens of each slot in the batch
    run the experts' own forward with W + delta in place of W. One W + delta, the size of the experts'
    weights, exists at a time: with autograd it is not kept for the backward but made again there
    (activation checkpointing of that call). Tokens of no slot (-1) run the base experts."""

    # True: the weight-space path for every experts module (the one other experts modules take; the
    # tests' and the bench's way to compare the two)
    weight_space: bool = False
    # False: in weight space, keep W + delta for the backward instead of making it again (faster, for
    # experts small enough that one copy per slot and layer fits; ``python -m bench.lora_experts``)
    recompute: bool = True

    def __init__(self, base: nn.Module, param_names: Sequence[str], num_adapters: int, rank: int, alpha: float,
                 ids: AdapterIds):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        transposed = bool(getattr(base, "is_transposed", False))
        self.adapters = nn.ModuleDict({n: GroupedLoRAExpertWeight(getattr(base, n), num_adapters, rank, alpha,
                                                                  transposed) for n in param_names})
        self._ids = ids
        self.interface = _experts_interface_projections(base)

    def __getattr__(self, name: str):
        # the MoE block, or a model's own code, may read the experts' attributes (num_experts, act_fn, a
        # weight's dtype): they are the base module's
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ids = self._ids
        if not ids.any_active and not torch.is_grad_enabled():
            return self.base(hidden_states, *args, **kwargs)  # the teacher pass: no sequence has an adapter
        lead = hidden_states.shape[:-1]
        try:
            row_ids, _ = ids.rows(lead, hidden_states.device, "torch")
        except ValueError as e:
            name = getattr(self, "module_name", None)
            raise ValueError(f"{'the LoRA experts ' + name if name else 'LoRA experts'} {e}") from None
        n = row_ids.numel()
        flat = hidden_states.reshape(n, hidden_states.shape[-1])
        if (self.interface is not None and not self.weight_space and not kwargs and len(args) == 2
                and hidden_states.dim() == 2 and not self.base._is_expert_parallel):
            return self._activation_space_forward(flat, *args, row_ids)

        def rows_of(t, idx):  # the routing tensors are per token: [*lead, ...]
            if idx is None or not isinstance(t, torch.Tensor) or t.shape[:len(lead)] != lead:
                return t
            return t.reshape(n, *t.shape[len(lead):]).index_select(0, idx)

        slots = row_ids.unique().tolist()
        out = None
        for s in slots:
            idx = None if len(slots) == 1 else (row_ids == s).nonzero().squeeze(1)
            x = flat if idx is None else flat.index_select(0, idx)
            a = [rows_of(t, idx) for t in args]
            kw = {k: rows_of(v, idx) for k, v in kwargs.items()}
            if s < 0:
                y = self.base(x, *a, **kw)
            elif torch.is_grad_enabled() and self.recompute:
                # W + delta is as large as the experts' weights, and autograd would keep it, per slot and layer,
                # for the backward (Qwen3-30B-A3B: 1.2 GB in bf16 each): it is remade there instead
                y = torch.utils.checkpoint.checkpoint(self._slot_forward, s, x, *a, use_reentrant=False, **kw)
            else:
                y = self._slot_forward(s, x, *a, **kw)
            if idx is None:
                out = y
            else:
                if out is None:
                    out = y.new_zeros((n, *y.shape[1:]))
                out = out.index_copy(0, idx, y)
        return out.reshape(*lead, *out.shape[1:])

    def _activation_space_forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                                  row_ids: torch.Tensor) -> torch.Tensor:
        """transformers' grouped_mm experts forward (``grouped_mm_experts_forward``, which its experts
        interface runs by default) on x [n, H], plus each routed row's LoRA delta on each adapted weight."""
        from transformers.integrations.moe import _grouped_linear

        base, (up, down) = self.base, self.interface
        E, k = base.num_experts, top_k_index.shape[-1]
        expert_ids, perm = torch.sort(top_k_index.reshape(-1))
        token = perm // k
        x_g = x[token]
        # histc, as transformers counts them: an id outside [0, E) (a dropped token's) is in no group, and its
        # rows, sorted past the last group, get no expert's output there either
        counted = expert_ids.float() if x.device.type in ("cpu", "mps") else expert_ids.int()
        tokens_per_expert = torch.histc(counted, bins=E, min=0, max=E - 1)
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        slot = row_ids.to(x.device)[token]
        pair = torch.where(slot >= 0, slot * E + expert_ids, torch.full_like(slot, -1))  # (slot, expert) adapter

        backend = resolve_backend(self._ids.backend, x.device)
        counts = [int(c) for c in tokens_per_expert.tolist()] if backend == "torch" else None

        def project(name: str, inp: torch.Tensor) -> torch.Tensor:
            bias = getattr(base, name + "_bias")[expert_ids] if base.has_bias else None
            out = _grouped_linear(inp, getattr(base, name), offsets, bias=bias, is_transposed=base.is_transposed)
            if name in self.adapters:
                u = self.adapters[name]
                if backend == "torch":
                    delta = _experts_lora_torch(inp, u, slot, counts)
                else:  # one adapter per (slot, expert) pair, all in one launch
                    D = u.lora_A.shape[0]
                    delta = grouped_lora(inp, u.lora_A.reshape(D * E, u.rank, u.in_features),
                                         u.lora_B.reshape(D * E, u.out_features, u.rank), pair,
                                         u.scaling.repeat_interleave(E), backend=backend, check_ids=False)
                out = out + delta.to(out.dtype)
            return out

        h = project(up, x_g)
        h = base._apply_gate(h) if base.has_gate else base.act_fn(h)
        y = project(down, h)
        if base.has_post_expert_norm:
            y = base.post_expert_norm(y)
        y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return y[inverse].view(x.shape[0], k, -1).sum(dim=1).to(x.dtype)

    def _slot_forward(self, slot: int, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The experts' own forward on ``x`` with W + slot ``slot``'s delta in place of each adapted W."""
        weights = {p: getattr(self.base, p) + u.delta(slot, getattr(self.base, p).dtype)
                   for p, u in self.adapters.items()}
        return torch.func.functional_call(self.base, weights, (x, *args), kwargs)

    def extra_repr(self) -> str:
        u = next(iter(self.adapters.values()))
        return (f"experts={u.num_experts}, parameters={', '.join(self.adapters)}, adapters={u.num_adapters}, "
                f"rank={u.rank}")


def _module_seed(seed: int, slot_key: str) -> int:
    # A fixed hash (not Python's salted hash()) so that an init is reproducible across processes.
    h = 1469598103934665603
    for ch in f"{seed}:{slot_key}".encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 63)
    return h


def _decoder_of(model: nn.Module) -> Optional[nn.Module]:
    """``model.get_decoder()``, or None for a model without one (or whose get_decoder is not implemented)."""
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except Exception:
        return None
    return decoder if isinstance(decoder, nn.Module) else None


def _maps_like_a_linear(m: nn.Module) -> bool:
    """Whether ``m`` maps [n, in] to a tensor [n, out] as nn.Linear does. An nn.Linear subclass may
    not: Llama 4's and PhiMoE's routers return (scores, logits), and wrapped they failed in the
    forward ("'tuple' object has no attribute 'shape'"). A subclass that overrides forward is run
    once on a row of zeros to tell (Falcon's FalconLinear maps as a linear layer does, and is kept)."""
    if type(m).forward is nn.Linear.forward or is_conv1d(m):
        return True
    try:
        with torch.no_grad():
            y = m(torch.zeros(1, m.in_features, device=m.weight.device, dtype=m.weight.dtype))
    except Exception:  # it takes other inputs than a linear layer's
        return False
    return isinstance(y, torch.Tensor) and tuple(y.shape) == (1, m.out_features)


def lora_targets(model: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGETS) -> List[Tuple[str, nn.Module]]:
    """(name, module) of each linear layer (nn.Linear, or transformers' Conv1D as in GPT-2, as PEFT
    counts them) whose last name component is in ``target_modules``, or of every linear layer of the
    language model (``get_decoder()``, where the model has one: not a multimodal model's vision
    tower) but the output head (``get_output_embeddings()``) for
    "all-linear": the layers attach_grouped_lora wraps. An nn.Linear subclass that does
    not map like one (an MoE router returning scores and logits: ``_maps_like_a_linear``) is left out
    of "all-linear" and refused by name. None at all raises ValueError naming the linear layers the
    model has, so a caller can check a model before any slow work."""
    if isinstance(target_modules, str):  # "q_proj" would be read as the names "q", "_", "p", ...
        raise ValueError(f"target_modules must be a sequence of names, got the string {target_modules!r}")
    targets = set(target_modules)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    # "all-linear" is the language model's: a multimodal model's vision tower and projector never see
    # text (a KM's adapters there would stay zero), and are outside get_decoder()
    decoder = _decoder_of(model)
    in_decoder = None if decoder is None else {id(m) for m in decoder.modules()}
    linears = [(name, m) for name, m in model.named_modules() if linear_features(m) is not None]
    found = [(name, m) for name, m in linears
             if name.rsplit(".", 1)[-1] in targets
             or (ALL_LINEAR in targets and m is not head and (in_decoder is None or id(m) in in_decoder))]
    odd = {}  # one probe per class: its instances map alike
    for name, m in found:
        if type(m) not in odd:
            odd[type(m)] = not _maps_like_a_linear(m)
    named = sorted({name.rsplit(".", 1)[-1] for name, m in found if odd[type(m)] and name.rsplit(".", 1)[-1] in targets})
    if named:
        kinds = sorted({type(m).__name__ for name, m in found if odd[type(m)]})
        raise ValueError(f"LoRA targets {', '.join(named)} are {', '.join(kinds)}: linear layers whose output is not "
                         f"a linear layer's (an MoE router's scores and logits?), so an adapter cannot be added to "
                         f"it; leave them out of the targets")
    found = [(name, m) for name, m in found if not odd[type(m)]]
    if not found and not expert_targets(model, target_modules):
        have = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
        wanted = ("every linear layer but the output head (all-linear)" if ALL_LINEAR in targets
                  else f"the LoRA targets {', '.join(target_modules)}")
        raise ValueError(f"no linear layer to adapt: wanted {wanted}; its linear layers: {', '.join(have) or 'none'}")
    return found


def expert_targets(model: nn.Module,
                   target_modules: Sequence[str] = DEFAULT_TARGETS) -> List[Tuple[str, nn.Module, List[str]]]:
    """(name, module, parameter names) of each MoE experts module of the language model (see
    ``experts_parameters``) with parameters to adapt: every 3-D one for "all-linear" (a KM adapts all of
    the model's projections), else those named "<module's last name>.<parameter>" in ``target_modules``
    (PEFT's ``target_parameters`` form: "experts.gate_up_proj")."""
    targets = set(target_modules)
    decoder = _decoder_of(model)
    in_decoder = None if decoder is None else {id(m) for m in decoder.modules()}
    found = []
    for name, m in model.named_modules():
        if in_decoder is not None and id(m) not in in_decoder:
            continue
        leaf = name.rsplit(".", 1)[-1]
        chosen = [p for p in experts_parameters(m) if ALL_LINEAR in targets or f"{leaf}.{p}" in targets]
        if chosen:
            found.append((name, m, chosen))
    return found


def _matches_target_parameter(full_name: str, targets: Sequence[str]) -> bool:
    # PEFT's rule for target_parameters: the full name, or a suffix of it at a dot
    return any(full_name == t or full_name.endswith("." + t) for t in targets)


def _expert_peft_paths(model: nn.Module,
                       target_parameters: Sequence[str]) -> Dict[str, Tuple[str, Optional[GroupedLoRAExpertWeight]]]:
    """PEFT module path -> (the parameter's full name, its slots here or None) of every expert parameter that
    an adapter with these ``target_parameters`` holds weights for. PEFT wraps a module once per targeted
    parameter, in the module's registration order, each wrapper around the one before: of k parameters
    targeted in one module, the i-th's weights sit under ``<module>`` + ".base_layer" * (k - 1 - i)."""
    paths = {}
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, GroupedLoRAExperts)}
    for name, m in model.named_modules():
        if id(m) in wrapped:
            continue
        base, adapters = (m.base, m.adapters) if isinstance(m, GroupedLoRAExperts) else (m, {})
        chosen = [p for p in experts_parameters(base) if _matches_target_parameter(f"{name}.{p}", target_parameters)]
        for i, p in enumerate(chosen):
            unit = adapters[p] if p in adapters else None
            paths[name + ".base_layer" * (len(chosen) - 1 - i)] = (f"{name}.{p}", unit)
    return paths


def attach_grouped_lora(
    model: nn.Module,
    num_adapters: int,
    rank: int = 16,
    alpha: float = 16,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    *,
    seed: int = 0,
    backend: str = "auto",
) -> nn.Module:
    """Wrap the model's linear layers named in ``target_modules`` (by last name component; "all-linear":
    every one but the output head, as PEFT's shorthand) in place.

    All base parameters are frozen; every slot is initialised as PEFT does, reproducibly from
    ``seed`` (slot s of module m gets its own stream, independent of the other slots).
    Returns the model. Use :func:`set_adapter_ids` before each forward.
    """
    if num_adapters < 1:
        raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if getattr(model, "_grouped_lora", None) is not None:
        raise ValueError("this model already has grouped LoRA attached")
    ids = AdapterIds(num_adapters, backend)
    found = lora_targets(model, target_modules)
    experts = expert_targets(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    wrappers = [(name, GroupedLoRALinear(module, num_adapters, rank, alpha, ids)) for name, module in found]
    wrappers += [(name, GroupedLoRAExperts(module, params, num_adapters, rank, alpha, ids))
                 for name, module, params in experts]
    for name, wrapper in wrappers:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        wrapper.module_name = name  # for its errors
        setattr(parent, name.rsplit(".", 1)[-1], wrapper)
    # the tokens per sequence, from the inputs, for layers that read the batch flattened (AdapterIds.note_inputs)
    entries = [model]
    decoder = _decoder_of(model)
    if decoder is not None and decoder is not model:
        entries.append(decoder)
    for entry in entries:
        entry.register_forward_pre_hook(ids.note_inputs, with_kwargs=True)
    model._grouped_lora = {"ids": ids, "rank": rank, "alpha": alpha, "targets": sorted({n.rsplit('.', 1)[-1] for n, _ in found}),
                           "expert_targets": sorted({f"{n.rsplit('.', 1)[-1]}.{p}" for n, _, ps in experts
                                                     for p in ps}),
                           "slot_rank": [rank] * num_adapters, "slot_alpha": [alpha] * num_adapters}
    for slot in range(num_adapters):
        reset_slot(model, slot, seed)
    return model


def _state(model) -> dict:
    st = getattr(model, "_grouped_lora", None)
    if st is None:
        raise ValueError("call attach_grouped_lora(model, ...) first")
    return st


def grouped_lora_modules(model: nn.Module) -> Dict[str, Union[GroupedLoRALinear, GroupedLoRAExpertWeight]]:
    """Every set of LoRA slots, by module name: each wrapped linear layer's, and each adapted expert
    parameter's. Each has ``lora_A`` and ``lora_B`` with the slot first, ``scaling`` [D] and ``reset_slot``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (GroupedLoRALinear, GroupedLoRAExpertWeight))}


def reset_slot(model: nn.Module, slot: int, seed: int) -> None:
    """Re-initialise one slot in every layer (PEFT init) from ``seed`` alone: the result does not
    depend on the slot index or on the other slots, so a document's KM does not depend on its batch."""
    st = _state(model)
    _check_slot(model, slot)
    for name, m in grouped_lora_modules(model).items():
        m.reset_slot(slot, torch.Generator().manual_seed(_module_seed(seed, name)))
    st["slot_rank"][slot] = st["rank"]
    st["slot_alpha"][slot] = st["alpha"]


def _check_slot(model, slot):
    n = _state(model)["ids"].num_adapters
    if not (0 <= int(slot) < n):
        raise ValueError(f"slot must be in [0, {n - 1}], got {slot}")


def set_adapter_ids(model: nn.Module, ids: Optional[Union[torch.Tensor, Sequence[int]]]) -> None:
    """Set the slot of each sequence [B] for the next forward passes (-1 = base model only)."""
    _state(model)["ids"].set(torch.as_tensor(ids) if ids is not None else None)


def slot_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for m in grouped_lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def _peft_key(module_name: str, which: str) -> str:
    return f"base_model.model.{module_name}.{which}.weight"


def _peft_renamed_targets(model: nn.Module) -> set:
    """Names in target_modules that the installed PEFT, loading an adapter onto this model's type under
    transformers 5, takes for transformers 4's MoE expert projections and moves to the fused experts'
    parameters (PEFT's ``transformers_weight_conversion``; empty where it has none, as before 0.18)."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except Exception:  # an older PEFT or transformers: nothing is renamed
        return set()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    pattern = getattr(conversion, "_MODEL_TO_CONVERSION_PATTERN", {}).get(model_type)
    if pattern is None or get_checkpoint_conversion_mapping(model_type) is None:
        return set()
    return set(getattr(conversion, "_MOE_TARGET_MODULE_MAPPING", {}).get(pattern, {}))


def export_peft(model: nn.Module, slot: int, path: Union[str, os.PathLike], *,
                base_model_name_or_path: Optional[str] = None,
                extra_files: Optional[Dict[str, Union[str, Callable[[str], str]]]] = None) -> str:
    """Write slot ``slot`` as a standard PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

    The folder is written to a temporary sibling and renamed into place, so a crash never
    leaves a half-written adapter. ``extra_files`` (name -> text, or a function of the adapter
    file's sha256 returning the text, for a manifest that records it) are written inside it first.
    Returns the sha256 (hex) of adapter_model.safetensors as written.
    """
    from peft import LoraConfig
    from safetensors.torch import save

    st = _state(model)
    _check_slot(model, slot)
    r, alpha = st["slot_rank"][slot], st["slot_alpha"][slot]
    tensors = {}
    wrapped = {n: m for n, m in grouped_lora_modules(model).items() if isinstance(m, GroupedLoRALinear)}
    for name, m in wrapped.items():
        tensors[_peft_key(name, "lora_A")] = m.lora_A[slot, :r].detach().to("cpu").contiguous().clone()
        tensors[_peft_key(name, "lora_B")] = m.lora_B[slot, :, :r].detach().to("cpu").contiguous().clone()
    # MoE experts' 3-D weights: PEFT's target_parameters, named "<module's last name>.<parameter>" (as full
    # names where a module outside the KM would match one, as for the linear layers below)
    target_parameters = list(st["expert_targets"])
    if target_parameters:
        adapted = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, GroupedLoRAExperts)
                   for p in m.adapters}
        if any(f"{n.rsplit('.', 1)[-1]}.{p}" in st["expert_targets"] and f"{n}.{p}" not in adapted
               for n, m in model.named_modules() if not isinstance(m, GroupedLoRAExperts)
               for p in experts_parameters(m)):
            target_parameters = sorted(adapted)
        for peft_path, (_, unit) in _expert_peft_paths(model, target_parameters).items():
            a, b = unit.peft_tensors(slot, r)
            tensors[_peft_key(peft_path, "lora_A")] = a.to("cpu").contiguous().clone()
            tensors[_peft_key(peft_path, "lora_B")] = b.to("cpu").contiguous().clone()
    base_name = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    # PEFT takes a target name for every module whose name ends with it. Where a linear layer that holds
    # no adapter shares one (a multimodal model's vision tower has its own q_proj), PEFT would add LoRA
    # layers there and warn of missing keys on load: the adapted modules are then named in full.
    targets = list(st["targets"])
    if any(name.rsplit(".", 1)[-1] in st["targets"] and name not in wrapped
           for name, m in model.named_modules() if linear_features(m) is not None):
        targets = sorted(wrapped)
    # Loading onto some MoE model types on transformers 5 (DeepSeek-V2/V3, GLM-4 MoE, Qwen3-Next, ...), PEFT
    # takes the names of transformers 4's expert projections (gate_proj, up_proj, down_proj) in target_modules
    # for those experts, now fused: it moved a shared expert's or a dense layer's LoRA there, and the KM
    # loaded without a word to other outputs. Their weights are named as target_parameters instead, which
    # PEFT leaves as they are: for a linear layer that is the same LoRA, under the same tensor names.
    renamed = _peft_renamed_targets(model)
    moved = [t for t in targets if t.rsplit(".", 1)[-1] in renamed]
    if moved:
        targets = [t for t in targets if t not in moved]
        target_parameters = target_parameters + [f"{t}.weight" for t in moved]
    # GPT-2's Conv1D stores its weight [in, out]: PEFT's fan_in_fan_out (only its merge reads it; the
    # A and B weights have the same shapes either way)
    fan_in_fan_out = any(m.fan_in_fan_out for m in wrapped.values())
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM", base_model_name_or_path=base_name, fan_in_fan_out=fan_in_fan_out,
                     **({"target_parameters": target_parameters} if target_parameters else {}))
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    # Temporary names carry the pid, so a later run can tell a dead run's leftovers from a live
    # one's. os.mkdir, not mkdtemp: the KM gets a plain folder's mode under the umask, not 0700.
    tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)
    try:
        with naming_file_on_error(path):  # out of disk names the KM being written
            cfg.save_pretrained(tmp)
            data = save(tensors, metadata={"format": "pt"})
            digest = hashlib.sha256(data).hexdigest()
            with open(os.path.join(tmp, "adapter_model.safetensors"), "wb") as f:
                f.write(data)
            for fname, text in (extra_files or {}).items():
                with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                    f.write(text(digest) if callable(text) else text)
            if os.path.exists(path):
                old = tempfile.mkdtemp(prefix=f".old-{os.getpid()}-", dir=parent)
                os.rename(path, os.path.join(old, "x"))
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return digest


_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def adapter_targets(path: Union[str, os.PathLike]) -> List[str]:
    """Last name components of the modules a PEFT folder's weights file holds LoRA weights for
    (what attach_grouped_lora's ``target_modules`` takes), read from its tensor names without
    loading a tensor. adapter_config.json's ``target_modules`` may be a regex or "all-linear";
    the weights say what is there. Its ``target_parameters`` name MoE experts' weights, whose tensors
    are named by their module alone: "<module's last name>.<parameter>" for those. A missing or damaged
    adapter_config.json raises ValueError naming it (``read_adapter_config``)."""
    from safetensors import safe_open

    weights_path = os.path.join(os.fspath(path), "adapter_model.safetensors")
    try:
        with safe_open(weights_path, "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # missing, truncated or not safetensors
        raise ValueError(f"{weights_path}: unreadable safetensors file ({e})") from None
    # MoE experts' weights (PEFT's target_parameters): "<module's last name>.<parameter>", from the config, as
    # their tensors are named by the module alone (with ".base_layer" once per parameter wrapped after it)
    params = _target_parameters(read_adapter_config(path), os.fspath(path))
    # "<linear layer>.weight" is a linear layer's LoRA written as a target parameter (see export_peft)
    linears = [t.split(".")[-2] for t in params if t.endswith(".weight") and "." in t]
    experts = [".".join(t.split(".")[-2:]) for t in params if not t.endswith(".weight")]
    expert_leaves = {t.split(".")[0] for t in experts if "." in t}
    names = []
    for m in filter(None, map(_KEY_RE.match, keys)):
        module = m.group("module")
        while module.endswith(".base_layer"):
            module = module[:-len(".base_layer")]
        if module.rsplit(".", 1)[-1] not in expert_leaves:
            names.append(module.rsplit(".", 1)[-1])
    return list(dict.fromkeys(names + linears + experts))


def _target_parameters(cfg: dict, where: str) -> List[str]:
    """An adapter config's ``target_parameters`` (PEFT's LoRA on parameters: MoE experts' 3-D weights, or a
    linear layer's ``<name>.weight``), checked to be a list of names; [] where it has none."""
    params = cfg.get("target_parameters") or []
    if isinstance(params, str) or not all(isinstance(t, str) for t in params):
        raise ValueError(f"{where}: target_parameters must be a list of parameter names, got {params!r}")
    return list(params)


def read_adapter_config(path: Union[str, os.PathLike]) -> dict:
    """The adapter_config.json of a PEFT folder, checked to be JSON with an integer rank ``r``;
    a missing or damaged file raises ValueError naming it."""
    cfg_path = os.path.join(os.fspath(path), "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{os.fspath(path)} is not a PEFT adapter folder: no adapter_config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: unreadable ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise ValueError(f"{cfg_path}: needs a positive integer rank 'r'")
    return cfg


def load_peft(model: nn.Module, slot: int, path: Union[str, os.PathLike]) -> None:
    """Load a PEFT LoRA folder into ``slot``. Smaller ranks are zero-padded; the slot keeps the
    adapter's own alpha / r (alpha / sqrt(r) for ``use_rslora``). Mismatched rank, targets or base
    model, DoRA and per-module rank or alpha patterns raise ValueError; on error the slot is left as
    it was."""
    from safetensors.torch import load_file

    st = _state(model)
    _check_slot(model, slot)
    path = os.fspath(path)
    cfg = read_adapter_config(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise ValueError(f"{path}: use_dora=True adapters are not supported")
    for pattern in ("rank_pattern", "alpha_pattern"):
        # per-module ranks or alphas: loaded with the one r and alpha, the scales would be wrong without a word
        if cfg.get(pattern):
            raise ValueError(f"{path}: a non-empty {pattern} (per-module {pattern.split('_')[0]}s) is not supported")
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    if cfg.get("use_rslora"):
        # rank-stabilised LoRA scales by alpha / sqrt(r), not alpha / r: the slot keeps the alpha that
        # gives that scale under plain LoRA, so that export_peft writes an adapter that computes the same
        alpha *= math.sqrt(r)
    if r > st["rank"]:
        raise ValueError(f"{path}: adapter rank r={r} exceeds the attached rank {st['rank']}")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights_path):
        raise ValueError(f"{path}: no adapter_model.safetensors")
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors raises its own error type for a truncated or damaged file
        raise ValueError(f"{weights_path}: unreadable safetensors file ({e})") from None
    modules = grouped_lora_modules(model)
    linear = {n: m for n, m in modules.items() if isinstance(m, GroupedLoRALinear)}
    # PEFT module path -> (parameter, its slots here)
    experts = _expert_peft_paths(model, _target_parameters(cfg, path))
    wrapped = st["targets"] + st["expert_targets"]
    staged: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} (not a LoRA A/B weight)")
        mod_name = m.group("module")
        if mod_name in experts and experts[mod_name][1] is None:
            param = experts[mod_name][0]
            raise ValueError(f"{path}: adapter targets the experts' parameter {param!r}, which this model did not "
                             f"wrap (wrapped targets: {wrapped}); different targets?")
        if mod_name not in linear and mod_name not in experts:
            leaf = mod_name.rsplit(".", 1)[-1]
            raise ValueError(f"{path}: adapter targets module {mod_name!r} ({leaf}), which this model "
                             f"does not have or did not wrap (wrapped targets: {wrapped}); different base model or "
                             f"targets?")
        staged.setdefault(mod_name, {})[m.group("which")] = t
    if not staged:
        raise ValueError(f"{path}: the adapter holds no LoRA weights")
    for mod_name, ab in staged.items():
        a, b = ab.get("lora_A"), ab.get("lora_B")
        if a is None or b is None:
            raise ValueError(f"{path}: module {mod_name} has only one of lora_A / lora_B")
        if mod_name in linear:
            mod = linear[mod_name]
            want = ((r, mod.in_features), (mod.out_features, r))
        else:  # named by the parameter, which says more than PEFT's nesting
            mod_name, unit = experts[mod_name]
            want = unit.peft_shapes(r)
        if (tuple(a.shape), tuple(b.shape)) != want:
            raise ValueError(f"{path}: {mod_name} expects lora_A {want[0]} and lora_B {want[1]} for r={r}, "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}: different base model?")
    with torch.no_grad():
        for mod_name, mod in linear.items():
            mod.lora_A[slot].zero_()
            mod.lora_B[slot].zero_()
            if mod_name in staged:  # modules the adapter does not target keep a zero delta
                mod.lora_A[slot, :r].copy_(staged[mod_name]["lora_A"])
                mod.lora_B[slot, :, :r].copy_(staged[mod_name]["lora_B"])
            mod.scaling[slot] = alpha / r
        held = {id(unit): staged[p] for p, (_, unit) in experts.items() if p in staged}
        for unit in modules.values():
            if isinstance(unit, GroupedLoRAExpertWeight):
                ab = held.get(id(unit), {})
                unit.load_slot(slot, ab.get("lora_A"), ab.get("lora_B"), r)
                unit.scaling[slot] = alpha / r
    st["slot_rank"][slot] = r
    st["slot_alpha"][slot] = alpha
