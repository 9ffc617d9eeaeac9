"""bench.quality_demo: which base model the KMs are scored on, and what the report says it was."""
import json

import pytest

import bench.quality_demo as quality_demo


def test_kms_are_scored_on_the_base_they_were_trained_on(tmp_path, monkeypatch):
    """With `--set model=...` the KMs are trained on that model, so base, ICL and the KMs must be
    answered with it too: before, the evaluation loaded the default SmolLM2 whatever the KMs' base
    was, and the report's title named SmolLM2. Indexing and the evaluation process are replaced by
    fakes that record what they were given (the real ones are covered by tests/test_demo.py)."""
    model = str(tmp_path / "my-model")
    indexed, evaluated = [], []

    def fake_index(docs, cfg):
        indexed.append((cfg.objective, cfg.model))
        # steps: what index() resolved (60, or 30 on a CPU without native bf16, when not given)
        km = {"base_model": "My-Model-1B", "train_seconds_wave": 1.0, "steps": 7}
        out = tmp_path / "work" / cfg.objective
        (out / ".work" / "doc").mkdir(parents=True, exist_ok=True)  # the stage files the next objective reuses
        (out / "doc" / "km.json").parent.mkdir(parents=True)
        (out / "doc" / "km.json").write_text(json.dumps(km))
        return [{"id": "doc"}]

    def fake_in_fresh_process(fn, out_dir, model_name, conditions, corpus):
        assert corpus == quality_demo.CORPUS
        evaluated.append((fn, model_name, conditions))
        return {"doc": {c: [True, False] for c in conditions}}

    monkeypatch.setattr(quality_demo, "index", fake_index)
    monkeypatch.setattr(quality_demo, "in_fresh_process", fake_in_fresh_process)
    report = tmp_path / "report.md"
    quality_demo.main(["--objectives", "sdcd", "lm", "--work", str(tmp_path / "work"), "--set", f"model={model}",
                       "--out", str(report)])

    assert indexed == [("sdcd", model), ("lm", model)]
    assert [(fn, m) for fn, m, _ in evaluated] == [(quality_demo.evaluate_corpus, model)] * 2
    assert [c for _, _, c in evaluated] == [("base", "icl", "km"), ("km",)]
    text = report.read_text()
    assert text.startswith("# Closed-book accuracy on the demo corpus (My-Model-1B)")
    assert "SmolLM2" not in text.splitlines()[0]
    assert "| KM (sdcd) | 7 | 1/2 |" in text  # the steps the KMs trained, from km.json


def test_a_corpus_of_ones_own_is_indexed_scored_and_described(tmp_path, monkeypatch, capsys):
    """--corpus DIR: its documents are indexed and scored on its questions.json, the report says
    which corpus and how many questions; a question file that cannot be scored stops the bench
    before any indexing (argparse's usage error, exit 2)."""
    corpus = tmp_path / "mine"
    corpus.mkdir()
    for d in ("north", "south"):
        (corpus / f"{d}.txt").write_text(f"The {d} gate opens at dawn.")
    questions = {"north": [{"q": "When?", "a": ["dawn"]}],
                 "south": [{"q": "When?", "a": ["dawn"]}, {"q": "What opens?", "a": ["gate"]}]}
    (corpus / "questions.json").write_text(json.dumps(questions))
    indexed, scored = [], []

    def fake_index(docs, cfg):
        indexed.append(docs)
        for d in questions:
            (tmp_path / "work" / cfg.objective / d).mkdir(parents=True, exist_ok=True)
            (tmp_path / "work" / cfg.objective / d / "km.json").write_text(
                json.dumps({"base_model": "M", "train_seconds_wave": 2.0, "steps": 3}))
        return [{"id": d} for d in questions]

    def fake_in_fresh_process(fn, out_dir, model_name, conditions, corpus):
        scored.append(corpus)
        return {d: {c: [True] * len(q) for c in conditions} for d, q in questions.items()}

    monkeypatch.setattr(quality_demo, "index", fake_index)
    monkeypatch.setattr(quality_demo, "in_fresh_process", fake_in_fresh_process)
    report = tmp_path / "report.md"
    quality_demo.main(["--objectives", "sdcd", "--corpus", str(corpus), "--work", str(tmp_path / "work"),
                       "--out", str(report)])
    assert indexed == [str(corpus)] and scored == [corpus]
    text = report.read_text()
    assert text.startswith("# Closed-book accuracy on mine (M)")
    assert f"- corpus: {corpus}, 2 documents with questions (1-2 each, 3 in all)" in text
    assert "| KM (sdcd) | 3 | 3/3 |" in text and "Per document (correct of 1-2):" in text
    assert "training s (one wave of 2 documents, from km.json)" in text

    indexed.clear()
    (corpus / "questions.json").write_text(json.dumps({"west": [{"q": "When?", "a": ["dawn"]}]}))
    with pytest.raises(SystemExit) as e:
        quality_demo.main(["--objectives", "sdcd", "--corpus", str(corpus), "--work", str(tmp_path / "work2")])
    assert e.value.code == 2 and indexed == []
    assert "questions for west, which no document of" in capsys.readouterr().err
