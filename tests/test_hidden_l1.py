"""hidden_l1 against a float64 reference."""
import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES
from kmkernels import HiddenL1, hidden_l1
from reference import hidden_l1_ref, rel_err

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _layers(L, lead, H, dtype, grad=True):
    hs = [torch.randn(*lead, H).to(DEVICE, dtype).requires_grad_(grad) for _ in range(L)]
    ht = [torch.randn(*lead, H).to(DEVICE, dtype) for _ in range(L)]
    return hs, ht


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("L,lead,H,mask_kind,stacked,grad_scale", [
    (3, (11,), 24, "none", False, 1.0),
    (2, (1,), 7, "none", True, -2.0),         # N = 1, odd H, teacher as one [L, N, H] tensor
    (4, (2, 9), 300, "partial", False, 0.5),  # H > one block, 2-D leading shape
    (2, (5,), 16, "all_false", False, 1.0),
])
def test_hidden_l1(backend, dtype, L, lead, H, mask_kind, stacked, grad_scale):
    hs, ht = _layers(L, lead, H, dtype)
    mask = None
    if mask_kind == "partial":
        mask = torch.rand(lead) > 0.5
        mask.view(-1)[0] = True
    elif mask_kind == "all_false":
        mask = torch.zeros(lead, dtype=torch.bool)
    teacher = torch.stack(ht) if stacked else ht
    out = hidden_l1(hs, teacher, mask=mask.to(DEVICE) if mask is not None else None, backend=backend)
    hs64 = [s.detach().double().cpu().requires_grad_() for s in hs]
    ref = hidden_l1_ref(hs64, [t.cpu() for t in ht], mask)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    grads = torch.autograd.grad(out * grad_scale, hs)
    rgrads = torch.autograd.grad(ref * grad_scale, hs64, allow_unused=True)
    for g, rg in zip(grads, rgrads):
        rg = torch.zeros_like(hs64[0]) if rg is None else rg
        assert g.dtype == dtype
        assert rel_err(g, rg) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_mixed_layers_strides_and_frozen_layers(backend, dtype):
    """Layers of different hidden sizes and row strides (each run of alike layers is one launch),
    and layers without gradient in the middle of a run, against the float64 reference."""
    N, sizes = 13, [24, 24, 40, 24, 24, 24]
    hs, ht = [], []
    for l, H in enumerate(sizes):
        wide = torch.randn(N, 2 * H).to(DEVICE, dtype)
        s = wide[:, :H] if l == 4 else torch.randn(N, H).to(DEVICE, dtype)  # layer 4: row stride 2H
        hs.append(s.requires_grad_(l != 1))  # layer 1 is frozen
        ht.append(torch.randn(N, H).to(DEVICE, dtype))
    out = hidden_l1(hs, ht, backend=backend)
    hs64 = [s.detach().double().cpu().requires_grad_() for s in hs]
    ref = hidden_l1_ref(hs64, [t.cpu() for t in ht])
    assert rel_err(out, ref) < 1e-5
    trainable = [l for l in range(len(sizes)) if l != 1]
    grads = torch.autograd.grad(out, [hs[l] for l in trainable])
    rgrads = torch.autograd.grad(ref, [hs64[l] for l in trainable])
    for g, rg in zip(grads, rgrads):
        assert g.dtype == dtype and rel_err(g, rg) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_norms_used(backend):
    hs, ht = _layers(3, (6,), 10, torch.float32)
    norms = torch.stack([t.abs().sum() for t in ht])
    a = hidden_l1(hs, ht, backend=backend)
    b = hidden_l1(hs, ht, teacher_norms=norms, backend=backend)
    assert rel_err(b, a) < 1e-6
    c = hidden_l1(hs, ht, teacher_norms=norms * 2, backend=backend)  # the given norms are really used
    assert rel_err(c, a / 2) < 1e-6


def test_backends_agree_and_deterministic():
    hs, ht = _layers(3, (13,), 40, torch.float16)
    res = {}
    for be in BACKENDS:
        out = hidden_l1(hs, ht, backend=be)
        res[be] = (out, *torch.autograd.grad(out, hs))
    for a, b in zip(res["torch"], res["triton"]):
        assert rel_err(a, b) < 1e-3
    out = hidden_l1(hs, ht, backend="triton")
    again = (out, *torch.autograd.grad(out, hs))
    for a, b in zip(res["triton"], again):
        assert torch.equal(a, b)


def test_module_and_errors():
    hs, ht = _layers(2, (4,), 8, torch.float32)
    assert torch.equal(HiddenL1(backend="torch")(hs, ht), hidden_l1(hs, ht, backend="torch"))
    with pytest.raises(ValueError, match="layer counts differ"):
        hidden_l1(hs, ht[:1])
    with pytest.raises(ValueError, match="shape"):
        hidden_l1(hs, [torch.randn(4, 9), torch.randn(4, 8)])
    with pytest.raises(ValueError, match="mask"):
        hidden_l1(hs, ht, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="teacher_norms"):
        hidden_l1(hs, ht, teacher_norms=torch.ones(3))
    with pytest.raises(ValueError, match="backend"):
        hidden_l1(hs, ht, backend="cpu")
    with pytest.raises(ValueError, match=r"student_hiddens as a tensor must be \[L, \.\.\., H\], got shape \(8,\)"):
        hidden_l1(torch.randn(8), ht)
    with pytest.raises(ValueError, match="teacher_hiddens must be a sequence of tensors"):
        hidden_l1(hs, [ht[0], "layer 1"])
    with pytest.raises(ValueError, match="student_hiddens is empty: need at least one layer"):
        hidden_l1([], [])
    two_lengths = [torch.randn(4, 8), torch.randn(5, 8)]  # each layer's pair agrees, the layers do not
    with pytest.raises(ValueError, match=r"layer 1: leading shape \(5,\) differs from layer 0's \(4,\)"):
        hidden_l1(two_lengths, [t.clone() for t in two_lengths])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layer_with_an_all_zero_teacher_adds_nothing(backend):
    """sum|h_t| = 0 in one layer (its positions kept): that layer adds 0 and no gradient, the others
    are averaged over all L layers as usual (as in the docstring), not inf or NaN."""
    hs, ht = _layers(3, (7,), 24, torch.float32)
    ht[1] = torch.zeros_like(ht[1])
    out = hidden_l1(hs, ht, backend=backend)
    want = sum((s.detach().double() - t.double()).abs().sum() / t.double().abs().sum()
               for i, (s, t) in enumerate(zip(hs, ht)) if i != 1) / 3
    assert rel_err(out, want) < 1e-5
    grads = torch.autograd.grad(out, hs)
    assert torch.count_nonzero(grads[1]) == 0 and torch.isfinite(torch.cat([g.flatten() for g in grads])).all()
    for i in (0, 2):
        want_g = torch.sign(hs[i].detach().double() - ht[i].double()) / (3 * ht[i].double().abs().sum())
        assert rel_err(grads[i], want_g) < 1e-5
