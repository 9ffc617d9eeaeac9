"""dcd_loss / DCDLoss against the float64 reference, and inside a tiny HF Llama with PEFT LoRA."""
import pytest
import torch

from conftest import DEVICE
from kmkernels import DCDLoss, dcd_loss, teacher_kl_stats
from reference import dcd_ref, rel_err

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


def test_dcd_errors():
    hs = [torch.randn(4, 8) for _ in range(2)]
    with pytest.raises(ValueError, match="layer counts differ"):
        dcd_loss(hs, hs[:1], torch.randn(10, 8))
    with pytest.raises(ValueError, match="student_weight"):
        dcd_loss(hs, hs, torch.randn(10, 9))


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
