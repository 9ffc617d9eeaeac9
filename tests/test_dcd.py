"""dcd_loss / DCDLoss against the float64 reference, and inside a tiny HF Llama with PEFT LoRA."""
import pytest
import torch

from conftest import DEVICE
from kmkernels import DCDLoss, dcd_loss, teacher_kl_stats
from reference import dcd_ref, hidden_l1_ref, linear_kl_ref, rel_err

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kl_from", ["hidden", "stats"])
def test_dcd_loss_matches_reference(backend, dtype, kl_from):
    L, N, H, V = 3, 17, 24, 211
    hs = [torch.randn(N, H).to(DEVICE, dtype).requires_grad_() for _ in range(L)]
    ht = torch.randn(L, N, H).to(DEVICE, dtype)
    w = (torch.randn(V, H) / 2).to(DEVICE, dtype)
    mask = torch.rand(N) > 0.3
    mask[0] = True
    stats = teacher_kl_stats(ht[-1], w, temperature=1.5, backend=backend) if kl_from == "stats" else None
    loss, parts = dcd_loss(hs, ht, w, kl_weight=0.7, hidden_weight=1.3, temperature=1.5, mask=mask.to(DEVICE),
                           teacher_kl_stats=stats, backend=backend)
    hs64 = [s.detach().double().cpu().requires_grad_() for s in hs]
    ref = dcd_ref(hs64, [t.cpu() for t in ht], w.cpu().double(), 0.7, 1.3, 1.5, mask)
    assert rel_err(loss, ref) < 1e-5
    assert rel_err(0.7 * parts["kl"] + 1.3 * parts["hidden"], ref) < 1e-5
    grads = torch.autograd.grad(loss, hs)
    rgrads = torch.autograd.grad(ref, hs64)
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    for g, rg in zip(grads, rgrads):
        assert rel_err(g, rg) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_dcd_kl_teacher_hidden_feeds_the_kl_only(backend):
    """kl_teacher_hidden (the teacher's last layer before a cache's rounding) is the KL's teacher;
    the L1 term keeps teacher_hiddens (the rounded states), as a cache's fp32 KL statistics do.
    Against float64, values and gradients; the two teachers differ enough for a mix-up to show."""
    L, N, H, V = 3, 13, 16, 97
    g = torch.Generator().manual_seed(0)
    ht = torch.randn(L, N, H, generator=g).to(DEVICE)
    ht_kl = ht[-1] + 0.3 * torch.randn(N, H, generator=g).to(DEVICE)
    # the student's last layer near the KL's teacher (a fitted student): its KL against ht[-1] is then far larger
    hs = [torch.randn(N, H, generator=g).to(DEVICE) for _ in range(L - 1)]
    hs = [h.requires_grad_() for h in hs + [ht_kl + 0.15 * torch.randn(N, H, generator=g).to(DEVICE)]]
    w = (torch.randn(V, H, generator=g) / 2).to(DEVICE)
    loss, parts = dcd_loss(hs, ht, w, kl_weight=0.7, hidden_weight=1.3, kl_teacher_hidden=ht_kl, backend=backend)
    hs64 = [s.detach().double().cpu().requires_grad_() for s in hs]
    kl = linear_kl_ref(hs64[-1], w.cpu().double(), ht_kl.cpu().double())
    hid = hidden_l1_ref(hs64, [t.cpu().double() for t in ht])
    assert rel_err(parts["kl"], kl) < 1e-5 and rel_err(parts["hidden"], hid) < 1e-5
    assert linear_kl_ref(hs64[-1], w.cpu().double(), ht[-1].cpu().double()) > 3 * parts["kl"].cpu()
    ref = 0.7 * kl + 1.3 * hid
    for g, rg in zip(torch.autograd.grad(loss, hs), torch.autograd.grad(ref, hs64)):
        assert rel_err(g, rg) < 2e-5
    with pytest.raises(ValueError, match="pass one"):
        dcd_loss(hs, ht, w, teacher_kl_stats=teacher_kl_stats(ht_kl, w), kl_teacher_hidden=ht_kl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dcd_softcap(backend):
    """A soft-capped model (Gemma 2): its cap reaches the KL, on teacher_hiddens[-1] or on
    kl_teacher_hidden, through the function and the module; with teacher_kl_stats it is refused (they
    assume logits linear in h). The logits are ~4 in size, so a cap of 3 changes the loss."""
    L, N, H, V = 2, 11, 16, 89
    g = torch.Generator().manual_seed(1)
    hs = [torch.randn(N, H, generator=g).to(DEVICE).requires_grad_() for _ in range(L)]
    ht = torch.randn(L, N, H, generator=g).to(DEVICE)
    ht_kl = ht[-1] + 0.3 * torch.randn(N, H, generator=g).to(DEVICE)
    w = torch.randn(V, H, generator=g).to(DEVICE)
    hs64 = [s.detach().double().cpu().requires_grad_() for s in hs]
    for kl_hidden in (None, ht_kl):
        loss, parts = dcd_loss(hs, ht, w, temperature=1.5, softcap=3.0, kl_teacher_hidden=kl_hidden, backend=backend)
        teacher = (ht[-1] if kl_hidden is None else kl_hidden).cpu().double()
        kl = linear_kl_ref(hs64[-1], w.cpu().double(), teacher, temperature=1.5, softcap=3.0)
        assert rel_err(parts["kl"], kl) < 1e-5
        assert rel_err(parts["kl"], linear_kl_ref(hs64[-1], w.cpu().double(), teacher, temperature=1.5)) > 1e-2
        ref = kl + hidden_l1_ref(hs64, [t.cpu().double() for t in ht])
        for gr, rg in zip(torch.autograd.grad(loss, hs), torch.autograd.grad(ref, hs64)):
            assert rel_err(gr, rg) < 2e-5
    module_loss, _ = DCDLoss(temperature=1.5, softcap=3.0, backend=backend)(hs, ht, w)
    assert rel_err(module_loss, dcd_ref(hs64, ht.cpu(), w.cpu().double(), temperature=1.5, softcap=3.0)) < 1e-5
    with pytest.raises(ValueError, match="softcap with teacher_kl_stats"):
        dcd_loss(hs, ht, w, softcap=3.0, teacher_kl_stats=teacher_kl_stats(ht[-1], w), backend=backend)
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="softcap must be a positive finite number"):
            dcd_loss(hs, ht, w, softcap=bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dcd_biased_head(backend):
    """A biased lm_head (Phi-2): its bias reaches the KL on the teacher's hidden state and from the
    teacher's statistics, through the function and the module, against float64; the bias (~2, the
    logits' size) changes the loss."""
    L, N, H, V = 2, 11, 16, 89
    g = torch.Generator().manual_seed(2)
    hs = [torch.randn(N, H, generator=g).to(DEVICE).requires_grad_() for _ in range(L)]
    ht = torch.randn(L, N, H, generator=g).to(DEVICE)
    w = (torch.randn(V, H, generator=g) / 2).to(DEVICE)
    b = (torch.randn(V, generator=g) * 2).to(DEVICE)
    hs64 = [s.detach().double().cpu().requires_grad_() for s in hs]
    ref = dcd_ref(hs64, ht.cpu(), w.cpu().double(), temperature=1.5, bias=b.cpu().double())
    unbiased = dcd_ref(hs64, ht.cpu(), w.cpu().double(), temperature=1.5)
    assert rel_err(unbiased, ref) > 1e-2
    ref_grads = torch.autograd.grad(ref, hs64)
    for stats in (None, teacher_kl_stats(ht[-1], w, temperature=1.5, bias=b, backend=backend)):
        loss, _ = dcd_loss(hs, ht, w, temperature=1.5, teacher_kl_stats=stats, lm_head_bias=b, backend=backend)
        assert rel_err(loss, ref) < 1e-5
        for gr, rg in zip(torch.autograd.grad(loss, hs), ref_grads):
            assert rel_err(gr, rg) < 2e-5
    module_loss, _ = DCDLoss(temperature=1.5, backend=backend)(hs, ht, w, lm_head_bias=b)
    assert rel_err(module_loss, ref) < 1e-5


def test_dcd_errors():
    hs = [torch.randn(4, 8) for _ in range(2)]
    with pytest.raises(ValueError, match="layer counts differ"):
        dcd_loss(hs, hs[:1], torch.randn(10, 8))
    with pytest.raises(ValueError, match="student_weight"):
        dcd_loss(hs, hs, torch.randn(10, 9))
    with pytest.raises(ValueError, match="student_hiddens is empty: need at least one layer"):
        dcd_loss([], [], torch.randn(10, 8))


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=131, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dcd_in_hf_llama_with_peft_step(backend):
    """One AdamW step with DCDLoss gives the same LoRA update as the float64 reference loss."""
    from peft import LoraConfig, get_peft_model

    def build():
        model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                         init_lora_weights="gaussian"))
        torch.manual_seed(1)
        for n, p in model.named_parameters():  # non-zero B so that A gets gradient too
            if "lora_B" in n:
                p.data.normal_(0, 0.05)
        return model

    g = torch.Generator().manual_seed(7)
    ctx_ids = torch.randint(0, 131, (2, 6), generator=g).to(DEVICE)
    tgt_ids = torch.randint(0, 131, (2, 9), generator=g).to(DEVICE)
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    mask[1, 6:] = False  # padded tail of the second target
    updates, grads = [], []
    for which in ("ours", "ref"):
        model = build().to(DEVICE)
        with torch.no_grad(), model.disable_adapter():  # teacher: frozen base with context
            t_out = model(input_ids=torch.cat([ctx_ids, tgt_ids], 1), output_hidden_states=True)
            ht = [h[:, 6:] for h in t_out.hidden_states[1:]]
        s_out = model(input_ids=tgt_ids, output_hidden_states=True)
        hs = list(s_out.hidden_states[1:])
        lm_w = model.get_output_embeddings().weight
        if which == "ours":
            loss, _ = DCDLoss(backend=backend)(hs, ht, lm_w, mask=mask)
        else:
            loss = dcd_ref(hs, ht, lm_w.double(), mask=mask)
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        opt.zero_grad()
        loss.backward()
        grads.append([p.grad.detach().clone() for p in params])
        opt.step()
        updates.append([p.detach() - b for p, b in zip(params, before)])
    assert len(grads[0]) == 12
    for ga, gb in zip(*grads):
        assert rel_err(ga, gb) < 1e-4
    for ua, ub in zip(*updates):
        assert rel_err(ua, ub) < 1e-3
        assert ub.abs().sum() > 0


def _readme_trainer_class():
    """The DCDTrainer of the README's "In a Hugging Face `Trainer`" section, executed as written."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### In a Hugging Face `Trainer`", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (Trainer section)", "exec"), scope)
    return scope["DCDTrainer"]


def test_readme_trainer_recipe_computes_dcd_and_trains(tmp_path):
    """The README's Trainer subclass, fed as its docstring says (cached teacher states in the target
    mask's row order, remove_unused_columns=False): its loss on a padded batch is the float64 DCD
    loss, and 30 Trainer steps of a PEFT LoRA bring it down."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    DCDTrainer = _readme_trainer_class()
    base = _tiny_llama()
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(20)  # a peaked teacher, so the KL term is not ~0
    g = torch.Generator().manual_seed(3)
    chunk = torch.randint(0, 131, (12,), generator=g)
    rows = []
    for n in (5, 9, 7, 6, 8, 5, 9, 6):
        tgt = torch.randint(0, 131, (n,), generator=g)
        with torch.no_grad():  # the frozen teacher with the chunk in context, on the target positions
            hs = base(input_ids=torch.cat([chunk, tgt])[None], output_hidden_states=True).hidden_states[1:]
        rows.append({"ids": tgt, "teacher": torch.stack([h[0, len(chunk):] for h in hs])})

    def collate(batch):
        T = max(len(r["ids"]) for r in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        target_mask = torch.zeros(len(batch), T, dtype=torch.bool)
        for b, r in enumerate(batch):
            ids[b, :len(r["ids"])] = r["ids"]
            target_mask[b, :len(r["ids"])] = True
        return {"input_ids": ids, "attention_mask": target_mask.long(), "target_mask": target_mask,
                "teacher_hiddens": torch.cat([r["teacher"] for r in batch], dim=1)}

    student = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=30, learning_rate=5e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             remove_unused_columns=False)
    trainer = DCDTrainer(model=student, args=args, train_dataset=rows, data_collator=collate)

    batch = collate(rows[:4])  # right-padded: the mask leaves the padding out
    with torch.no_grad():
        got = trainer.compute_loss(student, dict(batch))
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        hs = [h[batch["target_mask"]] for h in out.hidden_states[1:]]
        want = dcd_ref(hs, list(batch["teacher_hiddens"]), student.get_output_embeddings().weight)
    assert want > 0.01
    assert rel_err(got, want) < 1e-5

    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 30
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
