"""pytest-benchmark microbenchmarks for grouped_lora: ``pytest bench/bench_lora.py``.

The full shape sweep with memory-floor fractions is ``python -m bench.lora``.
"""
import pytest
import torch

from bench.lora import delta_fn, make

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
METHODS = ["kmkernels-triton", "loop (torch path)", "torch._grouped_mm"] if GPU else ["loop (torch path)"]
N, DIN, DOUT, R = (8192, 4096, 4096, 16) if GPU else (2048, 576, 576, 16)
DT = torch.bfloat16 if GPU else torch.float32


@pytest.mark.parametrize("D", [1, 32])
@pytest.mark.parametrize("method", METHODS)
def test_grouped_lora_fwd_bwd(benchmark, method, D):
    x, A, B, ids, _ = make(N, DIN, DOUT, R, D, DT, True)
    f = delta_fn(method, x, A, B, ids)
    dy = torch.ones(N, DOUT, device=DEV, dtype=DT)

    def step():
        torch.autograd.grad(f(), (x, A, B), dy)
        if GPU:
            torch.cuda.synchronize()

    benchmark(step)


@pytest.mark.parametrize("method", METHODS)
def test_grouped_lora_fwd_serving(benchmark, method):
    x, A, B, ids, _ = make(N, DIN, DOUT, R, 128 if GPU else 32, DT, False)
    f = delta_fn(method, x, A, B, ids)

    def step():
        with torch.no_grad():
            f()
        if GPU:
            torch.cuda.synchronize()

    benchmark(step)
