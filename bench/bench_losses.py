"""pytest-benchmark microbenchmarks for the losses: ``pytest bench/bench_losses.py``.

Small shapes on CPU (torch path); on a GPU the Triton path too. The full tables with floors
and peak memory come from ``python -m bench.losses``.
"""
import pytest
import torch

from kmkernels import fused_linear_kl, fused_linear_kl_from_stats, hidden_l1, teacher_kl_stats

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
BACKENDS = ["torch", "triton"] if GPU else ["torch"]
N, H, V = (8192, 4096, 128256) if GPU else (256, 576, 49152)
DT = torch.bfloat16 if GPU else torch.float32


def reference(hs, ws, ht):
    s, t = (hs @ ws.T).float(), (ht @ ws.T).float()
    lps, lpt = s.log_softmax(-1), t.log_softmax(-1)
    return (lpt.exp() * (lpt - lps)).sum(-1).mean()


@pytest.fixture(scope="module")
def kl_inputs():
    hs = torch.randn(N, H, device=DEV).to(DT).requires_grad_()
    ws = (torch.randn(V, H, device=DEV) / H**0.5).to(DT)
    ht = torch.randn(N, H, device=DEV).to(DT)
    return hs, ws, ht


def _run(fn, hs):
    (g,) = torch.autograd.grad(fn(), [hs])
    if GPU:
        torch.cuda.synchronize()
    return g


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_kl_fwd_bwd(benchmark, kl_inputs, backend):
    hs, ws, ht = kl_inputs
    benchmark(_run, lambda: fused_linear_kl(hs, ws, ht, backend=backend), hs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_kl_softcap_fwd_bwd(benchmark, kl_inputs, backend):
    """The same KL under Gemma 2's soft cap (30): what capping both logit sets and its derivative cost."""
    hs, ws, ht = kl_inputs
    benchmark(_run, lambda: fused_linear_kl(hs, ws, ht, softcap=30.0, backend=backend), hs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_kl_bias_fwd_bwd(benchmark, kl_inputs, backend):
    """The same KL with a biased head (Phi-2's lm_head): what adding the bias to both logit sets costs."""
    hs, ws, ht = kl_inputs
    bias = torch.randn(V, device=DEV).to(DT)
    benchmark(_run, lambda: fused_linear_kl(hs, ws, ht, student_bias=bias, backend=backend), hs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_kl_from_stats_fwd_bwd(benchmark, kl_inputs, backend):
    """The same KL from the teacher's cached statistics (computed once, as kmtrain's cache does)."""
    hs, ws, ht = kl_inputs
    emb, negent = teacher_kl_stats(ht, ws, backend=backend)
    benchmark(_run, lambda: fused_linear_kl_from_stats(hs, ws, emb, negent, backend=backend), hs)


def test_reference_kl_fwd_bwd(benchmark, kl_inputs):
    hs, ws, ht = kl_inputs
    benchmark(_run, lambda: reference(hs, ws, ht), hs)


@pytest.mark.parametrize("backend", BACKENDS + ["naive"])
def test_hidden_l1_fwd_bwd(benchmark, backend):
    L, n, h = (32, 8192, 4096) if GPU else (30, 1024, 576)
    hs = [torch.randn(n, h, device=DEV).to(DT).requires_grad_() for _ in range(L)]
    ht = [torch.randn(n, h, device=DEV).to(DT) for _ in range(L)]
    if backend == "naive":
        fn = lambda: torch.stack([(s - t).abs().sum() / t.abs().sum() for s, t in zip(hs, ht)]).mean()  # noqa: E731
    else:
        fn = lambda: hidden_l1(hs, ht, backend=backend)  # noqa: E731

    def step():
        torch.autograd.grad(fn(), hs)
        if GPU:
            torch.cuda.synchronize()

    benchmark(step)
