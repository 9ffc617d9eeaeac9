"""grouped_lora against a float64 per-adapter loop, and the model-level API against PEFT."""
import copy
import hashlib
import json
import re
import shutil

import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES
from kmkernels.lora import (AdapterIds, GroupedLoRALinear, adapter_targets, attach_grouped_lora, build_segments,
                            export_peft, grouped_lora, grouped_lora_modules, load_peft, lora_targets, reset_slot,
                            set_adapter_ids, slot_parameters)
from reference import rel_err

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def loop_ref(x, A, B, ids, scaling):
    """float64 per-adapter loop: y[n] = s_d * B_d A_d x_n."""
    y = torch.zeros(x.shape[0], B.shape[1], dtype=torch.float64)
    for d in range(A.shape[0]):
        rows = (ids == d).nonzero().squeeze(1)
        if rows.numel():
            y = y.index_add(0, rows, scaling[d] * (x[rows].double() @ A[d].double().T) @ B[d].double().T)
    return y


def id_pattern(kind, n, d, g):
    if kind == "sorted":
        return torch.sort(torch.randint(0, d, (n,), generator=g)).values
    if kind == "interleaved":
        return torch.arange(n) % d
    if kind == "all_none":
        return torch.full((n,), -1)
    if kind == "one_adapter":
        return torch.full((n,), d - 1)
    if kind == "empty_slots":  # only even slots used, with some -1 rows mixed in
        ids = 2 * torch.randint(0, (d + 1) // 2, (n,), generator=g)
        ids[torch.rand(n, generator=g) < 0.2] = -1
        return ids
    raise ValueError(kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("kind", ["sorted", "interleaved", "all_none", "one_adapter", "empty_slots"])
def test_grouped_lora_matches_loop(backend, dtype, kind):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    N, din, dout, r, D = 53, 40, 72, 8, 5
    x = torch.randn(N, din, generator=g).to(DEVICE, dtype).requires_grad_()
    A = (torch.randn(D, r, din, generator=g) * 0.2).to(DEVICE, dtype).requires_grad_()
    B = (torch.randn(D, dout, r, generator=g) * 0.2).to(DEVICE, dtype).requires_grad_()
    ids = id_pattern(kind, N, D, g)
    scaling = torch.rand(D, generator=g) + 0.5
    y = grouped_lora(x, A, B, ids.to(DEVICE), scaling, backend=backend)
    dy = torch.randn(N, dout, generator=g)
    grads = torch.autograd.grad(y, (x, A, B), dy.to(DEVICE, dtype))
    x64, A64, B64 = (t.detach().double().cpu().requires_grad_() for t in (x, A, B))
    ref = loop_ref(x64, A64, B64, ids, scaling.double())
    rgrads = (torch.autograd.grad(ref, (x64, A64, B64), dy.double(), allow_unused=True) if ref.requires_grad
              else (None, None, None))  # no row has an adapter: every true gradient is zero
    assert y.dtype == dtype and y.shape == ref.shape
    assert rel_err(y, ref) < TOL[dtype]
    for name, gr, rg in zip(("dx", "dA", "dB"), grads, rgrads):
        rg = torch.zeros_like(gr, dtype=torch.float64, device="cpu") if rg is None else rg
        assert rel_err(gr, rg) < TOL[dtype], name
    # Rows without an adapter: exact zeros in y and dx; unused slots: exact zero dA, dB.
    none = ids < 0
    assert (y.detach().cpu()[none] == 0).all() and (grads[0].cpu()[none] == 0).all()
    unused = [d for d in range(D) if not (ids == d).any()]
    for d in unused:
        assert (grads[1][d] == 0).all() and (grads[2][d] == 0).all()


@pytest.mark.parametrize("autocast", [False, True])
def test_module_per_sequence_path_matches_loop(autocast):
    """GroupedLoRALinear on [B, T, in] (torch backend) takes the per-sequence bmm path: unsorted
    slots, a repeated slot, a sequence without adapter, against the float64 loop; bf16 autocast
    against the same loop with bf16 tolerance."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    Bsz, T, din, dout, r, D = 5, 7, 24, 40, 8, 4
    ids_ = AdapterIds(D, "torch")
    lin = torch.nn.Linear(din, dout)
    mod = GroupedLoRALinear(lin, D, r, alpha=12.0, ids=ids_)
    with torch.no_grad():
        mod.lora_A.copy_(torch.randn(D, r, din, generator=g) * 0.3)
        mod.lora_B.copy_(torch.randn(D, dout, r, generator=g) * 0.3)
        mod.scaling.copy_(torch.rand(D, generator=g) + 0.5)
    seq = torch.tensor([2, 0, -1, 2, 3])
    ids_.set(seq)
    x = torch.randn(Bsz, T, din, generator=g).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = mod(x)
    dy = torch.randn(Bsz, T, dout, generator=g)
    gx, gA, gB = torch.autograd.grad(y, (x, mod.lora_A, mod.lora_B), dy.to(y.dtype))
    rows = seq.repeat_interleave(T)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, mod.lora_A, mod.lora_B))
    ref = (x64 @ lin.weight.double().T + lin.bias.double()).reshape(-1, dout) + loop_ref(
        x64.reshape(-1, din), A64, B64, rows, mod.scaling.double())
    rx, rA, rB = torch.autograd.grad(ref, (x64, A64, B64), dy.double().reshape(-1, dout))
    tol = 2e-2 if autocast else 1e-5
    assert y.shape == (Bsz, T, dout) and rel_err(y.reshape(-1, dout), ref) < tol
    for name, got, want in (("dx", gx, rx), ("dA", gA, rA), ("dB", gB, rB)):
        assert got.dtype == (x.dtype if name == "dx" else torch.float32), name
        assert rel_err(got, want) < tol, name
    assert (gA[1] == 0).all() and (gB[1] == 0).all()  # slot 1 is in no sequence
    # no sequence with an adapter, no grad: the base output itself
    ids_.set(torch.full((Bsz,), -1))
    with torch.no_grad():
        assert torch.equal(mod(x), lin(x))


def _per_sequence_layer(g, din, dout, D, r, dtype, bias):
    ids_ = AdapterIds(D, "torch")
    lin = torch.nn.Linear(din, dout, bias=bias).to(dtype).requires_grad_(False)
    mod = GroupedLoRALinear(lin, D, r, alpha=12.0, ids=ids_)
    with torch.no_grad():
        mod.lora_A.copy_(torch.randn(D, r, din, generator=g) * 0.3)
        mod.lora_B.copy_(torch.randn(D, dout, r, generator=g) * 0.3)
        mod.scaling.copy_(torch.rand(D, generator=g) + 0.5)
    return mod, ids_


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_grad", [True, False])
def test_fused_layer_matches_float64_and_the_separate_adds(dtype, bias, x_grad, monkeypatch):
    """Without autocast a plain nn.Linear's layer runs SequenceLoRALinearFunction (the delta's adds
    inside the GEMMs): against the float64 loop and against the delta added after the base, with
    and without a bias, with an input that needs no grad (a first layer's), and under no_grad."""
    import kmkernels.lora as lora_mod

    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    Bsz, T, din, dout, r, D = 6, 5, 24, 40, 8, 4
    mod, ids_ = _per_sequence_layer(g, din, dout, D, r, dtype, bias)
    seq = torch.tensor([3, 0, -1, 3, 2, 0])
    ids_.set(seq)
    x = torch.randn(Bsz, T, din, generator=g).to(dtype).requires_grad_(x_grad)
    dy = torch.randn(Bsz, T, dout, generator=g).to(dtype)
    params = (x, mod.lora_A, mod.lora_B) if x_grad else (mod.lora_A, mod.lora_B)
    calls = []
    real_apply = lora_mod.SequenceLoRALinearFunction.apply
    monkeypatch.setattr(lora_mod.SequenceLoRALinearFunction, "apply", lambda *a: calls.append(1) or real_apply(*a))
    y = mod(x)
    grads = torch.autograd.grad(y, params, dy)
    assert len(calls) == 1 and y.dtype == dtype
    lin = mod.base
    rows = seq.repeat_interleave(T)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, mod.lora_A, mod.lora_B))
    ref = torch.nn.functional.linear(x64, lin.weight.double(), None if lin.bias is None else lin.bias.double())
    ref = ref.reshape(-1, dout) + loop_ref(x64.reshape(-1, din), A64, B64, rows, mod.scaling.double())
    rgrads = torch.autograd.grad(ref, (x64, A64, B64) if x_grad else (A64, B64), dy.double().reshape(-1, dout))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(y.reshape(-1, dout), ref) < tol
    for got, want in zip(grads, rgrads):
        assert got.dtype == dtype and rel_err(got, want) < tol
    assert (grads[-2][1] == 0).all() and (grads[-1][1] == 0).all()  # slot 1 is in no sequence
    # the same layer with the delta added after the base's GEMM (the path autocast takes)
    monkeypatch.setattr(lora_mod, "fuses_into_linear", lambda *a: False)
    y_sep = mod(x)
    grads_sep = torch.autograd.grad(y_sep, params, dy)
    assert len(calls) == 1
    assert rel_err(y, y_sep) < tol / 10
    for got, want in zip(grads, grads_sep):
        assert rel_err(got, want) < tol / 10
    # no_grad with adapters active (answering with KMs on such a CPU): the same output
    monkeypatch.undo()
    with torch.no_grad():
        assert rel_err(mod(x), y_sep) < tol / 10


def test_fused_layer_with_frozen_adapters_gives_dx_only():
    """Frozen KMs under a trained input (a Knowledge Extractor's setting): the backward skips the
    adapters' grads and still gives dx through base and delta, against float64; and dB alone."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    mod, ids_ = _per_sequence_layer(g, 16, 24, 3, 4, torch.float32, True)
    mod.lora_A.requires_grad_(False)
    mod.lora_B.requires_grad_(False)
    seq = torch.tensor([2, 0, 2])
    ids_.set(seq)
    x = torch.randn(3, 5, 16, generator=g).requires_grad_()
    dy = torch.randn(3, 5, 24, generator=g)
    y = mod(x)
    dx, = torch.autograd.grad(y, (x,), dy)
    x64 = x.detach().double().requires_grad_()
    ref = (torch.nn.functional.linear(x64, mod.base.weight.double(), mod.base.bias.double()).reshape(-1, 24)
           + loop_ref(x64.reshape(-1, 16), mod.lora_A.double(), mod.lora_B.double(), seq.repeat_interleave(5),
                      mod.scaling.double()))
    rdx, = torch.autograd.grad(ref, (x64,), dy.double().reshape(-1, 24))
    assert rel_err(y.reshape(-1, 24), ref) < 1e-5 and rel_err(dx, rdx) < 1e-5
    # only B trained, the input needing no grad: dB alone (the backward skips dH)
    mod.lora_B.requires_grad_(True)
    gB, = torch.autograd.grad(mod(x.detach()), (mod.lora_B,), dy)
    B64 = mod.lora_B.detach().double().requires_grad_()
    ref_b = loop_ref(x.detach().double().reshape(-1, 16), mod.lora_A.double(), B64, seq.repeat_interleave(5),
                     mod.scaling.double())
    rB, = torch.autograd.grad(ref_b, (B64,), dy.double().reshape(-1, 24))
    assert rel_err(gB, rB) < 1e-5


def test_fused_layer_only_where_it_computes_what_the_layer_would():
    """fuses_into_linear: a plain frozen nn.Linear without hooks, no autocast, one dtype for x, the
    weight and the adapters. Anything else keeps base(x) + delta, which the tests above check."""
    from kmkernels.lora import fuses_into_linear

    g = torch.Generator().manual_seed(0)
    mod, _ = _per_sequence_layer(g, 8, 8, 2, 4, torch.float32, True)
    x = torch.randn(2, 3, 8)
    assert fuses_into_linear(mod.base, x, mod.lora_A)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fuses_into_linear(mod.base, x, mod.lora_A)
    assert not fuses_into_linear(mod.base, x.bfloat16(), mod.lora_A)  # 16-bit activations, fp32 adapters
    hook = mod.base.register_forward_hook(lambda m, a, out: out * 2)
    assert not fuses_into_linear(mod.base, x, mod.lora_A)
    hook.remove()
    mod.base.weight.requires_grad_(True)  # an unfrozen base needs its own weight's grad
    assert not fuses_into_linear(mod.base, x, mod.lora_A)
    mod.base.weight.requires_grad_(False)

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    sub = Scaled(8, 8)
    sub.requires_grad_(False)
    assert not fuses_into_linear(sub, x, mod.lora_A)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [t for t in KERNEL_DTYPES if t != torch.float32])
def test_fp32_master_weights_under_16bit_activations(backend, dtype):
    """Training holds fp32 A, B and 16-bit activations: the delta is in x's dtype, dA and dB come
    back in fp32, all within 16-bit rounding of the float64 loop."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    N, din, dout, r, D = 45, 40, 72, 8, 4
    x = torch.randn(N, din, generator=g).to(DEVICE, dtype).requires_grad_()
    A = (torch.randn(D, r, din, generator=g) * 0.2).to(DEVICE).requires_grad_()
    B = (torch.randn(D, dout, r, generator=g) * 0.2).to(DEVICE).requires_grad_()
    ids = id_pattern("empty_slots", N, D, g)
    scaling = torch.rand(D, generator=g) + 0.5
    y = grouped_lora(x, A, B, ids.to(DEVICE), scaling, backend=backend)
    dy = torch.randn(N, dout, generator=g)
    grads = torch.autograd.grad(y, (x, A, B), dy.to(DEVICE, dtype))
    assert y.dtype == dtype and [t.dtype for t in grads] == [dtype, torch.float32, torch.float32]
    x64, A64, B64 = (t.detach().double().cpu().requires_grad_() for t in (x, A, B))
    ref = loop_ref(x64, A64, B64, ids, scaling.double())
    rgrads = torch.autograd.grad(ref, (x64, A64, B64), dy.double())
    assert rel_err(y, ref) < TOL[dtype]
    for name, gr, rg in zip(("dx", "dA", "dB"), grads, rgrads):
        assert rel_err(gr, rg) < TOL[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_scaling_rank_not_multiple_of_16_and_n0(backend):
    N, din, dout, r, D = 7, 9, 11, 3, 2
    x = torch.randn(N, din, device=DEVICE, requires_grad=True)
    A = torch.randn(D, r, din, device=DEVICE, requires_grad=True)
    B = torch.randn(D, dout, r, device=DEVICE, requires_grad=True)
    ids = torch.tensor([1, 0, 1, -1, 0, 0, 1])
    y = grouped_lora(x, A, B, ids.to(DEVICE), 0.75, backend=backend)
    ref = loop_ref(x.detach().cpu(), A.detach().cpu(), B.detach().cpu(), ids, torch.full((D,), 0.75, dtype=torch.float64))
    assert rel_err(y, ref) < 1e-5
    # N = 0
    x0 = torch.randn(0, din, device=DEVICE, requires_grad=True)
    y0 = grouped_lora(x0, A, B, torch.zeros(0, dtype=torch.long, device=DEVICE), 1.0, backend=backend)
    assert y0.shape == (0, dout)
    gA, gB = torch.autograd.grad(y0.sum(), (A, B), allow_unused=True)
    for gr in (gA, gB):
        assert gr is None or (gr == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_adapters(backend):
    """D = 1024 slots, most empty."""
    N, din, dout, r, D = 40, 16, 16, 4, 1024
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, din, generator=g).to(DEVICE).requires_grad_()
    A = torch.randn(D, r, din, generator=g).to(DEVICE).requires_grad_()
    B = torch.randn(D, dout, r, generator=g).to(DEVICE).requires_grad_()
    ids = torch.randint(0, D, (N,), generator=g)
    ids[:5] = 1023
    y = grouped_lora(x, A, B, ids.to(DEVICE), 2.0, backend=backend)
    dA, = torch.autograd.grad(y.square().sum(), (A,))
    x64, A64 = x.detach().double().cpu(), A.detach().double().cpu().requires_grad_()
    ref = loop_ref(x64, A64, B.detach().cpu(), ids, torch.full((D,), 2.0, dtype=torch.float64))
    rdA, = torch.autograd.grad(ref.square().sum(), (A64,))
    assert rel_err(y, ref) < 1e-5 and rel_err(dA, rdA) < 1e-5


def test_segments_cover_each_row_once():
    ids = torch.tensor([3, -1, 0, 3, 3, 1, -1, 0] * 9)
    seg = build_segments(ids, 4, block_m=4)
    covered = []
    for s, r0, r1 in zip(seg.tile_seg.tolist(), seg.tile_r0.tolist(), seg.tile_r1.tolist()):
        if s < 0:
            continue
        rows = seg.order[r0:r1].tolist()
        assert all((ids[row].item() if ids[row] >= 0 else 4) == s for row in rows)
        covered += rows
    assert sorted(covered) == list(range(ids.numel()))


def test_deterministic_triton():
    x = torch.randn(64, 32, device=DEVICE, requires_grad=True)
    A = torch.randn(3, 8, 32, device=DEVICE, requires_grad=True)
    B = torch.randn(3, 24, 8, device=DEVICE, requires_grad=True)
    ids = torch.randint(-1, 3, (64,), device=DEVICE)
    runs = []
    for _ in range(2):
        y = grouped_lora(x, A, B, ids, 1.0, backend="triton")
        runs.append((y, *torch.autograd.grad(y.sum(), (x, A, B))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ids=torch.tensor([0, 5, 1])), r"adapter_ids must lie in \[-1, 2\]"),
    (dict(ids=torch.tensor([0, 1])), r"adapter_ids must be \[N\]=3"),
    (dict(ids=torch.tensor([0.0, 1.0, 1.0])), "integer"),
    (dict(x=torch.randn(3, 5)), "in=5"),
    (dict(scaling=torch.ones(4)), "scaling"),
    (dict(backend="gpu"), "backend"),
    (dict(A=torch.randn(0, 2, 4), B=torch.randn(0, 6, 2), ids=torch.full((3,), -1)), r"no adapters \(D=0\)"),
    (dict(ids=[0, 1, 2]), "adapter_ids must be a torch.Tensor, got list"),
    (dict(ids=torch.tensor([0, 1, 2], dtype=torch.complex64)), "integer"),
    (dict(x=torch.randn(4)), r"x must be \[N, in\], got torch.Size\(\[4\]\)"),
    (dict(A=torch.randn(2, 4)), r"lora_a must be \[D, r, in\] and lora_b \[D, out, r\], got \(2, 4\) and \(3, 6, 2\)"),
    (dict(B=torch.randn(3, 6, 5)), r"lora_b must be \[D=3, out, r=2\], got \(3, 6, 5\)"),
])
def test_bad_input(kwargs, match):
    args = dict(x=torch.randn(3, 4), A=torch.randn(3, 2, 4), B=torch.randn(3, 6, 2), ids=torch.tensor([0, 1, 2]),
                scaling=1.0, backend="torch")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        grouped_lora(args["x"], args["A"], args["B"], args["ids"], args["scaling"], backend=args["backend"])


# ------------------------------------------------------------------------------ model level vs PEFT
def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float().eval()


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peft_model(base, seed, r=4, alpha=8, **lora_options):
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(TARGETS),
                                                       **lora_options))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


@pytest.mark.parametrize("backend", BACKENDS)
def test_attach_matches_separate_peft_models(backend, tmp_path):
    base = tiny_llama().to(DEVICE)
    D = 3
    peft_models = [peft_model(base, seed=10 + d) for d in range(D)]
    grouped = attach_grouped_lora(copy.deepcopy(base), D, rank=4, alpha=8, backend=backend)
    for d, pm in enumerate(peft_models):
        pm.save_pretrained(tmp_path / f"a{d}")
        load_peft(grouped, d, tmp_path / f"a{d}")
    ids = torch.tensor([2, 0, -1, 1, 2], device=DEVICE)
    input_ids = torch.randint(0, 97, (5, 7)).to(DEVICE)
    set_adapter_ids(grouped, ids)
    with torch.no_grad():
        out = grouped(input_ids=input_ids).logits
        for b, d in enumerate(ids.tolist()):
            ref = (base if d < 0 else peft_models[d])(input_ids=input_ids[b:b + 1]).logits
            assert rel_err(out[b:b + 1], ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_step_on_mixed_batch_equals_peft_alone(backend, tmp_path):
    base = tiny_llama(1).to(DEVICE)
    D = 3
    grouped = attach_grouped_lora(copy.deepcopy(base), D, rank=4, alpha=8, backend=backend)
    peft_models = [peft_model(base, seed=20 + d) for d in range(D)]
    for d, pm in enumerate(peft_models):
        pm.save_pretrained(tmp_path / f"a{d}")
        load_peft(grouped, d, tmp_path / f"a{d}")
    input_ids = torch.randint(0, 97, (6, 8)).to(DEVICE)
    ids = torch.tensor([1, 0, 1, 2, 0, 1], device=DEVICE)  # interleaved documents

    def per_doc_loss(logits, logit_rows, doc_rows):
        """Next-token loss of document rows ``doc_rows`` whose logits sit at ``logit_rows``."""
        return torch.nn.functional.cross_entropy(logits[logit_rows, :-1].reshape(-1, 97),
                                                 input_ids[doc_rows, 1:].reshape(-1))

    # Mixed batch: the sum over documents of each document's own mean loss (separable per slot).
    opt = torch.optim.AdamW(slot_parameters(grouped), lr=1e-2, weight_decay=0.0)
    before = {n: m.lora_A.detach().clone() for n, m in grouped.named_modules() if isinstance(m, GroupedLoRALinear)}
    set_adapter_ids(grouped, ids)
    logits = grouped(input_ids=input_ids).logits
    loss = sum(per_doc_loss(logits, (ids == d).nonzero().squeeze(1), (ids == d).nonzero().squeeze(1)) for d in range(D))
    loss.backward()
    opt.step()
    for d, pm in enumerate(peft_models):
        rows = (ids == d).nonzero().squeeze(1)
        params = [p for p in pm.parameters() if p.requires_grad]
        popt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        per_doc_loss(pm(input_ids=input_ids[rows]).logits, torch.arange(rows.numel(), device=DEVICE), rows).backward()
        popt.step()
        sd = dict(pm.named_parameters())
        for name, m in grouped.named_modules():
            if not isinstance(m, GroupedLoRALinear):
                continue
            pa = sd[f"base_model.model.{name}.lora_A.default.weight"]
            pb = sd[f"base_model.model.{name}.lora_B.default.weight"]
            assert rel_err(m.lora_A[d], pa) < 1e-5 and rel_err(m.lora_B[d], pb) < 1e-5
            assert not torch.equal(m.lora_A[d], before[name][d])  # it did move


@pytest.mark.parametrize("backend", BACKENDS)
def test_16bit_base_keeps_fp32_adapters_as_peft_does(backend, tmp_path):
    """A 16-bit base gets fp32 adapter weights and grads (PEFT's autocast_adapter_dtype), and the
    same logits as PEFT on that base, to fp16 rounding."""
    base = tiny_llama(2).to(DEVICE, torch.float16)
    pm = peft_model(base, seed=30)
    assert {p.dtype for n, p in pm.named_parameters() if "lora_" in n} == {torch.float32}
    grouped = attach_grouped_lora(copy.deepcopy(base), 2, rank=4, alpha=8, backend=backend)
    pm.save_pretrained(tmp_path / "a")
    load_peft(grouped, 1, tmp_path / "a")
    mods = grouped_lora_modules(grouped).values()
    assert {m.lora_A.dtype for m in mods} | {m.lora_B.dtype for m in mods} == {torch.float32}
    input_ids = torch.randint(0, 97, (2, 6)).to(DEVICE)
    set_adapter_ids(grouped, torch.tensor([1, 1], device=DEVICE))
    out = grouped(input_ids=input_ids).logits
    with torch.no_grad():
        ref = pm(input_ids=input_ids).logits
    assert out.dtype == torch.float16 and rel_err(out, ref) < 1e-2
    out.float().square().mean().backward()
    assert all(m.lora_A.grad.dtype == torch.float32 and m.lora_B.grad.abs().sum() > 0 for m in mods)


def test_export_peft_that_fails_to_write_names_the_km_and_leaves_nothing(tmp_path):
    """A KM folder's write failing for want of disk raised an OSError naming no file (Python's, at the
    file's write or close): it names the KM now, and no temporary folder is left. A real failed write,
    under a file-size limit in a child process."""
    import os
    import subprocess
    import sys

    code = f"""
import errno, resource, signal, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_lora import tiny_llama
from kmkernels import attach_grouped_lora, export_peft
model = attach_grouped_lora(tiny_llama(), 1, rank=4, backend="torch")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    export_peft(model, 0, {str(tmp_path / "km")!r})
except OSError as e:
    print("OSError", errno.errorcode[e.errno], e.filename)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["OSError", "EFBIG", str(tmp_path / "km")]
    assert list(tmp_path.iterdir()) == []


def test_export_peft_round_trip(tmp_path):
    from peft import PeftModel

    base = tiny_llama(2)
    grouped = attach_grouped_lora(copy.deepcopy(base), 2, rank=4, alpha=16, seed=3, backend="torch")
    with torch.no_grad():  # give B non-zero values so the adapter changes outputs
        for p in slot_parameters(grouped):
            p.add_(torch.randn_like(p) * 0.05)
    digest = export_peft(grouped, 1, tmp_path / "km", extra_files={"note.txt": "hello", "manifest.json": lambda sha: sha})
    assert digest == hashlib.sha256((tmp_path / "km" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert (tmp_path / "km" / "manifest.json").read_text() == digest and (tmp_path / "km" / "note.txt").read_text() == "hello"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert (tmp_path / "km").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkdtemp's private 0700
    cfg = json.loads((tmp_path / "km" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == sorted(TARGETS)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "km")
    input_ids = torch.randint(0, 97, (2, 6))
    set_adapter_ids(grouped, [1, 1])
    with torch.no_grad():
        ours = grouped(input_ids=input_ids).logits
        theirs = loaded(input_ids=input_ids).logits
        plain = base(input_ids=input_ids).logits
    assert rel_err(theirs, ours) < 1e-5
    assert rel_err(plain, ours) > 1e-3  # the adapter matters
    # the targets as the weights file has them, in PEFT's own save too (config may hold a regex)
    assert sorted(adapter_targets(tmp_path / "km")) == sorted(TARGETS)
    loaded.save_pretrained(tmp_path / "peft_saved")
    assert sorted(adapter_targets(tmp_path / "peft_saved")) == sorted(TARGETS)
    # its config says which weights are the experts' (target_parameters): read as load_peft reads it,
    # so a missing or damaged one is named, not taken for an adapter without them
    (tmp_path / "peft_saved" / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="is not a PEFT adapter folder: no adapter_config.json"):
        adapter_targets(tmp_path / "peft_saved")
    (tmp_path / "km" / "adapter_model.safetensors").write_bytes(b"\x08\x00")
    with pytest.raises(ValueError, match="adapter_model.safetensors: unreadable safetensors file"):
        adapter_targets(tmp_path / "km")


def test_rslora_adapter_loads_with_its_own_scale_and_exports_the_same(tmp_path):
    """A PEFT adapter with use_rslora=True scales by alpha / sqrt(r): loaded into a slot it computes
    what PEFT does, and the slot exported (plain LoRA) loads in PEFT to the same again. DoRA and
    per-module rank or alpha patterns, which one r and alpha per slot cannot hold, are refused by name
    (an alpha_pattern loaded silently with the wrong scales before)."""
    from peft import PeftModel

    base = tiny_llama(5)
    rs = peft_model(base, seed=6, use_rslora=True)
    rs.save_pretrained(tmp_path / "rs")
    grouped = attach_grouped_lora(copy.deepcopy(base), 2, rank=4, alpha=8, backend="torch")
    load_peft(grouped, 1, tmp_path / "rs")
    input_ids = torch.randint(0, 97, (1, 6))
    set_adapter_ids(grouped, [1])
    with torch.no_grad():
        want = rs(input_ids=input_ids).logits
        plain = peft_model(base, seed=6)  # the same weights at plain LoRA's scale
        assert rel_err(plain(input_ids=input_ids).logits, want) > 1e-3  # the two scales differ: the check can fail
        assert rel_err(grouped(input_ids=input_ids).logits, want) < 1e-5
        export_peft(grouped, 1, tmp_path / "rs_again")
        again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "rs_again")
        assert rel_err(again(input_ids=input_ids).logits, want) < 1e-5
    before = [p.detach().clone() for p in slot_parameters(grouped)]
    for name, extra, said in (("dora", {"use_dora": True}, "use_dora=True adapters are not supported"),
                              ("ranks", {"rank_pattern": {"q_proj": 2}}, "rank_pattern (per-module ranks)"),
                              ("alphas", {"alpha_pattern": {"q_proj": 32}}, "alpha_pattern (per-module alphas)")):
        shutil.copytree(tmp_path / "rs", tmp_path / name)
        cfg_path = tmp_path / name / "adapter_config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **extra}))
        with pytest.raises(ValueError, match=re.escape(said)):
            load_peft(grouped, 0, tmp_path / name)
    assert all(torch.equal(a, b) for a, b in zip(before, slot_parameters(grouped)))


def test_smaller_rank_slot_and_errors(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(3)
    small = peft_model(base, seed=4, r=2, alpha=4)
    small.save_pretrained(tmp_path / "r2")
    grouped = attach_grouped_lora(copy.deepcopy(base), 2, rank=4, alpha=8, backend="torch")
    load_peft(grouped, 0, tmp_path / "r2")
    input_ids = torch.randint(0, 97, (1, 5))
    set_adapter_ids(grouped, [0])
    with torch.no_grad():
        assert rel_err(grouped(input_ids=input_ids).logits, small(input_ids=input_ids).logits) < 1e-5
    # round trip keeps the smaller rank
    export_peft(grouped, 0, tmp_path / "r2_again")
    assert json.loads((tmp_path / "r2_again" / "adapter_config.json").read_text())["r"] == 2

    big = peft_model(base, seed=5, r=8, alpha=8)
    big.save_pretrained(tmp_path / "r8")
    with pytest.raises(ValueError, match="rank r=8 exceeds"):
        load_peft(grouped, 1, tmp_path / "r8")
    other = get_peft_model(tiny_llama(4), LoraConfig(r=4, target_modules=["lm_head"]))
    other.save_pretrained(tmp_path / "lm_head")
    with pytest.raises(ValueError, match="lm_head"):
        load_peft(grouped, 1, tmp_path / "lm_head")
    from transformers import LlamaConfig, LlamaForCausalLM
    wider = get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=48,
                                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
                           LoraConfig(r=4, target_modules=list(TARGETS)))
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(ValueError, match="different base model"):
        load_peft(grouped, 1, tmp_path / "wider")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_peft(grouped, 1, tmp_path)
    with pytest.raises(ValueError, match="slot"):
        load_peft(grouped, 7, tmp_path / "r2")
    # damaged files name the file, and the slot keeps what it held
    before = [p.detach().clone() for p in slot_parameters(grouped)]
    shutil.copytree(tmp_path / "r2", tmp_path / "cut")
    weights = tmp_path / "cut" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: unreadable safetensors file"):
        load_peft(grouped, 0, tmp_path / "cut")
    shutil.copytree(tmp_path / "r2", tmp_path / "bad_json")
    (tmp_path / "bad_json" / "adapter_config.json").write_text('{"r": 2,')
    with pytest.raises(ValueError, match=r"adapter_config.json: unreadable"):
        load_peft(grouped, 0, tmp_path / "bad_json")
    (tmp_path / "bad_json" / "adapter_config.json").write_text('{"r": "two"}')
    with pytest.raises(ValueError, match=r"adapter_config.json: needs a positive integer rank 'r'"):
        load_peft(grouped, 0, tmp_path / "bad_json")
    (tmp_path / "bad_json" / "adapter_config.json").write_text('{"r": 2, "peft_type": "IA3"}')
    with pytest.raises(ValueError, match=r"bad_json: peft_type 'IA3' is not LORA"):
        load_peft(grouped, 0, tmp_path / "bad_json")
    (tmp_path / "bad_json" / "adapter_config.json").write_text('{"r": 2}')
    (tmp_path / "bad_json" / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"bad_json: no adapter_model.safetensors"):
        load_peft(grouped, 0, tmp_path / "bad_json")
    from safetensors.torch import load_file, save_file

    save_file({}, str(tmp_path / "bad_json" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"bad_json: the adapter holds no LoRA weights"):
        load_peft(grouped, 0, tmp_path / "bad_json")
    a_only = {k: v for k, v in load_file(str(tmp_path / "r2" / "adapter_model.safetensors")).items() if "lora_A" in k}
    save_file(a_only, str(tmp_path / "bad_json" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"bad_json: module .* has only one of lora_A / lora_B"):
        load_peft(grouped, 0, tmp_path / "bad_json")
    assert all(torch.equal(a, b) for a, b in zip(before, slot_parameters(grouped)))


def test_seeded_init_is_reproducible_and_slot_independent():
    base = tiny_llama(5)
    a = attach_grouped_lora(copy.deepcopy(base), 3, rank=4, seed=11, backend="torch")
    b = attach_grouped_lora(copy.deepcopy(base), 3, rank=4, seed=11, backend="torch")
    for pa, pb in zip(slot_parameters(a), slot_parameters(b)):
        assert torch.equal(pa, pb)
    # reset_slot(seed) gives the same values whatever the slot index
    reset_slot(a, 0, seed=99)
    reset_slot(a, 2, seed=99)
    for name, m in a.named_modules():
        if isinstance(m, GroupedLoRALinear):
            assert torch.equal(m.lora_A[0], m.lora_A[2])
            assert (m.lora_B[0] == 0).all()
            bound = 1 / m.in_features**0.5
            assert m.lora_A[0].abs().max() <= bound and m.lora_A[0].std() > bound / 3
    # only LoRA parameters train
    assert all(("lora_" in n) == p.requires_grad for n, p in a.named_parameters())


def test_ids_errors():
    m = attach_grouped_lora(tiny_llama(), 2, rank=2, backend="torch")
    with pytest.raises(ValueError, match="no adapter ids set"):
        m(input_ids=torch.randint(0, 97, (1, 3)))
    with pytest.raises(ValueError, match=r"lie in \[-1, 1\]"):
        set_adapter_ids(m, [0, 2])
    set_adapter_ids(m, [0, 1])
    with pytest.raises(ValueError, match="set for 2 sequences but the batch has 3"):
        m(input_ids=torch.randint(0, 97, (3, 3)))
    with pytest.raises(ValueError, match="already has grouped LoRA"):
        attach_grouped_lora(m, 2)
    with pytest.raises(ValueError, match=r"adapter ids must be an integer tensor \[B\] \(one per sequence\), got "
                                         r"torch.int64 \(1, 2\)"):
        set_adapter_ids(m, [[0, 1]])
    with pytest.raises(ValueError, match=r"call attach_grouped_lora\(model, \.\.\.\) first"):
        set_adapter_ids(tiny_llama(), [0])
    for kw, said in ((dict(num_adapters=0), "num_adapters must be >= 1, got 0"),
                     (dict(rank=0), "rank must be >= 1, got 0")):
        with pytest.raises(ValueError, match=said):
            attach_grouped_lora(tiny_llama(), **{"num_adapters": 2, **kw})
    with pytest.raises(ValueError, match="GroupedLoRALinear wraps nn.Linear or transformers' Conv1D, got Conv2d"):
        GroupedLoRALinear(torch.nn.Conv2d(2, 2, 1), 2, 2, 2.0, None)


def _each_sequence_as_alone(model, input_ids, ids):
    """The logits of a mixed batch (slot ``ids[b]`` for sequence b), checked to be each sequence's alone."""
    set_adapter_ids(model, ids)
    batched = model(input_ids=input_ids).logits
    for b, d in enumerate(ids):
        set_adapter_ids(model, [d])
        assert rel_err(batched[b:b + 1], model(input_ids=input_ids[b:b + 1]).logits) < 1e-5, (b, d)
    return batched


@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_that_read_the_batch_flattened_keep_each_sequences_adapter(backend, tmp_path):
    """Qwen2-MoE's shared expert reads [B * T, in], the batch's tokens flattened in order: the grouped
    LoRA raised "adapter ids were set for 1 sequences but the batch has 74" there, so such a model could
    not be indexed. Its rows are now each their own sequence's: a mixed batch gives each sequence what it
    gives alone, and an exported slot what PEFT gives. Rows that are not the batch's tokens in order (an
    MoE expert's routed tokens) are refused by name."""
    from peft import PeftModel
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    base = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=16)).float().eval().to(DEVICE)
    grouped = attach_grouped_lora(copy.deepcopy(base), 2, rank=4, alpha=8, seed=1, backend=backend)
    flat = [n for n, m in grouped.named_modules() if isinstance(m, GroupedLoRALinear) and ".shared_expert" in n]
    assert len(flat) == 2 * 4  # gate_proj, up_proj, down_proj and shared_expert_gate in each layer
    with torch.no_grad():
        for p in slot_parameters(grouped):
            p.add_(torch.randn_like(p) * 0.05)
    input_ids = torch.randint(0, 97, (3, 7)).to(DEVICE)
    with torch.no_grad():
        batched = _each_sequence_as_alone(grouped, input_ids, [1, -1, 0])
        export_peft(grouped, 0, tmp_path / "km")
        peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "km")
        assert rel_err(batched[2:3], peft(input_ids=input_ids[2:3]).logits) < 1e-5
        assert rel_err(batched[2:3], base(input_ids=input_ids[2:3]).logits) > 1e-3  # the adapter matters there
        set_adapter_ids(grouped, [0, 1])
        expert = dict(grouped.named_modules())[flat[0]]
        with pytest.raises(ValueError, match=re.escape(f"the LoRA layer {flat[0]} read 5 rows for 2 sequences: not the "
                                                       "batch's tokens in order (an MoE expert's routed tokens?)")):
            expert(torch.randn(5, expert.in_features, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flattened_layer_before_any_other_reads_its_sequences_from_the_inputs(backend):
    """JetMoE's attention router reads the batch flattened, [B * T, in], first in each decoder layer:
    before any layer had shown T, the grouped LoRA refused it ("read 28 rows for 2 sequences"). The
    tokens per sequence now come from the model's inputs, as the forward starts: a mixed batch gives
    each sequence what it gives alone, through the model and through its decoder."""
    from transformers import JetMoeConfig, JetMoeForCausalLM

    torch.manual_seed(0)
    base = JetMoeForCausalLM(JetMoeConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, kv_channels=16, intermediate_size=64,
                                          num_local_experts=4, num_experts_per_tok=2,
                                          max_position_embeddings=64)).float().eval().to(DEVICE)
    grouped = attach_grouped_lora(base, 3, rank=4, alpha=8, seed=1, backend=backend)
    wrapped = [n for n, m in grouped.named_modules() if isinstance(m, GroupedLoRALinear)]
    assert "model.layers.0.self_attention.experts.router.layer" in wrapped
    with torch.no_grad():
        for p in slot_parameters(grouped):
            p.add_(torch.randn_like(p) * 0.05)
    input_ids = torch.randint(0, 97, (3, 7)).to(DEVICE)
    ids = [2, -1, 0]
    with torch.no_grad():
        for run in (lambda x: grouped(input_ids=x).logits, lambda x: grouped.get_decoder()(x).last_hidden_state):
            set_adapter_ids(grouped, ids)
            batched = run(input_ids)
            for b, d in enumerate(ids):
                set_adapter_ids(grouped, [d])
                assert rel_err(batched[b:b + 1], run(input_ids[b:b + 1])) < 1e-5


def tiny_moe(family: str):
    """A tiny random MoE model of transformers 5 (experts fused in 3-D parameters), fp32, eval."""
    import transformers

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    config = {
        "mixtral": lambda: transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        # experts stored [E, in, out] (is_transposed), with biases
        "gpt_oss": lambda: transformers.GptOssConfig(**common, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                                     layer_types=["full_attention"] * 2),
        # a dense first layer and shared experts, whose gate/up/down_proj PEFT takes for transformers 4's experts
        "deepseek_v3": lambda: transformers.DeepseekV3Config(
            **common, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
            n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
            v_head_dim=8),
    }[family]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).float().eval().to(DEVICE)


def _perturb(model, scale=0.05):
    with torch.no_grad():
        for p in slot_parameters(model):
            p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("path", ["activation", "weight"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_moe_experts_weights_get_each_sequences_own_lora(family, path, tmp_path, monkeypatch):
    """In transformers 5 an MoE block's experts are 3-D parameters, not linear layers: a KM on Mixtral
    adapted the attention alone. Now each 3-D expert weight gets D slots (PEFT's target_parameters LoRA:
    expert e's weight W_e + s B_e A_e), each sequence's routed tokens its own: a mixed batch gives each
    sequence what it gives alone, and an exported slot loads in plain PEFT to the same outputs. On
    DeepSeek-V3, PEFT took the shared experts' and the dense layer's gate/up/down_proj for transformers
    4's experts and loaded the KM 9.5% off the model that trained it; they are now written where PEFT
    leaves them. Both ways of computing it: in activation space (what experts built on transformers'
    experts interface take) and in weight space (any other experts)."""
    from peft import PeftModel

    from kmkernels.lora import GroupedLoRAExperts, GroupedLoRAExpertWeight

    monkeypatch.setattr(GroupedLoRAExperts, "weight_space", path == "weight")
    base = tiny_moe(family)
    grouped = attach_grouped_lora(copy.deepcopy(base), 2, rank=4, alpha=8, seed=1, backend="torch")
    experts = {n: m for n, m in grouped.named_modules() if isinstance(m, GroupedLoRAExperts)}
    moe_layers = [1] if family == "deepseek_v3" else [0, 1]
    assert sorted(experts) == [f"model.layers.{i}.mlp.experts" for i in moe_layers]
    assert all(list(m.adapters) == ["gate_up_proj", "down_proj"] for m in experts.values())
    assert all(m.interface == ("gate_up_proj", "down_proj") for m in experts.values())
    units = [m for m in grouped_lora_modules(grouped).values() if isinstance(m, GroupedLoRAExpertWeight)]
    assert len(units) == 2 * len(moe_layers) and all(u.lora_A.shape[:2] == (2, 4) for u in units)
    assert grouped._grouped_lora["expert_targets"] == ["experts.down_proj", "experts.gate_up_proj"]
    _perturb(grouped)
    input_ids = torch.randint(0, 97, (3, 7)).to(DEVICE)
    with torch.no_grad():
        batched = _each_sequence_as_alone(grouped, input_ids, [1, -1, 0])
        assert rel_err(batched[1:2], base(input_ids=input_ids[1:2]).logits) < 1e-6  # no slot: the base model
        export_peft(grouped, 0, tmp_path / "km")
        cfg = json.loads((tmp_path / "km" / "adapter_config.json").read_text())
        assert {"experts.down_proj", "experts.gate_up_proj"} <= set(cfg["target_parameters"])
        peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "km")
        assert rel_err(batched[2:3], peft(input_ids=input_ids[2:3]).logits) < 1e-5
        # the experts' slots matter on their own: zeroed, the outputs move
        for u in units:
            u.lora_B[0].zero_()
        set_adapter_ids(grouped, [0])
        assert rel_err(batched[2:3], grouped(input_ids=input_ids[2:3]).logits) > 1e-3
    assert set(adapter_targets(tmp_path / "km")) >= {"q_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj"}
    if family == "deepseek_v3":  # the shared experts' and the dense layer's MLP are adapted, and PEFT loads them
        assert {"gate_proj", "up_proj", "down_proj"} <= set(adapter_targets(tmp_path / "km"))
        assert "gate_proj" not in cfg["target_modules"] and "gate_proj.weight" in cfg["target_parameters"]
        assert any("shared_experts.gate_proj.lora_A" in n for n, _ in peft.named_parameters())
        # without the experts' weights (what a KM held before they were adapted), PEFT loaded to other outputs
        # without a word: 9.5% off
        linear_only = attach_grouped_lora(copy.deepcopy(base), 1, rank=4, alpha=8, seed=1, backend="torch",
                                          target_modules=("q_proj", "gate_proj", "up_proj", "down_proj"))
        _perturb(linear_only)
        export_peft(linear_only, 0, tmp_path / "linear_km")
        with torch.no_grad():
            set_adapter_ids(linear_only, [0, 0, 0])
            want = linear_only(input_ids=input_ids).logits
            got = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "linear_km")(input_ids=input_ids).logits
        assert rel_err(got, want) < 1e-5 and rel_err(want, base(input_ids=input_ids).logits) > 1e-3


@pytest.mark.parametrize("path", ["activation, torch", "activation, triton", "weight"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_moe_experts_lora_against_float64_weights_forward_and_backward(family, path, monkeypatch):
    """One experts module, two sequences on slots 1 and 0: its output and every slot's gradient against
    float64 experts whose weights are W + s B_e A_e, run a sequence at a time: in activation space
    (s B_e (A_e x) per routed row; the torch path one expert at a time, the Triton path one adapter per
    (slot, expert) pair through grouped_lora's kernels) and in weight space."""
    from kmkernels.lora import GroupedLoRAExperts

    monkeypatch.setattr(GroupedLoRAExperts, "weight_space", path == "weight")
    backend = "triton" if path.endswith("triton") else "torch"
    grouped = attach_grouped_lora(tiny_moe(family), 2, rank=4, alpha=8, seed=3, backend=backend)
    _perturb(grouped, 0.1)
    name, mod = next((n, m) for n, m in grouped.named_modules() if isinstance(m, GroupedLoRAExperts))
    B, T, H, E, k = 2, 5, 32, 4, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B * T, H, generator=g).to(DEVICE)
    top_k_index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(B * T)]).to(DEVICE)
    top_k_weights = torch.rand(B * T, k, generator=g).softmax(-1).to(DEVICE)
    upstream = torch.randn(B * T, H, generator=g).to(DEVICE)
    ids = [1, 0]
    set_adapter_ids(grouped, ids)
    grouped._grouped_lora["ids"].tokens = T
    out = mod(x, top_k_index, top_k_weights)
    (out * upstream).sum().backward()

    ref64 = copy.deepcopy(mod.base).double()
    ref64.config._experts_implementation = "eager"  # torch's grouped_mm, the CPU default, takes no float64
    leaves = {p: (u.lora_A.detach().double().requires_grad_(), u.lora_B.detach().double().requires_grad_())
              for p, u in mod.adapters.items()}
    want = []
    for b, slot in enumerate(ids):
        rows = slice(b * T, (b + 1) * T)
        weights = {}
        for p, (a, bb) in leaves.items():
            d = torch.bmm(bb[slot], a[slot]) * 2.0  # alpha / r = 8 / 4
            weights[p] = getattr(ref64, p) + (d.transpose(1, 2) if mod.adapters[p].transposed else d)
        want.append(torch.func.functional_call(ref64, weights,
                                               (x[rows].double(), top_k_index[rows], top_k_weights[rows].double())))
    want = torch.cat(want)
    (want * upstream.double()).sum().backward()
    assert rel_err(out, want) < 1e-5, name
    for p, u in mod.adapters.items():
        a, bb = leaves[p]
        assert rel_err(u.lora_A.grad, a.grad) < 1e-5 and rel_err(u.lora_B.grad, bb.grad) < 1e-5, p


@pytest.mark.parametrize("mode", ["activation", "weight, remade", "weight, kept"])
def test_moe_experts_lora_keeps_no_weight_sized_tensor_for_the_backward(mode, monkeypatch):
    """W + delta is the size of the experts' weights. Kept by autograd for every slot in every layer (what
    the weight-space path did at first), about a third of it per document and layer (~150 GB for 8
    documents on Qwen3-30B-A3B). The activation-space path never makes it, and the weight-space path
    checkpoints each slot's call: what the backward keeps is activations, and the inputs alone for the
    weight-space path (13 KB here, against 1.1 MB with W + delta kept; 4 slots, one layer)."""
    import transformers

    from kmkernels.lora import GroupedLoRAExperts

    monkeypatch.setattr(GroupedLoRAExperts, "weight_space", mode != "activation")
    monkeypatch.setattr(GroupedLoRAExperts, "recompute", mode != "weight, kept")
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)).eval().to(DEVICE)
    grouped = attach_grouped_lora(model, 4, rank=4, backend="torch")
    experts = next(m for m in grouped.modules() if isinstance(m, GroupedLoRAExperts))
    T = 6
    x = torch.randn(4 * T, 64, device=DEVICE)
    top_k_index = torch.randint(0, 8, (4 * T, 2), device=DEVICE)
    top_k_weights = torch.rand(4 * T, 2, device=DEVICE)
    set_adapter_ids(grouped, [0, 1, 2, 3])
    grouped._grouped_lora["ids"].tokens = T
    params = {p.untyped_storage().data_ptr() for p in grouped.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = experts(x, top_k_index, top_k_weights)
    weight_bytes = experts.base.down_proj.numel() * 4  # the smaller of the two
    if mode == "weight, kept":
        assert max(kept.values()) >= weight_bytes, sorted(kept.values())[-3:]
    else:  # activations, and the torch path's copies of the slots' own A and B (r x (in + out) per expert)
        assert kept and max(kept.values()) < weight_bytes, sorted(kept.values())[-3:]
    out.square().sum().backward()  # every slot gets its gradient, however it was kept
    for u in experts.adapters.values():
        assert all(bool(u.lora_B.grad[s].abs().sum() > 0) for s in range(4))  # (A's is 0 while B is)


def test_moe_experts_lora_loads_peft_adapters_and_pads_smaller_ranks(tmp_path):
    """A target_parameters adapter that PEFT itself made (its layout: A [E * r, in], B [out, r * E], two
    parameters of one module nested) loads into a slot to PEFT's outputs, at a smaller rank than the one
    attached (zero-padded, keeping its own alpha / r); an adapter on an expert parameter that was not
    wrapped is refused by name, the slot left as it was."""
    import peft

    base = tiny_moe("mixtral")
    made = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    made.save_pretrained(tmp_path / "made")
    grouped = attach_grouped_lora(copy.deepcopy(base), 3, rank=4, alpha=4, seed=0, backend="torch")
    load_peft(grouped, 2, tmp_path / "made")
    input_ids = torch.randint(0, 97, (1, 6)).to(DEVICE)
    with torch.no_grad():
        set_adapter_ids(grouped, [2])
        got = grouped(input_ids=input_ids).logits
        want = made(input_ids=input_ids).logits
        assert rel_err(got, want) < 1e-5 and rel_err(want, base(input_ids=input_ids).logits) > 1e-3
    assert sorted(adapter_targets(tmp_path / "made")) == ["experts.down_proj", "experts.gate_up_proj", "q_proj"]
    only_attention = attach_grouped_lora(copy.deepcopy(base), 1, rank=4, target_modules=("q_proj",), backend="torch")
    before = [p.detach().clone() for p in slot_parameters(only_attention)]
    with pytest.raises(ValueError, match=r"adapter targets the experts' parameter 'model\.layers\.0\.mlp\.experts\."
                                         r"(gate_up|down)_proj', which this model did not wrap"):
        load_peft(only_attention, 0, tmp_path / "made")
    assert all(torch.equal(p, q) for p, q in zip(slot_parameters(only_attention), before))


def test_moe_experts_targets_by_name_and_experts_that_take_sorted_tokens_are_left_out():
    """Targets name an experts' parameter as PEFT's target_parameters do ("experts.down_proj"); a list
    naming experts alone is enough. Experts that take tokens sorted by expert (JetMoE's) cannot tell one
    sequence's tokens from another's, and keep no slots."""
    from transformers import JetMoeConfig, JetMoeForCausalLM

    from kmkernels.lora import GroupedLoRAExperts, expert_targets, experts_parameters

    m = attach_grouped_lora(tiny_moe("mixtral"), 2, rank=4, target_modules=("experts.down_proj",), backend="torch")
    assert not [n for n, x in m.named_modules() if isinstance(x, GroupedLoRALinear)]
    assert [list(x.adapters) for x in m.modules() if isinstance(x, GroupedLoRAExperts)] == [["down_proj"]] * 2
    assert m.model.layers[0].mlp.experts.num_experts == 4  # the experts' own attributes read through
    jet = JetMoeForCausalLM(JetMoeConfig(vocab_size=97, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, kv_channels=16, intermediate_size=64,
                                         num_local_experts=4, num_experts_per_tok=2))
    assert any(p.dim() == 3 for p in jet.parameters())
    assert expert_targets(jet) == [] and not any(experts_parameters(x) for x in jet.modules())
    assert experts_parameters(torch.nn.Conv1d(2, 2, 3)) == []


def test_attach_names_the_linear_layers_when_no_target_matches():
    with pytest.raises(ValueError, match=r"no linear layer to adapt: wanted the LoRA targets wq, wo; its linear "
                                         r"layers: down_proj, gate_proj, k_proj, .*v_proj$"):
        attach_grouped_lora(tiny_llama(1), 2, rank=4, target_modules=("wq", "wo"), backend="torch")
    with pytest.raises(ValueError, match="target_modules must be a sequence of names, got the string 'q_proj'"):
        lora_targets(tiny_llama(1), "q_proj")


def test_all_linear_adapts_every_projection_whatever_its_name(tmp_path):
    """The default, PEFT's "all-linear": every linear layer but the output head. A list of Llama's names
    left Phi-3's fused qkv_proj and gate_up_proj without LoRA (its KMs adapted o_proj and down_proj only).
    Exported, the Phi-3 slot loads in plain PEFT to the same outputs."""
    from peft import PeftModel
    from transformers import Phi3Config, Phi3ForCausalLM

    assert sorted({n.rsplit(".", 1)[-1] for n, _ in lora_targets(tiny_llama(1))}) == sorted(TARGETS)
    from kmkernels.lora import DEFAULT_TARGETS
    from kmtrain.config import TARGETS as INDEX_TARGETS  # a copy, kept free of torch for the CLI's start

    assert INDEX_TARGETS == DEFAULT_TARGETS
    torch.manual_seed(0)
    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)).float().eval()
    grouped = attach_grouped_lora(copy.deepcopy(phi3), 2, rank=4, alpha=8, seed=1, backend="torch")
    wrapped = sorted(n for n, m in grouped.named_modules() if isinstance(m, GroupedLoRALinear))
    assert wrapped == sorted(f"model.layers.{i}.{m}" for i in range(2)
                             for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"))
    with torch.no_grad():
        for p in slot_parameters(grouped):
            p.add_(torch.randn_like(p) * 0.05)
    export_peft(grouped, 1, tmp_path / "km")
    loaded = PeftModel.from_pretrained(copy.deepcopy(phi3), tmp_path / "km")
    input_ids = torch.randint(0, 97, (2, 6))
    set_adapter_ids(grouped, [1, 1])
    with torch.no_grad():
        ours, theirs = grouped(input_ids=input_ids).logits, loaded(input_ids=input_ids).logits
        assert rel_err(theirs, ours) < 1e-5 and rel_err(phi3(input_ids=input_ids).logits, ours) > 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpt2_conv1d_projections_are_adapted_as_peft_adapts_them(tmp_path, backend):
    """GPT-2 computes its projections in transformers' Conv1D (a linear layer whose weight is stored
    [in, out]); "all-linear" found no linear layer there but the head, and GPT-2 was refused. Now its
    c_attn, c_proj and c_fc are wrapped as PEFT wraps them: each sequence with its own slot equals that
    slot exported and loaded in plain PEFT (fan_in_fan_out, as PEFT sets for Conv1D), and a PEFT
    adapter loads into a slot to the same outputs."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    grouped = attach_grouped_lora(copy.deepcopy(gpt2), 3, rank=4, alpha=8, seed=1, backend=backend)
    wrapped = {n: m for n, m in grouped.named_modules() if isinstance(m, GroupedLoRALinear)}
    assert sorted(wrapped) == sorted(f"transformer.h.{i}.{m}" for i in range(2)
                                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert wrapped["transformer.h.0.attn.c_attn"].lora_A.shape == (3, 4, 32)  # in = 32
    assert wrapped["transformer.h.0.attn.c_attn"].lora_B.shape == (3, 96, 4)  # out = 3 x 32
    with torch.no_grad():
        for p in slot_parameters(grouped):
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 97, (3, 7))
    set_adapter_ids(grouped, [2, 0, -1])
    with torch.no_grad():
        ours = grouped(input_ids=ids).logits
    for slot in (0, 2):
        export_peft(grouped, slot, tmp_path / f"km{slot}")
    assert json.loads((tmp_path / "km0" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with torch.no_grad():
        for row, slot in ((0, 2), (1, 0)):
            theirs = PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / f"km{slot}")(input_ids=ids[row:row + 1])
            assert rel_err(ours[row:row + 1], theirs.logits) < 1e-5, slot
        assert rel_err(ours[2:], gpt2(input_ids=ids[2:]).logits) < 1e-6  # no slot: the base
        assert rel_err(ours[:1], gpt2(input_ids=ids[:1]).logits) > 1e-3
    # and the other way: an adapter PEFT trained (here: made) loads into a slot
    peft_model = get_peft_model(copy.deepcopy(gpt2), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)
        want = peft_model(input_ids=ids[:1]).logits
    peft_model.save_pretrained(tmp_path / "peft_km")
    load_peft(grouped, 1, tmp_path / "peft_km")
    set_adapter_ids(grouped, [1])
    with torch.no_grad():
        assert rel_err(grouped(input_ids=ids[:1]).logits, want) < 1e-5


def test_a_model_that_reads_a_projections_weight_runs_with_the_slots_attached():
    """Models read a projection's `.weight` (its dtype, its shape, or Jamba's Mamba computing
    `dt_proj.weight @ x` itself): the wrapper gives the base layer's weight and bias, as PEFT's LoRA
    layers do, where such a model failed with "'GroupedLoRALinear' object has no attribute 'weight'".
    With fresh slots (B = 0) the output is the base model's."""
    from transformers import JambaConfig, JambaForCausalLM

    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2,
                                         attn_layer_offset=1, expert_layer_period=100, num_experts=1,
                                         mamba_d_state=8, mamba_expand=2, use_mamba_kernels=False)).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    attach_grouped_lora(model, 2, rank=4, alpha=4, backend="torch")
    dt_proj = model.model.layers[0].mamba.dt_proj
    assert isinstance(dt_proj, GroupedLoRALinear)
    assert dt_proj.weight is dt_proj.base.weight and dt_proj.bias is dt_proj.base.bias
    set_adapter_ids(model, torch.tensor([0, 1]))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-6)


def test_linear_subclasses_that_do_not_map_like_one_are_not_adapted():
    """Llama 4's MoE router is an nn.Linear that returns (scores, logits): "all-linear" wrapped it and the
    forward failed ("'tuple' object has no attribute 'shape'"). It is now left out (and refused when
    named), while a subclass that maps like a linear layer (Falcon's FalconLinear) is still adapted."""
    from transformers import FalconConfig, FalconForCausalLM, Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    llama4 = Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=32, intermediate_size_mlp=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2, interleave_moe_layer_step=2,
        no_rope_layers=[1, 0])).eval()
    names = {name.rsplit(".", 1)[-1] for name, _ in lora_targets(llama4, ["all-linear"])}
    assert "router" not in names and {"q_proj", "o_proj", "gate_proj", "down_proj"} <= names
    with pytest.raises(ValueError, match=r"LoRA targets router are Llama4Router: linear layers whose output is not "
                                         r"a linear layer's"):
        lora_targets(llama4, ["q_proj", "router"])
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        before = llama4(input_ids=ids).logits
    attach_grouped_lora(llama4, 2, rank=4, alpha=4, backend="torch")
    set_adapter_ids(llama4, torch.tensor([1, 0]))
    with torch.no_grad():
        torch.testing.assert_close(llama4(input_ids=ids).logits, before, rtol=1e-5, atol=1e-6)  # fresh slots: B = 0
    falcon = FalconForCausalLM(FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
    kinds = {type(m).__name__ for _, m in lora_targets(falcon, ["all-linear"])}
    assert kinds == {"FalconLinear"}


def test_a_multimodal_models_kms_adapt_its_language_model_only(tmp_path):
    """A multimodal model (Gemma 3 from 4B up) has linear layers in its vision tower too, some with the
    language model's names (q_proj). "all-linear" adapted them (adapters that never see text, zero
    for good); it now takes the language model's (get_decoder()). The exported config names the
    adapted modules in full, so plain PEFT adds no LoRA layers to the vision tower and warns of no
    missing keys; it loads to our logits."""
    import warnings

    from peft import PeftModel
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=110,
                          boi_token_index=111, eoi_token_index=112)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    base = copy.deepcopy(model)
    names = [name for name, _ in lora_targets(model, ["all-linear"])]
    assert len(names) == 14 and all("language_model" in name for name in names)  # 2 layers x 7 projections
    attach_grouped_lora(model, 1, rank=4, alpha=8, backend="torch")
    with torch.no_grad():
        for m in grouped_lora_modules(model).values():
            m.lora_B.normal_(0, 0.1)
    export_peft(model, 0, tmp_path / "km")
    saved = json.loads((tmp_path / "km" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(saved) == sorted(names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / "km")).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert not any("vision" in name for name, _ in peft_model.named_modules() if name.endswith("lora_A"))
    ids = torch.randint(0, 100, (1, 9))
    set_adapter_ids(model, torch.tensor([0]))
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, peft_model(input_ids=ids).logits) < 1e-5
