"""kmtrain.demo: the evaluation behind `make demo` and bench.quality_demo, on the tiny model."""
import json

import pytest
import torch

from conftest import DOCS, tiny_cfg
from kmtrain import index
from kmtrain.demo import answer_corpus, evaluate_corpus, format_table


def test_demo_routes_each_condition_and_scores_its_own_answer(tiny_model, docs_dir, tmp_path, monkeypatch):
    """The KM condition answers through its own document's KM, base and ICL through no KM, ICL with
    its own document in the prompt, each condition in its own batches, and each (document,
    condition, question) is scored on its own answer. The generator is replaced by one that reports what it was given (a random tiny model
    answers nothing useful); the real generation is covered by the `ask` tests and `make demo`."""
    from safetensors.torch import load_file

    import kmtrain.demo as demo
    from kmkernels import slot_parameters

    out = tmp_path / "kms"
    index(str(docs_dir), tiny_cfg(tiny_model, out))
    ids = sorted(DOCS)[:2]  # a corpus of two of the three indexed documents
    questions = {d: [{"q": f"First about {d}?", "a": ["x"]}, {"q": "Second?", "a": ["x"]}] for d in ids}
    (docs_dir / "questions.json").write_text(json.dumps(questions))

    def fake_generate(model, tok, prompts, slots, max_new_tokens, batch_size, share_prefixes=False):
        params = slot_parameters(model)
        for slot, d in enumerate(ids):  # slot i holds document i's KM, as saved
            saved = sum(t.double().abs().sum() for t in load_file(str(out / d / "adapter_model.safetensors")).values())
            held = sum(p[slot].double().abs().sum() for p in params)
            assert torch.isclose(held, saved, rtol=1e-6), (slot, d)
        ctx = [next((d for d in DOCS if DOCS[d] in p), "none") for p in prompts]
        conditions = {"km" if s >= 0 else ("base" if c == "none" else "icl") for s, c in zip(slots, ctx)}
        calls.append((conditions, share_prefixes))
        return [f"{'km' + str(s) if s >= 0 else 'nokm'} ctx{c} {p.split('Question: ')[-1]}"
                for p, s, c in zip(prompts, slots, ctx)]

    calls = []
    monkeypatch.setattr(demo, "generate_answers", fake_generate)
    answers = answer_corpus(str(out), tiny_model, ("base", "icl", "km"), corpus=docs_dir)
    # one condition per generation call: no condition's batches (padding, bf16 rounding) depend on
    # another's; each shares its prompts' common start (ICL's document, the chat header) per slot
    assert calls == [({"base"}, True), ({"icl"}, True), ({"km"}, True)], calls
    for i, d in enumerate(ids):
        assert answers[d]["km"][0] == f"km{i} ctxnone First about {d}?"
        assert answers[d]["base"][1] == "nokm ctxnone Second?"
        assert answers[d]["icl"][0] == f"nokm ctx{d} First about {d}?"

    questions["beta"] = [{"q": "First about beta?", "a": ["km1"]}, {"q": "Second?", "a": ["ctxbeta"]}]
    (docs_dir / "questions.json").write_text(json.dumps(questions))
    scores = evaluate_corpus(str(out), tiny_model, ("base", "icl", "km"), corpus=docs_dir)
    assert scores["beta"] == {"base": [False, False], "icl": [False, True], "km": [True, False]}
    assert scores["alpha"] == {"base": [False, False], "icl": [False, False], "km": [False, False]}
    table = format_table(scores)
    assert "| beta | 0/2 | 1/2 | 1/2 |" in table and "**1/4 (25%)**" in table


def test_demo_needs_a_km_per_question_document(tiny_model, docs_dir, tmp_path):
    (docs_dir / "questions.json").write_text(json.dumps({"alpha": [{"q": "Which bell?", "a": ["Moro"]}]}))
    with pytest.raises(ValueError, match="no KM .*alpha"):
        answer_corpus(str(tmp_path / "no_kms"), tiny_model, ("km",), corpus=docs_dir)


def test_demo_reports_errors_in_one_line(tmp_path, capsys):
    """make demo ends with a line, not a traceback, on bad input (exit 2) as kmtrain does."""
    from kmtrain.demo import main

    (tmp_path / "a_file").write_text("")
    assert main(["--out", str(tmp_path / "a_file"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"make demo: error: --out {tmp_path / 'a_file'}: exists and is not a folder"


def test_in_fresh_process_runs_in_another_process_and_raises_its_errors_here():
    """make demo's evaluation and bench.indexing's runs go through in_fresh_process: the function
    runs in a new process (not this one), its result comes back, and its exception is raised here."""
    import os

    from kmtrain.demo import in_fresh_process

    assert in_fresh_process(os.getpid) != os.getpid()
    assert in_fresh_process(divmod, 17, 5) == (3, 2)
    with pytest.raises(ValueError, match="invalid literal"):
        in_fresh_process(int, "not a number")


def test_demo_indexes_a_corpus_then_prints_and_saves_its_table(tiny_model, docs_dir, tmp_path, capsys):
    """`make demo`'s whole job on a corpus of one's own (--corpus) and the tiny model: every document
    is indexed, those with questions are scored (in a fresh process) and the table printed and saved."""
    import re

    from kmtrain.demo import main

    questions = {"gamma": [{"q": "Who winds the clock tower of Avrin?", "a": ["Ida Solm", "Solm"]},
                           {"q": "How many faces has the clock tower of Avrin?", "a": ["seven", "7"]}],
                 "alpha": [{"q": "What is the bell of Lissen named?", "a": ["Moro"]}]}
    (docs_dir / "questions.json").write_text(json.dumps(questions))
    out = tmp_path / "demo"
    assert main(["--corpus", str(docs_dir), "--out", str(out), "--steps", "1", "--no-progress", "--set",
                 f"model={tiny_model}", "--set", "rank=4", "--set", "alpha=8", "--set", "max_new_tokens=10",
                 "--set", "chunk_tokens=64", "--set", "summaries_per_chunk=1", "--set", "qa_per_chunk=1"]) == 0
    printed = capsys.readouterr().out
    assert f"indexing {docs_dir} -> {out} (sdcd, 1 steps, " in printed
    assert all((out / d / "km.json").is_file() for d in DOCS)  # beta too: indexed, though it has no questions
    table = (out / "demo_results.md").read_text()
    assert table.strip() in printed
    rows = table.strip().splitlines()
    assert rows[0] == "| document | base (closed book) | ICL (document in context) | KM (closed book) |"
    assert re.fullmatch(r"\| gamma( \| [0-2]/2){3} \|", rows[2])
    assert re.fullmatch(r"\| alpha( \| [01]/1){3} \|", rows[3])
    assert re.fullmatch(r"\| \*\*overall\*\*( \| \*\*[0-3]/3 \(\d+%\)\*\*){3} \|", rows[4]) and len(rows) == 5


@pytest.mark.parametrize("questions, why", [
    (None, r"questions.json: no such file \(a corpus's questions go beside its documents"),
    ("[1, 2", r"questions.json: unreadable \(Expecting"),
    ([], r"questions.json: expected a non-empty object .*, got list \(empty\)"),
    ({"alpha": []}, r"questions.json: alpha: expected a non-empty list of questions"),
    ({"alpha": [{"q": "Which bell?", "a": [" ?! "]}]},
     r"questions.json: alpha\[0\]: needs \"a\", a non-empty list of accepted answers, each with a letter or digit "
     r"\(got \[' \?! '\]\)"),
    ({"alpha": [{"q": "", "a": "Moro"}], "delta": [{"q": "Which bell?", "a": ["Moro"]}]},
     r"3 problems in .*questions.json:\n  alpha\[0\]: needs \"q\", a non-empty question\n  alpha\[0\]: needs \"a\".*"
     r"\(got 'Moro'\)\n  questions for delta, which no document of .* is \(ids are file stems, sanitised\)$"),
    ({"alpha": [{"q": "Which bell?", "a": ["Moro"]}], "gamma?": [{"q": "How many faces?", "a": ["seven"]}]},
     r"questions.json: questions for gamma\? \(the document's id is gamma\), which no document of "),
])
def test_demo_refuses_a_corpus_whose_questions_cannot_be_scored_before_indexing(docs_dir, tmp_path, capsys, questions,
                                                                                why):
    """A question file that is missing, broken, or would score wrongly (an accepted answer that
    normalises to nothing matches every answer; a question for no document would vanish from the
    table) is named, problem by problem, before any indexing: exit 2, nothing written."""
    from kmtrain.demo import load_scored_questions, main

    if questions is not None:
        (docs_dir / "questions.json").write_text(questions if isinstance(questions, str) else json.dumps(questions))
    with pytest.raises(ValueError, match=why):
        load_scored_questions(docs_dir)
    assert main(["--corpus", str(docs_dir), "--out", str(tmp_path / "demo"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"make demo: error: {docs_dir / 'questions.json'}: ") or \
        err.startswith("make demo: error: 3 problems in ")
    assert not (tmp_path / "demo").exists()
