"""bench.cpu_heap: one setting with kmtrain's kept heap, one with glibc's defaults, side by side."""
import importlib
import re

import torch

import kmtrain.cpu_heap as cpu_heap
from bench.cpu_heap import SETTINGS, main, run_setting
from conftest import DOCS
from kmtrain import IndexConfig

TINY = ["docs_per_step=3", "examples_per_doc=1", "summaries_per_chunk=2", "qa_per_chunk=1", "max_new_tokens=10",
        "chunk_tokens=64", "gen_batch_size=8", "rank=4", "alpha=8", "device=cpu"]


class _FakeGlibc:
    """Records the malloc calls heap_kept makes, so that this process's own heap is not changed."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_only_the_kept_setting_touches_the_heap(tiny_model, docs_dir, tmp_path, monkeypatch):
    libc = _FakeGlibc()
    monkeypatch.setattr(cpu_heap, "_glibc", lambda: libc)
    overrides = dict(model=tiny_model, steps=3, **dict(IndexConfig.parse_override(s) for s in TINY))
    base = run_setting(False, str(docs_dir), str(tmp_path / "work"), overrides)
    assert libc.calls == []
    assert len(base["wall"]) == len(base["faults"]) == len(base["sys"]) == 2 and base["peak_rss"] > 0
    kept = run_setting(True, str(docs_dir), str(tmp_path / "work"), overrides)
    assert [c[0] for c in libc.calls] == ["mallopt", "mallopt", "mallopt", "malloc_trim"]
    assert len(kept["wall"]) == 2 and all(w > 0 for w in kept["wall"])
    # the glibc-defaults setting put the real heap_kept back for what runs after it
    assert importlib.import_module("kmtrain.index").heap_kept is cpu_heap.heap_kept


def test_report_has_both_settings_and_every_timed_step(tiny_model, docs_dir, tmp_path):
    assert len(DOCS) == 3  # one wave at docs_per_step=3
    out = tmp_path / "report.md"
    text = main(["--docs", str(docs_dir), "--work", str(tmp_path / "work"), "--steps", "4", "--set",
                 f"model={tiny_model}", *[x for s in TINY for x in ("--set", s)], "--out", str(out)])
    assert out.read_text() == text
    for name in SETTINGS:
        assert re.search(rf"^\| {re.escape(name)} \| [\d.]+ \| [\d.]+ \|", text, re.M), name
    assert re.search(r"^Kept heap: -?[\d.]+% less training wall time", text, re.M)
    steps = re.findall(r"^\| (\d+) \| [\d.]+ / [\d,]+ \| [\d.]+ / [\d,]+ \|$", text, re.M)
    assert steps == ["2", "3", "4"]
    assert f"torch: {torch.__version__}" in text
