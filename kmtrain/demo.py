"""`make demo`: index a corpus (the bundled one by default) with the default settings, then compare
closed-book accuracy of the base model, the base model with the document in context (ICL), and the KMs.

    python -m kmtrain.demo [--corpus DIR] [--out runs/demo] [--objective sdcd] [--steps N] [--set FIELD=VALUE ...]

(--corpus: a folder of documents with a questions.json beside them, as kmtrain/demo_corpus has:
see load_scored_questions)

(--set: any IndexConfig field, e.g. --set seed=1 --set amp=off; see IndexConfig.parse_override)
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Tuple, TypeVar

import torch

from kmkernels import attach_grouped_lora, load_peft, read_adapter_config

from .cli import reporting_errors
from .config import STEPS_DEFAULT_SAID, IndexConfig, resolve_device
from .data import Document, load_documents, problems_message, sanitize_id
from .evaluate import generate_answers, is_correct, normalize_answer, question_prompt
from .index import default_steps, index
from .models import load_model, native_bf16

CORPUS = Path(__file__).parent / "demo_corpus"


T = TypeVar("T")


def in_fresh_process(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` in a new Python process (spawned), its result sent back; an exception
    there is raised here. ``fn`` must be a module-level function, its arguments and result picklable.

    Why: after an indexing run, the process keeps what training left in the C heap (~7 GB freed
    but held, in pieces), and work run there is slower. make demo's 64 closed-book answers took
    12.0-17.4 s after a 60-step index against 7.3-11.4 s before it in the same process, and 9.7-11.3 s
    in a new process started right after (2-core CPU, 2026-12-03); malloc_trim gave the memory back
    but not the speed. bench.indexing saw the same for training in 2026-11."""
    # (an executor, not Pool: its shutdown lets the worker exit normally, so the semaphores tqdm
    # made there are released rather than reported as leaked)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def load_scored_questions(corpus: Path) -> Dict[str, List[dict]]:
    """``corpus``/questions.json, checked: {document id: [{"q": question, "a": [accepted answer, ...]}]}.
    (The questions a corpus is scored on, with their answers; kmtrain.load_questions reads the
    questions `kmtrain ask --questions` answers.) How it is checked: _scored_corpus."""
    return _scored_corpus(corpus)[0]


def _scored_corpus(corpus: Path) -> Tuple[Dict[str, List[dict]], Dict[str, Document]]:
    """(load_scored_questions's questions, the corpus's documents by id), the documents read once.

    Every problem is named in one ValueError, so that a corpus of one's own is fixed in one go and
    before its indexing: an accepted answer that normalises to nothing (is_correct ignores case and
    most punctuation) would count every answer correct, and a question whose document id matches no
    file would be dropped from the table without a word."""
    path = Path(corpus) / "questions.json"
    try:
        questions = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (a corpus's questions go beside its documents, as "
                         f"{{document id: [{{\"q\": question, \"a\": [accepted answer, ...]}}]}})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(questions, dict) or not questions:
        raise ValueError(f"{path}: expected a non-empty object {{document id: [{{\"q\", \"a\"}}, ...]}}, "
                         f"got {type(questions).__name__}{'' if questions else ' (empty)'}")
    problems = []
    # an answer normalised to nothing, or to punctuation alone, is found in every generation
    scorable = lambda x: isinstance(x, str) and any(map(str.isalnum, normalize_answer(x)))  # noqa: E731
    for doc, entries in questions.items():
        if not isinstance(entries, list) or not entries:
            problems.append(f"{doc}: expected a non-empty list of questions")
            continue
        for i, e in enumerate(entries):
            q, a = (e.get("q"), e.get("a")) if isinstance(e, dict) else (None, None)
            if not isinstance(q, str) or not q.strip():
                problems.append(f"{doc}[{i}]: needs \"q\", a non-empty question")
            if not isinstance(a, list) or not a or not all(map(scorable, a)):
                problems.append(f"{doc}[{i}]: needs \"a\", a non-empty list of accepted answers, each with a "
                                f"letter or digit (got {a!r})")
    docs = {d.id: d for d in load_documents(str(corpus), progress=False)}
    unknown = sorted(set(questions) - set(docs))
    if unknown:
        # a file "North Gate.txt" is the document "North_Gate": said where that is the slip
        named = [f"{k} (the document's id is {sanitize_id(k)})" if sanitize_id(k) in docs else k for k in unknown]
        problems.append(f"questions for {', '.join(named)}, which no document of {corpus} is (ids are file stems, "
                        f"sanitised)")
    if problems:
        raise ValueError(f"{path}: {problems[0]}" if len(problems) == 1 else problems_message(problems, str(path)))
    return questions, docs


# Prompts per generate call in the evaluation. Each decoding step runs the model's 30 layers of
# small GEMMs whatever the rows, so one batch of make demo's 64 questions beats two of 32: on a
# 2-core AVX2 CPU (fp32, 2026-12-08) base 20.7 against 27.5 and 23.9 s, KM 23.6 against 35.2 and
# 31.7 s (KMs of a 1-step run), ICL 31.0 against 42.5 and 43.7 s, the same 192 answers.
EVAL_BATCH = 64


def answer_corpus(out_dir: str, model_name: str = "smollm2-135m", conditions=("base", "icl", "km"),
                  corpus: Path = CORPUS) -> Dict[str, Dict[str, List[str]]]:
    """{doc_id: {condition: [greedy answer per question]}} on ``corpus``'s questions."""
    return _answers(out_dir, model_name, conditions, *_scored_corpus(corpus))


def _answers(out_dir: str, model_name: str, conditions, questions: Dict[str, List[dict]],
             docs: Dict[str, Document]) -> Dict[str, Dict[str, List[str]]]:
    ids = list(questions)
    # As `kmtrain ask` does: on a CUDA GPU when there is one, the base in bf16 where the device
    # multiplies bf16 natively (as it trained there). Before, a GPU machine answered on its CPU.
    device = resolve_device("auto")
    model, tok, _, _ = load_model(model_name, str(device), dtype=torch.bfloat16 if native_bf16(device) else torch.float32)
    rank = 16
    kms = [Path(out_dir) / d for d in ids]
    if "km" in conditions:
        missing = [str(k) for k in kms if not (k / "adapter_config.json").is_file()]
        if missing:
            raise ValueError(f"no KM (PEFT adapter folder) for {', '.join(missing)}: index the corpus into {out_dir} first")
        rank = max(read_adapter_config(k)["r"] for k in kms)
    attach_grouped_lora(model, len(ids), rank=rank, alpha=rank)
    if "km" in conditions:
        for slot, k in enumerate(kms):
            load_peft(model, slot, k)
    result: Dict[str, Dict[str, List[str]]] = {d: {} for d in ids}
    # One condition at a time: a batch never pads short closed-book prompts to the ICL prompts'
    # length, and a condition's bf16 answers do not depend on which other conditions are scored
    # (mixed batches once gave the same KMs 33/64 with the base and ICL prompts, 30/64 alone).
    for cond in conditions:
        prompts, slots = [], []
        for slot, d in enumerate(ids):
            for q in questions[d]:
                prompts.append(question_prompt(q["q"], docs[d].text if cond == "icl" else None))
                slots.append(slot if cond == "km" else -1)
        # share_prefixes: ICL's questions read their document once, and every condition's the chat
        # header and instruction once (per KM): 61 s for the three conditions against 105 s without
        # it in batches of 32 (fp32, 2-core AVX2 CPU, 2026-12-08, KMs of a 1-step run), the same answers
        answers = iter(generate_answers(model, tok, prompts, slots, max_new_tokens=24, batch_size=EVAL_BATCH,
                                        share_prefixes=True))
        for d in ids:
            result[d][cond] = [next(answers) for _ in questions[d]]
    return result


def evaluate_corpus(out_dir: str, model_name: str = "smollm2-135m", conditions=("base", "icl", "km"),
                    corpus: Path = CORPUS) -> Dict[str, Dict[str, List[bool]]]:
    """{doc_id: {condition: [correct per question]}} on ``corpus``'s questions."""
    questions, docs = _scored_corpus(corpus)
    answers = _answers(out_dir, model_name, conditions, questions, docs)
    return {d: {c: [is_correct(a, q["a"]) for a, q in zip(by[c], questions[d])] for c in conditions}
            for d, by in answers.items()}


def format_table(result: Dict[str, Dict[str, List[bool]]], conditions=("base", "icl", "km")) -> str:
    names = {"base": "base (closed book)", "icl": "ICL (document in context)", "km": "KM (closed book)"}
    lines = ["| document | " + " | ".join(names.get(c, c) for c in conditions) + " |",
             "|---|" + "---|" * len(conditions)]
    tot = {c: [0, 0] for c in conditions}
    for d, by in result.items():
        cells = []
        for c in conditions:
            k, n = sum(by[c]), len(by[c])
            tot[c][0] += k
            tot[c][1] += n
            cells.append(f"{k}/{n}")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{k}/{n} ({100 * k / max(n, 1):.0f}%)**" for k, n in tot.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="make demo: index a corpus (the bundled one by default) with the default "
                                             "settings, then score the base model, ICL and the KMs on its questions")
    ap.add_argument("--corpus", default=str(CORPUS),
                    help="a folder of .txt/.md documents with their questions.json beside them, as the bundled "
                         "corpus has (default: the bundled corpus)")
    ap.add_argument("--out", default="runs/demo", help="where the KMs go (default runs/demo)")
    ap.add_argument("--objective", default="sdcd", help="what the KMs are trained with (default sdcd)")
    ap.add_argument("--steps", type=int, help=f"training steps ({STEPS_DEFAULT_SAID})")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="an IndexConfig field for the indexing run (repeatable), e.g. seed=1 or amp=off")
    a = ap.parse_args(argv)
    a.out = os.path.expanduser(a.out)  # index() writes there, the evaluation reads there
    corpus = Path(os.path.expanduser(a.corpus))
    try:
        overrides = dict(IndexConfig.parse_override(item) for item in a.set)
        cfg = IndexConfig(out=a.out, objective=a.objective, progress=not a.no_progress).replace(**overrides)
        if a.steps is not None:  # --steps 0 is refused by validate(), not ignored
            cfg = cfg.replace(steps=a.steps)
        cfg.validate()
    except ValueError as e:
        ap.error(str(e))

    def run() -> int:
        load_scored_questions(corpus)  # now, not after the indexing it would be scored on
        torch.manual_seed(0)
        t0 = time.time()
        steps = cfg.steps or default_steps(cfg.device)
        print(f"indexing {corpus} -> {a.out} ({cfg.objective}, {steps} steps, {cfg.docs_per_step} documents per step)")
        index(str(corpus), cfg)
        t1 = time.time()
        result = in_fresh_process(evaluate_corpus, a.out, cfg.model, corpus=corpus)  # not in what indexing left
        table = format_table(result)
        print()
        print(table)
        print(f"\nindexing {t1 - t0:.0f} s, evaluation {time.time() - t1:.0f} s")
        Path(a.out, "demo_results.md").write_text(table + "\n", encoding="utf-8")
        return 0

    # one line, not a traceback, for a full disk or Ctrl-C; the KMs written so far are kept
    return reporting_errors(run, prog="make demo")


if __name__ == "__main__":
    sys.exit(main())
