"""The training loop: D documents per step, one grouped-LoRA slot each, fused DCD loss.

Read it top to bottom: `train_wave` trains one wave of up to D documents from fresh slots for
`cfg.steps` steps and returns their losses; the caller exports each slot as a PEFT folder.

Why the KM of a document does not depend on its batch-mates:
  * each slot is initialised from the document's own seed (reset_slot), and each document
    draws its examples from its own RNG;
  * the loss is a sum of per-document losses (each normalised over its own positions), so a
    slot's gradient comes from its own rows only;
  * gradients are clipped per slot, and AdamW is elementwise, so one document's gradient norm
    never scales another's update.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from kmkernels import dcd_loss, reset_slot, set_adapter_ids, slot_parameters

from .models import decoder_hidden_states
from .teacher_cache import Example, TeacherCache, _pad, select_layers, teacher_hiddens


@dataclass
class DocState:
    id: str
    examples: List[Example]
    seed: int
    cache: Optional[TeacherCache] = None
    losses: List[Dict[str, float]] = field(default_factory=list)
    _order: List[int] = field(default_factory=list)
    _rng: Optional[random.Random] = None

    def next_example(self) -> int:
        """Examples in a fresh random order each epoch, from this document's own RNG."""
        if self._rng is None:
            self._rng = random.Random(self.seed)
        if not self._order:
            self._order = list(range(len(self.examples)))
            self._rng.shuffle(self._order)
        return self._order.pop()


def lr_lambda(cfg, step: int) -> float:
    """Linear warm-up, then cosine decay to 0."""
    warm = max(1, int(round(cfg.warmup_frac * cfg.steps)))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def clip_per_slot(model, max_norm: float) -> torch.Tensor:
    """Clip each slot's gradient (all its A and B matrices together) to ``max_norm``. Returns norms [D]."""
    params = [p for p in slot_parameters(model) if p.grad is not None]
    sq = sum(p.grad.float().pow(2).sum(dim=tuple(range(1, p.dim()))) for p in params)
    norms = sq.sqrt()
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(factor.view(-1, *([1] * (p.dim() - 1))).to(p.grad.dtype))
    return norms


def _no_adapter(model):
    return lambda batch: set_adapter_ids(model, torch.full((batch,), -1, dtype=torch.long))


def round_like_cache(h: torch.Tensor, cache_dtype: str) -> torch.Tensor:
    """On-the-fly teacher states get the cache's rounding, so cached and uncached runs see the same numbers."""
    if cache_dtype == "bf16":
        return h.to(torch.bfloat16)
    if cache_dtype == "fp8":
        scale = (h.abs().amax(dim=(1, 2)) / 448.0).clamp_min(1e-12)
        return (h / scale[:, None, None]).to(torch.float8_e4m3fn).float() * scale[:, None, None]
    return h


def _ce_rows(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy((h @ weight.t()).float(), targets, reduction="none")


def chunked_lm_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Next-token cross entropy per row, [N] fp32, from last hidden states ``h`` [N, H] and the LM
    head ``weight`` [V, H], without a [N, V] tensor living through the backward: each chunk's
    logits are recomputed there (activation checkpointing). The LM and PIT baselines on 8 x 1024
    tokens would otherwise hold ~19 GB of fp32 logits and their softmax on a CPU (seen: OOM-killed)."""
    from torch.utils.checkpoint import checkpoint

    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=torch.float32)
    return torch.cat([checkpoint(_ce_rows, h[i:i + chunk], weight, targets[i:i + chunk], use_reentrant=False)
                      for i in range(0, h.shape[0], chunk)])


def train_wave(model, tokenizer, wave: List[DocState], cfg, device: torch.device, amp_dtype, progress=None) -> None:
    """Train up to D documents together for cfg.steps steps. Slots 0..len(wave)-1 are used."""
    distill = cfg.objective in ("sdcd", "ddcd")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    num_layers = model.config.num_hidden_layers
    layers = wave[0].cache.layers if (distill and wave[0].cache is not None) else select_layers(num_layers, cfg.cache_layers)
    lm_head = model.get_output_embeddings().weight

    for slot, doc in enumerate(wave):
        reset_slot(model, slot, doc.seed)
    params = slot_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(cfg, s))
    model.train()

    for step in range(cfg.steps):
        # 1. the batch: examples_per_doc examples of every document, grouped by slot
        picks = [(slot, doc.next_example()) for slot, doc in enumerate(wave) for _ in range(cfg.examples_per_doc)]
        examples = [wave[slot].examples[i] for slot, i in picks]

        # 2. the teacher's hidden states: from the cache, or (reference recipe) a teacher forward now
        if distill:
            if wave[0].cache is not None:
                got = [wave[slot].cache.get(i) for slot, i in picks]
                t_h = [h for h, _ in got]
                t_norms = [n for _, n in got]
            else:
                model.eval()
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    fresh = teacher_hiddens(model, examples, layers, pad_id, _no_adapter(model))
                model.train()
                t_h = [round_like_cache(h, cfg.cache_dtype) for h in fresh]
                t_norms = [h.abs().sum(dim=(1, 2)) for h in fresh]

        # 3. the student: base model + each document's own slot, one forward for the whole batch
        ids, mask = _pad([e.student_ids for e in examples], pad_id)
        set_adapter_ids(model, torch.tensor([slot for slot, _ in picks]))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            # no logits: both losses start from hidden states at the target positions
            hidden = decoder_hidden_states(model, ids.to(device), mask.to(device))

        # 4. the loss: a sum over documents of each document's own DCD (or LM) loss
        T = ids.shape[1]
        pos = torch.cat([b * T + torch.arange(e.s_start, e.s_start + e.n) for b, e in enumerate(examples)]).to(device)
        doc_of_pos = torch.cat([torch.full((e.n,), slot) for (slot, _), e in zip(picks, examples)])
        total = 0.0
        if distill:
            s_h = [hidden[l].reshape(-1, hidden[l].shape[-1])[pos] for l in layers]
            t_all = torch.cat(t_h, dim=1).to(device)  # [L_sel, N_pos, H]
            for slot, doc in enumerate(wave):
                sel = (doc_of_pos == slot).nonzero().squeeze(1).to(device)
                norms = torch.stack([n for (s, _), n in zip(picks, t_norms) if s == slot]).sum(0)
                loss_d, parts = dcd_loss([h[sel] for h in s_h], t_all[:, sel], lm_head, kl_weight=cfg.kl_weight,
                                         hidden_weight=cfg.hidden_weight, teacher_norms=norms, backend=cfg.backend)
                doc.losses.append({"loss": float(loss_d.detach()), "kl": float(parts["kl"]), "hidden": float(parts["hidden"])})
                total = total + loss_d
        else:
            last = hidden[-1]
            tgt = ids.to(device).reshape(-1)[pos + 1]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                ce = chunked_lm_loss(last.reshape(-1, last.shape[-1])[pos], lm_head, tgt)
            for slot, doc in enumerate(wave):
                loss_d = ce[(doc_of_pos == slot).to(device)].mean()
                doc.losses.append({"loss": float(loss_d.detach())})
                total = total + loss_d

        # 5. the update: per-slot clipping, AdamW, schedule
        opt.zero_grad(set_to_none=True)
        total.backward()
        clip_per_slot(model, cfg.clip)
        opt.step()
        sched.step()
        if progress is not None:
            progress.set_postfix(loss=f"{float(total.detach()) / len(wave):.4f}")
            progress.update(1)
    model.eval()
    set_adapter_ids(model, None)
