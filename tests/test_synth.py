"""Synthetic targets: what the generator reads for each chunk, and how its outputs become items."""
import random

import pytest
import torch

from kmtrain import synth
from kmtrain.config import IndexConfig
from kmtrain.data import FACTS_PROMPT, QA_PROMPT, SUMMARY_PROMPT, chat_prompt_ids
from kmtrain.synth import focus_sources, split_heldout, synthesize


def _paragraphs(rng, n):
    words = ["barge", "canal", "lantern", "granite", "spaniel", "harbour", "copper", "meadow"]
    return [f"Paragraph {i} opens here. " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) + "."
            for i in range(n)]


def test_focus_sources_cover_the_chunk_in_order():
    rng = random.Random()
    for _ in range(50):
        paras = _paragraphs(rng, rng.randint(1, 9))
        chunk = "\n\n".join(paras)
        parts = rng.randint(0, 5)
        sources = focus_sources(chunk, parts)
        assert sources[0] == chunk  # the whole chunk is always read first
        runs = sources[1:]
        if parts < 2 or len(paras) < 2:
            assert runs == []
            continue
        assert 2 <= len(runs) <= min(parts, len(paras))
        lead = "Paragraph 0 opens here."
        # runs after the first are led by the chunk's first sentence; the first opens the chunk itself
        assert runs[0].startswith(paras[0])
        bodies = [runs[0]] + [r[len(lead) + 2:] for r in runs[1:]]
        assert all(r.startswith(lead + "\n\n") for r in runs[1:])
        # every paragraph in exactly one run, in the chunk's order
        assert "\n\n".join(bodies) == chunk


def test_focus_sources_balance_runs_by_length():
    paras = ["A b. " + "x " * 100, "C d. " + "y " * 100, "E f. " + "z " * 100, "G h. " + "w " * 100]
    sources = focus_sources("\n\n".join(p.strip() for p in paras), 2)
    assert len(sources) == 3
    assert sources[1] == paras[0].strip() + "\n\n" + paras[1].strip()
    assert sources[2] == "A b.\n\n" + paras[2].strip() + "\n\n" + paras[3].strip()


class _CharTokenizer:
    """No chat template: chat_prompt_ids falls back to 'User: ...\\nAssistant:' as characters."""
    chat_template = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=False, split_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


@pytest.mark.parametrize("focus_parts", [0, 3])
def test_requests_cycle_over_sources_and_outputs_become_items(monkeypatch, focus_parts):
    chunk = "\n\n".join(_paragraphs(random.Random(), 4))
    seen = []

    def fake_generate(model, tokenizer, prompts, cfg, seeds, progress=None):
        outs = []
        for i, p in enumerate(prompts):
            text = "".join(map(chr, p))
            seen.append(text)
            if QA_PROMPT in text:  # every other Q/A output is unparseable and must be dropped, not fatal
                outs.append("no pair here" if i % 2 else f"Question: q{i}?\nAnswer: a{i}")
            else:
                outs.append(f"summary {i}")
        return outs

    monkeypatch.setattr(synth, "_generate_hf", fake_generate)
    cfg = IndexConfig(summaries_per_chunk=8, qa_per_chunk=4, facts_per_chunk=3, focus_parts=focus_parts)
    got = synthesize(None, _CharTokenizer(), {"doc": [chunk]}, cfg)["doc"]
    sources = focus_sources(chunk, focus_parts)
    summary_reads = [t for t in seen if SUMMARY_PROMPT in t]
    qa_reads = [t for t in seen if QA_PROMPT in t]
    facts_reads = [t for t in seen if FACTS_PROMPT in t]
    assert len(summary_reads) == 8 and len(qa_reads) == 4 and len(facts_reads) == 3
    for reads in (summary_reads, qa_reads, facts_reads):
        for i, t in enumerate(reads):
            assert t.startswith("User: " + sources[i % len(sources)] + "\n\n")
    # the teacher reads the whole chunk with the standard prompt, whatever the generator read
    assert all(it["chunk"] == 0 for it in got["items"])
    assert sum(it["prompt"] == SUMMARY_PROMPT for it in got["items"]) == 8
    # a fact list is distilled as written, after its own prompt
    facts = [it for it in got["items"] if it["prompt"] == FACTS_PROMPT]
    assert len(facts) == 3 and all(it["target"].startswith("summary ") for it in facts)
    assert got["requested"] == 15
    assert got["qa_pairs"] == len([it for it in got["items"] if it["prompt"] == QA_PROMPT])
    assert got["qa_pairs"] + got["dropped"] == 4 and got["dropped"] >= 1


def test_a_kind_asked_for_zero_times_is_never_tokenized(monkeypatch):
    """Off by default, fact lists must cost nothing: no chunk is tokenized with their prompt."""
    read = []

    class Recording(_CharTokenizer):
        def __call__(self, text, add_special_tokens=False, split_special_tokens=False):
            read.append(text)
            return super().__call__(text, add_special_tokens)

    monkeypatch.setattr(synth, "_generate_hf", lambda model, tok, prompts, cfg, seeds, progress=None:
                        ["Question: q?\nAnswer: a" if QA_PROMPT in "".join(map(chr, p)) else "s" for p in prompts])
    got = synthesize(None, Recording(), {"doc": ["One fact. Another fact."]}, IndexConfig(summaries_per_chunk=2, qa_per_chunk=1))
    assert got["doc"]["requested"] == 3
    assert read and not any(FACTS_PROMPT in t for t in read)
    assert any(SUMMARY_PROMPT in t for t in read) and any(QA_PROMPT in t for t in read)


def test_a_generation_cut_inside_a_character_loses_only_that_character(monkeypatch):
    """The token cap can stop a generation between the byte tokens of one character, which decode
    to U+FFFD: it was distilled as part of the target."""
    monkeypatch.setattr(synth, "_generate_hf", lambda model, tok, prompts, cfg, seeds, progress=None:
                        ["Question: 钟楼?\nAnswer: 港口\ufffd" if QA_PROMPT in "".join(map(chr, p)) else "大麦 \ufffd\ufffd"
                         for p in prompts])
    got = synthesize(None, _CharTokenizer(), {"doc": ["One fact."]}, IndexConfig(summaries_per_chunk=1, qa_per_chunk=1))
    assert [(it["prompt"], it["target"]) for it in got["doc"]["items"]] == [
        (SUMMARY_PROMPT, "大麦"), (QA_PROMPT, "\nQuestion: 钟楼?\nAnswer: 港口")]


def test_negative_focus_parts_or_target_counts_are_refused():
    with pytest.raises(ValueError, match="focus_parts"):
        IndexConfig(focus_parts=-1).validate()
    with pytest.raises(ValueError, match=r"none negative.*\(12, 6, -1\)"):
        IndexConfig(facts_per_chunk=-1).validate()
    with pytest.raises(ValueError, match="at least one synthetic target"):
        IndexConfig(summaries_per_chunk=0, qa_per_chunk=0).validate()
    IndexConfig(summaries_per_chunk=0, qa_per_chunk=0, facts_per_chunk=1).validate()  # fact lists alone will do


def test_split_heldout_per_chunk_keeps_a_training_target():
    rng = random.Random(3)
    items = [{"chunk": rng.randrange(5), "target": f"t{i}"} for i in range(40)] + [{"chunk": 9, "target": "alone"}]
    for per_chunk in (1, 2, 100):
        train, held = split_heldout(items, per_chunk, seed=7)
        assert sorted(train + held, key=items.index) == items  # a partition
        assert train == [it for it in items if it in train] and held == [it for it in items if it in held]  # order kept
        for c in {it["chunk"] for it in items}:
            n = sum(it["chunk"] == c for it in items)
            assert sum(it["chunk"] == c for it in held) == min(per_chunk, n - 1)
        assert split_heldout(items, per_chunk, seed=7) == (train, held)  # the seed decides
    assert split_heldout(items, 1, seed=8)[1] != split_heldout(items, 1, seed=7)[1]
    assert split_heldout(items, 0, seed=7) == (items, [])


def test_row_sampler_keeps_the_top_p_nucleus_of_hugging_face():
    from transformers import TopPLogitsWarper

    from kmtrain.synth import RowSampler

    g = torch.Generator().manual_seed(0)
    for top_p in (0.3, 0.8, 0.95):
        # peaked rows (nucleus inside the 8 candidates) and flat ones (the full-sort fallback)
        scores = torch.randn(4, 300, generator=g) * torch.tensor([[6.0], [3.0], [0.5], [0.1]])
        for candidates in (8, 256, 1000):
            ours = RowSampler([1, 2, 3, 4], temperature=0.5, top_p=top_p, candidates=candidates)(None, scores)
            hf = TopPLogitsWarper(top_p)(None, scores / 0.5)
            assert torch.equal(torch.isinf(ours), torch.isinf(hf)), (top_p, candidates)


def test_row_sampler_adds_each_rows_own_noise_to_its_nucleus_step_after_step():
    """The sampler's output, exactly: scores / T inside Hugging Face's top-p nucleus plus the
    float64 Gumbel noise of the row's own stream (V uniforms per step) rounded to fp32, -inf
    outside; over several steps, for batches whose nuclei lie among the candidates (noise drawn
    for those only) and batches with a flat row (the full-row path)."""
    from transformers import TopPLogitsWarper

    from kmtrain.synth import RowSampler

    g = torch.Generator().manual_seed(1)
    T, top_p, V, seeds = 0.5, 0.8, 500, [11, 12, 13]
    for spread, candidates in (([8.0, 5.0, 4.0], 16), ([8.0, 5.0, 0.05], 16), ([8.0, 5.0, 4.0], V)):
        sampler = RowSampler(seeds, temperature=T, top_p=top_p, candidates=candidates)
        streams = [torch.Generator().manual_seed(s) for s in seeds]
        for step in range(3):
            scores = torch.randn(3, V, generator=g) * torch.tensor(spread)[:, None]
            u = torch.stack([torch.rand(V, generator=s, dtype=torch.float64) for s in streams])
            noise = (-torch.log(-torch.log(u.clamp(1e-300, 1 - 1e-16)))).float()
            expected = TopPLogitsWarper(top_p)(None, scores / T) + noise
            got = sampler(None, scores)
            assert torch.equal(got, expected), (spread, candidates, step)


def test_row_sampler_draws_from_the_tempered_nucleus():
    """Frequencies of 20000 draws against the exact probabilities (float64), within 5 standard errors."""
    from kmtrain.synth import RowSampler

    scores = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
    T, top_p, n = 0.7, 0.9, 20000
    sampler = RowSampler([123], temperature=T, top_p=top_p)
    counts = torch.zeros(6, dtype=torch.float64)
    for _ in range(n):
        counts[int(sampler(None, scores).argmax())] += 1
    p = torch.softmax(scores[0].double() / T, dim=0)
    keep = (p.cumsum(0) - p) < top_p  # already sorted: the nucleus is a prefix
    q = torch.where(keep, p, torch.zeros_like(p))
    q = q / q.sum()
    se = (q * (1 - q) / n).sqrt()
    assert torch.all((counts / n - q).abs() <= 5 * se + 1e-12), (counts / n, q)
    assert counts[~keep].sum() == 0


def test_synthetic_targets_do_not_depend_on_batch_mates(tiny_model):
    """A document's targets come from its requests' own seeds: the same alone, with other
    documents, and at another generation batch size (fp32, so the logits agree to rounding)."""
    from kmtrain.models import load_model

    from conftest import DOCS

    model, tok, _, _ = load_model(tiny_model)
    cfg = IndexConfig(summaries_per_chunk=3, qa_per_chunk=2, max_new_tokens=12, gen_batch_size=4)
    alone = synthesize(model, tok, {"gamma": [DOCS["gamma"]]}, cfg)["gamma"]
    together = synthesize(model, tok, {k: [v] for k, v in DOCS.items()}, cfg.replace(gen_batch_size=3))["gamma"]
    assert alone == together
    assert len({it["target"] for it in alone["items"] if it["prompt"] == SUMMARY_PROMPT}) > 1  # samples, not one greedy text
    other_seed = synthesize(model, tok, {"gamma": [DOCS["gamma"]]}, cfg.replace(seed=1))["gamma"]
    assert other_seed["items"] != alone["items"]


def test_shared_prompt_cache_generates_what_a_batched_prefill_does(tiny_model):
    """Each distinct prompt's keys and values computed once and left-padded into the batch's cache
    (prompts of different lengths, repeated, one going on into the next batch) give the same samples
    as running every row's prompt in the batched prefill (fp32)."""
    from kmtrain.models import cache_kwarg, load_model, prompt_cache
    from kmtrain.synth import _generate_hf

    from conftest import DOCS

    model, tok, _, _ = load_model(tiny_model)
    cfg = IndexConfig(max_new_tokens=10, gen_batch_size=4)
    prompts = [chat_prompt_ids(tok, DOCS[k] + "\n\n" + SUMMARY_PROMPT) for k in ("alpha", "alpha", "beta", "gamma",
                                                                               "gamma", "gamma", "alpha")]
    prompts.insert(3, chat_prompt_ids(tok, "Short.\n\n" + SUMMARY_PROMPT))
    assert len({len(p) for p in prompts}) >= 3
    # the cache itself: next-token logits from it equal a left-padded forward of the whole prompts
    batch = prompts[:4]
    width = max(map(len, batch))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        cache = prompt_cache(model, [list(p) for p in batch], width, {}, new_tokens=4)
        step = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos[:, -1:],
                     **{cache_kwarg(model): cache}).logits[:, -1]
    torch.testing.assert_close(step, whole, rtol=1e-5, atol=1e-5)

    seeds = list(range(100, 100 + len(prompts)))
    shared = list(_generate_hf(model, tok, prompts, cfg, seeds))
    assert shared == list(_generate_hf(model, tok, prompts, cfg, seeds, share_prompts=False))
    assert len(set(shared)) > 2 and all(shared)


def test_vllm_generator_wiring(tiny_model, docs_dir, tmp_path, monkeypatch):
    """--generator vllm, with a stand-in for vllm (not installable on a CPU machine): it is handed a
    folder it can load (an alias resolves to its converted folder), every request as token ids with
    its own seed and the run's sampling settings, and its outputs become the synthetic items."""
    import importlib.machinery
    import json
    import sys
    import types

    from conftest import tiny_cfg
    from kmtrain import IndexConfig, index
    from kmtrain.models import resolve_model

    seen = {}

    class LLM:
        def __init__(self, model, seed, **kw):
            seen["model"], seen["seed"], seen["kw"] = model, seed, kw

        def generate(self, prompts, params):
            seen["prompts"], seen["params"] = prompts, params
            out = types.SimpleNamespace(text=" Question: Who rings Moro?\nAnswer: The tide. ")
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    def sampling_params(**kw):
        return types.SimpleNamespace(**kw)

    fake = types.ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    fake.LLM, fake.SamplingParams = LLM, sampling_params
    monkeypatch.setitem(sys.modules, "vllm", fake)
    # the model named as the user may name it, "~/tiny": vLLM gets the folder, not the name
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "tiny").symlink_to(tiny_model)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = tiny_cfg("~/tiny", tmp_path / "kms", steps=1, generator="vllm", recite_tokens=0, temperature=0.7)
    index(str(docs_dir), cfg)
    assert seen["model"] == resolve_model("~/tiny")[0] == str(tmp_path / "home" / "tiny") and seen["seed"] == cfg.seed
    n = 3 * (cfg.summaries_per_chunk + cfg.qa_per_chunk)  # three one-chunk documents
    assert len(seen["prompts"]) == len(seen["params"]) == n
    assert all(isinstance(p["prompt_token_ids"], list) and p["prompt_token_ids"] for p in seen["prompts"])
    assert len({p.seed for p in seen["params"]}) == n  # one seed per request
    assert {(p.temperature, p.top_p, p.max_tokens) for p in seen["params"]} == {(0.7, cfg.top_p, cfg.max_new_tokens)}
    synth = json.loads((tmp_path / "kms" / ".work" / "alpha" / "synth.json").read_text())
    assert synth["qa_pairs"] == cfg.qa_per_chunk and synth["dropped"] == 0
    assert {it["target"] for it in synth["items"]} == {"Question: Who rings Moro?\nAnswer: The tide.",
                                                         "\nQuestion: Who rings Moro?\nAnswer: The tide."}
    # without vllm (None in sys.modules: not importable, even where it is installed) the option
    # fails at once, before any model loads
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ValueError, match="--generator vllm needs vllm installed"):
        IndexConfig(generator="vllm").validate()
