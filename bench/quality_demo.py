"""Closed-book accuracy per objective on the bundled demo corpus (or --corpus DIR), one table:
base, ICL (document in context), and KMs trained with each objective for the same steps.

    python -m bench.quality_demo [--objectives sdcd lm ...] [--steps N] [--out bench/results/quality_demo_cpu.md]
    python -m bench.quality_demo --objectives sdcd --set qa_format=chat --work runs/quality_chat   # an ablation
    python -m bench.quality_demo --corpus my_docs --work runs/my_quality   # documents + questions.json, as make demo's
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from bench.common import env_block, environment, km_records, markdown_table, set_overrides, write_report
from kmtrain.config import IndexConfig
from kmtrain.demo import CORPUS, evaluate_corpus, in_fresh_process, load_scored_questions
from kmtrain.index import index


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--objectives", nargs="+", default=["sdcd", "lm", "ddcd", "pit"])
    ap.add_argument("--steps", type=int, help="training steps (default: kmtrain index's on this machine)")
    ap.add_argument("--work", default="runs/quality")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="IndexConfig override for every KM run (e.g. qa_format=chat, hidden_weight=0)")
    ap.add_argument("--corpus", default=str(CORPUS),
                    help="documents with a questions.json beside them (default: the bundled demo corpus)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    overrides = set_overrides(ap, a.set)
    corpus = Path(a.corpus).expanduser()
    try:  # before any indexing: a question file that cannot be scored is named now
        questions = load_scored_questions(corpus)
    except ValueError as e:
        ap.error(str(e))
    cfg = IndexConfig(**overrides)
    env = environment()
    rows, per_doc = [], {}
    base_name = cfg.model
    base_icl = None
    first = None
    for obj in a.objectives:
        out = Path(a.work) / obj
        if first is not None:  # same chunks and synthetic targets for every objective
            for d in (first / ".work").iterdir():
                dst = out / ".work" / d.name
                dst.mkdir(parents=True, exist_ok=True)
                for f in ("chunks.json", "synth.json"):
                    if (d / f).is_file() and not (dst / f).exists():
                        shutil.copy(d / f, dst / f)
        first = first or out
        # A KM already finished in `out` with these settings is reused (index() resumes), so the
        # training time comes from its km.json, not from this call's wall clock.
        summary = index(str(corpus), IndexConfig(out=str(out), objective=obj, steps=a.steps, progress=False,
                                                       **overrides))
        records = km_records(out)
        kms = [records[s["id"]] for s in summary if s["id"] in records]
        t_train = max(km["train_seconds_wave"] for km in kms)
        base_name = kms[0]["base_model"]
        conds = ("km",) if base_icl is not None else ("base", "icl", "km")
        # on the base the KMs were trained on (`--set model=...`), not the default model
        # not in what indexing left
        res = in_fresh_process(evaluate_corpus, str(out), cfg.model, conditions=conds, corpus=corpus)
        if base_icl is None:
            base_icl = {d: {c: res[d][c] for c in ("base", "icl")} for d in res}
            for c, name in (("base", "base (closed book)"), ("icl", "ICL (document in context)")):
                k = sum(sum(v[c]) for v in res.values())
                n = sum(len(v[c]) for v in res.values())
                rows.append([name, "", f"{k}/{n}", f"{100 * k / n:.1f}", ""])
                per_doc[name] = {d: sum(v[c]) for d, v in res.items()}
        k = sum(sum(v["km"]) for v in res.values())
        n = sum(len(v["km"]) for v in res.values())
        rows.append([f"KM ({obj})", str(kms[0]["steps"]), f"{k}/{n}", f"{100 * k / n:.1f}", f"{t_train:.0f}"])
        per_doc[f"KM ({obj})"] = {d: sum(v["km"]) for d, v in res.items()}
        print(rows[-1], flush=True)
    waves = f"one wave of {len(kms)} documents" if len(kms) <= cfg.docs_per_step else "its longest wave"
    table = markdown_table(["condition", "steps", "correct", "accuracy %", f"training s ({waves}, from km.json)"], rows)
    docs = list(next(iter(per_doc.values())))
    doc_table = markdown_table(["document"] + list(per_doc), [[d] + [str(per_doc[c][d]) for c in per_doc] for d in docs])
    changed = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "none"
    counts = sorted({len(q) for q in questions.values()})
    per_doc_count = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    n_questions = sum(map(len, questions.values()))
    bundled = corpus.resolve() == CORPUS.resolve()
    described = ("kmtrain/demo_corpus, 8 fictional documents, 8 short-answer questions each (64)" if bundled else
                 f"{corpus}, {len(questions)} documents with questions ({per_doc_count} each, {n_questions} in all)")
    title = "the demo corpus" if bundled else corpus.name
    text = (f"# Closed-book accuracy on {title} ({base_name})\n\n{env_block(env)}\n"
            f"- overrides of the defaults for every KM here: {changed}\n"
            f"- corpus: {described}\n"
            f"- settings (the defaults with the overrides): {cfg.summaries_per_chunk} summaries + {cfg.qa_per_chunk} Q/A "
            f"{f'+ {cfg.facts_per_chunk} fact-list ' if cfg.facts_per_chunk else ''}generations per chunk, "
            f"{f'recitation pieces of ~{cfg.recite_tokens} tokens, ' if cfg.recite_tokens else ''}"
            f"{cfg.docs_per_step} documents per step, {cfg.examples_per_doc} examples per document per step, "
            f"lr {cfg.lr}, r={cfg.rank}, alpha={cfg.alpha}\n"
            f"- scoring: greedy answer (24 new tokens) contains an accepted answer as whole words\n\n"
            f"{table}\n\nPer document (correct of {per_doc_count}):\n\n{doc_table}\n")
    write_report(text, a.out)


if __name__ == "__main__":
    main()
