"""Synthetic targets: what the generator reads for each chunk, and how its outputs become items."""
import math
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


def test_only_the_prompts_of_requests_made_are_tokenized(monkeypatch):
    """A long document makes a few of its requests (requests_to_make): the others' prompts are never
    tokenized (a 48 MB text spent 122 s on prompts for 2 million requests to make 29), and the ones
    made are what they are when all are made, in the same order, one array per distinct prompt."""
    from kmtrain.synth import made_positions

    read, sent = [], []

    class Recording(_CharTokenizer):
        def __call__(self, text, add_special_tokens=False, split_special_tokens=False):
            read.append(text)
            return super().__call__(text, add_special_tokens)

    def fake_generate(model, tok, prompts, cfg, seeds, progress=None):
        sent.append((list(prompts), list(seeds)))
        return ["Question: q?\nAnswer: a" if QA_PROMPT in "".join(map(chr, p)) else "s" for p in prompts]

    monkeypatch.setattr(synth, "_generate_hf", fake_generate)
    rng = random.Random()
    chunks = ["\n\n".join(_paragraphs(rng, 3)) for _ in range(40)]
    cfg = IndexConfig(summaries_per_chunk=4, qa_per_chunk=2, focus_parts=2)
    synthesize(None, Recording(), {"doc": chunks}, cfg)
    (all_prompts, all_seeds), = sent
    assert len(all_prompts) == 240
    read.clear()
    sent.clear()
    got = synthesize(None, Recording(), {"doc": chunks}, cfg, requests={"doc": 10})["doc"]
    (prompts, seeds), = sent
    made = made_positions(240, 10, cfg.seed, "doc")
    assert got["requested"] == 10 and got["of_requests"] == 240
    assert [list(p) for p in prompts] == [list(all_prompts[i]) for i in made]
    assert seeds == [all_seeds[i] for i in made]
    assert len(read) == len({tuple(p) for p in prompts}) <= 10  # each distinct prompt tokenized once
    assert len({id(p) for p in prompts}) == len({tuple(p) for p in prompts})  # and shared by its requests


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


def test_requests_to_make_keeps_one_share_of_sources_and_nested_subsets():
    """A document's requests are all made while its sources fit sources_to_keep; past that, the share
    that keeps that many (rounded up). The requests made are a random subset in request order, and
    fewer are a subset of more."""
    from kmtrain.synth import MIN_SOURCES, made_positions, requests_to_make, sources_to_keep

    assert sources_to_keep(1) == MIN_SOURCES and sources_to_keep(120) == 180
    assert requests_to_make(18, 5, 120) == 18 and requests_to_make(170, 10, 120) == 170  # 180 sources: all
    assert requests_to_make(171, 10, 120) == math.ceil(171 * 180 / 181) == 171
    assert requests_to_make(540, 700, 120) == math.ceil(540 * 180 / 1240) == 79
    assert requests_to_make(540, 0, 120) == 180 and requests_to_make(0, 900, 120) == 0
    assert requests_to_make(30, 30, 1) == 16  # at least MIN_SOURCES sources, however few the draws
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 400)
        a, b = sorted(rng.sample(range(n + 1), 2)) if n > 1 else (0, 1)
        few, more = made_positions(n, a, 7, "doc"), made_positions(n, b, 7, "doc")
        assert few == sorted(set(few)) and len(few) == a and len(more) == b and set(few) <= set(more) <= set(range(n))
    assert made_positions(10, 10, 7, "doc") == list(range(10))
    assert made_positions(400, 40, 7, "doc") != made_positions(400, 40, 7, "other")  # drawn per document
    assert made_positions(400, 40, 7, "doc") != list(range(40))  # not the first chunks' requests


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


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_row_sampler_draws_from_the_tempered_nucleus(top_p):
    """Frequencies of 20000 draws against the exact probabilities (float64), within 5 standard errors;
    top_p=1 (--top-p 1) draws from the whole tempered distribution, through noise on every token."""
    from kmtrain.synth import RowSampler

    scores = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
    T, n = 0.7, 20000
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
    assert keep.all() == (top_p == 1.0)  # the cases differ: 0.9 leaves the tail out


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


def test_a_model_that_lets_padding_in_generates_each_row_alone(tiny_model):
    """RWKV takes an attention mask but ignores it: left padding runs through its state, and a
    document's targets and answers depended on its batch-mates (its logits 13% off with 3 pad tokens).
    Such a model is found at the first generation (left_padding_ok) and batches prompts of one length
    only: the same targets alone and with other documents, the same answers alone and batched, and
    no padded batch, while the requests of a chunk (one prompt) still go together. The tiny Llama,
    which masks its padding, keeps its batches."""
    from transformers import AutoTokenizer, RwkvConfig, RwkvForCausalLM

    from conftest import DOCS
    from kmtrain.evaluate import generate_answers, question_prompt
    from kmtrain.models import left_padding_ok, load_model

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    rwkv = RwkvForCausalLM(RwkvConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                      attention_hidden_size=32, intermediate_size=64)).eval()
    assert not left_padding_ok(rwkv) and left_padding_ok(load_model(tiny_model)[0])
    cfg = IndexConfig(summaries_per_chunk=2, qa_per_chunk=1, max_new_tokens=8, gen_batch_size=4)
    calls = []
    generate = rwkv.generate

    def spy(*a, **kw):
        calls.append(kw["attention_mask"])
        return generate(*a, **kw)

    rwkv.generate = spy
    alone = synthesize(rwkv, tok, {"gamma": [DOCS["gamma"]]}, cfg)["gamma"]
    together = synthesize(rwkv, tok, {k: [v] for k, v in DOCS.items()}, cfg.replace(gen_batch_size=3))["gamma"]
    assert alone == together
    assert all(bool(m.all()) for m in calls) and max(len(m) for m in calls) > 1
    asked = [question_prompt(q, DOCS[k]) for k, q in (("alpha", "Which bell?"), ("beta", "Which market?"))]
    assert generate_answers(rwkv, tok, asked, max_new_tokens=5, batch_size=2) == \
        [generate_answers(rwkv, tok, [q], max_new_tokens=5, batch_size=1)[0] for q in asked]


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


# A stand-in for vllm (not installable on a CPU machine), as a package on disk: the generator runs
# vLLM in a child process, which imports it from the parent's sys.path. It logs what it is handed,
# one JSON line per event, to $FAKE_VLLM_LOG; $FAKE_VLLM_FAIL_AT / $FAKE_VLLM_SLEEP_AT /
# $FAKE_VLLM_DIE_AT make that generate() call fail, hang, or end the process at once.
FAKE_VLLM = """
import atexit, json, os, time
from types import SimpleNamespace


def _log(**rec):
    with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
        f.write(json.dumps({"pid": os.getpid(), **rec}) + "\\n")


atexit.register(_log, event="exit")  # runs only if the process unwinds (SIGTERM handled, not SIGKILL)


class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class LLM:
    def __init__(self, model, seed, **kw):
        self.calls = 0
        _log(event="load", model=model, seed=seed, kw=kw)

    def generate(self, prompts, params):
        self.calls += 1
        if self.calls == int(os.environ.get("FAKE_VLLM_FAIL_AT", 0)):
            raise MemoryError("fake vllm: no room for the KV cache")
        if self.calls == int(os.environ.get("FAKE_VLLM_DIE_AT", 0)):
            os._exit(134)  # as a CUDA abort or a native crash ends it: no traceback, no exit handlers
        if self.calls == int(os.environ.get("FAKE_VLLM_SLEEP_AT", 0)):
            _log(event="asleep")
            time.sleep(120)
        _log(event="generate", prompts=prompts, params=[vars(p) for p in params])
        out = SimpleNamespace(text=" Question: Who rings Moro?\\nAnswer: The tide. ")
        return [SimpleNamespace(outputs=[out]) for _ in prompts]
"""


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """The fake vllm's log (its events, read when called), after putting it on sys.path."""
    import json
    import sys

    site = tmp_path / "fake_site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    log = tmp_path / "fake_vllm.jsonl"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie, as an orphan stays where PID 1 does not reap, counts)."""
    import importlib
    from pathlib import Path

    if not Path("/proc").is_dir():  # macOS: the check index uses for a dead run's temporaries
        return not importlib.import_module("kmtrain.index")._alive(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")  # the state field follows the command's name


def test_vllm_generator_wiring(tiny_model, docs_dir, tmp_path, monkeypatch, fake_vllm, capfd):
    """--generator vllm: vLLM runs in a child process that is gone when generation ends. It is handed
    a folder it can load (an alias resolves to its converted folder), every request as token ids
    with its own seed and the run's sampling settings, and its outputs become the synthetic items."""
    import json
    import os
    import sys

    from conftest import tiny_cfg
    from kmtrain import index
    from kmtrain.models import resolve_model

    # the model named as the user may name it, "~/tiny": vLLM gets the folder, not the name
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "tiny").symlink_to(tiny_model)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = tiny_cfg("~/tiny", tmp_path / "kms", steps=1, generator="vllm", recite_tokens=0, temperature=0.7,
                   trust_remote_code=True)
    index(str(docs_dir), cfg)
    events = fake_vllm()
    load, calls = events[0], [e for e in events if e["event"] == "generate"]
    assert load["event"] == "load" and events[-1]["event"] == "exit"
    assert load["model"] == resolve_model("~/tiny")[0] == str(tmp_path / "home" / "tiny") and load["seed"] == cfg.seed
    assert {e["pid"] for e in events} == {load["pid"]} != {os.getpid()}  # one other process,
    assert _gone(load["pid"]) and "vllm" not in sys.modules  # ended, and vllm never imported here
    assert "Traceback" not in capfd.readouterr().err  # it ended on its own, not stopped while exiting
    assert len(calls) == 1  # fewer requests than VLLM_REQUESTS_PER_CALL
    prompts, params = calls[0]["prompts"], calls[0]["params"]
    n = 3 * (cfg.summaries_per_chunk + cfg.qa_per_chunk)  # three one-chunk documents
    assert len(prompts) == len(params) == n
    assert all(isinstance(p["prompt_token_ids"], list) and p["prompt_token_ids"] for p in prompts)
    assert len({p["seed"] for p in params}) == n  # one seed per request
    # vLLM is sized for the longest request, not the model's whole context (it would refuse to start
    # where its KV cache cannot hold that, as beside the trainer's model on a smaller GPU)
    assert load["kw"]["max_model_len"] == max(len(p["prompt_token_ids"]) for p in prompts) + cfg.max_new_tokens
    assert load["kw"]["trust_remote_code"] is True  # as the run was told: vLLM loads the model's own code too
    assert {(p["temperature"], p["top_p"], p["max_tokens"]) for p in params} == {(0.7, cfg.top_p, cfg.max_new_tokens)}
    synth_rec = json.loads((tmp_path / "kms" / ".work" / "alpha" / "synth.json").read_text())
    assert synth_rec["qa_pairs"] == cfg.qa_per_chunk and synth_rec["dropped"] == 0
    assert {it["target"] for it in synth_rec["items"]} == {"Question: Who rings Moro?\nAnswer: The tide.",
                                                             "\nQuestion: Who rings Moro?\nAnswer: The tide."}
    # without vllm (None in sys.modules: not importable, even where it is installed) the option
    # fails at once, before any model loads
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ValueError, match="--generator vllm needs vllm installed"):
        IndexConfig(generator="vllm").validate()


def test_a_vllm_failure_keeps_the_documents_it_finished(tiny_model, docs_dir, tmp_path, monkeypatch, fake_vllm,
                                                       capsys):
    """vLLM failing in its process (here at its second call, one document a call) is a GeneratorError:
    one line, and the process's traceback beside it (the CLI prints both, then how to resume, exit 1).
    The documents generated before it are saved, and a re-run generates only the rest."""
    from conftest import tiny_cfg
    from kmtrain import index
    from kmtrain.cli import _RESUME, reporting_errors

    cfg = tiny_cfg(tiny_model, tmp_path / "kms", steps=1, generator="vllm", recite_tokens=0)
    per_doc = cfg.summaries_per_chunk + cfg.qa_per_chunk
    monkeypatch.setattr(synth, "VLLM_REQUESTS_PER_CALL", per_doc)
    monkeypatch.setenv("FAKE_VLLM_FAIL_AT", "2")
    said = ("MemoryError: fake vllm: no room for the KV cache; lower --max-new-tokens or --chunk-tokens, or use "
            "--generator hf")
    with pytest.raises(synth.GeneratorError) as e:
        index(str(docs_dir), cfg)
    assert str(e.value) == f"vLLM generation failed after {per_doc} of {3 * per_doc} requests: {said}"
    assert e.value.traceback.startswith("Traceback") and "in generate" in e.value.traceback
    work = tmp_path / "kms" / ".work"
    assert [d for d in ("alpha", "beta", "gamma") if (work / d / "synth.json").exists()] == ["alpha"]
    assert not (tmp_path / "kms" / "alpha").exists()  # nothing trained yet
    first = fake_vllm()
    assert first[-1]["event"] == "exit" and _gone(first[-1]["pid"])

    capsys.readouterr()
    assert reporting_errors(lambda: index(str(docs_dir), cfg)) == 1  # as the CLI runs it: beta, then gamma fails
    err = capsys.readouterr().err.rstrip()
    trace, line = err.rsplit("\n", 1)
    assert trace.startswith("Traceback") and "fake vllm: no room for the KV cache" in trace
    assert line == f"kmtrain: error: vLLM generation failed after {per_doc} of {2 * per_doc} requests: {said}{_RESUME}"
    assert [d for d in ("alpha", "beta", "gamma") if (work / d / "synth.json").exists()] == ["alpha", "beta"]

    monkeypatch.delenv("FAKE_VLLM_FAIL_AT")
    second = fake_vllm()
    index(str(docs_dir), cfg)
    again = [e for e in fake_vllm()[len(second):] if e["event"] == "generate"]
    assert [len(e["prompts"]) for e in again] == [per_doc]  # gamma's alone
    assert all((tmp_path / "kms" / d / "km.json").exists() for d in ("alpha", "beta", "gamma"))


def test_a_vllm_generation_stopped_early_ends_its_process(fake_vllm, monkeypatch):
    """Closing the generator mid-way (a Ctrl-C, a failure while saving) stops the vLLM process with
    SIGTERM, which it handles by unwinding (so vLLM's own exit handlers run), at once."""
    import time

    monkeypatch.setattr(synth, "VLLM_REQUESTS_PER_CALL", 2)
    monkeypatch.setenv("FAKE_VLLM_SLEEP_AT", "2")
    cfg = IndexConfig(generator="vllm", max_new_tokens=4)
    texts = synth._generate_vllm("some/model", [[1, 2], [3], [4, 5], [6]], cfg, [7, 8, 9, 10])
    assert [next(texts), next(texts)] == ["Question: Who rings Moro?\nAnswer: The tide."] * 2
    while fake_vllm()[-1]["event"] != "asleep":  # in its second call
        time.sleep(0.1)
    start = time.monotonic()
    texts.close()
    events = fake_vllm()
    assert time.monotonic() - start < 20 and _gone(events[0]["pid"])
    assert [e["event"] for e in events] == ["load", "generate", "asleep", "exit"]


def test_a_vllm_process_that_dies_says_its_exit_code_and_how_far_it_got(fake_vllm, monkeypatch):
    """vLLM's process ending with no word (a native crash, the kernel's OOM killer) is a
    GeneratorError naming its exit code and the requests answered; the texts before it are kept."""
    monkeypatch.setattr(synth, "VLLM_REQUESTS_PER_CALL", 2)
    monkeypatch.setenv("FAKE_VLLM_DIE_AT", "2")
    texts = synth._generate_vllm("some/model", [[1, 2], [3], [4, 5], [6]], IndexConfig(generator="vllm"),
                                 [7, 8, 9, 10])
    assert [next(texts), next(texts)] == ["Question: Who rings Moro?\nAnswer: The tide."] * 2
    with pytest.raises(synth.GeneratorError, match=r"^the vLLM generator's process ended \(exit code 134\) after 2 "
                                                   r"of 4 requests; its output is above$"):
        next(texts)
    events = fake_vllm()
    assert [e["event"] for e in events] == ["load", "generate"] and _gone(events[0]["pid"])


def test_the_vllm_process_ends_when_its_parent_is_killed(fake_vllm, tmp_path):
    """A kill -9 of the indexing process (no `finally` runs there) still ends the vLLM process,
    which would otherwise go on holding the GPU and block the resumed run's own vLLM."""
    import os
    import signal
    import subprocess
    import sys
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's (vLLM runs on Linux only)")
    code = ("import sys; sys.path[:0] = sys.argv[1:]\n"
            "from kmtrain.config import IndexConfig\n"
            "from kmtrain.synth import _generate_vllm\n"
            "print(list(_generate_vllm('some/model', [[1, 2]], IndexConfig(generator='vllm'), [3])))\n")
    env = {**os.environ, "FAKE_VLLM_SLEEP_AT": "1"}
    parent = subprocess.Popen([sys.executable, "-c", code, *sys.path], env=env)
    deadline = time.monotonic() + 120
    while not fake_vllm() or fake_vllm()[-1]["event"] != "asleep":
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.2)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    child = fake_vllm()[0]["pid"]
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(child)
    assert [e["event"] for e in fake_vllm()] == ["load", "asleep", "exit"]  # it unwound (SIGTERM)
