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

from bench.common import env_block, environment, markdown_table, projection_sizes, write_report
from kmtrain.config import IndexConfig
from kmtrain.demo import CORPUS, in_fresh_process
from kmtrain.index import default_steps, index


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

    from kmtrain.models import ALIASES, resolve_model

    if (folder / "config.json").is_file():
        return str(folder)
    # A folder is read as it is: `make gpu-carry` carries a tokenizer alone, which resolve_model
    # (for models) refuses for want of a config.json.
    tok = AutoTokenizer.from_pretrained(resolve_model(tokenizer)[0] if tokenizer in ALIASES else tokenizer)
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


def decoder_flops_per_token(config) -> float:
    """Forward FLOPs of one token through the decoder's linear layers (2 per weight; Llama layout:
    q, k, v, o, gate, up, down). Embedding lookups are free; the LM head is counted by the caller."""
    w = projection_sizes(config)
    H, kv, I = w["hidden"], w["kv"], w["intermediate"]
    return 2.0 * config.num_hidden_layers * (2 * H * w["q"] + 2 * H * kv + 3 * H * I)


def work_model(cfg, corpus: str, work_dir: Path) -> dict:
    """FLOPs of the two recipes on this run's own examples and batches (GFLOP per document-step).

    Counts the GEMMs, which is where the time goes at these shapes: the decoder's linear layers
    (forward 1x; backward 1x, since frozen weights need input gradients only), causal attention
    (2*L*H*T^2 forward, twice that backward), and the vocabulary GEMMs of the KL on the
    distillation positions: the reference's teacher logits, student logits and the student's dh
    (3 x 2*n*V*H per step); the full recipe's student logits and dh (2 x 2*n*V*H per step, the
    teacher entering through its cached statistics), plus the statistics' build, 2 x 2*n*V*H once
    per cached target (teacher logits, then W^T p_t).
      reference : one teacher forward over (chunk + prompt + target) per document-step, the student's
                  unpadded sequence, D = 1.
      full      : the student's sequence padded to the widest of its D-document batch, replayed
                  from the documents' own example order; the cache build (once: one pass per
                  shared chunk + prompt prefix, then each target attending to it) spread over the steps.
    Their ratio is the speed-up at equal FLOP rates; the measured speed-up is that ratio times the
    ratio of the two runs' effective FLOP rates (larger GEMMs run faster: little on a 2-core CPU
    already near its peak, much on a GPU, where D = 1 leaves most of it idle). Not counted: the
    held-out evaluations of sdcd's model selection (about ten forward-only batches per run, the
    same in both recipes but for the teacher pass the reference adds).
    """
    from transformers import AutoConfig, AutoTokenizer

    from kmtrain.data import load_documents
    from kmtrain.index import doc_seed, document_items, share_of_requests_made, stored_chunk_ids
    from kmtrain.models import resolve_model
    from kmtrain.teacher_cache import build_examples, prefix_groups
    from kmtrain.train import DocState

    folder = resolve_model(cfg.model)[0]
    mc = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    per_tok = decoder_flops_per_token(mc)
    H, L, V = mc.hidden_size, mc.num_hidden_layers, mc.vocab_size

    def fwd(T: int) -> float:  # one sequence of T tokens through the decoder, forward
        return per_tok * T + 2.0 * L * H * T * T

    def kl(n: int, gemms: int) -> float:
        return gemms * 2.0 * n * V * H

    states = []
    for d in load_documents(corpus):
        stage = work_dir / ".work" / d.id
        chunks = json.loads((stage / "chunks.json").read_text())
        synth = json.loads((stage / "synth.json").read_text())
        # the training examples only, as index() has them
        items = document_items(cfg, d.id, synth["items"], chunks["texts"], tok, share_of_requests_made(synth))[0]
        seed = doc_seed(cfg.seed, d.id)
        states.append(DocState(d.id, build_examples(cfg.objective, tok, chunks["texts"], stored_chunk_ids(chunks), items, cfg,
                                                          seed), seed))
    D = min(cfg.docs_per_step, len(states))
    ref = full = 0.0
    useful = padded = 0
    for w in range(0, len(states), D):
        wave = states[w:w + D]
        for _ in range(cfg.steps):
            picked = [st.examples[st.next_example()] for st in wave for _ in range(cfg.examples_per_doc)]
            width = max(len(e.student_ids) for e in picked)
            full += sum(3 * fwd(width) - per_tok * width + kl(e.n, 2) for e in picked)  # fwd + bwd (1x linears, 2x attention)
            ref += sum(fwd(len(e.teacher_ids)) + 3 * fwd(len(e.student_ids)) - per_tok * len(e.student_ids) + kl(e.n, 3)
                       for e in picked)
            useful += sum(len(e.student_ids) for e in picked)
            padded += width * len(picked)
        for st in wave:  # the cache build, as build_cache runs it: one pass per shared prefix, then the suffixes
            shared, alone = prefix_groups(st.examples)
            full += sum(kl(e.n, 2) for e in st.examples)  # the KL's teacher statistics
            full += sum(fwd(len(st.examples[i].teacher_ids)) for i in alone)
            for prefix, idx in shared.items():
                P = len(prefix)
                full += fwd(P) + sum(fwd(S) + 4.0 * L * H * P * S
                                     for S in (len(st.examples[i].teacher_ids) - P for i in idx))
    doc_steps = len(states) * cfg.steps
    return {"ref_gflop": ref / doc_steps / 1e9, "full_gflop": full / doc_steps / 1e9, "work_ratio": ref / full,
            "student_tokens_useful": useful / padded,
            "mean_teacher_tokens": sum(len(e.teacher_ids) for st in states for e in st.examples)
            / sum(len(st.examples) for st in states),
            "mean_student_tokens": sum(len(e.student_ids) for st in states for e in st.examples)
            / sum(len(st.examples) for st in states)}


def _precision(cfg) -> str:
    """The autocast and base-weight dtypes this config resolves to on this machine."""
    from kmtrain.config import resolve_device
    from kmtrain.index import _amp_dtype, _base_dtype

    dev = resolve_device(cfg.device)
    amp = _amp_dtype(cfg, dev)
    base = _base_dtype(cfg, dev, amp)
    return f"autocast {'bf16' if amp is not None else 'off (fp32)'}, base weights {str(base).replace('torch.', '')}"


def _timed_index(corpus: str, cfg: IndexConfig) -> tuple[list[dict], float, float]:
    """(summaries, seconds of the whole index() call, seconds of those spent loading the model).

    The load is timed apart because a job pays it once however many documents it indexes: at
    Llama-3.1-8B shapes it is 16 GB read onto the GPU, a large share of a 4-document run but not
    of a real indexing job's hours."""
    import importlib

    index_module = importlib.import_module("kmtrain.index")  # (kmtrain.index is also the function)
    load_model, load_s = index_module.load_model, []

    def timed_load_model(*args, **kwargs):
        t = time.time()
        try:
            return load_model(*args, **kwargs)
        finally:
            load_s.append(time.time() - t)

    index_module.load_model = timed_load_model
    try:
        t0 = time.time()
        summ = index(corpus, cfg)
        return summ, time.time() - t0, sum(load_s)
    finally:
        index_module.load_model = load_model


def _index_in_fresh_process(corpus: str, cfg: IndexConfig) -> tuple[list[dict], float, float]:
    """index() timed in a spawned process. Why: run in this one, each recipe inherited what the
    runs before it left (allocator state, kept CPU scratch buffers, the generator's model). On
    2026-11-24 the reference took 2.7-3.3 s per step run there after the full recipe, against
    2.3-2.4 s in a separate 12-step run of the same configuration, a gap we could not otherwise
    explain; a fresh process for each gives both recipes the same start, model load included."""
    return in_fresh_process(_timed_index, corpus, cfg)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--steps", type=int, help="training steps (default: kmtrain index's on this machine)")
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
    base = IndexConfig(model=a.model, steps=default_steps() if a.steps is None else a.steps, progress=False)
    if a.long:
        texts = [p.read_text() for p in sorted(Path(CORPUS).glob("*.txt"))]
        corpus = work / "long_corpus"
        corpus.mkdir(parents=True)
        for i in range(4):
            (corpus / f"long_{i}.txt").write_text("\n\n".join(texts[(i + j) % len(texts)] for j in range(a.long)))
        a.corpus = str(corpus)
        base = base.replace(summaries_per_chunk=2, qa_per_chunk=2)
    # synthetic data once (shared), timed separately
    # (objective "pit" needs the synthetic targets but no teacher cache; 1 step, discarded)
    _, t_synth, _ = _index_in_fresh_process(a.corpus, base.replace(out=str(work / "synth_only"), objective="pit", steps=1))
    runs = {"full recipe (cache, D=8, backend auto)": base.replace(out=str(work / "full")),
            "reference (--no-teacher-cache --docs-per-step 1 --backend torch)":
                base.replace(out=str(work / "ref"), teacher_cache=False, docs_per_step=1, backend="torch")}
    rows, results, timing = [], {}, {}
    for name, cfg in runs.items():
        src = work / "synth_only" / ".work"
        for d in src.iterdir():  # same chunks and synthetic targets for both runs
            dst = Path(cfg.out) / ".work" / d.name
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("chunks.json", "synth.json"):
                shutil.copy(d / f, dst / f)
        summ, secs, load_s = _index_in_fresh_process(a.corpus, cfg)
        n = len([s for s in summ if s.get("status") == "trained"])
        results[name] = {s["id"]: s["final_loss"] for s in summ}
        timing[name] = (n, secs, load_s)
        rows.append([name, str(n), str(cfg.steps), f"{secs:.0f}", f"{load_s:.0f}", f"{3600 * n / secs:.1f}",
                     f"{3600 * n / (secs - load_s):.1f}"])
        print(rows[-1], flush=True)
    (full_name, full), (ref_name, ref) = list(results.items())
    (n_docs, full_s, full_load), (_, ref_s, ref_load) = timing[full_name], timing[ref_name]
    speedup = ref_s / full_s
    speedup_loaded = (ref_s - ref_load) / (full_s - full_load)
    wm = work_model(runs[full_name], a.corpus, Path(runs[full_name].out))
    doc_steps = n_docs * base.steps
    rate_full = wm["full_gflop"] * doc_steps / full_s
    rate_ref = wm["ref_gflop"] * doc_steps / ref_s
    loss_rows = [[d, f"{full[d]['loss']:.5f}", f"{ref[d]['loss']:.5f}",
                  f"{abs(full[d]['loss'] - ref[d]['loss']) / abs(ref[d]['loss']):.2e}"] for d in full]
    header = ["run", "documents", "steps", "seconds", "of them loading the model", "documents/hour",
              "documents/hour, model loaded"]
    text = (f"# Indexing throughput (documents per hour), side by side\n\n{env_block(env)}\n"
            f"- model: {f'random weights at {a.random_shape} shapes (bf16 on disk)' if a.random_shape else a.model}"
            f"; precision: {_precision(base)}; corpus: {a.corpus}{f' ({a.long} demo documents per document)' if a.long else ''}; "
            f"{base.summaries_per_chunk}+{base.qa_per_chunk} synthetic generations per chunk; {base.steps} steps per document; "
            f"{base.examples_per_doc} examples per document per step\n"
            f"- synthetic targets generated once for both runs ({t_synth:.0f} s, not counted below; model load is, and\n"
            f"  is also shown apart)\n\n"
            f"{markdown_table(header, rows)}\n\n"
            f"**Speed-up of the full recipe: {speedup:.2f}x**; {speedup_loaded:.2f}x with the model loaded, the rate a\n"
            f"job of many documents approaches, since a process loads the model once however many it indexes\n\n"
            f"Work model (`work_model` in bench/indexing.py: GEMM FLOPs of this run's own examples and batches;\n"
            f"teacher sequences {wm['mean_teacher_tokens']:.0f} tokens on average, student sequences "
            f"{wm['mean_student_tokens']:.0f}, {100 * wm['student_tokens_useful']:.0f}% of the\n"
            f"full recipe's padded student tokens real): reference {wm['ref_gflop']:.1f} GFLOP per document-step, "
            f"full recipe {wm['full_gflop']:.1f}, a work ratio of **{wm['work_ratio']:.2f}x**.\n"
            f"Effective rates (all counted GFLOP over each run's wall time): reference {rate_ref:.0f} GFLOP/s, "
            f"full recipe {rate_full:.0f} GFLOP/s\n"
            f"(speed-up = work ratio x rate ratio = {wm['work_ratio']:.2f} x {rate_full / rate_ref:.2f}).\n\n"
            f"Final DCD loss (mean of the last 10% of steps) with the cache and without it, same seed. The\n"
            f"reference run's teacher states are rounded to the cache dtype (bf16), so the two runs see the\n"
            f"same numbers up to the batched-matmul rounding of D=8 against D=1:\n\n"
            f"{markdown_table(['document', 'with cache', 'without cache', 'relative difference'], loss_rows)}\n")
    write_report(text, a.out)


if __name__ == "__main__":
    main()
