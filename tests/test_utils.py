"""kmkernels.utils: where Triton is not installed, every op runs its PyTorch path."""
import importlib.metadata

import pytest

from conftest import requires_cuda, run_without_triton

_OPS_WITHOUT_TRITON = """
import torch
from kmkernels import dcd_loss, fused_linear_kl, grouped_lora, hidden_l1
from kmkernels.utils import HAS_TRITON

assert not HAS_TRITON
assert not [m for m in sys.modules if m.split(".")[0] == "triton"]
torch.manual_seed(0)
h_s, h_t, W = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8), torch.randn(20, 8)
kl = fused_linear_kl(h_s, W, h_t)
p_t = (h_t.double() @ W.double().T).log_softmax(-1)
ref = (p_t.exp() * (p_t - (h_s.double() @ W.double().T).log_softmax(-1))).sum(-1).mean()
assert torch.allclose(kl.double(), ref, rtol=1e-5), (kl, ref)
kl.backward()
assert h_s.grad is not None
layers_s, layers_t = [torch.randn(2, 3, 8)], [torch.randn(2, 3, 8)]
l1 = hidden_l1(layers_s, layers_t)
ref = (layers_s[0].double() - layers_t[0].double()).abs().sum() / layers_t[0].double().abs().sum()
assert torch.allclose(l1.double(), ref, rtol=1e-5), (l1, ref)
x, A, B = torch.randn(5, 8), torch.randn(2, 4, 8), torch.randn(2, 8, 4)
ids = torch.tensor([0, 1, 1, -1, 0])
y = grouped_lora(x, A, B, ids, scaling=0.5)
for i, a in enumerate(ids.tolist()):
    want = torch.zeros(8).double() if a < 0 else 0.5 * (x[i].double() @ A[a].double().T) @ B[a].double().T
    assert torch.allclose(y[i].double(), want, rtol=1e-5, atol=1e-5), i
for call in (lambda: fused_linear_kl(h_s, W, h_t, backend="triton"),
             lambda: grouped_lora(x, A, B, ids, scaling=0.5, backend="triton")):
    try:
        call()
        raise SystemExit("backend='triton' ran without triton")
    except ValueError as e:
        assert "triton is not installed" in str(e), e
print("ok")
"""


def test_ops_run_their_torch_path_where_triton_is_not_installed():
    """A macOS or Windows laptop has no Triton: kmkernels imports, backend="auto" runs the PyTorch
    path (checked against the plain formulas in float64), and backend="triton" says triton is missing."""
    child = run_without_triton(_OPS_WITHOUT_TRITON)
    assert child.returncode == 0 and child.stdout.strip().endswith("ok"), child.stderr[-3000:]


def test_triton_is_required_only_where_it_has_wheels():
    """Triton ships wheels for Linux only; required everywhere, it made `pip install kmkernels` fail
    on macOS and Windows ("No matching distribution found for triton")."""
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in importlib.metadata.requires("kmkernels")]
    triton = [r for r in reqs if r.name == "triton"]
    assert len(triton) == 1 and triton[0].marker is not None
    for system, platform, wanted in (("Linux", "linux", True), ("Darwin", "darwin", False),
                                     ("Windows", "win32", False)):
        env = {"platform_system": system, "sys_platform": platform, "extra": ""}
        assert triton[0].marker.evaluate(env) is wanted, system
        # torch itself is required everywhere: the PyTorch paths need it
        assert any(r.name == "torch" and (r.marker is None or r.marker.evaluate(env)) for r in reqs)



def _device_mismatch_calls(dev: str, other: str):
    """(op, the tensor named in the error, call(backend)) for each public op, that tensor on ``other``."""
    import torch

    from kmkernels import (fused_linear_kl, fused_linear_kl_from_stats, grouped_lora, hidden_l1, kl_div_logits,
                           teacher_kl_stats)

    def r(*shape, on=dev):
        return torch.randn(*shape, device=on)

    ids = torch.tensor([0, 1, -1], device=dev)
    return [
        ("fused_linear_kl", "student_weight", lambda be: fused_linear_kl(r(3, 8), r(16, 8, on=other), r(3, 8), backend=be)),
        ("fused_linear_kl", "teacher_hidden", lambda be: fused_linear_kl(r(3, 8), r(16, 8), r(3, 8, on=other), backend=be)),
        ("fused_linear_kl", "teacher_weight",
         lambda be: fused_linear_kl(r(3, 8), r(16, 8), r(3, 4), teacher_weight=r(16, 4, on=other), backend=be)),
        ("kl_div_logits", "teacher_logits", lambda be: kl_div_logits(r(3, 16), r(3, 16, on=other), backend=be)),
        ("hidden_l1", "teacher_hiddens[1]",
         lambda be: hidden_l1([r(3, 8), r(3, 8)], [r(3, 8), r(3, 8, on=other)], backend=be)),
        ("hidden_l1", "student_hiddens[1]",
         lambda be: hidden_l1([r(3, 8), r(3, 8, on=other)], [r(3, 8), r(3, 8)], backend=be)),
        ("teacher_kl_stats", "weight", lambda be: teacher_kl_stats(r(3, 8), r(16, 8, on=other), backend=be)),
        ("fused_linear_kl_from_stats", "weight",
         lambda be: fused_linear_kl_from_stats(r(3, 8), r(16, 8, on=other), r(3, 8), r(3), backend=be)),
        ("grouped_lora", "lora_b", lambda be: grouped_lora(r(3, 8), r(2, 4, 8), r(2, 8, 4, on=other), ids, backend=be)),
    ]


@pytest.mark.parametrize("dev,other", [("cpu", "meta"), pytest.param("cuda", "cpu", marks=requires_cuda)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tensors_on_two_devices_are_refused_by_name(dev, other, backend, monkeypatch):
    """A host tensor among CUDA ones (a teacher state read from a memory-mapped cache) used to reach
    hidden_l1's Triton kernels through its table of addresses: an illegal memory access that ends
    the process. Every op now refuses mixed devices first, naming the tensor and both devices."""
    if backend == "triton" and dev == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    for op, name, call in _device_mismatch_calls(dev, other):
        with pytest.raises(ValueError) as err:
            call(backend)
        msg = str(err.value)
        assert msg.startswith(f"{op}: {name} is on {other}") and f"is on {dev}" in msg, (op, msg)


def test_operands_that_are_not_real_floats_are_refused_by_name():
    """Token ids or a complex tensor passed for hidden states, logits or LoRA weights: the torch
    paths cast them in silence (a loss from token ids) and the Triton paths failed inside a
    kernel. Each op now names the tensor and its dtype."""
    import torch

    from kmkernels import (fused_linear_kl, fused_linear_kl_from_stats, grouped_lora, hidden_l1, kl_div_logits,
                           teacher_kl_stats)

    h, w, ids = torch.randn(3, 8), torch.randn(16, 8), torch.tensor([0, 1, -1])
    tokens = torch.randint(0, 16, (3, 8))
    calls = [
        ("fused_linear_kl", "student_hidden", torch.int64, lambda: fused_linear_kl(tokens, w, h)),
        ("fused_linear_kl", "teacher_hidden", torch.complex64, lambda: fused_linear_kl(h, w, h.to(torch.complex64))),
        ("kl_div_logits", "student_logits", torch.int64, lambda: kl_div_logits(tokens, h)),
        ("hidden_l1", "teacher_hiddens[0]", torch.int64, lambda: hidden_l1([h], [tokens])),
        ("teacher_kl_stats", "teacher_hidden", torch.int64, lambda: teacher_kl_stats(tokens, w)),
        ("fused_linear_kl_from_stats", "student_hidden", torch.int64,
         lambda: fused_linear_kl_from_stats(tokens, w, h, h[:, 0])),
        ("grouped_lora", "x", torch.int64, lambda: grouped_lora(tokens, torch.randn(2, 4, 8), torch.randn(2, 8, 4), ids)),
        ("grouped_lora", "lora_a", torch.float8_e4m3fn,
         lambda: grouped_lora(h, torch.randn(2, 4, 8).to(torch.float8_e4m3fn), torch.randn(2, 8, 4), ids)),
    ]
    for op, name, dtype, call in calls:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == f"{op}: {name} must be a float16, bfloat16, float32 or float64 tensor, got {dtype}"
