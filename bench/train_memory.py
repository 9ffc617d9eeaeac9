"""Peak memory and time of one training step by ``--micro-batch-tokens``, at a step's real shape.

    python -m bench.train_memory [--model smollm2-135m] [--docs 8] [--examples 8] [--tokens 800]
        [--micro 0 4096 8192] [--out bench/results/train_memory_<device>.md]
    python -m bench.train_memory --random-shape llama-3.1-8b --tokenizer DIR ...   # a GPU, no download

The step is kmtrain's own (``train.step_backward``, sdcd, teacher statistics as a cache gives them)
over ``--docs`` x ``--examples`` sequences of ``--tokens`` tokens each: by default the paper
preset's step (8 documents x 8 examples, targets of up to 768 tokens). Token ids and the cached
teacher states are random: memory and time depend on the shapes, not the values. Each setting runs
in a fresh process (a clean allocator; an out-of-memory there ends only that setting). Memory
beyond the model, the slots and the optimizer-free rest of the process:
  GPU: torch.cuda.max_memory_allocated over the steps, less what was allocated before them;
  CPU: the process's peak resident size (ru_maxrss) after the steps, less before them (coarser).
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import List, Optional

import torch

from bench.common import env_block, environment, markdown_table, write_report
from kmtrain.demo import in_fresh_process


class _RandomCache:
    """What train.teacher_rows reads of a TeacherCache, random: hidden [L, n, H] in the cache's bf16,
    per-layer norms, and the KL statistics (fp32)."""

    has_kl_stats, has_kl_hidden = True, False  # a model without a soft cap on its logits

    def __init__(self, layers: List[int], n: int, hidden: int, examples: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.layers = layers
        self._h = [torch.randn(len(layers), n, hidden, generator=g).to(torch.bfloat16) for _ in range(examples)]
        self._stats = [(torch.randn(n, hidden, generator=g) * 0.02, -torch.rand(n, generator=g) * 5)
                       for _ in range(examples)]

    def get(self, i: int):
        return self._h[i], self._h[i].float().abs().sum(dim=(1, 2))

    def kl_stats(self, i: int):
        return self._stats[i]


def measure(model_path: str, docs: int, examples: int, tokens: int, micro: int, steps: int) -> dict:
    """One setting, in this process: peak memory (bytes beyond the start of the steps) and the last
    step's seconds, or {"error": ...} where the device ran out of memory."""
    from kmkernels import attach_grouped_lora
    from kmtrain.config import IndexConfig, resolve_device
    from kmtrain.models import load_model, native_bf16
    from kmtrain.teacher_cache import Example
    from kmtrain.train import DocState, micro_batches, step_backward

    device = resolve_device("auto")
    amp = torch.bfloat16 if native_bf16(device) else None
    model, tok, _, _ = load_model(model_path, str(device), dtype=torch.bfloat16 if amp else torch.float32,
                                  progress=False)
    attach_grouped_lora(model, docs, rank=16, alpha=16)
    model.train()
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    layers = list(range(L))
    g = torch.Generator().manual_seed(0)
    wave = []
    for d in range(docs):
        exs = [Example([1] + torch.randint(3, len(tok), (tokens,), generator=g).tolist(), 0, tokens)
               for _ in range(examples)]
        wave.append(DocState(f"d{d}", exs, seed=d, cache=_RandomCache(layers, tokens, H, examples, seed=d)))
    picks = [(slot, i) for slot in range(docs) for i in range(examples)]
    cfg = IndexConfig(micro_batch_tokens=micro, examples_per_doc=examples, docs_per_step=docs)
    passes = len(micro_batches([tokens + 1] * len(picks), micro))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step_backward(model, wave, picks, cfg, device, amp, layers, tok.pad_token_id)
            if cuda:
                torch.cuda.synchronize()
            step_s = time.perf_counter() - t0
    except torch.OutOfMemoryError as e:
        return {"passes": passes, "error": f"out of memory ({str(e).split('.')[0]})"}
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"passes": passes, "peak_bytes": peak - before, "step_s": step_s}


def main(argv: Optional[List[str]] = None) -> str:
    from bench.indexing import RANDOM_SHAPES, random_model_folder

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), help="random weights at this shape (see bench.indexing)")
    ap.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer for --random-shape (folder or alias)")
    ap.add_argument("--work", default="runs/train_memory", help="where --random-shape's weights are written once")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=768, help="distilled tokens per sequence (the paper's max_new_tokens)")
    ap.add_argument("--micro", type=int, nargs="+", default=[0, 4096, 8192], help="--micro-batch-tokens values")
    ap.add_argument("--steps", type=int, default=2, help="steps per setting (the last is timed)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if min(a.docs, a.examples, a.tokens, a.steps) < 1 or min(a.micro) < 0:
        ap.error("--docs, --examples, --tokens and --steps must be >= 1, --micro values >= 0")
    model = a.model
    if a.random_shape:
        model = random_model_folder(a.random_shape, a.tokenizer, Path(a.work) / f"random-{a.random_shape}")
    rows = []
    for micro in a.micro:
        r = in_fresh_process(measure, model, a.docs, a.examples, a.tokens, micro, a.steps)
        step_tokens = a.docs * a.examples * (a.tokens + 1)
        if "error" in r:
            rows.append([micro or "0 (one pass)", r["passes"], r["error"], "", ""])
        else:
            rows.append([micro or "0 (one pass)", r["passes"], f"{r['peak_bytes'] / 2**30:.2f}",
                         f"{r['peak_bytes'] / step_tokens / 2**20:.3f}" if micro == 0 else "",
                         f"{r['step_s']:.2f}"])
        print(rows[-1], flush=True)
    text = "\n".join([
        "# Training step memory by --micro-batch-tokens (`python -m bench.train_memory`)", "",
        env_block(environment()),
        f"- model: {a.random_shape + ' (random bf16 weights)' if a.random_shape else a.model}; a step of "
        f"{a.docs} documents x {a.examples} examples of {a.tokens} distilled tokens (+1 prompt token), sdcd, "
        f"teacher statistics as cached, rank 16, all projections", "",
        markdown_table(["--micro-batch-tokens", "passes", "peak GiB beyond the model", "MiB a token (one pass)",
                        "step s"], rows), ""])
    write_report(text, a.out)
    return text


if __name__ == "__main__":
    main()
