"""bench.quality_demo: which base model the KMs are scored on, and what the report says it was."""
import json

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

    def fake_in_fresh_process(fn, out_dir, model_name, conditions):
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
