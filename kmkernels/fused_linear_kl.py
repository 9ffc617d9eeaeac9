"""KL(p_teacher || p_student) from hidden states, without the [N, V] logits.

    loss_n = sum_v p_t(v) * (log p_t(v) - log p_s(v)),
    p_s = softmax(cap(h_s @ W_s^T + b_s) / T),  p_t = softmax(cap(h_t @ W_t^T + b_t) / T)

with b the output head's bias where it has one (Phi-1/1.5/2, GPT-J, CodeGen), else 0, and cap the
identity, or with ``softcap`` c the soft cap c * tanh(z / c) that Gemma 2 puts on its logits after
the output head (``final_logit_softcapping``).

Design (same for both backends, so they differ only in who does the arithmetic):
  * Positions are processed in chunks of C rows; only [C, V] fp32 logits exist at a time
    (C*V*4 bytes, about 256 MB at V=128k), never [N, V].
  * Logits are accumulated and kept in fp32 straight out of the matmul: 16-bit inputs are never
    rounded to 16 bits before the softmax (the Liger-Kernel JSD bug, see SPEC.md section 4).
  * One online pass over the vocabulary gives lse_s, lse_t and sum_v p_t (t - s), from which
    KL = E_pt[t - s] - lse_t + lse_s. The gradient w.r.t. the student logits is
    (p_s - p_t) / T (times 1 - tanh^2(z_s / c) under a soft cap), written over the chunk's logits
    and multiplied into W_s / h_s at once.
  * With a scalar reduction the gradient is computed eagerly in forward (one set of logit
    matmuls instead of two), and backward only scales it by grad_output. With
    reduction="none" the per-position grad_output is only known in backward, so backward
    recomputes the chunk logits.

The Triton path uses Triton kernels for the row-wise softmax/KL/gradient passes. The logit
GEMMs go to cuBLAS with fp32 output (torch.mm(out_dtype=float32)) where torch has it for 16-bit
CUDA operands, else to a Triton fp32-output GEMM; the gradient GEMMs (dh = G W, dW = G^T h) go to
torch.mm (cuBLAS).
The torch path upcasts to fp32 and uses plain torch ops on the same chunks.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Optional

import torch
from torch import nn

from .utils import (HAS_TRITON, check_operands, check_reduction, cpu_bf16_products, cpu_native_bf16, cpu_scratch,
                    flatten_mask, is_16bit, reduce_rows, reduction_divisor, resolve_backend)

if HAS_TRITON:
    import triton
    import triton.language as tl

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _logits_fp32_kernel(
        X, W, OUT,
        M, V, K,
        stride_xm, stride_wv, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """OUT[m, v] = sum_k X[m, k] * W[v, k], accumulated and stored in fp32.

        Grid: (cdiv(M, BLOCK_M) * cdiv(V, BLOCK_V),). Row blocks vary fastest so that the
        programs that share one W tile run together and the tile is read from L2 once.
        UPCAST: fp32 inputs (or mixed dtypes) multiply in full fp32 ("ieee"), not tf32.
        """
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_v = pid // num_m
        # int64 rows: OUT holds M * V elements, past 2**31 for a 128k vocab at 16k+ rows per chunk
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :],
                        mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(W + offs_v[:, None] * stride_wv + kk[None, :],
                        mask=(offs_v[:, None] < V) & (kk[None, :] < K), other=0.0)
            if UPCAST:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        tl.store(OUT + offs_m[:, None] * stride_om + offs_v[None, :], acc,
                 mask=(offs_m[:, None] < M) & (offs_v[None, :] < V))

    @triton.jit
    def _kl_rows_fwd_kernel(
        S, T, LOSS, LSE_S, LSE_T,
        V, stride_s, stride_t, inv_temp,
        BLOCK_V: tl.constexpr,
    ):
        """One program per row: online softmax statistics of both logit rows in one pass.

        Keeps running max/sum for student and teacher and a = sum exp(t - m_t) * (t - s),
        rescaled like the sum. KL = a / z_t - lse_t + lse_s. Positions where the teacher
        logit is -inf have p_t = 0 and contribute nothing (0 * log 0 = 0).
        """
        row = tl.program_id(0).to(tl.int64)
        s_ptr = S + row * stride_s
        t_ptr = T + row * stride_t
        m_s = float("-inf")
        z_s = 0.0
        m_t = float("-inf")
        z_t = 0.0
        a = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            valid = offs < V
            # Out-of-range lanes: s = 0 (kept finite so t - s never forms inf - inf), t = -inf.
            s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32) * inv_temp
            t = tl.load(t_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
            s_m = tl.where(valid, s, float("-inf"))
            m_s_new = tl.maximum(m_s, tl.max(s_m, axis=0))
            z_s = z_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s_m - m_s_new), axis=0)
            m_s = m_s_new
            m_t_new = tl.maximum(m_t, tl.max(t, axis=0))
            alpha = tl.exp(m_t - m_t_new)
            e_t = tl.exp(t - m_t_new)
            d = tl.where(t > float("-inf"), t - s, 0.0)
            a = a * alpha + tl.sum(e_t * d, axis=0)
            z_t = z_t * alpha + tl.sum(e_t, axis=0)
            m_t = m_t_new
        lse_s = m_s + tl.log(z_s)
        lse_t = m_t + tl.log(z_t)
        tl.store(LOSS + row, a / z_t - lse_t + lse_s)
        tl.store(LSE_S + row, lse_s)
        tl.store(LSE_T + row, lse_t)

    @triton.jit
    def _kl_rows_grad_kernel(
        S, T, G, LSE_S, LSE_T, ROW_SCALE,
        V, stride_s, stride_t, stride_g, inv_temp, inv_cap,
        BLOCK_V: tl.constexpr, HAS_CAP: tl.constexpr,
    ):
        """G[n, v] = (p_s(v) - p_t(v)) * ROW_SCALE[n]. Grid: (rows, cdiv(V, BLOCK_V)).
        HAS_CAP: S and T hold soft-capped logits c * tanh(z / c) (inv_cap = 1 / c), and G is the
        gradient w.r.t. the uncapped z: times 1 - tanh^2 = 1 - (S * inv_cap)^2.

        G may alias S (in-place over the chunk's fp32 logits): each element is read before
        it is written, by the same program.
        """
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        valid = offs < V
        s_raw = tl.load(S + row * stride_s + offs, mask=valid, other=0.0).to(tl.float32)
        s = s_raw * inv_temp
        t = tl.load(T + row * stride_t + offs, mask=valid, other=0.0).to(tl.float32) * inv_temp
        scale = tl.load(ROW_SCALE + row)
        g = (tl.exp(s - tl.load(LSE_S + row)) - tl.exp(t - tl.load(LSE_T + row))) * scale
        if HAS_CAP:
            th = s_raw * inv_cap
            g = g * (1.0 - th * th)
        tl.store(G + row * stride_g + offs, g.to(G.dtype.element_ty), mask=valid)


def _pick_block(n: int, lo: int, hi: int) -> int:
    b = lo
    while b < n and b < hi:
        b *= 2
    return b


def _logits_fp32_triton(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[M, K] x [V, K] -> [M, V] fp32 logits, never rounded to 16 bits."""
    M, K = x.shape
    V = w.shape[0]
    out = torch.empty((M, V), device=x.device, dtype=torch.float32)
    if M == 0:
        return out
    upcast = (x.dtype != w.dtype) or x.dtype == torch.float32
    block_m = _pick_block(M, 16, 64)
    block_v = 64 if upcast else 128
    block_k = _pick_block(K, 16, 64)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(V, block_v),)
    _logits_fp32_kernel[grid](
        x, w, out, M, V, K, x.stride(0), w.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, UPCAST=upcast,
    )
    return out


# ----------------------------------------------------------------------------------------------
# Row-level core shared by fused_linear_kl and kl_div_logits (both backends)
# ----------------------------------------------------------------------------------------------
def _kl_rows_forward(s: torch.Tensor, t: torch.Tensor, inv_temp: float, backend: str):
    """Per-row KL, lse_s and lse_t (all fp32 [R]) for logit rows s, t of shape [R, V]."""
    R, V = s.shape
    if backend == "triton" and R > 0:
        loss = torch.empty(R, device=s.device, dtype=torch.float32)
        lse_s = torch.empty_like(loss)
        lse_t = torch.empty_like(loss)
        _kl_rows_fwd_kernel[(R,)](
            s, t, loss, lse_s, lse_t, V, s.stride(0), t.stride(0), inv_temp,
            BLOCK_V=_pick_block(V, 16, 4096),
        )
        return loss, lse_s, lse_t
    s32 = s.float() * inv_temp
    t32 = t.float() * inv_temp
    lse_s = torch.logsumexp(s32, dim=-1)
    lse_t = torch.logsumexp(t32, dim=-1)
    log_pt = t32 - lse_t[:, None]
    pt = log_pt.exp()
    # p_t * (log p_t - log p_s); where p_t == 0 the term is 0 (also for t = -inf).
    terms = torch.where(pt > 0, pt * (log_pt - (s32 - lse_s[:, None])), torch.zeros((), device=s.device))
    return terms.sum(-1), lse_s, lse_t


def _kl_rows_grad(s, t, lse_s, lse_t, row_scale, inv_temp: float, backend: str, out: torch.Tensor,
                  softcap: Optional[float] = None) -> torch.Tensor:
    """out[R, V] = (softmax(s/T) - softmax(t/T)) * row_scale[:, None]. ``out`` may alias ``s``.
    With ``softcap`` c, s and t are capped logits c * tanh(z / c) and out is the gradient w.r.t.
    the uncapped z: also times 1 - (s / c)^2."""
    R, V = s.shape
    if R == 0:
        return out
    if backend == "triton":
        block_v = _pick_block(V, 16, 2048)
        _kl_rows_grad_kernel[(R, triton.cdiv(V, block_v))](
            s, t, out, lse_s, lse_t, row_scale, V, s.stride(0), t.stride(0), out.stride(0), inv_temp,
            1.0 / softcap if softcap else 1.0, BLOCK_V=block_v, HAS_CAP=bool(softcap),
        )
        return out
    g = ((s.float() * inv_temp - lse_s[:, None]).exp() - (t.float() * inv_temp - lse_t[:, None]).exp())
    g.mul_(row_scale[:, None])
    if softcap:
        g.mul_(1.0 - (s.float() / softcap).square())
    out.copy_(g)
    return out


def softcap_logits(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """c * tanh(z / c), the soft cap Gemma 2 puts on its logits, out of place (autograd through it);
    ``z`` itself where ``softcap`` is None."""
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _softcap_(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """z <- c * tanh(z / c) in place (fp32 logits), as Gemma 2 caps its logits; z as it is without a cap."""
    if softcap:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _kl_chunk_torch(s: torch.Tensor, t: torch.Tensor, inv_temp: float, row_scale: Optional[torch.Tensor],
                    softcap: Optional[float] = None):
    """Torch path for one chunk, in place over the fp32 scratch logits s, t [R, V] (uncapped: with
    ``softcap`` they are capped here, and the gradient is w.r.t. the uncapped logits).

    Returns (loss [R], grad [R, V] written over s, or None). Few full passes: this is the CPU path.
    """
    _softcap_(s, softcap)
    _softcap_(t, softcap)
    if inv_temp != 1.0:
        s.mul_(inv_temp)
        t.mul_(inv_temp)
    lse_s = torch.logsumexp(s, -1, keepdim=True)
    s.sub_(lse_s)  # log p_s
    t.sub_(torch.logsumexp(t, -1, keepdim=True))  # log p_t
    # the teacher's probabilities need a third [R, V] block; on CPU a reused one (see cpu_scratch)
    pt = torch.exp(t, out=cpu_scratch("kl_teacher_probs", *t.shape)) if t.device.type == "cpu" else t.exp()
    t.sub_(s).mul_(pt).masked_fill_(pt == 0, 0.0)  # p_t (log p_t - log p_s), with 0 log 0 = 0
    loss = t.sum(-1)
    if row_scale is None:
        return loss, None
    if softcap:  # the cap's derivative 1 - tanh^2 into t's block (free now): tanh = capped / c
        t.copy_(s).add_(lse_s).mul_(1.0 / (inv_temp * softcap)).square_().neg_().add_(1.0)  # (log p_s + lse_s) T / c
        return loss, s.exp_().sub_(pt).mul_(row_scale[:, None]).mul_(t)
    return loss, s.exp_().sub_(pt).mul_(row_scale[:, None])


_FP32_COPY: list = []  # [(weakref to a 16-bit weight, its _version, its fp32 copy)], at most one entry


def _fp32_copy(w: torch.Tensor) -> torch.Tensor:
    """``w.float()``, kept for the last 16-bit weight asked for while that tensor lives unchanged.
    The CPU path calls the loss once per document of a batch with the same frozen lm_head; the
    upcast ([V, H], 29 ms for SmolLM2's) was a fifth of each call. An in-place change of ``w``
    bumps its _version and the copy is made again."""
    if w.dtype == torch.float32 or w.requires_grad:
        return w.float()
    if _FP32_COPY:
        ref, version, copy = _FP32_COPY[0]
        if ref() is w and version == w._version:
            return copy
    copy = w.float()
    _FP32_COPY[:] = [(weakref.ref(w), w._version, copy)]
    return copy


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk so that one [C, V] fp32 buffer stays near 256 MiB (C in [16, 1024], a power of 2)."""
    c = 1 << max(4, min(10, int(math.log2(max(1, (1 << 26) // max(vocab, 1))))))
    return c


def chunk_rows(chunk_size: Optional[int], vocab: int) -> int:
    """The rows per chunk an op runs with: ``chunk_size``, or ``default_chunk_size`` when it is None
    or 0. A negative size is refused (a loop over it would run no chunk and return garbage)."""
    cs = int(chunk_size) if chunk_size else default_chunk_size(vocab)
    if cs < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return cs


# ----------------------------------------------------------------------------------------------
# Fused linear + KL
# ----------------------------------------------------------------------------------------------
_CUBLAS_FP32_OUT: Optional[bool] = None  # does this torch have mm(out_dtype=float32) for 16-bit CUDA operands?


def _cublas_fp32_out(a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
    """a @ b with an fp32 result from cuBLAS (16-bit operands, fp32 accumulate and output, never
    rounded to 16 bits), or None where that is not available (CPU, fp32, older torch)."""
    global _CUBLAS_FP32_OUT
    if _CUBLAS_FP32_OUT is False or not (a.is_cuda and a.dtype == b.dtype and is_16bit(a.dtype)):
        return None
    try:
        out = torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError):  # older torch without mm(out_dtype=)
        _CUBLAS_FP32_OUT = False
        return None
    _CUBLAS_FP32_OUT = True
    return out


def _mm_fp32_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result. 16-bit CUDA operands use cuBLAS with fp32 output (no rounding)."""
    out = _cublas_fp32_out(a, b)
    return out if out is not None else torch.mm(a.float(), b.float())


def _logits_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[M, K] x [V, K] -> fp32 [M, V] logits. cuBLAS with fp32 output where torch offers it (16-bit
    CUDA operands: about twice the rate of the Triton GEMM on an H100), else the Triton kernel
    (fp32 operands, mixed dtypes, the CPU interpreter)."""
    out = _cublas_fp32_out(x, w.T) if x.shape[0] > 0 else None
    return out if out is not None else _logits_fp32_triton(x, w)


DW_SLICE_ELEMS = 1 << 26  # fp32 elements of one dW slice product (256 MiB)


def _vocab_slices(V: int, H: int):
    """Slices of the vocabulary whose [rows, H] fp32 block is about DW_SLICE_ELEMS elements, so that
    work on dW never needs a second [V, H] fp32 buffer."""
    step = max(1, DW_SLICE_ELEMS // max(H, 1))
    return [slice(v0, min(V, v0 + step)) for v0 in range(0, V, step)]


def _add_dw(dw: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """dw (fp32 [V, H]) += g^T @ h, g [C, V], h [C, H], one vocabulary slice at a time."""
    for sl in _vocab_slices(*dw.shape):
        dw[sl] += _mm_fp32_acc(g[:, sl].T, h)


def _logit_blocks(rows: int, vocab: int, device: torch.device):
    """The torch path's student and teacher fp32 [rows, vocab] logit blocks: reused buffers on CPU,
    where a fresh ~200 MB block is page-faulted in on every chunk (see cpu_scratch)."""
    if device.type == "cpu":
        return cpu_scratch("kl_student_logits", rows, vocab), cpu_scratch("kl_teacher_logits", rows, vocab)
    return (torch.empty(rows, vocab, device=device, dtype=torch.float32),
            torch.empty(rows, vocab, device=device, dtype=torch.float32))


def _add_bias_(z: torch.Tensor, b32: Optional[torch.Tensor]) -> torch.Tensor:
    """z [R, V] += b32 [V] in place (fp32 logits plus the head's fp32 bias); z as it is without a bias."""
    return z if b32 is None else z.add_(b32)


def _linear_kl_chunks(hs, ws, ht, wt, inv_temp, backend, chunk_size, row_scale, need_dh, need_dw, softcap=None,
                      bs=None, bt=None, need_db=False):
    """Loop over row chunks. Returns (loss_rows fp32 [N], dh [N, Hs] or None, dw fp32 [V, Hs] or None,
    db fp32 [V] or None).

    row_scale: fp32 [N] (gradient weight per row, already including 1/N for 'mean') or None
    for a forward without gradient. bs, bt: the student's and teacher's head biases [V], or None.
    """
    N = hs.shape[0]
    loss = torch.empty(N, device=hs.device, dtype=torch.float32)
    dh = torch.empty_like(hs) if (need_dh and row_scale is not None) else None
    dw = torch.zeros(ws.shape, device=ws.device, dtype=torch.float32) if (need_dw and row_scale is not None) else None
    db = torch.zeros(ws.shape[0], device=ws.device, dtype=torch.float32) if (need_db and row_scale is not None) else None
    # the biases in fp32, added to the fp32 logits straight out of the GEMM (before the cap)
    bs32 = None if bs is None else bs.detach().float()
    bt32 = None if bt is None else (bs32 if bt is bs else bt.detach().float())
    bf16_cpu = False
    if backend == "torch":
        # Upcast once per call: the CPU path multiplies in fp32 so logits keep fp32 precision.
        ws32 = _fp32_copy(ws)
        wt32 = ws32 if wt is ws else wt.float()
        # bf16 operands on a CPU with native bf16: the logit GEMMs run at the bf16 rate with fp32
        # products and output (exact for bf16 values, see cpu_bf16_products); dh takes g in bf16
        # as the GPU path does (it is written in bf16 anyway). Never the logits rounded to bf16.
        bf16_cpu = (hs.device.type == "cpu" and cpu_native_bf16()
                    and all(x.dtype == torch.bfloat16 for x in (hs, ht, ws, wt)))
    want_grad = row_scale is not None and (need_dh or need_dw or need_db)
    for c0 in range(0, N, chunk_size):
        c1 = min(N, c0 + chunk_size)
        hs_c, ht_c = hs[c0:c1], ht[c0:c1]
        scale_c = (row_scale[c0:c1] * inv_temp).contiguous() if want_grad else None
        if backend == "triton":
            s = _softcap_(_add_bias_(_logits_fp32(hs_c, ws), bs32), softcap)
            t = _softcap_(_add_bias_(_logits_fp32(ht_c, wt), bt32), softcap)
            loss[c0:c1], lse_s, lse_t = _kl_rows_forward(s, t, inv_temp, backend)
            if not want_grad:
                continue
            # 16-bit weights: the gradient is written once, in the weight dtype, for the tensor-core GEMMs.
            g_out = torch.empty(s.shape, device=s.device, dtype=ws.dtype) if is_16bit(ws.dtype) else s
            g = _kl_rows_grad(s, t, lse_s, lse_t, scale_c, inv_temp, backend, g_out, softcap)
        else:
            s, t = _logit_blocks(c1 - c0, ws.shape[0], hs.device)
            with cpu_bf16_products() if bf16_cpu else contextlib.nullcontext():
                torch.mm(hs_c.float(), ws32.T, out=s)
                torch.mm(ht_c.float(), wt32.T, out=t)
            _add_bias_(s, bs32)
            _add_bias_(t, bt32)
            loss[c0:c1], g = _kl_chunk_torch(s, t, inv_temp, scale_c, softcap)
            if not want_grad:
                continue
        del t
        if dh is not None:
            if bf16_cpu:
                dh[c0:c1] = torch.mm(g.to(torch.bfloat16), ws)  # oneDNN accumulates in fp32
            elif backend == "torch":
                dh[c0:c1] = (g @ ws32).to(hs.dtype)
            elif g.dtype == ws.dtype and g.is_cuda:
                dh[c0:c1] = torch.mm(g, ws).to(hs.dtype)  # cuBLAS accumulates in fp32
            else:
                dh[c0:c1] = _mm_fp32_acc(g, ws).to(hs.dtype)
        if dw is not None:
            _add_dw(dw, g, hs_c.to(g.dtype) if g.dtype != torch.float32 else hs_c)
        if db is not None:
            db += g.sum(0, dtype=torch.float32)
    return loss, dh, dw, db


def _scaled_cast(dw: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(dw * g).to(dtype), one vocabulary slice at a time."""
    out = torch.empty(dw.shape, device=dw.device, dtype=dtype)
    for sl in _vocab_slices(*dw.shape):
        out[sl] = dw[sl] * g
    return out


class FusedLinearKLFunction(torch.autograd.Function):
    """Autograd for fused_linear_kl on already-flattened, already-masked rows.

    Inputs: hs [N, Hs], ws [V, Hs], ht [N, Ht], wt [V, Ht] (or None for ws itself), bs [V] or None
    (the student head's bias), bt [V] or None (the teacher's: bs itself where the head is shared).
    Output: fp32 scalar for 'mean'/'sum', fp32 [N] for 'none'.
    """

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, bs, bt, inv_temp: float, reduction: str, chunk_size: int, backend: str,
                softcap: Optional[float] = None):
        need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        shared = wt is None
        wt_ = ws if shared else wt
        N = hs.shape[0]
        ctx.eager = reduction != "none" and (need_dh or need_dw or need_db)
        row_scale = None
        if ctx.eager:
            row_scale = torch.full((N,), 1.0 / reduction_divisor(reduction, N),
                                   device=hs.device, dtype=torch.float32)
        loss, dh, dw, db = _linear_kl_chunks(hs, ws, ht, wt_, inv_temp, backend, chunk_size, row_scale, need_dh,
                                             need_dw, softcap, bs, bt, need_db)
        ctx.inv_temp, ctx.backend, ctx.chunk_size, ctx.shared, ctx.softcap = inv_temp, backend, chunk_size, shared, softcap
        ctx.ws_dtype = ws.dtype
        ctx.bias_shared = bt is not None and bt is bs
        ctx.bs_dtype = None if bs is None else bs.dtype
        if ctx.eager:
            ctx.save_for_backward(dh, dw, db)
        else:
            ctx.save_for_backward(hs, ws, ht, wt_, bs, None if ctx.bias_shared else bt)
        return reduce_rows(loss, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        if ctx.eager:
            dh, dw, db = ctx.saved_tensors
            g = grad_out.to(torch.float32)
            dh_out = (dh * g.to(dh.dtype)) if (need_dh and dh is not None) else None
            dw_out = _scaled_cast(dw, g, ctx.ws_dtype) if (need_dw and dw is not None) else None
        else:
            hs, ws, ht, wt, bs, bt = ctx.saved_tensors
            _, dh_out, dw, db = _linear_kl_chunks(
                hs, ws, ht, wt, ctx.inv_temp, ctx.backend, ctx.chunk_size,
                grad_out.to(torch.float32).contiguous(), need_dh, need_dw, ctx.softcap,
                bs, bs if ctx.bias_shared else bt, need_db,
            )
            dw_out = dw.to(ws.dtype) if dw is not None else None
            g = 1.0  # grad_out is in db already (it was the row scale)
        db_out = (db * g).to(ctx.bs_dtype) if (need_db and db is not None) else None
        return dh_out, dw_out, None, None, db_out, None, None, None, None, None, None


def _check_kl_hidden_args(student_hidden, student_weight, teacher_hidden, teacher_weight, temperature):
    for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if student_weight.dim() != 2:
        raise ValueError(f"student_weight must be [V, H], got shape {tuple(student_weight.shape)}")
    if student_hidden.dim() < 1 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"student_hidden's last dim must match student_weight [V, H]: "
            f"student_hidden {tuple(student_hidden.shape)}, student_weight {tuple(student_weight.shape)}"
        )
    tw = student_weight if teacher_weight is None else teacher_weight
    if teacher_weight is not None:
        if not isinstance(teacher_weight, torch.Tensor) or teacher_weight.dim() != 2:
            raise ValueError(f"teacher_weight must be a [V, H_teacher] tensor, got {getattr(teacher_weight, 'shape', teacher_weight)}")
        if teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(
                f"vocab mismatch: student_weight {tuple(student_weight.shape)} vs teacher_weight {tuple(teacher_weight.shape)}"
            )
    if teacher_hidden.dim() < 1 or teacher_hidden.shape[-1] != tw.shape[1]:
        raise ValueError(
            f"teacher_hidden's last dim must match the teacher weight: teacher_hidden {tuple(teacher_hidden.shape)}, "
            f"{'teacher_weight' if teacher_weight is not None else 'student_weight (shared)'} {tuple(tw.shape)}"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden and teacher_hidden must have the same leading shape (N positions): "
            f"student_hidden {tuple(student_hidden.shape)}, teacher_hidden {tuple(teacher_hidden.shape)}"
        )
    named = [("student_hidden", student_hidden), ("student_weight", student_weight), ("teacher_hidden", teacher_hidden)]
    if teacher_weight is not None:
        named.append(("teacher_weight", teacher_weight))
    check_operands("fused_linear_kl", named)
    _check_temperature(temperature)


def check_bias(op: str, name: str, bias, weight: torch.Tensor) -> None:
    """Refuse a head bias that is not None or a float [V] tensor on ``weight``'s device, V = weight.shape[0]."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{op}: {name} must be a [V] tensor with V = {weight.shape[0]} (the head's rows), "
                         f"got {tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    check_operands(op, [("weight", weight), (name, bias)])


def _check_temperature(temperature) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def check_softcap(softcap) -> Optional[float]:
    """``softcap`` as a float, or None for no cap; anything but a positive finite number is refused."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not (isinstance(softcap, (int, float)) and softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a positive finite number (or None for no cap), got {softcap!r}")
    return float(softcap)


def _kept_rows(keep_mask: Optional[torch.Tensor], *rows: torch.Tensor):
    """Drop masked rows (a gather, differentiable). Returns (kept row indices or None, contiguous rows...)."""
    keep = None
    if keep_mask is not None:
        keep = keep_mask.to(rows[0].device).nonzero().squeeze(1)
        rows = tuple(r.index_select(0, keep) for r in rows)
    return (keep, *(r.contiguous() for r in rows))


def _scatter_rows(values: torch.Tensor, keep: Optional[torch.Tensor], n: int, lead_shape) -> torch.Tensor:
    if keep is None:
        return values.reshape(lead_shape)
    full = values.new_zeros(n)
    full = full.index_put((keep,), values)  # out of place, so autograd routes grad to kept rows only
    return full.reshape(lead_shape)


def fused_linear_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    softcap: Optional[float] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """KL(softmax((h_t W_t^T + b_t) / T) || softmax((h_s W_s^T + b_s) / T)), summed over the vocabulary.

    Args:
        student_hidden: [..., Hs], any float dtype; receives gradient.
        student_weight: [V, Hs] lm_head of the student; receives gradient if it requires grad.
        teacher_hidden: [..., Ht], same leading shape as ``student_hidden``; never receives gradient.
        teacher_weight: [V, Ht] or None to share ``student_weight`` (the KM case).
        temperature: T > 0 applied to both logit sets (no T^2 factor).
        mask: bool, leading shape; False positions are dropped from loss and gradient.
        reduction: 'mean' over kept positions, 'sum', or 'none' (fp32 [...] per position, 0 where masked).
        backend: 'auto' (Triton on CUDA, torch elsewhere), 'triton' or 'torch'.
        chunk_size: rows per chunk (default: [C, V] fp32 ~ 256 MiB).
        softcap: c > 0 to cap both logit sets at c * tanh(z / c) before the temperature (Gemma 2's
            ``final_logit_softcapping``), or None (default) for none.
        student_bias: [V], the student head's bias b_s (Phi-2's lm_head has one), added to its fp32
            logits before the cap; receives gradient if it requires grad. None (default): no bias.
        teacher_bias: [V], the teacher head's bias, only with a separate ``teacher_weight``; where the
            head is shared (``teacher_weight`` None) the teacher shares ``student_bias`` too.
    Returns:
        fp32 scalar, or fp32 tensor of the leading shape for reduction='none'.
    """
    check_reduction(reduction)
    _check_kl_hidden_args(student_hidden, student_weight, teacher_hidden, teacher_weight, temperature)
    softcap = check_softcap(softcap)
    check_bias("fused_linear_kl", "student_bias", student_bias, student_weight)
    if teacher_bias is not None and teacher_weight is None:
        raise ValueError("fused_linear_kl: teacher_bias without teacher_weight: a shared head (teacher_weight None) "
                         "shares student_bias too; pass the teacher's head as teacher_weight, or drop teacher_bias")
    check_bias("fused_linear_kl", "teacher_bias", teacher_bias, student_weight)
    be = resolve_backend(backend, student_hidden.device)
    lead_shape = student_hidden.shape[:-1]
    keep_mask = flatten_mask(mask, lead_shape)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    n = hs.shape[0]
    keep, hs, ht = _kept_rows(keep_mask, hs, ht)
    ws = student_weight if student_weight.stride(-1) == 1 else student_weight.contiguous()
    wt = None
    if teacher_weight is not None and teacher_weight is not student_weight:
        wt = teacher_weight.detach().contiguous()
    bs = student_bias
    bt = bs if teacher_weight is None else (None if teacher_bias is None else teacher_bias.detach())
    cs = chunk_rows(chunk_size, ws.shape[0])
    out = FusedLinearKLFunction.apply(hs, ws, ht, wt, bs, bt, 1.0 / float(temperature), reduction, cs, be, softcap)
    if reduction == "none":
        return _scatter_rows(out, keep, n, lead_shape)
    return out


class FusedLinearKL(nn.Module):
    """Module form of :func:`fused_linear_kl`; ``forward(student_hidden, student_weight, teacher_hidden,
    teacher_weight=None, mask=None, student_bias=None, teacher_bias=None)``."""

    def __init__(self, temperature: float = 1.0, reduction: str = "mean", backend: str = "auto",
                 chunk_size: Optional[int] = None, softcap: Optional[float] = None):
        super().__init__()
        check_reduction(reduction)
        self.temperature, self.reduction, self.backend, self.chunk_size = temperature, reduction, backend, chunk_size
        self.softcap = check_softcap(softcap)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight=None, mask=None,
                student_bias=None, teacher_bias=None):
        return fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight,
                               temperature=self.temperature, mask=mask, reduction=self.reduction,
                               backend=self.backend, chunk_size=self.chunk_size, softcap=self.softcap,
                               student_bias=student_bias, teacher_bias=teacher_bias)


# ----------------------------------------------------------------------------------------------
# KL from logits
# ----------------------------------------------------------------------------------------------
class KLDivLogitsFunction(torch.autograd.Function):
    """Rows already flattened and masked: s, t [N, V]. Saves lse per row; backward is one pass."""

    @staticmethod
    def forward(ctx, s, t, inv_temp: float, reduction: str, chunk_size: int, backend: str):
        N = s.shape[0]
        loss = torch.empty(N, device=s.device, dtype=torch.float32)
        lse_s = torch.empty_like(loss)
        lse_t = torch.empty_like(loss)
        for c0 in range(0, N, chunk_size):
            c1 = min(N, c0 + chunk_size)
            loss[c0:c1], lse_s[c0:c1], lse_t[c0:c1] = _kl_rows_forward(s[c0:c1], t[c0:c1], inv_temp, backend)
        ctx.save_for_backward(s, t, lse_s, lse_t)
        ctx.inv_temp, ctx.reduction, ctx.chunk_size, ctx.backend = inv_temp, reduction, chunk_size, backend
        return reduce_rows(loss, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        s, t, lse_s, lse_t = ctx.saved_tensors
        N = s.shape[0]
        if ctx.reduction == "none":
            row_scale = grad_out.to(torch.float32) * ctx.inv_temp
        else:
            g = grad_out.to(torch.float32) * ctx.inv_temp / reduction_divisor(ctx.reduction, N)
            row_scale = g.expand(N)
        row_scale = row_scale.contiguous()
        grad = torch.empty_like(s)
        for c0 in range(0, N, ctx.chunk_size):
            c1 = min(N, c0 + ctx.chunk_size)
            _kl_rows_grad(s[c0:c1], t[c0:c1], lse_s[c0:c1], lse_t[c0:c1], row_scale[c0:c1],
                          ctx.inv_temp, ctx.backend, grad[c0:c1])
        return grad, None, None, None, None, None


def kl_div_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """KL(softmax(teacher_logits / T) || softmax(student_logits / T)) summed over the last dim.

    Args:
        student_logits, teacher_logits: [..., V], same shape, any float dtype (statistics in fp32).
        temperature, mask, reduction, backend: as in :func:`fused_linear_kl`.
    Returns:
        fp32 scalar, or fp32 tensor of the leading shape for reduction='none'.
        Gradient flows to ``student_logits`` only, in its dtype.
    """
    check_reduction(reduction)
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise ValueError(f"{name} must be a tensor [..., V], got {getattr(t, 'shape', type(t).__name__)}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"vocab mismatch: student_logits {tuple(student_logits.shape)} vs teacher_logits {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same leading shape (N positions): "
            f"{tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    check_operands("kl_div_logits", [("student_logits", student_logits), ("teacher_logits", teacher_logits)])
    _check_temperature(temperature)
    be = resolve_backend(backend, student_logits.device)
    lead_shape = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    keep_mask = flatten_mask(mask, lead_shape)
    s = student_logits.reshape(-1, V)
    t = teacher_logits.detach().reshape(-1, V)
    n = s.shape[0]
    keep, s, t = _kept_rows(keep_mask, s, t)
    cs = chunk_rows(chunk_size, V)
    out = KLDivLogitsFunction.apply(s, t, 1.0 / float(temperature), reduction, cs, be)
    if reduction == "none":
        return _scatter_rows(out, keep, n, lead_shape)
    return out


class KLDivLogits(nn.Module):
    """Module form of :func:`kl_div_logits`."""

    def __init__(self, temperature: float = 1.0, reduction: str = "mean", backend: str = "auto",
                 chunk_size: Optional[int] = None):
        super().__init__()
        check_reduction(reduction)
        self.temperature, self.reduction, self.backend, self.chunk_size = temperature, reduction, backend, chunk_size

    def forward(self, student_logits, teacher_logits, mask=None):
        return kl_div_logits(student_logits, teacher_logits, temperature=self.temperature, mask=mask,
                             reduction=self.reduction, backend=self.backend, chunk_size=self.chunk_size)
