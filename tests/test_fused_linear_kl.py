"""fused_linear_kl and kl_div_logits against a float64 reference that materialises [N, V]."""
import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES, requires_cuda
from kmkernels import FusedLinearKL, KLDivLogits, fused_linear_kl, kl_div_logits
from reference import kl_ref, linear_kl_ref, random_mask, rel_err

BACKENDS = ["torch", "triton"]
# Relative-norm tolerances per input dtype (gradients come back in the input dtype).
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _make(n, hs_dim, v, dtype, ht_dim=None, seed=None, lead=None, separate_teacher_w=False, weight_grad=True):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    ht_dim = ht_dim or hs_dim
    shape = lead if lead is not None else (n,)
    hs = torch.randn(*shape, hs_dim, generator=g).to(DEVICE, dtype).requires_grad_()
    ws = (torch.randn(v, hs_dim, generator=g) / hs_dim**0.5 * 3).to(DEVICE, dtype).requires_grad_(weight_grad)
    ht = torch.randn(*shape, ht_dim, generator=g).to(DEVICE, dtype)
    wt = (torch.randn(v, ht_dim, generator=g) / ht_dim**0.5 * 3).to(DEVICE, dtype) if separate_teacher_w else None
    return hs, ws, ht, wt


def _make_bias(v, dtype, seed, grad):
    """A head bias [V] of logits' size (~2, as Phi-2's lm_head bias spreads them)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(v, generator=g) * 2).to(DEVICE, dtype).requires_grad_(grad)


def _check(backend, dtype, n=23, hs_dim=24, v=301, ht_dim=None, temperature=1.0, mask_kind="none",
           reduction="mean", separate_teacher_w=False, grad_scale=1.0, lead=None, chunk_size=8, weight_grad=True,
           softcap=None, bias=None):
    """``bias``: None, "student" (a bias on the student's head: the shared head's, or with a separate
    teacher head the student's only), "both" (and another on the teacher's head) or "teacher"."""
    hs, ws, ht, wt = _make(n, hs_dim, v, dtype, ht_dim, lead=lead, separate_teacher_w=separate_teacher_w,
                           weight_grad=weight_grad)
    seed = torch.randint(0, 2**31, ()).item()
    bs = _make_bias(v, dtype, seed, weight_grad) if bias in ("student", "both") else None
    bt = _make_bias(v, dtype, seed + 1, False) if bias in ("teacher", "both") else None
    lead_shape = hs.shape[:-1]
    mask = random_mask(mask_kind, lead_shape)
    mask_d = mask.to(DEVICE) if mask is not None else None
    out = fused_linear_kl(hs, ws, ht, wt, temperature=temperature, mask=mask_d, reduction=reduction,
                          backend=backend, chunk_size=chunk_size, softcap=softcap, student_bias=bs, teacher_bias=bt)
    # Reference on the same (rounded) inputs, in float64.
    hs64 = hs.detach().double().cpu().requires_grad_()
    ws64 = ws.detach().double().cpu().requires_grad_()
    ht64 = ht.detach().double().cpu()
    wt64 = wt.detach().double().cpu() if wt is not None else None
    bs64 = bs.detach().double().cpu().requires_grad_() if bs is not None else None
    bt64 = bt.detach().double().cpu() if bt is not None else None
    ref = linear_kl_ref(hs64, ws64, ht64, wt64, temperature, mask, reduction, softcap, bs64, bt64)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5 if dtype == torch.float32 else rel_err(out, ref) < 5e-5 * (10 if dtype == torch.bfloat16 else 1) + 1e-6

    if reduction == "none":  # feed per-position losses into a weighted sum: grad_output is a tensor
        w = torch.randn(lead_shape)
        loss, ref_loss = (out * w.to(DEVICE)).sum() * grad_scale, (ref * w.double()).sum() * grad_scale
    else:
        loss, ref_loss = out * grad_scale, ref * grad_scale
    inputs = [hs, ws] if weight_grad else [hs]
    ref_inputs = [hs64, ws64] if weight_grad else [hs64]
    if bs is not None and weight_grad:  # a trainable head's bias gets its gradient too
        inputs, ref_inputs = inputs + [bs], ref_inputs + [bs64]
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs)
    for name, g, rg in zip(["d_student_hidden", "d_student_weight", "d_student_bias"], grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape
        err = rel_err(g, rg)
        assert err < TOL[dtype], f"{name}: rel err {err:.3g}"
    if mask is not None and (~mask).any():
        dh = grads[0].detach().cpu()
        assert (dh[~mask] == 0).all(), "masked positions must get zero gradient"
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_basic_mean(backend, dtype):
    _check(backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize(
    "case",
    [
        dict(n=1, v=97),                                    # N = 1, prime V
        dict(hs_dim=13, v=1000),                            # odd H, V not a multiple of any block
        dict(temperature=2.5, grad_scale=-0.7),             # T != 1, grad_output != 1
        dict(mask_kind="partial"),
        dict(mask_kind="all_false"),
        dict(reduction="sum", mask_kind="partial", grad_scale=3.0),
        dict(reduction="none", mask_kind="partial", temperature=0.6),
        dict(separate_teacher_w=True),                      # teacher weight != student weight
        dict(ht_dim=40, separate_teacher_w=True),           # teacher H != student H
        dict(lead=(3, 5), mask_kind="partial"),             # [B, T, H] leading dims
        dict(weight_grad=False, reduction="none"),          # frozen lm_head (the KM case)
        # Gemma 2's soft cap on the logits (~3 in size: a cap of 2 bends most of them), with T != 1 and
        # grad_output != 1, per position under a mask (backward recomputes), a separate teacher head
        dict(softcap=2.0, temperature=1.7, grad_scale=-0.7),
        dict(softcap=1.5, reduction="none", mask_kind="partial", temperature=0.6),
        dict(softcap=4.0, separate_teacher_w=True, v=1000, hs_dim=13),
        # a biased head (Phi-2's lm_head): shared by both (T != 1, grad_output != 1; per position under
        # a mask; frozen, the KM case; under a cap), and separate heads biased on one side or both
        dict(bias="student", temperature=1.7, grad_scale=-0.7),
        dict(bias="student", reduction="none", mask_kind="partial", temperature=0.6),
        dict(bias="student", weight_grad=False, softcap=2.0),
        dict(bias="both", separate_teacher_w=True, ht_dim=40, reduction="sum"),
        dict(bias="teacher", separate_teacher_w=True, v=1000, hs_dim=13),
    ],
    ids=["n1", "odd_h_v", "temp_gradscale", "mask", "mask_all_false", "sum", "none", "teacher_w", "teacher_h",
         "lead3d", "frozen_w", "softcap", "softcap_none", "softcap_teacher_w", "bias", "bias_none", "bias_frozen_cap",
         "bias_both", "bias_teacher"],
)
def test_cases(backend, dtype, case):
    _check(backend, dtype, **case)


def test_row_gradient_with_softcap_backends_agree():
    """The row-gradient helper's two paths under a soft cap: (p_s - p_t) * scale * (1 - (s / c)^2)
    over capped logits, against float64 autograd through the cap."""
    import importlib

    flk = importlib.import_module("kmkernels.fused_linear_kl")
    g = torch.Generator().manual_seed(3)
    z_s, z_t = torch.randn(7, 150, generator=g) * 4, torch.randn(7, 150, generator=g) * 4
    scale = torch.rand(7, generator=g) + 0.5
    cap, inv_temp = 2.5, 1 / 1.3
    z64 = z_s.double().requires_grad_()
    ref = (kl_ref(cap * torch.tanh(z64 / cap), cap * torch.tanh(z_t.double() / cap), 1.3, reduction="none")
           * scale.double()).sum()
    ref_grad = torch.autograd.grad(ref, z64)[0]
    s, t = (cap * torch.tanh(z / cap) for z in (z_s, z_t))
    lse_s, lse_t = torch.logsumexp(s * inv_temp, -1), torch.logsumexp(t * inv_temp, -1)
    for be in BACKENDS:
        s_be = s.clone().to(DEVICE)  # out aliases s, as the fused path does with fp32 weights
        out = flk._kl_rows_grad(s_be, t.to(DEVICE), lse_s.to(DEVICE), lse_t.to(DEVICE), (scale * inv_temp).to(DEVICE),
                                inv_temp, be, s_be, softcap=cap)
        assert rel_err(out, ref_grad) < 1e-5, be


def test_all_false_mask_is_zero_not_nan():
    hs, ws, ht, _ = _make(6, 8, 50, torch.float32, seed=1)
    for be in BACKENDS:
        out = fused_linear_kl(hs, ws, ht, mask=torch.zeros(6, dtype=torch.bool, device=DEVICE), backend=be)
        gh, gw = torch.autograd.grad(out, [hs, ws])
        assert out.item() == 0.0
        assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_backends_agree(dtype):
    hs, ws, ht, _ = _make(19, 20, 257, dtype)
    res = {}
    for be in BACKENDS:
        out = fused_linear_kl(hs, ws, ht, temperature=1.3, backend=be, chunk_size=4)
        res[be] = (out, *torch.autograd.grad(out, [hs, ws]))
    for a, b in zip(res["triton"], res["torch"]):
        assert rel_err(a, b) < TOL[dtype]


def test_chunk_size_does_not_change_result():
    hs, ws, ht, _ = _make(21, 16, 129, torch.float32)
    outs = [fused_linear_kl(hs, ws, ht, backend="triton", chunk_size=c) for c in (1, 5, 64)]
    for o in outs[1:]:
        assert rel_err(o, outs[0]) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grad_in_vocabulary_slices(backend, monkeypatch):
    """dW is accumulated in vocabulary slices (to bound its fp32 scratch): uneven slices give the
    same weight gradient as the float64 reference."""
    import importlib

    flk = importlib.import_module("kmkernels.fused_linear_kl")  # the module; the package exports the function

    monkeypatch.setattr(flk, "DW_SLICE_ELEMS", 7 * 16)  # 7 vocabulary rows per slice at H=16
    hs, ws, ht, _ = _make(13, 16, 101, torch.float32)
    out = fused_linear_kl(hs, ws, ht, backend=backend, chunk_size=5)
    dws = torch.autograd.grad(out, ws)[0]
    ref = linear_kl_ref(hs.double(), ws.double(), ht.double(), ws.detach().double())  # no grad via the teacher
    assert rel_err(dws, torch.autograd.grad(ref, ws)[0]) < TOL[torch.float32]


def test_cpu_scratch_reuse_across_calls_and_shapes():
    """The CPU torch path writes its logits into buffers kept between calls (cpu_scratch). A call at
    another shape in between, the statistics' op sharing the machinery, and a release of the
    buffers must change nothing: each call matches its float64 reference, and the gradients an
    earlier call returned are not overwritten by a later one."""
    from kmkernels import free_cpu_scratch, fused_linear_kl_from_stats, teacher_kl_stats

    def run(hs, ws, ht):
        out = fused_linear_kl(hs, ws, ht, backend="torch", chunk_size=8)
        return out, torch.autograd.grad(out, [hs, ws])

    def check(hs, ws, ht, out, grads):
        hs64, ws64 = hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
        ref = linear_kl_ref(hs64, ws64, ht.double(), ws64.detach())
        assert rel_err(out, ref) < 1e-5
        for g, rg in zip(grads, torch.autograd.grad(ref, [hs64, ws64])):
            assert rel_err(g, rg) < TOL[torch.float32]

    a = _make(23, 16, 301, torch.float32)
    b = _make(11, 24, 157, torch.float32)
    out_a, grads_a = run(*a[:3])
    kept = [g.clone() for g in grads_a]
    out_b, grads_b = run(*b[:3])
    hs_b, ws_b, ht_b, _ = b
    emb, negent = teacher_kl_stats(ht_b, ws_b.detach(), backend="torch", chunk_size=4)
    fused_linear_kl_from_stats(hs_b, ws_b.detach(), emb, negent, backend="torch", chunk_size=4).backward()
    free_cpu_scratch()
    out_a2, grads_a2 = run(*a[:3])
    for g, k in zip(grads_a, kept):
        assert torch.equal(g, k)
    check(*a[:3], out_a, grads_a)
    check(*b[:3], out_b, grads_b)
    assert torch.equal(out_a2, out_a) and all(torch.equal(x, y) for x, y in zip(grads_a2, grads_a))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    hs, ws, ht, _ = _make(17, 16, 200, torch.float32)
    runs = []
    for _ in range(2):
        out = fused_linear_kl(hs, ws, ht, backend=backend, chunk_size=8)
        runs.append((out, *torch.autograd.grad(out, [hs, ws])))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_teacher_gets_no_gradient():
    hs, ws, ht, wt = _make(5, 8, 40, torch.float32, separate_teacher_w=True)
    ht.requires_grad_()
    wt.requires_grad_()
    out = fused_linear_kl(hs, ws, ht, wt, backend="torch")
    out.backward()
    assert ht.grad is None and wt.grad is None
    assert hs.grad is not None and ws.grad is not None


def test_module_matches_functional():
    hs, ws, ht, _ = _make(9, 12, 77, torch.float32)
    m = FusedLinearKL(temperature=2.0, reduction="sum", backend="torch")
    assert torch.equal(m(hs, ws, ht), fused_linear_kl(hs, ws, ht, temperature=2.0, reduction="sum", backend="torch"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ht=torch.randn(4, 8)), "same leading shape"),
        (dict(wt=torch.randn(51, 8)), "vocab mismatch"),
        (dict(mask=torch.ones(3, dtype=torch.bool)), "mask must have the leading shape"),
        (dict(reduction="avg"), "reduction"),
        (dict(backend="cuda"), "backend"),
        (dict(temperature=0.0), "temperature"),
        (dict(ws=torch.randn(50, 7)), "student_weight"),
        (dict(hs=[[0.0] * 8] * 5), "student_hidden must be a torch.Tensor, got list"),
        (dict(ws=torch.randn(50)), r"student_weight must be \[V, H\], got shape \(50,\)"),
        (dict(wt=torch.randn(50)), r"teacher_weight must be a \[V, H_teacher\] tensor, got torch.Size\(\[50\]\)"),
        (dict(ht=torch.randn(5, 7)),
         r"teacher_hidden's last dim must match the teacher weight: teacher_hidden \(5, 7\), student_weight \(shared\) "
         r"\(50, 8\)"),
        (dict(mask=[True] * 5), r"mask must be a torch.Tensor of shape \(5,\), got list"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(hs=torch.randn(5, 8), ws=torch.randn(50, 8), ht=torch.randn(5, 8), wt=None, mask=None,
                reduction="mean", backend="torch", temperature=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_linear_kl(args["hs"], args["ws"], args["ht"], args["wt"], mask=args["mask"],
                        reduction=args["reduction"], backend=args["backend"], temperature=args["temperature"])


def test_bad_bias():
    hs, ws, ht, _ = _make(5, 8, 50, torch.float32, seed=2)
    with pytest.raises(ValueError, match=r"student_bias must be a \[V\] tensor with V = 50"):
        fused_linear_kl(hs, ws, ht, student_bias=torch.randn(49, device=DEVICE))
    with pytest.raises(ValueError, match="teacher_bias without teacher_weight"):
        fused_linear_kl(hs, ws, ht, teacher_bias=torch.randn(50, device=DEVICE))
    with pytest.raises(ValueError, match=r"teacher_bias must be a \[V\] tensor"):
        fused_linear_kl(hs, ws, ht, ws.detach(), teacher_bias=torch.randn(1, 50, device=DEVICE))
    with pytest.raises(ValueError, match="student_bias must be a float16"):
        fused_linear_kl(hs, ws, ht, student_bias=torch.arange(50, device=DEVICE))


def test_module_passes_the_biases():
    hs, ws, ht, wt = _make(7, 8, 60, torch.float32, seed=4, separate_teacher_w=True)
    bs, bt = _make_bias(60, torch.float32, 5, False), _make_bias(60, torch.float32, 6, False)
    a = FusedLinearKL(temperature=1.4)(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt)
    b = fused_linear_kl(hs, ws, ht, wt, temperature=1.4, student_bias=bs, teacher_bias=bt)
    assert torch.equal(a, b) and not torch.equal(a, fused_linear_kl(hs, ws, ht, wt, temperature=1.4))


# ------------------------------------------------------------------------------------- kl_div_logits
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("reduction,mask_kind,temperature", [("mean", "none", 1.0), ("none", "partial", 1.7),
                                                             ("sum", "partial", 0.8), ("mean", "all_false", 1.0)])
def test_kl_div_logits(backend, dtype, reduction, mask_kind, temperature):
    n, v = 13, 333
    s = (torch.randn(n, v) * 3).to(DEVICE, dtype).requires_grad_()
    t = (torch.randn(n, v) * 3).to(DEVICE, dtype)
    mask = None
    if mask_kind == "partial":
        mask = torch.rand(n) > 0.5
        mask[0] = True
    elif mask_kind == "all_false":
        mask = torch.zeros(n, dtype=torch.bool)
    out = kl_div_logits(s, t, temperature=temperature, mask=mask.to(DEVICE) if mask is not None else None,
                        reduction=reduction, backend=backend, chunk_size=4)
    s64 = s.detach().double().cpu().requires_grad_()
    ref = kl_ref(s64, t.detach().cpu(), temperature, mask, reduction)
    assert rel_err(out, ref) < 1e-5
    w = torch.randn(ref.shape)
    (g,) = torch.autograd.grad((out * w.to(DEVICE)).sum(), [s])
    (rg,) = torch.autograd.grad((ref * w.double()).sum(), [s64])
    assert g.dtype == dtype
    assert rel_err(g, rg) < TOL[dtype]


def test_kl_div_logits_module_and_errors():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    assert torch.equal(KLDivLogits(backend="torch")(s, t), kl_div_logits(s, t, backend="torch"))
    with pytest.raises(ValueError, match="vocab mismatch"):
        kl_div_logits(s, torch.randn(4, 11))
    with pytest.raises(ValueError, match="same leading shape"):
        kl_div_logits(s, torch.randn(5, 10))
    with pytest.raises(ValueError, match=r"student_logits must be a tensor \[\.\.\., V\], got torch.Size\(\[\]\)"):
        kl_div_logits(torch.tensor(1.0), t)
    with pytest.raises(ValueError, match=r"teacher_logits must be a tensor \[\.\.\., V\], got list"):
        kl_div_logits(s, t.tolist())
    # a negative chunk would loop over nothing and return an uninitialised loss
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        kl_div_logits(s, t, chunk_size=-2)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fused_linear_kl(torch.randn(4, 8), torch.randn(10, 8), torch.randn(4, 8), chunk_size=-1)


def test_kl_minus_inf_teacher_logits():
    """A teacher logit of -inf (p_t = 0) contributes nothing, not NaN."""
    s = torch.randn(3, 20, device=DEVICE, requires_grad=True)
    t = torch.randn(3, 20, device=DEVICE)
    t[:, :5] = float("-inf")
    for be in BACKENDS:
        out = kl_div_logits(s, t, backend=be)
        ref = kl_ref(s.detach().cpu(), t.cpu())
        assert rel_err(out, ref) < 1e-5


def test_bf16_cpu_logits_are_not_rounded():
    """bf16 operands on the CPU path (oneDNN's bf16 products where the CPU has them, fp32 upcast
    elsewhere): the logits keep fp32 precision, so the loss matches float64 on the same bf16 values
    to fp32 level (logits rounded to bf16 would be off by ~1e-3 here); dh comes back in bf16."""
    hs, ws, ht, _ = _make(96, 128, 4096, torch.bfloat16, weight_grad=False)
    hs, ws, ht = hs.cpu().detach().requires_grad_(), ws.cpu().detach(), ht.cpu()
    ht = (ht + 0.5 * hs.detach()).to(torch.bfloat16)  # a teacher near the student, as after training
    out = fused_linear_kl(hs, ws, ht, backend="torch", chunk_size=32)
    (gh,) = torch.autograd.grad(out, [hs])
    hs64 = hs.detach().double().requires_grad_()
    ref = linear_kl_ref(hs64, ws.double(), ht.double(), ws.double())
    (rgh,) = torch.autograd.grad(ref, [hs64])
    assert rel_err(out, ref) < 1e-5
    assert gh.dtype == torch.bfloat16 and rel_err(gh, rgh) < 1e-2


def test_cpu_weight_copy_follows_in_place_changes():
    """The CPU path keeps an fp32 copy of a frozen 16-bit weight between calls: an in-place change
    of the weight, or another weight, must never meet the stale copy."""
    hs, ws, ht, _ = _make(16, 32, 200, torch.float16, weight_grad=False)
    hs, ws, ht = hs.detach().cpu(), ws.detach().cpu(), ht.cpu()
    for _ in range(2):
        out = fused_linear_kl(hs, ws, ht, backend="torch")
        assert rel_err(out, linear_kl_ref(hs.double(), ws.double(), ht.double(), ws.double())) < 1e-5
        with torch.no_grad():
            ws.mul_(1.5)
    other = (ws * 0.5).to(torch.float16)
    out = fused_linear_kl(hs, other, ht, backend="torch")
    assert rel_err(out, linear_kl_ref(hs.double(), other.double(), ht.double(), other.double())) < 1e-5


# ------------------------------------------------------------------------------------- GPU only
@requires_cuda
def test_bf16_gpu_large_vocab_no_logit_rounding():
    """bf16 inputs at a realistic vocab: gradient error stays at bf16-operand level (Liger loses 4-23%)."""
    hs, ws, ht, _ = _make(256, 512, 32000, torch.bfloat16, seed=3)
    out = fused_linear_kl(hs, ws, ht, backend="triton")
    gh, gw = torch.autograd.grad(out, [hs, ws])
    hs64 = hs.detach().double().requires_grad_()
    ws64 = ws.detach().double().requires_grad_()
    ref = linear_kl_ref(hs64, ws64, ht.detach().double(), ws64.detach())
    rgh, rgw = torch.autograd.grad(ref, [hs64, ws64])
    assert rel_err(out, ref) < 1e-3
    assert rel_err(gh, rgh) < 1e-2 and rel_err(gw, rgw) < 1e-2


@requires_cuda
def test_logits_kernel_past_int32_offsets():
    """A chunk of [M, V] logits with M * V > 2**31 (17k rows at a 128k vocab, chunk_size set by
    the user): the rows past the int32 range land where they belong instead of wrapping around."""
    from kmkernels.fused_linear_kl import _logits_fp32_triton
    g = torch.Generator(device="cuda").manual_seed(11)
    M, V, K = 17_000, 128_256, 16
    assert M * V > 2**31
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(V, K, device="cuda", generator=g).to(torch.bfloat16)
    out = _logits_fp32_triton(x, w)
    for rows in (slice(0, 64), slice(M - 64, M)):
        ref = x[rows].double() @ w.double().T
        assert rel_err(out[rows], ref) < 1e-6
