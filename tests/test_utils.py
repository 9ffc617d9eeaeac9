"""kmkernels.utils: where Triton is not installed, every op runs its PyTorch path."""
import importlib.metadata

from conftest import run_without_triton

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
