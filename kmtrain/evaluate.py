"""Closed-book question answering with base model, document in context (ICL), or KMs."""
from __future__ import annotations

import re
import string
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from kmkernels import set_adapter_ids

from .data import ANSWER_PROMPT, chat_prompt_ids
from .models import cache_kwarg, kv_reuse_ok, left_padding_ok, prompt_cache, prompt_kv, row_batches, shared_prefixes


def question_prompt(question: str, context: Optional[str] = None) -> str:
    q = ANSWER_PROMPT.format(question=question)
    return q if context is None else context + "\n\n" + q


ANSWER_BATCH = 16  # prompts per generate call, unless the caller says otherwise


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], slots: Optional[Sequence[int]] = None,
                     max_new_tokens: int = 32, batch_size: int = ANSWER_BATCH,
                     share_prefixes: bool = False) -> List[str]:
    """Greedy answers, batched with left padding; ``slots[i]`` picks the grouped-LoRA slot (-1 = none).

    share_prefixes: prompts that start with the same long run of tokens (a document asked several
    questions, ``models.shared_prefixes``) read it once; each prompt then reads only its own tokens
    after it, and the batch decodes from their keys and values (``models.prompt_cache``). The base
    model only (every slot -1). The same answers up to rounding: in bf16 a few answers may differ
    by a word or more (on the demo corpus: 10 of 64 ICL answers, the same 45/64 right, 15 s
    instead of 31 s on a 2-core CPU)."""
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids_all = [chat_prompt_ids(tokenizer, p) for p in prompts]
    # a sliding-window layer keeps too few of a long prompt's keys to reuse them: each prompt runs whole
    share_prefixes = share_prefixes and kv_reuse_ok(model, max(map(len, ids_all), default=1) - 1)
    prefix_of: Dict[int, Tuple[int, ...]] = {}
    last_use: Dict[Tuple[int, ...], int] = {}
    if share_prefixes:
        if slots is not None and any(s >= 0 for s in slots):
            raise ValueError("share_prefixes: every prompt must be answered by the base model (slot -1); "
                             "a prefix's keys and values depend on the adapter that reads it")
        shared, _ = shared_prefixes([p[:-1] for p in ids_all])  # the last token is the prefill's own
        prefix_of = {i: prefix for prefix, idx in shared.items() for i in idx}
        last_use = {prefix: max(idx) for prefix, idx in shared.items()}
    prefix_kv: Dict[Tuple[int, ...], list] = {}  # each shared prefix's keys and values, while needed
    answers: List[str] = []
    # a model that lets left padding in (RWKV ignores the mask) batches prompts of one length only, so
    # that an answer does not follow its batch-mates'
    for i, end in row_batches([len(b) for b in ids_all], batch_size, left_padding_ok(model)):
        batch = ids_all[i:end]
        width = max(len(b) for b in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, b in enumerate(batch):
            ids[j, width - len(b):] = torch.tensor(b)
            mask[j, width - len(b):] = 1
        cached = {}
        if share_prefixes and min(len(b) for b in batch) > 1:
            if slots is not None:
                set_adapter_ids(model, torch.tensor([-1]))  # the single-prompt passes below
            kv: Dict[Tuple[int, ...], list] = {}
            for j, b in enumerate(batch, start=i):
                prefix = prefix_of.get(j)
                if prefix is not None and tuple(b) not in kv:
                    if prefix not in prefix_kv:
                        prefix_kv[prefix] = prompt_kv(model, prefix)
                    rest = b[len(prefix):-1]
                    kv[tuple(b)] = prompt_kv(model, rest, past=prefix_kv[prefix]) if rest else prefix_kv[prefix]
            # a prefix whose prompts are all in this batch or before goes
            prefix_kv = {p: v for p, v in prefix_kv.items() if last_use[p] >= end}
            cached[cache_kwarg(model)] = prompt_cache(model, batch, width, kv, max_new_tokens)
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
