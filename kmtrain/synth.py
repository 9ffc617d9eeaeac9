"""Synthetic targets: the base model writes summaries and Q/A pairs about each chunk."""
from __future__ import annotations

import random
import re
from typing import Dict, List, Tuple

import torch

from .data import QA_PROMPT, SUMMARY_PROMPT, chat_prompt_ids, parse_qa, qa_target


def _generate_hf(model, tokenizer, prompts: List[List[int]], cfg, seed: int, progress=None) -> List[str]:
    """Batched sampling with Hugging Face generate (left padding)."""
    outs: List[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for i in range(0, len(prompts), cfg.gen_batch_size):
        batch = prompts[i:i + cfg.gen_batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, p in enumerate(batch):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))  # sampling is reproducible
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True,
                                 top_p=cfg.top_p, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                 pad_token_id=pad)
        for j in range(len(batch)):
            outs.append(tokenizer.decode(out[j, width:], skip_special_tokens=True).strip())
        if progress is not None:
            progress.update(len(batch))
    return outs


def _generate_vllm(model_path: str, tokenizer, prompts: List[List[int]], cfg, seed: int) -> List[str]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise ValueError("--generator vllm needs vllm installed (pip install 'kmkernels[vllm]')") from None
    llm = LLM(model=model_path, seed=seed)
    params = SamplingParams(top_p=cfg.top_p, temperature=cfg.temperature, max_tokens=cfg.max_new_tokens, seed=seed)
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [r.outputs[0].text.strip() for r in res]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def focus_sources(chunk: str, parts: int) -> List[str]:
    """What the generator reads for one chunk: the whole chunk, then up to `parts` runs of its paragraphs.

    Each run is a contiguous group of paragraphs (split at blank lines, balanced by length). A run
    that does not open the chunk is led by the chunk's first sentence, which names what the chunk
    is about, so a summary of "It was built in 1843" still says what "it" is. With parts=0, or a
    chunk of one paragraph, only the whole chunk.
    """
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", chunk) if p.strip()]
    parts = min(parts, len(paragraphs))
    if parts < 2:
        return [chunk]
    # a paragraph goes to the run its middle falls in: contiguous runs of about equal length
    total = sum(len(p) for p in paragraphs)
    runs: List[List[str]] = [[] for _ in range(parts)]
    done = 0
    for p in paragraphs:
        runs[min(parts - 1, int((done + len(p) / 2) * parts / total))].append(p)
        done += len(p)
    runs = [r for r in runs if r]
    lead = _SENTENCE_END.split(paragraphs[0], maxsplit=1)[0]
    sources = [chunk]
    for r, run in enumerate(runs):
        text = "\n\n".join(run)
        sources.append(text if r == 0 else lead + "\n\n" + text)
    return sources


def synthesize(model, tokenizer, chunks_by_doc: Dict[str, List[str]], cfg, model_path: str = "",
               progress_factory=None) -> Dict[str, dict]:
    """For each document: {"items": [{"chunk", "prompt", "target"}], "dropped", "requested", "qa_pairs"}.

    Requests for all documents go through the generator together (one batch stream).
    Q/A outputs that do not parse are dropped and counted, never fatal. With cfg.focus_parts > 0
    the requests of each kind cycle over the whole chunk and its parts (`focus_sources`); the
    teacher still reads the whole chunk, so only what the targets talk about changes.
    """
    jobs: List[Tuple[str, int, str, List[int]]] = []
    for doc_id, chunks in chunks_by_doc.items():
        for c, chunk in enumerate(chunks):
            texts = focus_sources(chunk, cfg.focus_parts)
            for kind, prompt, n in (("summary", SUMMARY_PROMPT, cfg.summaries_per_chunk), ("qa", QA_PROMPT, cfg.qa_per_chunk)):
                ids = [chat_prompt_ids(tokenizer, text + "\n\n" + prompt) for text in texts]
                jobs += [(doc_id, c, kind, ids[i % len(ids)]) for i in range(n)]
    if not jobs:
        return {}
    bar = progress_factory(total=len(jobs), desc="synthetic targets") if progress_factory else None
    if cfg.generator == "vllm":
        texts = _generate_vllm(model_path, tokenizer, [j[3] for j in jobs], cfg, cfg.seed)
        if bar is not None:
            bar.update(len(jobs))
    else:
        texts = _generate_hf(model, tokenizer, [j[3] for j in jobs], cfg, cfg.seed, bar)
    if bar is not None:
        bar.close()
    result = {d: {"items": [], "dropped": 0, "requested": 0, "qa_pairs": 0} for d in chunks_by_doc}
    for (doc_id, c, kind, _), text in zip(jobs, texts):
        r = result[doc_id]
        r["requested"] += 1
        if kind == "summary":
            if text:
                r["items"].append({"chunk": c, "prompt": SUMMARY_PROMPT, "target": text})
            else:
                r["dropped"] += 1
        else:
            pairs = parse_qa(text)
            if pairs:  # every parsed pair becomes its own target, as in the reference
                r["items"] += [{"chunk": c, "prompt": QA_PROMPT, "target": qa_target(q, a), "question": q, "answer": a}
                               for q, a in pairs]
                r["qa_pairs"] += len(pairs)
            else:
                r["dropped"] += 1
    return result



def split_heldout(items: List[dict], per_chunk: int, seed: int) -> Tuple[List[dict], List[dict]]:
    """(training items, held-out items): ``per_chunk`` items of each chunk, drawn with ``seed``, are
    held out, but never a chunk's last one (every chunk keeps a training target). Item order is kept."""
    if per_chunk <= 0:
        return list(items), []
    rng = random.Random(seed)
    by_chunk: Dict[int, List[int]] = {}
    for i, it in enumerate(items):
        by_chunk.setdefault(it["chunk"], []).append(i)
    held = set()
    for c in sorted(by_chunk):
        idx = by_chunk[c]
        held.update(rng.sample(idx, min(per_chunk, len(idx) - 1)))
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]
