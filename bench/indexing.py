"""Indexing throughput, side by side in one run, at equal steps and synthetic targets:

  full recipe : teacher cache + D documents per step + fused kernels (backend auto)
  reference   : --no-teacher-cache --docs-per-step 1 --backend torch (teacher re-run every step)

Both runs start from the same chunks and synthetic targets (generated once, copied), so the
difference is the teacher cache, batching and kernels. Also checks that the final DCD loss with
the cache equals the loss without it (same seed).

    python -m bench.indexing [--corpus DIR] [--steps N] [--out bench/results/indexing_cpu.md]
    python -m bench.indexing --random-shape llama-3.1-8b --tokenizer DIR --long 8 --out bench/results/indexing_<gpu>.md

``--random-shape`` times a model of real size without downloading one: random bf16 weights at
the published shapes of that architecture (written once to the work folder), with any local
tokenizer (SmolLM2's; ids past its vocabulary decode to nothing). The synthetic targets of a
random model are noise, which is fine for speed: both runs train on the same ones.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from bench.common import env_block, environment, markdown_table, write_report
from kmtrain.config import IndexConfig
from kmtrain.demo import CORPUS
from kmtrain.index import index


# Published shapes (config.json of each model); "tiny" is for a CPU smoke run of this script.
RANDOM_SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
}


def random_model_folder(shape: str, tokenizer: str, folder: Path) -> str:
    """Write a Llama of the given shape with random bf16 weights (std 0.02, as HF initialises) and
    the tokenizer found at ``tokenizer`` (a folder or the smollm2-135m alias) into ``folder``, once."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kmtrain.models import resolve_model

    if (folder / "config.json").is_file():
        return str(folder)
    tok = AutoTokenizer.from_pretrained(resolve_model(tokenizer)[0])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = LlamaConfig(**RANDOM_SHAPES[shape], max_position_embeddings=16384, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg._name_or_path = f"random-{shape}"
    if cfg.vocab_size < len(tok):
        raise ValueError(f"{shape} has a vocabulary of {cfg.vocab_size}, smaller than the tokenizer's {len(tok)}")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 on the device: 8B fp32 would be 32 GB
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    tmp.rename(folder)
    return str(folder)


def _precision(cfg) -> str:
    """The autocast and base-weight dtypes this config resolves to on this machine."""
    from kmtrain.index import _amp_dtype, _base_dtype, _device

    dev = _device(cfg)
    amp = _amp_dtype(cfg, dev)
    base = _base_dtype(cfg, dev, amp)
    return f"autocast {'bf16' if amp is not None else 'off (fp32)'}, base weights {str(base).replace('torch.', '')}"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--steps", type=int, default=IndexConfig().steps)
    ap.add_argument("--work", default="runs/indexing")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES),
                    help="instead of --model: random weights at this model's shapes (see the module docstring)")
    ap.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer for --random-shape (folder or alias)")
    ap.add_argument("--long", type=int, default=0, metavar="K",
                    help="instead of the demo documents, index 4 documents each made of K demo documents in a row "
                         "(paper-like chunk lengths: the teacher sees ~K*260 tokens); 2+2 targets per chunk")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    env = environment()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    if a.random_shape:  # kept beside the work folder: writing 16 GB once per machine is enough
        a.model = random_model_folder(a.random_shape, a.tokenizer, work.parent / f"random-{a.random_shape}")
    base = IndexConfig(model=a.model, steps=a.steps, progress=False)
    if a.long:
        texts = [p.read_text() for p in sorted(Path(CORPUS).glob("*.txt"))]
        corpus = work / "long_corpus"
        corpus.mkdir(parents=True)
        for i in range(4):
            (corpus / f"long_{i}.txt").write_text("\n\n".join(texts[(i + j) % len(texts)] for j in range(a.long)))
        a.corpus = str(corpus)
        base = base.replace(summaries_per_chunk=2, qa_per_chunk=2)
    # synthetic data once (shared), timed separately
    t0 = time.time()
    # (objective "pit" needs the synthetic targets but no teacher cache; 1 step, discarded)
    index(a.corpus, base.replace(out=str(work / "synth_only"), objective="pit", steps=1))
    t_synth = time.time() - t0
    runs = {"full recipe (cache, D=8, backend auto)": base.replace(out=str(work / "full")),
            "reference (--no-teacher-cache --docs-per-step 1 --backend torch)":
                base.replace(out=str(work / "ref"), teacher_cache=False, docs_per_step=1, backend="torch")}
    rows, results = [], {}
    for name, cfg in runs.items():
        src = work / "synth_only" / ".work"
        for d in src.iterdir():  # same chunks and synthetic targets for both runs
            dst = Path(cfg.out) / ".work" / d.name
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("chunks.json", "synth.json"):
                shutil.copy(d / f, dst / f)
        t0 = time.time()
        summ = index(a.corpus, cfg)
        secs = time.time() - t0
        n = len([s for s in summ if s.get("status") == "trained"])
        results[name] = {s["id"]: s["final_loss"] for s in summ}
        rows.append([name, str(n), str(cfg.steps), f"{secs:.0f}", f"{3600 * n / secs:.1f}"])
        print(rows[-1], flush=True)
    (full_name, full), (ref_name, ref) = list(results.items())
    speedup = float(rows[1][3]) / float(rows[0][3])
    loss_rows = [[d, f"{full[d]['loss']:.5f}", f"{ref[d]['loss']:.5f}",
                  f"{abs(full[d]['loss'] - ref[d]['loss']) / abs(ref[d]['loss']):.2e}"] for d in full]
    text = (f"# Indexing throughput (documents per hour), side by side\n\n{env_block(env)}\n"
            f"- model: {f'random weights at {a.random_shape} shapes (bf16 on disk)' if a.random_shape else a.model}"
            f"; precision: {_precision(base)}; corpus: {a.corpus}{f' ({a.long} demo documents per document)' if a.long else ''}; "
            f"{base.summaries_per_chunk}+{base.qa_per_chunk} synthetic generations per chunk; {base.steps} steps per document; "
            f"{base.examples_per_doc} examples per document per step\n"
            f"- synthetic targets generated once for both runs ({t_synth:.0f} s, not counted below; model load is)\n\n"
            f"{markdown_table(['run', 'documents', 'steps', 'seconds', 'documents/hour'], rows)}\n\n"
            f"**Speed-up of the full recipe: {speedup:.2f}x**\n\n"
            f"Final DCD loss (mean of the last 10% of steps) with the cache and without it, same seed. The\n"
            f"reference run's teacher states are rounded to the cache dtype (bf16), so the two runs see the\n"
            f"same numbers up to the batched-matmul rounding of D=8 against D=1:\n\n"
            f"{markdown_table(['document', 'with cache', 'without cache', 'relative difference'], loss_rows)}\n")
    write_report(text, a.out)


if __name__ == "__main__":
    main()
