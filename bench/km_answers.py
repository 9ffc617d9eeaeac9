"""Why a KM misses what it misses: every demo question with the KM's answer, whether it counts,
and how many of its document's synthetic targets state an accepted answer.

    python -m bench.km_answers --kms runs/quality/sdcd [--out bench/results/km_answers_sdcd_cpu.md]

``--kms`` is an output folder of `kmtrain index` on the demo corpus (one KM per document, the
stage files under ``.work/<id>/synth.json`` beside them). A target "states" an answer when the
answer appears in it as whole words, the rule that scores the KM's own answer.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Tuple

from bench.common import env_block, environment, km_records, markdown_table, write_report
from kmtrain.data import QA_PROMPT
from kmtrain.demo import CORPUS, answer_corpus
from kmtrain.evaluate import is_correct
from kmtrain.index import doc_seed
from kmtrain.synth import split_heldout


def target_coverage(items: List[dict], accepted: List[str]) -> Tuple[int, int]:
    """(summaries, Q/A targets) among ``items`` (a synth.json's items) that state an accepted answer;
    fact lists (cfg.facts_per_chunk) count with the summaries: both are distilled as written."""
    in_summary = sum(is_correct(it["target"], accepted) for it in items if it["prompt"] != QA_PROMPT)
    in_qa = sum(is_correct(it["target"], accepted) for it in items if it["prompt"] == QA_PROMPT)
    return in_summary, in_qa


def coverage_class(in_summary: int, in_qa: int) -> str:
    return {(True, True): "summaries and Q/A", (True, False): "summaries only",
            (False, True): "Q/A only", (False, False): "no target"}[(in_summary > 0, in_qa > 0)]


def count_class(n: int) -> str:
    return "0" if n == 0 else "1-4" if n < 5 else "5 or more"


def trained_items(items: List[dict], meta: dict, doc_id: str) -> List[dict]:
    """The generated items (a synth.json's) that a KM trained on, given its km.json ``meta``: without
    the held-out ones where model selection was on, split as index() split them. Recitation items
    (cfg.recite_tokens) are not among them: coverage counts what the generator wrote."""
    if not meta.get("heldout"):
        return list(items)
    return split_heldout(items, meta["heldout"]["per_chunk"], doc_seed(meta["seed"], doc_id))[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kms", required=True, help="a `kmtrain index` output folder of the demo corpus")
    ap.add_argument("--model", help="the KMs' base model (default: the one their km.json names)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    kms = Path(a.kms)
    questions = json.loads((CORPUS / "questions.json").read_text())
    records = km_records(kms)
    if not records:
        ap.error(f"--kms {kms} holds no KM (no <id>/km.json): give a `kmtrain index` output folder")
    # by default the base the KMs were trained on; the default SmolLM2 would misread other bases' KMs
    model = a.model or next(iter(records.values()))["base_model_path"]
    answers = answer_corpus(str(kms), model, conditions=("km",))
    rows, n_items = [], {}
    by_kind, by_count = {}, {}  # two partitions of the questions: which kinds of target, how many targets
    for doc, by in answers.items():
        items = json.loads((kms / ".work" / doc / "synth.json").read_text())["items"]
        items = trained_items(items, records[doc], doc)
        n_items[doc] = len(items)
        for q, ans in zip(questions[doc], by["km"]):
            s, qa = target_coverage(items, q["a"])
            ok = is_correct(ans, q["a"])
            for tallies, key in ((by_kind, coverage_class(s, qa)), (by_count, count_class(s + qa))):
                tally = tallies.setdefault(key, [0, 0])
                tally[0] += ok
                tally[1] += 1
            rows.append([doc, q["q"], " / ".join(q["a"]), str(s), str(qa), ans.replace("|", "/").replace("\n", " "),
                         "yes" if ok else "no"])
    km = records[next(iter(answers))]
    summary = "\n\n".join(markdown_table([head, "KM correct", "questions"],
                                          [[c, str(k), str(n)] for c, (k, n) in sorted(tallies.items())])
                           for head, tallies in (("targets stating the answer", by_count),
                                                 ("kinds of target stating it", by_kind)))
    text = (f"# KM answers on the demo corpus, with the synthetic targets' coverage\n\n{env_block(environment())}\n"
            f"- KMs: `{kms}` (objective {km.get('objective')}, {km.get('steps')} steps); "
            f"synthetic targets trained on per document: {', '.join(f'{d} {n}' for d, n in n_items.items())}\n"
            f"- scoring: greedy answer (24 new tokens) contains an accepted answer as whole words; "
            f"a target states an answer by the same rule\n\n{summary}\n\n"
            + markdown_table(["document", "question", "accepted", "summaries stating it", "Q/A targets stating it",
                              "KM answer", "correct"], rows) + "\n")
    write_report(text, a.out)


if __name__ == "__main__":
    main()
