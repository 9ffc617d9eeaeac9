"""Small helpers shared by every op: backend choice, argument checks, Triton availability."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Sequence, Tuple

import torch

try:  # Triton is a hard dependency on Linux, but keep import errors readable elsewhere.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only on platforms without a Triton wheel
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` to ``triton`` on CUDA and ``torch`` elsewhere; validate explicit choices."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (device.type == "cuda" and HAS_TRITON) else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' was asked for but triton is not installed")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device}); "
                "set TRITON_INTERPRET=1 to run the Triton kernels on CPU, or use backend='torch'"
            )
    return backend


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def reduction_divisor(reduction: str, rows: int) -> int:
    """What a sum of ``rows`` per-row losses is divided by: ``rows`` (at least 1) for 'mean', else 1.
    A divisor, not its reciprocal as a factor, so that a loss and its gradient round as a division does."""
    return max(rows, 1) if reduction == "mean" else 1


def reduce_rows(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """fp32 [N] per-row losses -> 'none': [N] as they are; 'sum': their sum; 'mean': the sum / N (0 for N = 0)."""
    return loss if reduction == "none" else loss.sum() / reduction_divisor(reduction, loss.shape[0])


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_operands(op: str, tensors: Sequence[Tuple[str, torch.Tensor]]) -> None:
    """Raise ValueError naming the first of ``tensors`` (name, tensor) that is not a fp16, bf16,
    fp32 or fp64 tensor, or not on the first's device.

    Why: hidden_l1's Triton kernels reach the layers through a table of raw addresses, so a
    host tensor among CUDA ones is read on the GPU: an illegal memory access that ends the
    process. An integer or complex operand (token ids passed for hidden states) was cast in
    silence by the torch paths and failed inside the Triton ones. Elsewhere torch would raise,
    but deep inside the op and without names."""
    first_name, first = tensors[0]
    for name, t in tensors:
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be a float16, bfloat16, float32 or float64 tensor, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             f"move {name} to {first.device} first")


def flatten_mask(mask: torch.Tensor | None, lead_shape: Sequence[int], name: str = "mask") -> torch.Tensor | None:
    """Check that ``mask`` has the leading shape of the hidden states and return it flattened to [N] bool."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {tuple(lead_shape)}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(
            f"{name} must have the leading shape of the hidden states {tuple(lead_shape)}, got {tuple(mask.shape)}"
        )
    return mask.reshape(-1).to(torch.bool)


def is_16bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def cpu_native_bf16() -> bool:
    """Whether this x86 CPU multiplies bf16 natively under oneDNN (AVX512-BF16 or AMX). There a bf16
    matmul measured 5.5x the fp32 rate (AMD EPYC with AVX512-BF16); elsewhere bf16 is emulated."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
    except (AttributeError, RuntimeError):  # an older build without these queries
        return False


@contextlib.contextmanager
def cpu_bf16_products() -> Iterator[None]:
    """fp32 CPU matmuls inside run in oneDNN's bf16 mode: operands rounded to bf16, products
    accumulated and returned in fp32. For operands that already hold bf16 values the rounding is
    the identity and every product is exact in fp32, so the result is an fp32 GEMM of them, at the
    bf16 rate (2.8x fp32 for [160, 576] x [576, 49152] here). A process-wide flag, restored on exit."""
    mm = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if mm is None or not hasattr(mm, "fp32_precision"):
        yield
        return
    prev = mm.fp32_precision
    mm.fp32_precision = "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = prev


_CPU_SCRATCH: dict = {}


def cpu_scratch(name: str, rows: int, cols: int) -> torch.Tensor:
    """A reused fp32 [rows, cols] CPU buffer, one per ``name``, grown as needed and kept.

    Why: a fresh [C, V] logit block (~200 MB at C=1024, V=49152) comes from mmap and is
    page-faulted in on every chunk of every call: measured 0.17 s of a 0.45 s [1024, 576] x
    [576, 49152] logit GEMM on a 2-core CPU. The caller must be done with the buffer before it
    asks for the same name again (no autograd state may keep it); single-threaded use only."""
    need = rows * cols
    buf = _CPU_SCRATCH.get(name)
    if buf is None or buf.numel() < need:
        _CPU_SCRATCH[name] = None  # free the old one before the larger allocation
        buf = torch.empty(need, dtype=torch.float32)
        _CPU_SCRATCH[name] = buf
    return buf[:need].view(rows, cols)


def free_cpu_scratch() -> None:
    """Release the buffers ``cpu_scratch`` keeps (up to ~256 MiB each)."""
    _CPU_SCRATCH.clear()


@contextlib.contextmanager
def naming_file_on_error(path: "os.PathLike | str") -> Iterator[None]:
    """Inside, an OSError that names no file is raised again naming ``path``. Why: out of disk shows at a
    file's write or close, where Python's OSError names none ("[Errno 28] No space left on device")."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, os.fspath(path)) from e
