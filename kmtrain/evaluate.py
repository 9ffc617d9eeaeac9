"""Closed-book question answering with base model, document in context (ICL), or KMs."""
from __future__ import annotations

import re
import string
from typing import List, Optional, Sequence

import torch

from kmkernels import set_adapter_ids

from .data import ANSWER_PROMPT, chat_prompt_ids


def question_prompt(question: str, context: Optional[str] = None) -> str:
    q = ANSWER_PROMPT.format(question=question)
    return q if context is None else context + "\n\n" + q


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], slots: Optional[Sequence[int]] = None,
                     max_new_tokens: int = 32, batch_size: int = 16) -> List[str]:
    """Greedy answers, batched with left padding; ``slots[i]`` picks the grouped-LoRA slot (-1 = none)."""
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: List[str] = []
    for i in range(0, len(prompts), batch_size):
        batch = [chat_prompt_ids(tokenizer, p) for p in prompts[i:i + batch_size]]
        width = max(len(b) for b in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, b in enumerate(batch):
            ids[j, width - len(b):] = torch.tensor(b)
            mask[j, width - len(b):] = 1
        if slots is not None:
            set_adapter_ids(model, torch.tensor(list(slots[i:i + batch_size])))
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
        answers += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    return answers


def _norm(s: str) -> str:
    s = s.lower().replace(",", "")
    s = "".join(ch if ch not in string.punctuation or ch in ".-" else " " for ch in s)
    return " ".join(s.split())


def is_correct(answer: str, accepted: Sequence[str]) -> bool:
    """Short-answer match: an accepted answer appears in the generation as whole words."""
    a = " " + _norm(answer) + " "
    return any(re.search(r"(?<![\w])" + re.escape(_norm(x)) + r"(?![\w])", a) for x in accepted)
