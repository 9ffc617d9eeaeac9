"""Closed-book question answering with base model, document in context (ICL), or KMs."""
from __future__ import annotations

import re
import string
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from kmkernels import set_adapter_ids

from .data import ANSWER_PROMPT, chat_prompt_ids
from .models import (cache_kwarg, gap_padding_ok, kv_reuse_limit, left_padding_ok, prefix_cache, prompt_kv, row_batches,
                     shared_prefixes)


def question_prompt(question: str, context: Optional[str] = None) -> str:
    q = ANSWER_PROMPT.format(question=question)
    return q if context is None else context + "\n\n" + q


ANSWER_BATCH = 16  # prompts per generate call, unless the caller says otherwise


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], slots: Optional[Sequence[int]] = None,
                     max_new_tokens: int = 32, batch_size: int = ANSWER_BATCH,
                     share_prefixes: bool = False) -> List[str]:
    """Greedy answers, batched with left padding; ``slots[i]`` picks the grouped-LoRA slot (-1 = none).

    share_prefixes: prompts that start with the same long run of tokens (``models.shared_prefixes``:
    a document asked several questions, or the chat template and instruction of closed-book
    questions) read it once per adapter slot. A batch then holds each row's prefix, as keys and
    values (``models.prefix_cache``), in its first columns, and each prompt's own tokens after a gap
    of padding, which the batched prefill reads; positions come from the mask, so the gap is as if
    absent (``models.gap_padding_ok``, or each prompt runs whole). The same answers up to rounding:
    in bf16 a few may differ by a word or more (on the demo corpus, when ICL first read each
    document once: 10 of 64 answers, the same 45/64 right, 15 s instead of 31 s on a 2-core CPU). Closed-book
    questions share SmolLM2's 48-token chat header and instruction: 64 of them in 14.9 and 17.9 s
    against 23.5 and 26.6 s, the same answers (fp32, 2-core AVX2 CPU, 2026-12-08)."""
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids_all = [chat_prompt_ids(tokenizer, p) for p in prompts]
    slot_of = (lambda j: -1) if slots is None else (lambda j: int(slots[j]))  # noqa: E731
    # a sliding-window layer keeps too few of a long prompt's keys to reuse them: each prompt runs whole
    limit = kv_reuse_limit(model) if share_prefixes else 0
    prefix_of: Dict[int, Tuple[int, ...]] = {}
    last_use: Dict[Tuple[int, Tuple[int, ...]], int] = {}  # (slot, prefix): the last prompt that reads it
    # a model that lets left padding in (RWKV ignores the mask) batches prompts of one length only, so
    # that an answer does not follow its batch-mates': no padding, so no gap either
    padding_ok = left_padding_ok(model)
    if share_prefixes and padding_ok and max(map(len, ids_all), default=1) - 1 <= limit:
        shared, _ = shared_prefixes([p[:-1] for p in ids_all])  # the last token is the prefill's own
        if shared and not gap_padding_ok(model):
            shared = {}
        for prefix, idx in shared.items():
            for j in idx:
                prefix_of[j] = prefix
                last_use[slot_of(j), prefix] = max(j, last_use.get((slot_of(j), prefix), j))
    prefix_kv: Dict[Tuple[int, Tuple[int, ...]], list] = {}  # each (slot, prefix)'s keys and values, while needed
    answers: List[str] = []
    for i, end in row_batches([len(b) for b in ids_all], batch_size, padding_ok):
        batch, rows = ids_all[i:end], range(i, end)
        pre = [len(prefix_of.get(j, ())) for j in rows]  # each row's shared prefix, read from the cache
        cols = max(pre)  # the prefixes' columns; each prompt's own tokens come after them
        width = cols + max(len(b) - p for b, p in zip(batch, pre))
        if cols and width - 1 + max_new_tokens > limit:  # a sliding window would count the gap as tokens
            pre, cols, width = [0] * len(batch), 0, max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (b, p) in enumerate(zip(batch, pre)):
            ids[r, cols - p:cols] = torch.tensor(b[:p], dtype=torch.long)
            ids[r, width - len(b) + p:] = torch.tensor(b[p:])
            mask[r, cols - p:cols] = 1
            mask[r, width - len(b) + p:] = 1
        cached = {}
        if cols:
            for j in rows:
                key = (slot_of(j), prefix_of.get(j))
                if key[1] is not None and key not in prefix_kv:
                    if slots is not None:
                        set_adapter_ids(model, torch.tensor([key[0]]))  # the prefix as this row's adapter reads it
                    prefix_kv[key] = prompt_kv(model, key[1])
            kvs = [prefix_kv.get((slot_of(j), prefix_of.get(j))) for j in rows]
            cached[cache_kwarg(model)] = prefix_cache(model, kvs, cols, width - cols + max_new_tokens)
            # a prefix whose prompts are all in this batch or before goes
            prefix_kv = {k: v for k, v in prefix_kv.items() if last_use[k] >= end}
        if slots is not None:
            set_adapter_ids(model, torch.tensor(list(slots[i:end])))
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, **cached)
        answers += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    return answers


def normalize_answer(s: str) -> str:
    """What is_correct compares: lower case, no commas, other punctuation but '.' and '-' as spaces."""
    s = s.lower().replace(",", "")
    s = "".join(ch if ch not in string.punctuation or ch in ".-" else " " for ch in s)
    return " ".join(s.split())


def is_correct(answer: str, accepted: Sequence[str]) -> bool:
    """Short-answer match: an accepted answer appears in the generation as whole words."""
    a = " " + normalize_answer(answer) + " "
    return any(re.search(r"(?<![\w])" + re.escape(normalize_answer(x)) + r"(?![\w])", a) for x in accepted)
