"""bench.km_answers: counting the synthetic targets that state an answer."""
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
