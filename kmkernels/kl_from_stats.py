"""KL(p_teacher || p_student) from the student's hidden states and two numbers cached per teacher
position: exact, with one vocabulary GEMM forward and one backward, no teacher logits.

For an lm_head W [V, H] shared by teacher and student and frozen (the KM case), temperature T:

    p_t = softmax(W h_t / T),   p_s = softmax(W h_s / T),   lse_s = logsumexp(W h_s / T)
    KL(p_t || p_s) = sum_v p_t log p_t - sum_v p_t log p_s
                   = negent_t - (h_s . e_t) / T + lse_s
    dKL/dh_s       = (W^T p_s - e_t) / T

    with e_t = W^T p_t [H] (the teacher's probability-weighted output embedding)
    and negent_t = sum_v p_t log p_t (its negative entropy).

The teacher enters only through e_t and negent_t. ``teacher_kl_stats`` computes them once from the
teacher's last hidden state; after that the KL of any student against that teacher needs neither
the teacher's logits nor a pass over them. Where the teacher is frozen and its states are cached
(kmtrain's teacher cache), this takes the teacher's logit GEMM and every [N, V] pass over its
logits out of each training step; ``fused_linear_kl`` recomputes them on every call.

With a bias b on the head (Phi-2's lm_head), the logits are W h + b, and

    sum_v p_t log p_s = (h_s . e_t + p_t . b) / T - lse_s,

so the KL keeps the form above with negent_t replaced by sum_v p_t log p_t - (p_t . b) / T: that is
what ``teacher_kl_stats`` returns as its second value for a biased head (the part of the KL that the
student cannot change), and lse_s is taken over the biased logits. No third statistic is needed.

Limits: W must not require gradient (dL/dW needs p_t itself; use ``fused_linear_kl`` to train the
lm_head), and the statistics hold for the W and the temperature they were computed with.

Precision: e_t and negent_t are fp32 from fp32 logits; the student's logits are fp32 straight out
of the GEMM, never rounded to 16 bits (SPEC.md section 4); W^T p_s is accumulated in fp32 and never
rounded before e_t is subtracted from it, because the gradient is that difference and can be much
smaller than either term. On the torch path that product is an fp32 GEMM; on the Triton path with
bf16 weights p_s is split into a bf16 high part and a bf16 low part (two tensor-core GEMMs with fp32
output whose sum carries ~16 bits of p_s), with fp16 or fp32 weights it is an fp32 GEMM.

Design otherwise as ``fused_linear_kl``: rows in chunks of C, so only [C, V] fp32 exists at a time;
with a scalar reduction the gradient is computed in the forward and the backward scales it.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import nn

from .fused_linear_kl import (_add_bias_, _check_temperature, _fp32_copy, _kept_rows, _logits_fp32, _mm_fp32_acc,
                              _pick_block, _scatter_rows, check_bias, chunk_rows)
from .utils import (HAS_TRITON, check_operands, check_reduction, cpu_bf16_products, cpu_native_bf16, cpu_scratch,
                    flatten_mask, reduce_rows, reduction_divisor, resolve_backend)

if HAS_TRITON:
    import triton
    import triton.language as tl

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _lse_rows_kernel(S, LSE, V, stride_s, inv_temp, BLOCK_V: tl.constexpr):
        """LSE[n] = logsumexp(S[n, :] * inv_temp): one program per row, one online pass."""
        row = tl.program_id(0).to(tl.int64)
        m = float("-inf")
        z = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            s = tl.load(S + row * stride_s + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(s, axis=0))
            z = z * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
            m = m_new
        tl.store(LSE + row, m + tl.log(z))

    @triton.jit
    def _probs_rows_kernel(S, LSE, HI, LO, V, stride_s, stride_hi, stride_lo, inv_temp,
                           SPLIT: tl.constexpr, BLOCK_V: tl.constexpr):
        """p = exp(S * inv_temp - LSE) written to HI in HI's dtype and, if SPLIT, the rounding
        remainder p - HI to LO. Grid: (rows, cdiv(V, BLOCK_V)). HI may alias S (fp32, in place):
        each element is read before it is written, by the same program."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        valid = offs < V
        s = tl.load(S + row * stride_s + offs, mask=valid, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp(s - tl.load(LSE + row))
        hi = p.to(HI.dtype.element_ty)
        tl.store(HI + row * stride_hi + offs, hi, mask=valid)
        if SPLIT:
            tl.store(LO + row * stride_lo + offs, (p - hi.to(tl.float32)).to(LO.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# Row passes (both backends): softmax statistics and W^T softmax
# ----------------------------------------------------------------------------------------------
def _softmax_rows_(s: torch.Tensor, inv_temp: float, backend: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(lse [R], z [R, 1] or None) of the fp32 logit rows ``s`` [R, V] at temperature 1/inv_temp.

    The torch path turns ``s`` in place into exp(s / T - max), whose row sums are ``z``: the
    probabilities are s / z, and the division is left to the [R, H] product (one [R, V] pass
    fewer; no [R, V] temporary either: on the CPU a fresh buffer of that size is page-faulted in
    on every call). The Triton path leaves ``s`` as it is and returns z = None."""
    R, V = s.shape
    if backend == "triton":
        lse = torch.empty(R, device=s.device, dtype=torch.float32)
        if R > 0:
            _lse_rows_kernel[(R,)](s, lse, V, s.stride(0), inv_temp, BLOCK_V=_pick_block(V, 16, 4096))
        return lse, None
    if inv_temp != 1.0:
        s.mul_(inv_temp)
    m = s.amax(-1, keepdim=True)
    s.sub_(m).exp_()
    z = s.sum(-1, keepdim=True)
    return (m + z.log()).squeeze(1), z


def _weighted_embedding(s: torch.Tensor, lse: torch.Tensor, z: Optional[torch.Tensor], w: torch.Tensor,
                        w32: Optional[torch.Tensor], inv_temp: float, backend: str) -> torch.Tensor:
    """W^T softmax(s / T) for each row, fp32 [R, H], accumulated and returned in fp32.

    Torch path: ``s`` already holds the probabilities times ``z`` (``_softmax_rows_``), one fp32
    GEMM with the fp32 copy ``w32``, divided by ``z``. Triton path: the probabilities are written over ``s`` (fp32 weights) or into
    16-bit parts for the tensor cores (bf16: high + low part; fp16, whose range would flush small
    probabilities to zero, upcasts to an fp32 GEMM)."""
    R, V = s.shape
    if backend != "triton":
        return torch.mm(s, w32).div_(z)
    if R == 0:
        return torch.zeros(0, w.shape[1], device=s.device, dtype=torch.float32)
    block_v = _pick_block(V, 16, 2048)
    grid = (R, triton.cdiv(V, block_v))
    if w.dtype == torch.bfloat16:
        parts = torch.empty((2, R, V), device=s.device, dtype=torch.bfloat16)
        _probs_rows_kernel[grid](s, lse, parts[0], parts[1], V, s.stride(0), V, V, inv_temp, SPLIT=True, BLOCK_V=block_v)
        both = _mm_fp32_acc(parts.view(2 * R, V), w)  # [2R, H] fp32: high parts' rows, then low parts'
        return both[:R] + both[R:]
    _probs_rows_kernel[grid](s, lse, s, s, V, s.stride(0), s.stride(0), s.stride(0), inv_temp, SPLIT=False,
                             BLOCK_V=block_v)
    return _mm_fp32_acc(s, w)


def _row_chunks(hs: torch.Tensor, w: torch.Tensor, backend: str, chunk_size: int, bias: Optional[torch.Tensor]):
    """Yield (c0, c1, fp32 logits [c1 - c0, V], w32 or None) for each chunk of rows of ``hs``: hs W^T,
    plus ``bias`` [V] (in fp32) where it is not None.

    The torch path multiplies in fp32 (bf16 operands on a CPU with native bf16 at the bf16 rate,
    with fp32 products and output: exact for bf16 values) into one reused CPU buffer."""
    N, V = hs.shape[0], w.shape[0]
    b32 = None if bias is None else bias.detach().float()
    w32 = None
    bf16_cpu = False
    if backend != "triton":
        w32 = _fp32_copy(w)
        bf16_cpu = hs.device.type == "cpu" and cpu_native_bf16() and hs.dtype == w.dtype == torch.bfloat16
    for c0 in range(0, N, chunk_size):
        c1 = min(N, c0 + chunk_size)
        if backend == "triton":
            yield c0, c1, _add_bias_(_logits_fp32(hs[c0:c1], w), b32), None
            continue
        s = cpu_scratch("logits", c1 - c0, V) if hs.device.type == "cpu" else \
            torch.empty(c1 - c0, V, device=hs.device, dtype=torch.float32)
        with cpu_bf16_products() if bf16_cpu else contextlib.nullcontext():
            torch.mm(hs[c0:c1].float(), w32.T, out=s)
        yield c0, c1, _add_bias_(s, b32), w32


# ----------------------------------------------------------------------------------------------
# The teacher's statistics
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_kl_stats(
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """What the KL needs of a teacher: (e_t = W^T p_t, fp32 [..., H]; negent_t = sum_v p_t log p_t,
    fp32 [...]), p_t = softmax((W h_t + b) / T).

    Args:
        teacher_hidden: [..., H], the teacher's last (post-norm) hidden state, any float dtype.
        weight: [V, H], the lm_head the student shares.
        temperature: T > 0, the temperature the KL will use.
        backend: 'auto' (Triton on CUDA, torch elsewhere), 'triton' or 'torch'.
        chunk_size: rows per chunk (default: [C, V] fp32 ~ 256 MiB).
        bias: [V], the lm_head's bias b where it has one, else None. With a bias the second value
            is sum_v p_t log p_t - (p_t . b) / T, the form ``fused_linear_kl_from_stats`` takes (see
            the module's docstring), not the negative entropy itself.
    """
    _check_temperature(temperature)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a [V, H] tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if not isinstance(teacher_hidden, torch.Tensor) or teacher_hidden.dim() < 1 or teacher_hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"teacher_hidden must be [..., H] with H = weight.shape[1] = {weight.shape[1]}, "
                         f"got {tuple(getattr(teacher_hidden, 'shape', ()))}")
    check_operands("teacher_kl_stats", [("teacher_hidden", teacher_hidden), ("weight", weight)])
    check_bias("teacher_kl_stats", "bias", bias, weight)
    be = resolve_backend(backend, teacher_hidden.device)
    lead = teacher_hidden.shape[:-1]
    ht = teacher_hidden.detach().reshape(-1, weight.shape[1]).contiguous()
    w = weight.detach() if weight.stride(-1) == 1 else weight.detach().contiguous()
    inv_temp = 1.0 / float(temperature)
    cs = chunk_rows(chunk_size, w.shape[0])
    emb = torch.empty(ht.shape, device=ht.device, dtype=torch.float32)
    negent = torch.empty(ht.shape[0], device=ht.device, dtype=torch.float32)
    # no autocast: it would round the fp32 probabilities to 16 bits before the W^T p GEMM
    with torch.autocast(ht.device.type, enabled=False):
        for c0, c1, s, w32 in _row_chunks(ht, w, be, cs, bias):
            lse, z = _softmax_rows_(s, inv_temp, be)
            emb[c0:c1] = _weighted_embedding(s, lse, z, w, w32, inv_temp, be)
            # sum_v p_t (z_v / T - lse) with sum_v p_t z_v = p_t^T W h_t = e_t . h_t: no second pass over V
            # (with a bias, z_v is the biased logit less b_v: p_t . b / T is left out, as the KL wants it)
            negent[c0:c1] = inv_temp * (emb[c0:c1] * ht[c0:c1].float()).sum(-1) - lse
    return emb.reshape(*lead, w.shape[1]), negent.reshape(lead)


# ----------------------------------------------------------------------------------------------
# The KL
# ----------------------------------------------------------------------------------------------
def _kl_stats_chunks(hs, w, bias, emb, negent, inv_temp, backend, chunk_size, row_scale):
    """Returns (loss_rows fp32 [N], dh [N, H] in hs's dtype or None). row_scale: fp32 [N] gradient
    weight per row (1/N included for 'mean'), or None for a forward without gradient."""
    N = hs.shape[0]
    loss = torch.empty(N, device=hs.device, dtype=torch.float32)
    dh = torch.empty_like(hs) if row_scale is not None else None
    with torch.autocast(hs.device.type, enabled=False):  # as in teacher_kl_stats
        _kl_stats_chunk_loop(hs, w, bias, emb, negent, inv_temp, backend, chunk_size, row_scale, loss, dh)
    return loss, dh


def _kl_stats_chunk_loop(hs, w, bias, emb, negent, inv_temp, backend, chunk_size, row_scale, loss, dh) -> None:
    for c0, c1, s, w32 in _row_chunks(hs, w, backend, chunk_size, bias):
        lse, z = _softmax_rows_(s, inv_temp, backend)
        h32 = hs[c0:c1].float()
        loss[c0:c1] = negent[c0:c1] - inv_temp * (h32 * emb[c0:c1]).sum(-1) + lse
        if dh is not None:
            wp = _weighted_embedding(s, lse, z, w, w32, inv_temp, backend)
            dh[c0:c1] = wp.sub_(emb[c0:c1]).mul_((row_scale[c0:c1] * inv_temp)[:, None]).to(hs.dtype)


class FusedLinearKLFromStatsFunction(torch.autograd.Function):
    """Autograd on flattened, kept rows: hs [N, H], w [V, H] frozen, bias [V] frozen or None, emb fp32
    [N, H], negent fp32 [N]."""

    @staticmethod
    def forward(ctx, hs, w, bias, emb, negent, inv_temp: float, reduction: str, chunk_size: int, backend: str):
        N = hs.shape[0]
        ctx.eager = reduction != "none" and ctx.needs_input_grad[0]
        row_scale = None
        if ctx.eager:
            row_scale = torch.full((N,), 1.0 / reduction_divisor(reduction, N),
                                   device=hs.device, dtype=torch.float32)
        loss, dh = _kl_stats_chunks(hs, w, bias, emb, negent, inv_temp, backend, chunk_size, row_scale)
        ctx.inv_temp, ctx.backend, ctx.chunk_size = inv_temp, backend, chunk_size
        ctx.save_for_backward(*((dh,) if ctx.eager else (hs, w, bias, emb, negent)))
        return reduce_rows(loss, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        nones = (None,) * 8
        if not ctx.needs_input_grad[0]:
            return (None, *nones)
        if ctx.eager:
            (dh,) = ctx.saved_tensors
            return (dh * grad_out.to(torch.float32).to(dh.dtype), *nones)
        hs, w, bias, emb, negent = ctx.saved_tensors
        _, dh = _kl_stats_chunks(hs, w, bias, emb, negent, ctx.inv_temp, ctx.backend, ctx.chunk_size,
                                 grad_out.to(torch.float32).contiguous())
        return (dh, *nones)


def fused_linear_kl_from_stats(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_embedding: torch.Tensor,
    teacher_neg_entropy: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """KL(p_t || softmax((W h_s + b) / T)) summed over the vocabulary, the teacher given by
    ``teacher_kl_stats`` (computed with the same ``weight``, ``bias`` and ``temperature``).

    Args:
        student_hidden: [..., H], any float dtype; receives gradient.
        weight: [V, H] lm_head, frozen (requires_grad False).
        teacher_embedding: fp32 [..., H], e_t from ``teacher_kl_stats``; no gradient.
        teacher_neg_entropy: fp32 [...], negent_t from ``teacher_kl_stats``; no gradient.
            Both may be on another device (the host): they are copied to ``student_hidden``'s.
        temperature, mask, reduction, backend, chunk_size: as in ``fused_linear_kl``.
        bias: [V], the lm_head's bias where it has one (frozen), else None.
    Returns:
        fp32 scalar, or fp32 tensor of the leading shape for reduction='none'.
    """
    check_reduction(reduction)
    _check_temperature(temperature)
    for name, t in (("student_hidden", student_hidden), ("weight", weight), ("teacher_embedding", teacher_embedding),
                    ("teacher_neg_entropy", teacher_neg_entropy)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2 or student_hidden.dim() < 1 or student_hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"student_hidden [..., H] and weight [V, H] must share H: student_hidden "
                         f"{tuple(student_hidden.shape)}, weight {tuple(weight.shape)}")
    if weight.requires_grad:
        raise ValueError("weight requires grad, but the teacher's statistics give no gradient for the lm_head "
                         "(it needs p_t itself): freeze it, or use fused_linear_kl with the teacher's hidden state")
    lead_shape = student_hidden.shape[:-1]
    if tuple(teacher_embedding.shape) != tuple(student_hidden.shape):
        raise ValueError(f"teacher_embedding must have student_hidden's shape {tuple(student_hidden.shape)}, "
                         f"got {tuple(teacher_embedding.shape)}")
    if tuple(teacher_neg_entropy.shape) != tuple(lead_shape):
        raise ValueError(f"teacher_neg_entropy must have the leading shape {tuple(lead_shape)}, "
                         f"got {tuple(teacher_neg_entropy.shape)}")
    # The teacher's statistics may stay on the host (a memory-mapped cache): they are copied below.
    check_operands("fused_linear_kl_from_stats", [("student_hidden", student_hidden), ("weight", weight)])
    check_bias("fused_linear_kl_from_stats", "bias", bias, weight)
    if bias is not None and bias.requires_grad:
        raise ValueError("bias requires grad, but the teacher's statistics give no gradient for the lm_head's bias "
                         "(it needs p_t itself): freeze it, or use fused_linear_kl with the teacher's hidden state")
    be = resolve_backend(backend, student_hidden.device)
    keep_mask = flatten_mask(mask, lead_shape)
    H = weight.shape[1]
    hs = student_hidden.reshape(-1, H)
    emb = teacher_embedding.detach().reshape(-1, H).to(hs.device, torch.float32)
    negent = teacher_neg_entropy.detach().reshape(-1).to(hs.device, torch.float32)
    n = hs.shape[0]
    keep, hs, emb, negent = _kept_rows(keep_mask, hs, emb, negent)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    cs = chunk_rows(chunk_size, w.shape[0])
    out = FusedLinearKLFromStatsFunction.apply(hs, w, bias, emb, negent, 1.0 / float(temperature), reduction, cs, be)
    if reduction == "none":
        return _scatter_rows(out, keep, n, lead_shape)
    return out


class FusedLinearKLFromStats(nn.Module):
    """Module form of :func:`fused_linear_kl_from_stats`;
    ``forward(student_hidden, weight, teacher_embedding, teacher_neg_entropy, mask=None, bias=None)``."""

    def __init__(self, temperature: float = 1.0, reduction: str = "mean", backend: str = "auto",
                 chunk_size: Optional[int] = None):
        super().__init__()
        check_reduction(reduction)
        self.temperature, self.reduction, self.backend, self.chunk_size = temperature, reduction, backend, chunk_size

    def forward(self, student_hidden, weight, teacher_embedding, teacher_neg_entropy, mask=None, bias=None):
        return fused_linear_kl_from_stats(student_hidden, weight, teacher_embedding, teacher_neg_entropy,
                                          temperature=self.temperature, mask=mask, reduction=self.reduction,
                                          backend=self.backend, chunk_size=self.chunk_size, bias=bias)
