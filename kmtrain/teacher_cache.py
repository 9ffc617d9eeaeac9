"""Distillation examples and the teacher cache.

The teacher (frozen base model with the chunk in context) is run once per (chunk, target)
example, and the chunk + prompt prefix once for all the targets that share it. What the DCD
loss needs is stored on the distillation positions only: every selected decoder layer's hidden
state, each example's per-layer sum|h_t|, and for the KL two numbers per position that stand for
the teacher's whole distribution (kmkernels.teacher_kl_stats, from the last hidden state as the
teacher computed it, before the cache's rounding, so the KL is exact under every cache dtype):
e_t = W^T p_t and negent_t = sum_v p_t log p_t (less p_t . b / T for a head with a bias b, as
the KL takes it: kmkernels.kl_from_stats). Teacher logits are neither stored nor
recomputed: the KL needs only these (kmkernels.fused_linear_kl_from_stats), one vocabulary GEMM
fewer per step.

File per document: ``teacher.safetensors`` with
  hidden          [L_sel, T_total, H]  bf16 | float8_e4m3fn | fp32
  hidden_scale    [L_sel, n_examples]  fp32, fp8 only: example i's layer l is hidden[l, its tokens] *
                                       hidden_scale[l, i] (per example, as --no-teacher-cache rounds
                                       each re-run example, so the two runs see the same numbers)
  norms           [n_examples, L_sel]  fp32, per-example sum|h_t| from the full-precision values
  kl_embedding    [T_total, H]         fp32, e_t (fp32 whatever the hidden dtype: the KL is a small
                                       difference of e_t . h_s and lse_s, bf16 would swamp it)
  kl_neg_entropy  [T_total]            fp32, negent_t (with a biased head, less p_t . b / T)
  kl_hidden       [T_total, H]         the LM head's dtype, in place of the two above for a model that
                                       soft-caps its logits (Gemma 2): the statistics need logits linear in
                                       h, so the KL's teacher is the last layer as computed, unrounded
  tok_offsets     [n_examples + 1]     int64, example i owns hidden[:, off[i]:off[i+1]]
  layers          [L_sel]              int64, decoder layer indices (0-based; the last layer always)
and in the header's metadata ``content_sha256`` (tensors_sha256 of the tensors), which a run that
reuses a cache written earlier checks, so a changed byte is rebuilt, never trained on.
Read back through safetensors' memory map, one example slice at a time.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from kmkernels import teacher_kl_stats

from .data import ANSWER_PROMPT, QA_PROMPT, atomic_save_tensors, chat_prompt_ids, parse_qa, target_ids, text_ids
from .models import (cache_kwarg, cpu_bf16_attention, decoder_hidden_states, head_bias, kv_reuse_limit, logit_softcap,
                     logit_temperature, prompt_kv, shared_prefixes)

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class Example:
    """One training sequence. Distillation positions: student [s_start, s_start + n), teacher [t_start, t_start + n).
    For LM objectives teacher_ids is None and the loss is next-token CE on student_ids."""
    student_ids: List[int]
    s_start: int
    n: int
    teacher_ids: Optional[List[int]] = None
    t_start: int = 0

    def to_json(self):
        return [self.student_ids, self.s_start, self.n, self.teacher_ids, self.t_start]

    @staticmethod
    def from_json(x):
        return Example(*x)


def _sdcd_turns(item: dict, qa_format: str) -> List[Tuple[str, str]]:
    """(user prompt, distilled reply) pairs of one synthetic item.

    A Q/A pair is distilled as the generator wrote it ("pair": the Q/A prompt, then
    "Question: ... Answer: ..."), as the question a KM is later asked ("chat": the answer prompt
    with the question as the user turn, the answer as the reply), or both.
    """
    if item["prompt"] != QA_PROMPT or qa_format == "pair":
        return [(item["prompt"], item["target"])]
    if "question" in item:
        q, a = item["question"], item["answer"]
    else:  # synth.json written before the fields existed
        parsed = parse_qa(item["target"])
        if not parsed:
            return [(item["prompt"], item["target"])]
        q, a = parsed[0]
    chat = (ANSWER_PROMPT.format(question=q), a)
    return [chat] if qa_format == "chat" else [(item["prompt"], item["target"]), chat]


def build_examples(objective: str, tokenizer, chunks: List[str], chunk_ids: Sequence[Sequence[int]], items: List[dict],
                   cfg, seed: int) -> List[Example]:
    """Token layout of every example of one document (SPEC.md section 1). ``chunk_ids``: each chunk's
    token ids (lists, or int32 arrays as index keeps them); the examples hold lists."""
    rng = random.Random(seed)
    out: List[Example] = []
    if objective == "sdcd":
        for it in items:
            for prompt, target in _sdcd_turns(it, cfg.qa_format):
                tgt = target_ids(tokenizer, target)
                s_prompt = chat_prompt_ids(tokenizer, prompt)
                t_prompt = chat_prompt_ids(tokenizer, chunks[it["chunk"]] + "\n\n" + prompt)
                # positions from the last prompt position to the second-to-last target position
                out.append(Example(s_prompt + tgt, len(s_prompt) - 1, len(tgt), t_prompt + tgt, len(t_prompt) - 1))
    elif objective == "ddcd":
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        start = [bos] if bos is not None else []
        for ids in chunk_ids:
            if len(ids) < 4:
                continue
            for _ in range(cfg.ddcd_windows_per_chunk):
                if len(ids) > cfg.ddcd_window_tokens:
                    W = cfg.ddcd_window_tokens
                else:
                    # A chunk no longer than the window: a fixed W = len(ids) would give the same window
                    # every time and distil only the chunk's tail. A random length ends windows anywhere.
                    W = rng.randint(max(4, len(ids) // 4), len(ids))
                m = max(2, int(round(W * cfg.ddcd_student_frac)))
                off = rng.randint(0, len(ids) - W)
                win = list(ids[off:off + W])
                # The student sees the last m tokens, the teacher the whole window, both after the same
                # start token. Without it the student's first distilled position is sequence position 0,
                # where the model parks its attention sink (hidden states far larger than mid-text
                # ones): the hidden term then pulls that position toward the teacher's mid-window
                # state and the KM learns to break the sink. Seen: ddcd KMs answering 0/64 on the demo
                # corpus with garbled text. Position j predicts token j + 1.
                out.append(Example(start + win[W - m:], len(start), m - 1, start + win, len(start) + W - m))
    elif objective == "lm":
        for ids in chunk_ids:
            for s in range(0, len(ids), cfg.lm_seq_tokens):
                seq = list(ids[s:s + cfg.lm_seq_tokens])
                if len(seq) >= 2:
                    out.append(Example(seq, 0, len(seq) - 1))
    elif objective == "pit":
        for it in items:
            text = it["target"].strip() + "\n\n" + chunks[it["chunk"]]
            seq = text_ids(tokenizer, text)[: 2 * cfg.lm_seq_tokens]
            out.append(Example(seq, 0, len(seq) - 1))
    else:
        raise ValueError(f"unknown objective {objective!r}")
    return out


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def select_layers(num_layers: int, layers: Optional[Sequence[int]]) -> List[int]:
    """Decoder layers to cache (negative numbers count from the end); the last is always kept."""
    if layers is None:
        return list(range(num_layers))
    bad = [l for l in layers if not -num_layers <= int(l) < num_layers]
    if bad:
        raise ValueError(f"cache_layers {list(layers)}: layer(s) {bad} do not exist (the model has {num_layers} "
                         f"decoder layers, 0..{num_layers - 1}, or -{num_layers}..-1 from the end)")
    return sorted({int(l) % num_layers for l in layers} | {num_layers - 1})


@torch.no_grad()
def teacher_hiddens(model, examples: Sequence[Example], layers: Sequence[int], pad_id: int,
                    no_adapter=None) -> List[torch.Tensor]:
    """Run the frozen teacher on ``examples`` (one padded batch) and return, per example, the
    selected layers' hidden states on its distillation positions: fp32 [L_sel, n, H].

    ``no_adapter``: a callable(batch_size) that makes an attached grouped LoRA inactive (-1 ids).
    """
    dev = next(model.parameters()).device
    ids, mask = _pad([e.teacher_ids for e in examples], pad_id)
    if no_adapter is not None:
        no_adapter(len(examples))
    hs = decoder_hidden_states(model, ids.to(dev), mask.to(dev))  # the last is post-norm (feeds the lm_head)
    res = []
    for i, e in enumerate(examples):
        res.append(torch.stack([hs[l][i, e.t_start:e.t_start + e.n].float() for l in layers]))
    return res


def prefix_groups(examples: Sequence[Example]) -> Tuple[Dict[Tuple[int, ...], List[int]], List[int]]:
    """How the cache build runs ``examples``: ({teacher prefix: indices} for prefixes shared by two
    or more examples, run once each by ``shared_prefix_hiddens``; indices of the rest, run whole).

    An example's prefix is its whole teacher input before the first distilled position (chunk +
    prompt), grouped by ``models.shared_prefixes``: every summary of a chunk shares one, every Q/A
    target another; the examples left with a prompt of their own (recitation pieces, each cued by
    its own words) share the chunk before the cue with their neighbours. Why: run whole, a
    recitation piece of a 1700-token chunk costs the teacher 1700 tokens instead of its ~110-token
    cue and piece (measured on 4 documents of six demo documents each: their cache build took most
    of the full recipe's time)."""
    return shared_prefixes([e.teacher_ids[:e.t_start] for e in examples])


@torch.no_grad()
def shared_prefix_hiddens(model, prefix: Sequence[int], examples: Sequence[Example], layers: Sequence[int],
                          pad_id: int, no_adapter=None, batch_size: int = 8) -> List[torch.Tensor]:
    """``teacher_hiddens`` for examples whose teacher input starts with the same ``prefix`` (the chunk
    and the prompt: every summary of a chunk shares one, every Q/A target another; or the chunk
    alone, for recitation pieces with prompts of their own: ``prefix_groups``), with the
    prefix run once. Its keys and values are reused by each batch of suffixes (the targets), so
    the teacher reads a chunk once per prompt instead of once per target: for the demo corpus 2
    prefixes of ~300 tokens and ~18 targets of ~100 tokens instead of ~18 sequences of ~410.
    Same hidden states as running each example whole (fp32: ~1e-6 relative, the tests check it).
    Needs every example's distillation positions to lie after the prefix (t_start >= len(prefix)).
    """
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    P = len(prefix)
    if any(e.t_start < P or list(e.teacher_ids[:P]) != list(prefix) for e in examples):
        raise ValueError("shared_prefix_hiddens: an example does not start with the prefix, or distils inside it")
    decoder = model.get_decoder()
    # the attention path decoder_hidden_states takes, so cached and re-run teacher states agree
    keys = P + max(len(e.teacher_ids) - P for e in examples)
    with cpu_bf16_attention(dev, next(model.parameters()).dtype, keys=keys):
        if no_adapter is not None:
            no_adapter(1)
        kv = prompt_kv(model, prefix)
        res = []
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            B = len(batch)
            ids, mask = _pad([e.teacher_ids[P:] for e in batch], pad_id)
            # each batch gets its own copy: the forward appends the suffix's keys and values to the cache
            cache = DynamicCache([(k.expand(B, -1, -1, -1).contiguous(), v.expand(B, -1, -1, -1).contiguous())
                                  for k, v in kv], config=model.config)
            full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], dim=1)
            if no_adapter is not None:
                no_adapter(B)
            hs = decoder(input_ids=ids.to(dev), attention_mask=full_mask.to(dev), **{cache_kwarg(decoder): cache},
                         use_cache=True, output_hidden_states=True).hidden_states[1:]  # the last is post-norm
            for r, e in enumerate(batch):
                s = e.t_start - P
                res.append(torch.stack([hs[l][r, s:s + e.n].float() for l in layers]))
    return res


def _encode(h: torch.Tensor, dtype: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if dtype == "fp32":
        return h.float(), None
    if dtype == "bf16":
        return h.to(torch.bfloat16), None
    scale = (h.abs().amax(dim=(1, 2)) / FP8_MAX).clamp_min(1e-12)  # per layer
    return (h / scale[:, None, None]).to(torch.float8_e4m3fn), scale


def _decode(enc: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """What a reader of the cache gets back for ``_encode``'s output."""
    return enc if scale is None else enc.float() * scale[:, None, None]


def _tensor_bytes(t: torch.Tensor):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def tensors_sha256(tensors: Dict[str, object], block_bytes: int = 1 << 26) -> str:
    """sha256 over name, shape, dtype and bytes of each tensor in name order. ``tensors`` maps a
    name to a tensor or to a safetensors slice (read ~``block_bytes`` at a time along dim 0, so a
    memory-mapped cache of several GB is hashed without loading it whole); both give one digest."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor) and len(t.get_shape()) and t.get_shape()[0] > 1:
            shape, row = tuple(t.get_shape()), t[0:1]
            step = max(1, block_bytes // max(1, row.numel() * row.element_size()))
            dtype, blocks = row.dtype, (t[a:a + step] for a in range(0, shape[0], step))
        else:
            t = t if isinstance(t, torch.Tensor) else t[...]
            shape, dtype, blocks = tuple(t.shape), t.dtype, (t,)
        h.update(f"{name}|{shape}|{dtype};".encode())
        for b in blocks:
            h.update(_tensor_bytes(b))
    return h.hexdigest()


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}  # a stored hidden value, by --cache-dtype


def cache_bytes(examples: Sequence[Example], num_layers: int, hidden_size: int, cfg,
                kl_hidden_bytes: Optional[int] = None) -> int:
    """Bytes of the tensors ``build_cache`` writes for ``examples`` (the file adds its header, < 4 KB):
    known before the teacher runs, so that a disk too small is found before its minutes are spent.
    ``kl_hidden_bytes``: for a soft-capped model, the bytes of an LM-head value (its cache holds the
    last layer in that dtype instead of the KL statistics)."""
    L, n, T = len(select_layers(num_layers, cfg.cache_layers)), len(examples), sum(e.n for e in examples)
    kl = T * hidden_size * 4 + T * 4 if kl_hidden_bytes is None else T * hidden_size * kl_hidden_bytes
    return (L * T * hidden_size * DTYPE_BYTES[cfg.cache_dtype]  # hidden
            + n * L * 4 + kl  # norms; kl_embedding and kl_neg_entropy (fp32), or kl_hidden
            + (n + 1) * 8 + L * 8  # tok_offsets, layers (int64)
            + (L * n * 4 if cfg.cache_dtype == "fp8" else 0))  # hidden_scale


def build_cache(model, examples: List[Example], path: Path, num_layers: int, cfg, pad_id: int,
                no_adapter=None, batch_size: int = 8) -> dict:
    """Run the teacher over a document's examples and write teacher.safetensors atomically."""
    if not examples:  # index drops a document without examples before this
        raise ValueError(f"{path}: no examples to cache")

    layers = select_layers(num_layers, cfg.cache_layers)
    offsets = [0]
    for e in examples:
        offsets.append(offsets[-1] + e.n)
    # Each example's states are stored as they come, into host tensors of the file's final shapes:
    # the device holds one group's fp32 states at a time (the targets of one chunk and prompt, or
    # one batch) and the host the cache once. (All of a document's were kept on the device in fp32
    # and concatenated there: 8 bytes a value at the peak, 1 MB a target token at Llama-3.1-8B
    # shapes, so a book's ~200k target tokens could not fit.)
    enc: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    norms: List[Optional[torch.Tensor]] = [None] * len(examples)
    last: List[Optional[torch.Tensor]] = [None] * len(examples)

    def store(i: int, h: torch.Tensor) -> None:  # h: fp32 [L_sel, n, H] on the model's device
        nonlocal enc, scale
        norms[i] = h.abs().sum(dim=(1, 2))
        last[i] = h[-1].clone()  # a copy: a view would keep all of h
        # Each example is encoded on its own: an fp8 scale per example and layer, the rounding that
        # --no-teacher-cache gives each re-run example (train.round_like_cache). One scale per document
        # made the two runs' hidden-state terms differ by 2.4% after 3 steps on the tiny test model.
        # (Storage, not compute: outside the caller's autocast.)
        with torch.autocast(h.device.type, enabled=False):
            e, s = _encode(h, cfg.cache_dtype)
        if enc is None:
            enc = torch.empty((len(layers), offsets[-1], h.shape[2]), dtype=e.dtype)
            scale = None if s is None else torch.empty((len(layers), len(examples)), dtype=torch.float32)
        enc[:, offsets[i]:offsets[i + 1]].copy_(e)
        if s is not None:
            scale[:, i].copy_(s)

    def store_all(idx: List[int], hs: List[torch.Tensor]) -> None:
        for k, i in enumerate(idx):
            store(i, hs[k])
            hs[k] = None  # freed once stored

    # Examples with a common teacher prefix share one prefix pass (prefix_groups); the rest (DDCD
    # windows: each its own) run whole, batched.
    shared, alone = prefix_groups(examples)
    # a prefix longer than a sliding-window layer keeps cannot be reused: its examples run whole
    reusable = kv_reuse_limit(model)
    too_long = [i for prefix, idx in shared.items() if len(prefix) > reusable for i in idx]
    if too_long:
        shared = {prefix: idx for prefix, idx in shared.items() if len(prefix) <= reusable}
        alone = sorted(alone + too_long)
    for prefix, idx in shared.items():
        store_all(idx, shared_prefix_hiddens(model, prefix, [examples[i] for i in idx], layers, pad_id, no_adapter,
                                             batch_size))
    for j in range(0, len(alone), batch_size):
        idx = alone[j:j + batch_size]
        store_all(idx, teacher_hiddens(model, [examples[i] for i in idx], layers, pad_id, no_adapter))
    last = torch.cat(last)
    # The KL's teacher statistics come from the last layer as the teacher computed it, not as the
    # cache rounds it: they are fp32 whatever the cache dtype, so the KL stays exact under a bf16 or
    # fp8 cache and only the hidden-state term sees the rounding. (From the rounded layer, on trained
    # KMs, they moved the last layer's loss gradient by 49% under fp8, and by 3% under bf16 of an fp32
    # teacher: bench/results/cache_quality_cpu.md.) --no-teacher-cache does the same
    # (train._batch_losses). The layer goes in the LM head's dtype: the states came from the model in
    # it (so nothing is rounded), and a mixed-dtype GEMM would run without tensor cores.
    w = model.get_output_embeddings().weight
    if logit_softcap(model) is None:  # (a biased head's p_t . b / T goes into negent: see kmkernels.kl_from_stats)
        emb, negent = teacher_kl_stats(last.to(w.dtype), w, temperature=logit_temperature(model), backend=cfg.backend,
                                       bias=head_bias(model))
        kl = {"kl_embedding": emb.contiguous(), "kl_neg_entropy": negent.contiguous()}
    else:  # capped logits are not linear in h, so no statistics stand for p_t: the KL recomputes it from h
        kl = {"kl_hidden": last.to(w.dtype).contiguous()}
    tensors = {"hidden": enc, "norms": torch.stack(norms), **kl,
               "tok_offsets": torch.tensor(offsets, dtype=torch.int64), "layers": torch.tensor(layers, dtype=torch.int64)}
    if scale is not None:
        tensors["hidden_scale"] = scale
    tensors = {k: v.cpu() for k, v in tensors.items()}  # once, for the hash and the file (a GPU's cache)
    meta = {"dtype": cfg.cache_dtype, "examples": str(len(examples)), "content_sha256": tensors_sha256(tensors)}
    atomic_save_tensors(path, tensors, meta)
    return {"bytes": path.stat().st_size, "tokens": offsets[-1], "layers": len(layers)}


class TeacherCache:
    """Memory-mapped reader of one document's teacher.safetensors."""

    def __init__(self, path: Path, examples: Optional[int] = None, verify: bool = False):
        """Opens and checks the file: a truncated or damaged file, tensors whose shapes disagree, or
        (given ``examples``) another number of examples raise ValueError naming the file and the
        problem, so that a caller can rebuild the cache rather than train on it. ``verify`` also
        hashes the tensors against the content_sha256 recorded when the file was written (one pass
        over the file; for a cache from an earlier run, whose bytes may have changed since)."""
        from safetensors import safe_open

        self.path = Path(path)
        try:
            self._f = safe_open(str(path), framework="pt")
            keys = set(self._f.keys())
            missing = {"hidden", "norms", "tok_offsets", "layers"} - keys
            if missing:
                raise ValueError(f"no {', '.join(sorted(missing))} tensor")
            self.norms = self._f.get_tensor("norms")
            self.offsets = self._f.get_tensor("tok_offsets").tolist()
            self.layers = self._f.get_tensor("layers").tolist()
            self.scale = self._f.get_tensor("hidden_scale") if "hidden_scale" in keys else None
            self._hidden = self._f.get_slice("hidden")
            self.has_kl_stats = "kl_embedding" in keys
            if self.has_kl_stats:
                self._kl_embedding = self._f.get_slice("kl_embedding")
                self._kl_neg_entropy = self._f.get_slice("kl_neg_entropy")
            self.has_kl_hidden = "kl_hidden" in keys
            if self.has_kl_hidden:
                self._kl_hidden = self._f.get_slice("kl_hidden")
        except ValueError as e:
            raise ValueError(f"{path}: damaged teacher cache ({e})") from None
        except Exception as e:  # safetensors raises its own error type for a truncated or damaged file
            raise ValueError(f"{path}: damaged teacher cache ({type(e).__name__}: {e})") from None
        problem = self._shape_problem(examples) or (self._content_problem() if verify else None)
        if problem:
            raise ValueError(f"{path}: damaged teacher cache ({problem})")

    def _content_problem(self) -> Optional[str]:
        recorded = (self._f.metadata() or {}).get("content_sha256")
        if not recorded:
            return "no content_sha256 in its header (written by an earlier version), so it cannot be checked"
        try:
            got = tensors_sha256({k: self._f.get_slice(k) for k in self._f.keys()})
        except Exception as e:  # a tensor whose bytes cannot be read
            return f"unreadable tensor data ({type(e).__name__}: {e})"
        if got != recorded:
            return f"content sha256 {got[:12]} is not the {recorded[:12]} recorded when it was written"
        return None

    def _shape_problem(self, examples: Optional[int]) -> Optional[str]:
        n, tokens, n_layers = len(self.offsets) - 1, self.offsets[-1] if self.offsets else -1, len(self.layers)
        hidden = tuple(self._hidden.get_shape())
        if n < 0 or any(b < a for a, b in zip(self.offsets, self.offsets[1:])) or (self.offsets and self.offsets[0] != 0):
            return f"token offsets {self.offsets[:4]}... are not a rising list from 0"
        if examples is not None and n != examples:
            return f"{n} examples, the run has {examples}"
        if len(hidden) != 3 or hidden[:2] != (n_layers, tokens):
            return f"hidden {hidden}, expected ({n_layers}, {tokens}, H)"
        if tuple(self.norms.shape) != (n, n_layers):
            return f"norms {tuple(self.norms.shape)}, expected ({n}, {n_layers})"
        if self.scale is not None and tuple(self.scale.shape) != (n_layers, n):
            return f"hidden_scale {tuple(self.scale.shape)}, expected ({n_layers}, {n})"
        if self.has_kl_stats:
            emb, neg = tuple(self._kl_embedding.get_shape()), tuple(self._kl_neg_entropy.get_shape())
            if len(emb) != 2 or emb[0] != tokens or (tokens and emb[1] != hidden[2]) or neg != (tokens,):
                return f"kl_embedding {emb} / kl_neg_entropy {neg}, expected ({tokens}, {hidden[2]}) / ({tokens},)"
        if self.has_kl_hidden:
            kl = tuple(self._kl_hidden.get_shape())
            if len(kl) != 2 or kl[0] != tokens or (tokens and kl[1] != hidden[2]):
                return f"kl_hidden {kl}, expected ({tokens}, {hidden[2]})"
        return None

    def __len__(self):
        return len(self.offsets) - 1

    def get(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(hidden [L_sel, n, H] in the stored dtype, or fp32 for fp8; norms fp32 [L_sel]) of example i."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return _decode(self._hidden[:, a:b, :], None if self.scale is None else self.scale[:, i]), self.norms[i]

    def kl_stats(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(e_t fp32 [n, H], negent_t fp32 [n]) of example i, for kmkernels.fused_linear_kl_from_stats."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self._kl_embedding[a:b, :], self._kl_neg_entropy[a:b]

    def kl_hidden(self, i: int) -> torch.Tensor:
        """The teacher's last layer [n, H] of example i as computed (the KL's teacher, for a soft-capped model)."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self._kl_hidden[a:b, :]
