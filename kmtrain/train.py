"""The training loop: D documents per step, one grouped-LoRA slot each, fused DCD loss.

Read it top to bottom: `train_wave` trains one wave of up to D documents from fresh slots for
`cfg.steps` steps, recording each document's losses (and held-out curve) in its DocState, and
leaves each slot at the weights to ship; the caller exports each slot as a PEFT folder.

Why the KM of a document does not depend on its batch-mates:
  * each slot is initialised from the document's own seed (reset_slot), and each document
    draws its examples from its own RNG;
  * the loss is a sum of per-document losses (each normalised over its own positions), so a
    slot's gradient comes from its own rows only;
  * gradients are clipped per slot, and AdamW is elementwise, so one document's gradient norm
    never scales another's update;
  * model selection compares each slot's own held-out loss over time, and keeps each slot's own
    best weights.
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from kmkernels import dcd_loss, reset_slot, set_adapter_ids, slot_parameters
from kmkernels.fused_linear_kl import softcap_logits
from kmkernels.lora import grouped_lora_modules

from .checkpoint import TrainingCheckpoint, load_checkpoint, save_checkpoint
from .models import decoder_hidden_states, head_bias, logit_softcap, logit_temperature, text_config
from .teacher_cache import Example, TeacherCache, _decode, _encode, _pad, select_layers, teacher_hiddens


@dataclass
class DocState:
    id: str
    examples: List[Example]
    seed: int
    cache: Optional[TeacherCache] = None
    heldout: List[int] = field(default_factory=list)  # example indices never trained on (model selection)
    losses: List[Dict[str, float]] = field(default_factory=list)
    heldout_curve: List[Dict[str, float]] = field(default_factory=list)
    best_step: Optional[int] = None
    _order: List[int] = field(default_factory=list)
    _rng: Optional[random.Random] = None

    def next_example(self) -> int:
        """Training examples in a fresh random order each epoch, from this document's own RNG."""
        if self._rng is None:
            self._rng = random.Random(self.seed)
        if not self._order:
            held = set(self.heldout)
            self._order = [i for i in range(len(self.examples)) if i not in held]
            self._rng.shuffle(self._order)
        return self._order.pop()


@dataclass
class StopRequest:
    signum: Optional[int] = None  # the first SIGINT or SIGTERM received, if any


@contextlib.contextmanager
def stop_at_step_end(enabled: bool) -> Iterator[StopRequest]:
    """While training, a first Ctrl-C (SIGINT) or SIGTERM (a scheduler's or a spot machine's notice)
    is recorded for the loop, which saves its state at the end of the step and then stops; a second
    Ctrl-C stops at once. Why: such a stop lost up to --checkpoint-seconds of training, and a
    handler that saved mid-step would save weights that AdamW had half updated. Off (signals as
    usual) when ``enabled`` is False (no checkpoint to save) or outside the main thread, where
    Python cannot install handlers."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.signum = signum
        try:
            print(f"\nkmtrain: {signal.Signals(signum).name}: the training state is saved at the end of this step, "
                  f"then the run stops (Ctrl-C again to stop at once, losing the steps since the last save)",
                  file=sys.stderr, flush=True)
        except RuntimeError:  # the signal came in the middle of a write to stderr (a progress bar's): the
            pass              # stream refuses a reentrant write; the line after the save still comes

    before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, h in before.items():
            signal.signal(s, h)


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
    """On-the-fly teacher states [L, n, H] get the cache's rounding (its own encode and decode), so
    cached and uncached runs see the same numbers."""
    return _decode(*_encode(h, cache_dtype))


def _ce_rows(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
             softcap: Optional[float], bias: Optional[torch.Tensor]) -> torch.Tensor:
    logits = softcap_logits(torch.nn.functional.linear(h, weight, bias).float(), softcap)
    return torch.nn.functional.cross_entropy(logits if temperature == 1.0 else logits / temperature, targets,
                                             reduction="none")


def chunked_lm_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                    temperature: float = 1.0, softcap: Optional[float] = None,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token cross entropy per row, [N] fp32, from last hidden states ``h`` [N, H] and the LM
    head ``weight`` [V, H] with its ``bias`` [V] where it has one (logits capped at softcap * tanh(z /
    softcap) where given, then divided by ``temperature``: the model's own), without a [N, V] tensor
    living through the backward: each chunk's logits are recomputed there (activation checkpointing).
    The LM and PIT baselines on 8 x 1024 tokens would otherwise hold ~19 GB of fp32 logits and their
    softmax on a CPU (seen: OOM-killed)."""
    from torch.utils.checkpoint import checkpoint

    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=torch.float32)
    return torch.cat([checkpoint(_ce_rows, h[i:i + chunk], weight, targets[i:i + chunk], temperature, softcap, bias,
                                 use_reentrant=False) for i in range(0, h.shape[0], chunk)])


# A batch is split in two forwards when that leaves at least this fraction of its padded tokens
# out: a second decoder call costs about 4% of a make demo batch's forward + backward (measured
# 2026-12-03 on a 2-core CPU: 16 sequences of 78-166 tokens, 7.4 s in one forward against 6.9 s in
# two, where the two hold 9% fewer tokens), so smaller savings are not worth a call. make demo's
# batches would leave 3-21% out (10.5% over its 60 steps). A round threshold, not a tuned one.
SPLIT_MIN_SAVING = 0.05


def length_groups(lengths: List[int]) -> List[List[int]]:
    """The batch's sequences (indices into ``lengths``) in one group, or in two by length (the
    shortest ones, then the rest) when padding each group to its own longest sequence leaves at
    least SPLIT_MIN_SAVING of the padded tokens out. Each group keeps the batch's order."""
    n = len(lengths)
    order = sorted(range(n), key=lambda i: lengths[i])
    longest = lengths[order[-1]] if n else 0
    best_k, best = 0, n * longest
    for k in range(1, n):
        cost = k * lengths[order[k - 1]] + (n - k) * longest
        if cost < best:
            best_k, best = k, cost
    if best_k == 0 or n * longest - best < SPLIT_MIN_SAVING * n * longest:
        return [list(range(n))]
    short = set(order[:best_k])
    return [[i for i in range(n) if i in short], [i for i in range(n) if i not in short]]


def _student_rows(model, examples: List[Example], slots: List[int], layers: List[int], device: torch.device,
                  amp_dtype, pad_id: int, lm_targets: bool) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """Each of ``layers``' student hidden states at the examples' distilled positions, [N_pos, H]
    in the examples' order (example k's rows s_start .. s_start + n - 1, then example k + 1's), and
    with ``lm_targets`` the next token at each of them [N_pos]. The sequences run in one decoder
    forward, or two by length (``length_groups``): every sequence's numbers are its own either way
    (causal attention over its own tokens, its own LoRA slot), only the padding differs."""
    per_layer: List[List[torch.Tensor]] = [[] for _ in layers]
    tgt, where = [], []
    for idx in length_groups([len(e.student_ids) for e in examples]):
        batch = [examples[i] for i in idx]
        ids, mask = _pad([e.student_ids for e in batch], pad_id)
        ids = ids.to(device)
        set_adapter_ids(model, torch.tensor([slots[i] for i in idx]))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            # no logits: both losses start from hidden states at the target positions
            hidden = decoder_hidden_states(model, ids, mask.to(device))
        T = ids.shape[1]
        pos = torch.cat([b * T + torch.arange(e.s_start, e.s_start + e.n) for b, e in enumerate(batch)]).to(device)
        for rows, l in zip(per_layer, layers):
            rows.append(hidden[l].reshape(-1, hidden[l].shape[-1])[pos])
        if lm_targets:
            tgt.append(ids.reshape(-1)[pos + 1])
        where.extend(idx)
    if len(per_layer[0]) == 1:
        return [rows[0] for rows in per_layer], (tgt[0] if lm_targets else None)
    # back to the examples' order: the rows came group by group
    start, at = {}, 0
    for i in where:
        start[i] = at
        at += examples[i].n
    back = torch.cat([torch.arange(start[k], start[k] + e.n) for k, e in enumerate(examples)]).to(device)
    return ([torch.cat(rows)[back] for rows in per_layer],
            torch.cat(tgt)[back] if lm_targets else None)


@dataclass
class TeacherRows:
    """The teacher's side of one picked example, on its distilled positions: ``hidden`` [L_sel, n, H]
    as the cache returns them (rounded to its dtype), ``norms`` fp32 [L_sel] (sum|h_t| per layer),
    and the KL's teacher: ``kl_stats`` (embedding fp32 [n, H], negative entropy fp32 [n]) where the
    cache has them, else ``kl_hidden`` [n, H], the last layer before the cache's rounding (from the
    cache for a soft-capped model, whose cache stores it in place of the statistics)."""
    hidden: torch.Tensor
    norms: torch.Tensor
    kl_stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    kl_hidden: Optional[torch.Tensor] = None


def teacher_rows(model, wave: List[DocState], picks: List[Tuple[int, int]], cfg, device: torch.device, amp_dtype,
                 layers: List[int], pad_id: int) -> List[TeacherRows]:
    """Each pick's TeacherRows: from its document's cache, or (reference recipe) a teacher forward
    now over all ``picks`` in one batch."""
    if wave[0].cache is not None:
        rows = []
        for slot, i in picks:
            cache = wave[slot].cache
            h, norms = cache.get(i)
            rows.append(TeacherRows(h, norms, kl_stats=cache.kl_stats(i) if cache.has_kl_stats else None,
                                    kl_hidden=cache.kl_hidden(i) if cache.has_kl_hidden else None))
        return rows
    was_training = model.training
    model.eval()
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        fresh = teacher_hiddens(model, [wave[slot].examples[i] for slot, i in picks], layers, pad_id,
                                _no_adapter(model))
    model.train(was_training)
    # rounded as the cache would store them; the KL reads them unrounded, as the cache's statistics
    # are computed (teacher_cache.build_cache), in the LM head's dtype, which the states came in from
    # the model in (as build_cache does)
    head_dtype = model.get_output_embeddings().weight.dtype
    return [TeacherRows(round_like_cache(h, cfg.cache_dtype), h.abs().sum(dim=(1, 2)),
                        kl_hidden=h[-1].to(device, head_dtype)) for h in fresh]


def _batch_losses(model, wave: List[DocState], picks: List[Tuple[int, int]], groups: List[int], cfg,
                  device: torch.device, amp_dtype, layers: List[int], pad_id: int,
                  teacher: Optional[List[TeacherRows]] = None,
                  totals: Optional[List[Tuple[int, Optional[torch.Tensor]]]] = None,
                  ) -> List[Tuple[torch.Tensor, Dict[str, float]]]:
    """The student's pass over ``picks`` [(slot, example index)], each example in its document's slot
    (one decoder forward, or two by length: ``_student_rows``), and one loss per group: ``groups[k]``
    (0..G-1) is the group of ``picks[k]``. A group's loss is its own DCD loss (KL averaged over the
    group's positions, each layer's sum|h_s - h_t| / sum|h_t| over them) or its mean next-token loss,
    so no group's value or gradient depends on another's rows.

    ``teacher``: the picks' TeacherRows (default: ``teacher_rows`` of them). ``totals``: per group,
    (its positions, its teacher norms [L_sel] or None) over a whole step of which these picks are a
    part (``micro_batches``): each group's loss is then its share of the step's loss, normalised by
    those totals, so the shares of the step's passes sum to the loss of one pass over them all."""
    distill = cfg.objective in ("sdcd", "ddcd")
    examples = [wave[slot].examples[i] for slot, i in picks]
    G = max(groups) + 1
    if distill and teacher is None:
        teacher = teacher_rows(model, wave, picks, cfg, device, amp_dtype, layers, pad_id)

    # the student: base model + each document's own slot, its hidden states at the distilled
    # positions [N_pos, H] of each layer (the LM objectives: of the last, with next-token targets)
    want = layers if distill else [-1]
    s_rows, targets = _student_rows(model, examples, [slot for slot, _ in picks], want, device, amp_dtype, pad_id,
                                    lm_targets=not distill)
    group_of_pos = torch.cat([torch.full((e.n,), g) for g, e in zip(groups, examples)])
    lm_head = model.get_output_embeddings().weight
    temperature = logit_temperature(model)  # the model's own logit scale (Cohere, Granite), else 1
    softcap = logit_softcap(model)  # its own soft cap on the logits (Gemma 2), else None
    bias = head_bias(model)  # its head's bias (Phi-2), else None
    out = []
    if distill:
        t_all = torch.cat([t.hidden for t in teacher], dim=1).to(device)  # [L_sel, N_pos, H]
        t_emb = t_negent = t_kl = None
        if all(t.kl_stats is not None for t in teacher):
            t_emb = torch.cat([t.kl_stats[0] for t in teacher]).to(device)
            t_negent = torch.cat([t.kl_stats[1] for t in teacher]).to(device)
        elif all(t.kl_hidden is not None for t in teacher):
            t_kl = torch.cat([t.kl_hidden for t in teacher]).to(device)
        for g in range(G):
            sel = (group_of_pos == g).nonzero().squeeze(1).to(device)
            if totals is None:
                norms = torch.stack([t.norms for k, t in zip(groups, teacher) if k == g]).sum(0)
                share = 1.0
            else:  # this pass's share of the step: the KL's mean over the step's positions, the norms of the step's
                norms, share = totals[g][1], len(sel) / totals[g][0]
            stats = (t_emb[sel], t_negent[sel]) if t_emb is not None else None
            loss, parts = dcd_loss([h[sel] for h in s_rows], t_all[:, sel], lm_head, kl_weight=cfg.kl_weight * share,
                                   hidden_weight=cfg.hidden_weight, teacher_norms=norms, teacher_kl_stats=stats,
                                   kl_teacher_hidden=t_kl[sel] if t_kl is not None else None,
                                   temperature=temperature, softcap=softcap, lm_head_bias=bias, backend=cfg.backend)
            out.append((loss, {"loss": float(loss.detach()), "kl": float(parts["kl"]) * share,
                               "hidden": float(parts["hidden"])}))
    else:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            ce = chunked_lm_loss(s_rows[0], lm_head, targets, temperature=temperature, softcap=softcap, bias=bias)
        for g in range(G):
            rows = ce[(group_of_pos == g).to(device)]
            loss = rows.mean() if totals is None else rows.sum() / totals[g][0]
            out.append((loss, {"loss": float(loss.detach())}))
    return out


def micro_batches(lengths: List[int], budget: int) -> List[List[int]]:
    """The picks (indices into ``lengths``, their student sequence lengths) in passes of at most
    ``budget`` padded tokens each, shortest first (less padding); one pass of all where ``budget`` is
    0. A sequence longer than the budget gets a pass of its own."""
    if budget <= 0:
        return [list(range(len(lengths)))]
    passes: List[List[int]] = []
    for i in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        if passes and (len(passes[-1]) + 1) * lengths[i] <= budget:  # ascending: lengths[i] is the pass's longest
            passes[-1].append(i)
        else:
            passes.append([i])
    return passes


def _passes(wave: List[DocState], picks: List[Tuple[int, int]], budget: int) -> List[List[int]]:
    """``micro_batches`` of ``picks`` [(slot, example index)], by their student sequences' lengths."""
    return micro_batches([len(wave[slot].examples[i].student_ids) for slot, i in picks], budget)


def step_backward(model, wave: List[DocState], picks: List[Tuple[int, int]], cfg, device: torch.device, amp_dtype,
                  layers: List[int], pad_id: int) -> Tuple[List[Dict[str, float]], float]:
    """One training step's forward and backward: the sum over documents of each document's own loss
    (the picks of slot s are document s's), its gradients added to the slots' ``.grad``. Returns each
    document's loss parts and the sum.

    With ``cfg.micro_batch_tokens`` the picks run in passes of at most that many padded tokens, each
    with its own backward, so activations of one pass at a time are held: every document's loss is
    normalised by its totals over the whole step (its positions, its teacher norms), so the passes'
    shares and gradients add up to one pass's, to rounding. A document's examples may fall into
    different passes. Without a cache the teacher runs for every pass first, its states kept for the
    step (the norms need all of them before the first student pass)."""
    distill = cfg.objective in ("sdcd", "ddcd")
    passes = _passes(wave, picks, cfg.micro_batch_tokens)
    if len(passes) == 1:
        out = _batch_losses(model, wave, picks, [slot for slot, _ in picks], cfg, device, amp_dtype, layers, pad_id)
        total = sum(loss for loss, _ in out)
        total.backward()
        return [parts for _, parts in out], float(total.detach())

    teacher: List[Optional[TeacherRows]] = [None] * len(picks)
    if distill:
        for idx in passes:
            for k, rows in zip(idx, teacher_rows(model, wave, [picks[k] for k in idx], cfg, device, amp_dtype, layers,
                                                 pad_id)):
                teacher[k] = rows
    positions: Dict[int, int] = {}
    norms: Dict[int, torch.Tensor] = {}
    for k, (slot, i) in enumerate(picks):
        positions[slot] = positions.get(slot, 0) + wave[slot].examples[i].n
        if distill:
            norms[slot] = norms[slot] + teacher[k].norms if slot in norms else teacher[k].norms
    per_doc: Dict[int, Dict[str, float]] = {}
    total = 0.0
    for idx in passes:
        sub = [picks[k] for k in idx]
        slots = sorted({slot for slot, _ in sub})
        out = _batch_losses(model, wave, sub, [slots.index(slot) for slot, _ in sub], cfg, device, amp_dtype, layers,
                            pad_id, teacher=[teacher[k] for k in idx] if distill else None,
                            totals=[(positions[s], norms.get(s)) for s in slots])
        loss = sum(loss for loss, _ in out)
        loss.backward()
        total += float(loss.detach())
        for slot, (_, parts) in zip(slots, out):
            acc = per_doc.setdefault(slot, dict.fromkeys(parts, 0.0))
            for name, value in parts.items():
                acc[name] += value
    return [per_doc[slot] for slot in range(len(wave))], total


@torch.no_grad()
def heldout_losses(model, wave: List[DocState], cfg, device: torch.device, amp_dtype, layers: List[int],
                   pad_id: int) -> Dict[int, Dict[str, float]]:
    """{slot: mean over the document's held-out examples of each example's own DCD loss} for the
    documents that have held-out examples. Forward only, in batches of a training step's size, or of
    ``cfg.micro_batch_tokens`` (each example is its own group, so any batching gives the same losses)."""
    picks = [(slot, i) for slot, doc in enumerate(wave) for i in doc.heldout]
    per_slot: Dict[int, List[Dict[str, float]]] = {}
    if cfg.micro_batch_tokens:
        batches = [[picks[k] for k in p] for p in _passes(wave, picks, cfg.micro_batch_tokens)]
    else:
        size = len(wave) * cfg.examples_per_doc
        batches = [picks[k:k + size] for k in range(0, len(picks), size)]
    was_training = model.training
    model.eval()
    for batch in batches:
        for (slot, _), (_, parts) in zip(batch, _batch_losses(model, wave, batch, list(range(len(batch))), cfg,
                                                               device, amp_dtype, layers, pad_id)):
            per_slot.setdefault(slot, []).append(parts)
    model.train(was_training)
    return {slot: {k: sum(p[k] for p in ps) / len(ps) for k in ps[0]} for slot, ps in per_slot.items()}


def train_wave(model, tokenizer, wave: List[DocState], cfg, device: torch.device, amp_dtype, progress=None,
               checkpoint: Optional[TrainingCheckpoint] = None) -> int:
    """Train up to D documents together for cfg.steps steps. Slots 0..len(wave)-1 are used.

    Documents with held-out examples end with their slot holding the checkpoint of lowest held-out
    loss (doc.best_step; doc.heldout_curve has every evaluation, step 0 being the untrained KM).
    With ``checkpoint``, training resumes from its file when there is one, and saves to it every
    ``checkpoint.every_s`` seconds; the weights come out as a run that was never stopped makes them.
    Returns the step training started from (0, or the checkpoint's)."""
    distill = cfg.objective in ("sdcd", "ddcd")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    num_layers = text_config(model).num_hidden_layers
    layers = wave[0].cache.layers if (distill and wave[0].cache is not None) else select_layers(num_layers, cfg.cache_layers)
    for doc in wave:
        if len(doc.heldout) >= len(doc.examples):
            raise ValueError(f"{doc.id}: every example is held out, none left to train on")

    for slot, doc in enumerate(wave):
        reset_slot(model, slot, doc.seed)
    params = slot_parameters(model)
    mods = grouped_lora_modules(model).values()  # LoRA+: B in its own group at lr * lr_b_ratio
    opt = torch.optim.AdamW([{"params": [m.lora_A for m in mods], "lr": cfg.lr},
                             {"params": [m.lora_B for m in mods], "lr": cfg.lr * cfg.lr_b_ratio}],
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(cfg, s))
    # The frozen base stays in eval mode while its KMs train (autograd needs no train mode): a config
    # with dropout (Seed-OSS: 0.1 on attention and residuals) or an MoE router's jitter noise drew from
    # the global RNG in train mode, so a document's KM depended on its batch-mates' draws, and a cached
    # run's losses on the uncached run's. The slots have no dropout of their own (lora_dropout 0).
    model.eval()

    # model selection on held-out examples: each slot keeps its own best weights (on the CPU)
    selecting = any(doc.heldout for doc in wave)
    every = cfg.heldout_every or max(1, cfg.steps // 10)
    best: Dict[int, Tuple[float, List[torch.Tensor]]] = {}

    def evaluate(step: int) -> None:
        for slot, parts in heldout_losses(model, wave, cfg, device, amp_dtype, layers, pad_id).items():
            doc = wave[slot]
            doc.heldout_curve.append({"step": step, **parts})
            if step > 0 and (slot not in best or parts["loss"] < best[slot][0]):
                best[slot] = (parts["loss"], [p.detach()[slot].to("cpu", copy=True) for p in params])
                doc.best_step = step

    start = load_checkpoint(checkpoint, wave, params, opt, sched, best, cfg.steps) if checkpoint else 0
    if start:
        ids = ", ".join(d.id for d in wave[:3]) + (f" and {len(wave) - 3} more" if len(wave) > 3 else "")
        print(f"training {ids}: resumed from its checkpoint at step {start} of {cfg.steps}", flush=True)
        if progress is not None:
            progress.update(start)
    elif selecting:
        evaluate(0)
    saved_at = time.monotonic()
    with stop_at_step_end(checkpoint is not None and checkpoint.every_s > 0) as stop:
        for step in range(start, cfg.steps):
            # 1. the batch: examples_per_doc training examples of every document, grouped by slot
            picks = [(slot, doc.next_example()) for slot, doc in enumerate(wave) for _ in range(cfg.examples_per_doc)]

            # 2. the loss, a sum over documents of each document's own DCD (or LM) loss, and its gradients
            opt.zero_grad(set_to_none=True)
            parts_per_doc, total = step_backward(model, wave, picks, cfg, device, amp_dtype, layers, pad_id)
            for doc, parts in zip(wave, parts_per_doc):
                doc.losses.append(parts)

            # 3. the update: per-slot clipping, AdamW, schedule
            clip_per_slot(model, cfg.clip)
            opt.step()
            sched.step()
            if selecting and ((step + 1) % every == 0 or step + 1 == cfg.steps):
                evaluate(step + 1)
            if (checkpoint is not None and checkpoint.every_s > 0 and step + 1 < cfg.steps
                    and time.monotonic() - saved_at >= checkpoint.every_s):
                try:
                    save_checkpoint(checkpoint, step + 1, wave, params, opt, sched, best)
                except OSError as e:  # out of disk, say: training goes on (its KMs need far less room)
                    why = f"[Errno {e.errno}] {e.strerror}" if e.strerror else str(e)  # the line names the file
                    print(f"{checkpoint.path}: checkpoint of step {step + 1} not saved ({why}); training goes on, and a "
                          f"kill now resumes from the checkpoint before, if any", flush=True)
                saved_at = time.monotonic()
            if progress is not None:
                progress.set_postfix(loss=f"{total / len(wave):.4f}")
                progress.update(1)
            if stop.signum is not None:  # asked to stop (stop_at_step_end): this step's state is saved, then stop
                save_checkpoint(checkpoint, step + 1, wave, params, opt, sched, best)
                print(f"kmtrain: training state saved at step {step + 1} of {cfg.steps} ({checkpoint.path.name}): "
                      f"the same command resumes from there", file=sys.stderr, flush=True)
                raise KeyboardInterrupt

    # 4. each selecting slot goes back to its best checkpoint (the caller exports the slots)
    with torch.no_grad():
        for slot, (_, weights) in best.items():
            if wave[slot].best_step != cfg.steps:
                for p, w in zip(params, weights):
                    p[slot].copy_(w.to(p.device))
    model.eval()
    set_adapter_ids(model, None)
    return start
