"""bench.km_answers: counting the synthetic targets that state an answer."""
import json

import pytest

from bench.km_answers import count_class, coverage_class, target_coverage
from kmtrain.data import QA_PROMPT, SUMMARY_PROMPT, qa_target


def test_target_coverage_counts_each_kind_by_the_scoring_rule():
    items = [{"prompt": SUMMARY_PROMPT, "target": "Odile Marchetti founded it in 1893."},
             {"prompt": SUMMARY_PROMPT, "target": "Founded by the astronomer Marchetti."},
             {"prompt": SUMMARY_PROMPT, "target": "An observatory on Mount Vessary."},
             {"prompt": QA_PROMPT, "target": qa_target("Who founded it?", "Odile Marchetti")},
             {"prompt": QA_PROMPT, "target": qa_target("Where is it?", "Marchettiville")}]  # not a whole word
    assert target_coverage(items, ["Odile Marchetti", "Marchetti"]) == (2, 1)
    assert target_coverage(items, ["1893"]) == (1, 0)
    assert target_coverage(items, ["Saturn"]) == (0, 0)
    assert [coverage_class(*c) for c in [(2, 1), (1, 0), (0, 3), (0, 0)]] == \
        ["summaries and Q/A", "summaries only", "Q/A only", "no target"]
    assert [count_class(n) for n in (0, 1, 4, 5, 12)] == ["0", "1-4", "1-4", "5 or more", "5 or more"]


def test_trained_items_are_the_split_index_trained_on():
    import random

    from bench.km_answers import trained_items
    from kmtrain.config import IndexConfig
    from kmtrain.index import document_items

    rng = random.Random()
    items = [{"chunk": c, "prompt": SUMMARY_PROMPT, "target": f"target {c}.{k}"}
             for c in range(3) for k in range(rng.randint(2, 6))]
    seed = rng.randint(0, 1000)
    assert trained_items(items, {"seed": seed, "heldout": None}, "doc-a") == items
    cfg = IndexConfig(heldout_per_chunk=1, seed=seed, recite_tokens=0)  # the generated items only
    for doc in ("doc-a", "doc-b"):
        kept, held = document_items(cfg, doc, items)
        assert len(held) == 3  # one per chunk: the branch is exercised
        got = trained_items(items, {"seed": seed, "heldout": {"per_chunk": 1}}, doc)
        assert got == kept and not any(it in got for it in held)


def test_answers_come_from_the_base_the_kms_name(tmp_path, monkeypatch, capsys):
    """Without --model the KMs are answered on the base their km.json names (it was always the
    default SmolLM2, which misreads another base's KMs); --model still overrides; a folder with no
    KM is refused with its name. answer_corpus is a fake that records the model it was given."""
    import bench.km_answers as km_answers
    from kmtrain.demo import CORPUS

    doc = "saltmere_rowing"
    questions = json.loads((CORPUS / "questions.json").read_text())[doc]
    kms = tmp_path / "kms"
    (kms / doc).mkdir(parents=True)
    (kms / doc / "km.json").write_text(json.dumps({"base_model_path": "/models/other-base", "seed": 0,
                                                   "heldout": None, "objective": "sdcd", "steps": 3}))
    (kms / ".work" / doc).mkdir(parents=True)
    items = [{"chunk": 0, "prompt": SUMMARY_PROMPT, "target": "The course is 3.2 kilometres long."}]
    (kms / ".work" / doc / "synth.json").write_text(json.dumps({"items": items}))
    asked = []

    def fake_answer_corpus(out_dir, model_name, conditions):
        asked.append(model_name)
        return {doc: {"km": ["It is 3.2 kilometres."] + ["I do not know."] * (len(questions) - 1)}}

    monkeypatch.setattr(km_answers, "answer_corpus", fake_answer_corpus)
    km_answers.main(["--kms", str(kms), "--out", str(tmp_path / "a.md")])
    km_answers.main(["--kms", str(kms), "--model", "/models/chosen", "--out", str(tmp_path / "b.md")])
    assert asked == ["/models/other-base", "/models/chosen"]
    report = (tmp_path / "a.md").read_text()
    assert "| 1 | 0 | It is 3.2 kilometres. | yes |" in report  # the first question, scored and counted

    with pytest.raises(SystemExit):
        km_answers.main(["--kms", str(tmp_path / "empty")])
    assert "holds no KM" in capsys.readouterr().err and len(asked) == 2
