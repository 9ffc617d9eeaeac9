"""Attention for a bf16 training pass on a CPU: what PyTorch's math path computes, in fewer passes.

PyTorch's math path (the faster of its two CPU paths for short bf16 training passes, see
``models.cpu_bf16_attention``) upcasts q, k and v to fp32 after transformers has repeated k and v
for every query head, scales q and k in two more passes, and checks every score row for a fully
masked one (three more passes over the [B, H, T, S] scores) before its fp32 softmax. This does the
same arithmetic (fp32 scores, fp32 softmax, fp32 P @ V, the output rounded to bf16) with the query
heads that share a key head stacked into one matrix (no repeated k and v), the scale and the mask
added inside the score GEMM, and the mask's bias built once per forward for all layers.
``Q K^T`` and ``dO V^T`` multiply bf16 values, so oneDNN's bf16 mode computes them exactly at its
bf16 rate (``kmkernels.utils.cpu_bf16_products``); the products with the fp32 probabilities stay fp32.

Measured on a 2-core CPU with native bf16 (2026-12-03), SmolLM2-135M's shapes: one layer's
attention forward + backward for 16 sequences of 78-166 tokens 42 against 56 ms; a decoder forward
+ backward of that batch with the grouped LoRA 7.7 against 8.4 s (medians of 5, alternated in one
process). Against float64 the output and dq match the math path's error, and dk and dv are closer
(their sums over the query heads that share a key head are taken in fp32, where the math path sums
bf16 gradients of the repeated heads); tests/test_cpu_attention.py checks both.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional, Tuple

import torch

from kmkernels.utils import cpu_bf16_products


def _contiguous(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in ``dtype``, contiguous, in one pass (``to`` alone returns x as it is when it has the dtype)."""
    return x.contiguous() if x.dtype == dtype else x.to(dtype, memory_format=torch.contiguous_format)


class CPUTrainingAttentionFunction(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v for q [B, Hq, T, D], k and v [B, Hkv, S, D] (Hq = g * Hkv),
    any float dtype; bias fp32 [B * Hkv, g * T, S]; dead: bool [B * Hkv, g * T, 1] rows with no
    key to attend to (their output is 0, as in PyTorch's math path) or None. Returns [B, T, Hq, D]
    contiguous in q's dtype (the layout transformers' attention functions return)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, dead, scale: float):
        B, Hq, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        g = Hq // Hkv
        with torch.autocast("cpu", enabled=False):  # fp32 math whatever the autocast around it
            qg = _contiguous(q, torch.float32).view(B * Hkv, g * T, D)
            kf = _contiguous(k, torch.float32).view(B * Hkv, S, D)
            vf = _contiguous(v, torch.float32).view(B * Hkv, S, D)
            exact = q.dtype == k.dtype == torch.bfloat16
            with cpu_bf16_products() if exact else contextlib.nullcontext():
                p = torch.baddbmm(bias, qg, kf.transpose(1, 2), alpha=scale)
            p = torch.softmax(p, -1)
            if dead is not None:
                p.masked_fill_(dead, 0.0)
            o = torch.bmm(p, vf)
        ctx.save_for_backward(qg, kf, vf, p, o)
        ctx.scale, ctx.exact, ctx.dims = scale, exact, (B, Hq, Hkv, T, S, D)
        return _contiguous(o.view(B, Hq, T, D).transpose(1, 2), q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        qg, kf, vf, p, o = ctx.saved_tensors
        B, Hq, Hkv, T, S, D = ctx.dims
        dtype = grad_out.dtype
        with torch.autocast("cpu", enabled=False):
            do = _contiguous(grad_out.transpose(1, 2), torch.float32)
            do = do.view(B * Hkv, -1, D)
            with cpu_bf16_products() if ctx.exact and dtype == torch.bfloat16 else contextlib.nullcontext():
                ds = torch.bmm(do, vf.transpose(1, 2))  # dP
            dv = torch.bmm(p.transpose(1, 2), do)
            # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O)
            ds.sub_((do * o).sum(-1, keepdim=True)).mul_(p)
            dq = torch.bmm(ds, kf).mul_(ctx.scale)
            dk = torch.bmm(ds.transpose(1, 2), qg).mul_(ctx.scale)
        return (dq.view(B, Hq, T, D).to(dtype), dk.view(B, Hkv, S, D).to(dtype), dv.view(B, Hkv, S, D).to(dtype),
                None, None, None)


# One forward's mask bias, shared by its layers (they all get the same mask tensor).
_BIAS: dict = {}


def _mask_bias(mask: Optional[torch.Tensor], B: int, Hkv: int, g: int, T: int, S: int
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(bias fp32 [B * Hkv, g * T, S], dead rows or None) for a boolean mask [B or 1, 1, T, S]
    (True: attend) or, with ``mask`` None, a causal one."""
    key = (getattr(mask, "_version", None), B, Hkv, g, T, S)
    hit = _BIAS.get("entry")
    if hit is not None and hit[1] is mask and hit[0] == key:  # the same mask object, unchanged
        return hit[2], hit[3]
    m = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None] if mask is None else mask
    m = m.expand(B, 1, T, S)
    bias = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, torch.finfo(torch.float32).min)
    bias = bias[:, :, None].expand(B, Hkv, g, T, S).reshape(B * Hkv, g * T, S)
    dead = ~m.any(-1, keepdim=True)  # [B, 1, T, 1]
    dead = dead[:, :, None].expand(B, Hkv, g, T, 1).reshape(B * Hkv, g * T, 1) if bool(dead.any()) else None
    _BIAS["entry"] = (key, mask, bias, dead)
    return bias, dead


def training_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, fallback=None, **kwargs):
    """A transformers attention function (the signature of its ``sdpa_attention_forward``):
    CPUTrainingAttentionFunction where it applies (CPU tensors, no dropout, a boolean mask or a
    causal one over equal query and key lengths, no soft-capping, biases or sinks), else
    ``fallback`` (default: transformers' sdpa function)."""
    if fallback is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as fallback
    B, Hq, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    usable = (query.device.type == "cpu" and dropout == 0.0 and Hq % Hkv == 0 and value.shape[-1] == D
              and not any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux", "sinks"))
              and (attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4
                   and attention_mask.shape[1] == 1 and attention_mask.shape[-2:] == (T, S)
                   or attention_mask is None and causal and T == S))
    if not usable:
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else D ** -0.5
    bias, dead = _mask_bias(attention_mask, B, Hkv, Hq // Hkv, T, S)
    return CPUTrainingAttentionFunction.apply(query, key, value, bias, dead, float(scale)), None


@contextlib.contextmanager
def cpu_training_attention() -> Iterator[None]:
    """Inside, models whose attention implementation is transformers' "sdpa" run
    ``training_attention`` instead; the mapping is restored on exit, and the mask bias dropped."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had, before = "sdpa" in local, local.get("sdpa")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = functools.partial(training_attention, fallback=ALL_ATTENTION_FUNCTIONS["sdpa"])
    try:
        yield
    finally:
        if had:
            local["sdpa"] = before
        else:
            local.pop("sdpa", None)
        _BIAS.clear()
