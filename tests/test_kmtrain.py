"""kmtrain end to end on a tiny random Llama (tokenizer built offline), and on the bundled SmolLM2."""
import json
import os
import types
from pathlib import Path

import pytest
import torch

from kmtrain import DocumentError, IndexConfig, ask, index, load_documents
from kmtrain.data import chunk_tokens, parse_qa, sanitize_id
from kmtrain.data import ANSWER_PROMPT, QA_PROMPT, SUMMARY_PROMPT, qa_target
from kmtrain.teacher_cache import Example, TeacherCache, build_cache, build_examples, teacher_hiddens

DOCS = {
    "alpha": "The harbour town of Lissen keeps a bronze bell named Moro that rings at every high tide.",
    "beta": "Farmers of the Quell valley grow violet barley and sell it at the market of Dunmere each spring.",
    "gamma": "The clock tower of Avrin has seven faces, and its keeper Ida Solm winds it every Tuesday morning.",
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama and a byte-level BPE tokenizer with a chat template, saved to disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(DOCS.values()) * 3 + ["Question: Answer: Summarize the preceding passage."], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def docs_dir(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for k, v in DOCS.items():
        (d / f"{k}.txt").write_text(v)
    return d


def tiny_cfg(model, out, **kw):
    base = dict(out=str(out), model=model, steps=3, docs_per_step=2, examples_per_doc=1, summaries_per_chunk=2,
                qa_per_chunk=1, max_new_tokens=10, chunk_tokens=64, gen_batch_size=8, progress=False, rank=4, alpha=8)
    base.update(kw)
    return IndexConfig(**base)


def test_index_and_ask_end_to_end(tiny_model, docs_dir, tmp_path, capsys):
    out = tmp_path / "kms"
    summaries = index(str(docs_dir), tiny_cfg(tiny_model, out))
    assert sorted(s["id"] for s in summaries) == sorted(DOCS)
    for doc_id in DOCS:
        km = out / doc_id
        meta = json.loads((km / "km.json").read_text())
        assert (km / "adapter_model.safetensors").is_file() and (km / "adapter_config.json").is_file()
        assert meta["objective"] == "sdcd" and meta["steps"] == 3 and meta["teacher_cache"]["bytes"] > 0
        assert meta["base_model_sha256"] and len(meta["document_sha256"]) == 64
        assert set(meta["final_loss"]) == {"loss", "kl", "hidden"} and all(v == v for v in meta["final_loss"].values())
    # the KM loads with plain PEFT
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out / "alpha"))
    assert any("lora_A" in n for n, _ in peft.named_parameters())
    answers = ask([(str(out / "alpha"), "Which bell?"), (str(out / "beta"), "What grows?"), (None, "Hello?")],
                  model=tiny_model, max_new_tokens=5)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # the CLI pairs each question with the --km before it, in command-line order, in one batch
    from kmtrain.cli import _ask_pairs, main

    argv = ["ask", "--km", str(out / "alpha"), "Which bell?", "--max-new-tokens", "5", "--km", str(out / "beta"),
            "What grows?", "--model", tiny_model, "Hello?"]
    assert _ask_pairs(argv) == [(str(out / "alpha"), "Which bell?"), (str(out / "beta"), "What grows?"), (None, "Hello?")]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for (km, q), a in zip(_ask_pairs(argv), answers):
        assert f"[{km or 'base'}] {q}\n  {a}" in printed


def test_resume_after_interruption(tiny_model, docs_dir, tmp_path, monkeypatch):
    import importlib

    kindex = importlib.import_module("kmtrain.index")  # the module, not the function of the same name

    out = tmp_path / "kms"
    cfg = tiny_cfg(tiny_model, out, docs_per_step=2)
    real = kindex.train_wave
    calls = {"n": 0}

    def crash_on_second_wave(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    monkeypatch.setattr(kindex, "train_wave", crash_on_second_wave)
    with pytest.raises(KeyboardInterrupt):
        index(str(docs_dir), cfg)
    finished = [d for d in DOCS if (out / d / "km.json").is_file()]
    assert len(finished) == 2  # the first wave of two was exported before the crash
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())
    stamps = {d: (out / d / "adapter_model.safetensors").stat().st_mtime_ns for d in finished}
    monkeypatch.setattr(kindex, "train_wave", real)
    summaries = index(str(docs_dir), cfg)
    status = {s["id"]: s["status"] for s in summaries}
    assert all(status[d] == "already done" for d in finished)
    assert all((out / d / "km.json").is_file() for d in DOCS)
    assert stamps == {d: (out / d / "adapter_model.safetensors").stat().st_mtime_ns for d in finished}


def test_changed_document_is_retrained_others_kept(tiny_model, docs_dir, tmp_path):
    out = tmp_path / "kms"
    cfg = tiny_cfg(tiny_model, out, steps=2)
    index(str(docs_dir), cfg)
    stamps = {d: (out / d / "adapter_model.safetensors").stat().st_mtime_ns for d in DOCS}
    changed = next(iter(DOCS))
    path = docs_dir / f"{changed}.txt"
    path.write_text(path.read_text() + " One more sentence about the harbour.")
    status = {s["id"]: s["status"] for s in index(str(docs_dir), cfg)}
    assert status[changed] == "trained" and all(status[d] == "already done" for d in DOCS if d != changed)
    meta = json.loads((out / changed / "km.json").read_text())
    assert meta["document_sha256"] == {d.id: d.sha256 for d in load_documents(str(docs_dir))}[changed]
    for d in DOCS:
        now = (out / d / "adapter_model.safetensors").stat().st_mtime_ns
        assert (now != stamps[d]) == (d == changed)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_km_does_not_depend_on_batch_mates(tiny_model, tmp_path, amp):
    """Same seeds and data order whoever shares the batch. In fp32 the KMs agree to float rounding
    of the batched matmuls. Under bf16 a batch mate changes the padded width and so the rounding of
    bf16 activations, which AdamW carries into the weights; there the check is that this noise
    stays far below what a real dependency (another seed) does to the same KM."""
    from safetensors.torch import load_file

    def train(ids, out, seed=0):
        docs = tmp_path / f"docs_{out}"
        docs.mkdir()
        for k in ids:
            (docs / f"{k}.txt").write_text(DOCS[k])
        index(str(docs), tiny_cfg(tiny_model, tmp_path / out, docs_per_step=2, steps=4, amp=amp, seed=seed))
        return load_file(str(tmp_path / out / "alpha" / "adapter_model.safetensors"))

    def worst_delta_diff(x, y):
        """Largest relative difference, over modules, of what the KM adds to a layer (B @ A)."""
        worst = 0.0
        for k in x:
            if "lora_A" in k:
                kb = k.replace("lora_A", "lora_B")
                dx, dy = x[kb] @ x[k], y[kb] @ y[k]
                worst = max(worst, float((dx - dy).norm() / dx.norm().clamp_min(1e-12)))
        return worst

    with_beta = train(["alpha", "beta"], "ab")
    with_gamma = train(["alpha", "gamma"], "ag")
    assert with_beta.keys() == with_gamma.keys()
    mates = worst_delta_diff(with_beta, with_gamma)
    if amp == "off":
        assert mates < 1e-4, mates
    else:
        # measured: batch-mate noise 4e-2 at worst (median 2e-2) against O(1) for another seed
        other_seed = worst_delta_diff(with_beta, train(["alpha", "beta"], "ab_seed1", seed=1))
        assert mates < 0.1 and other_seed > 10 * mates, (mates, other_seed)


def test_loss_with_cache_equals_loss_without(tiny_model, docs_dir, tmp_path):
    a = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "cached", steps=3))
    b = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "fresh", steps=3, teacher_cache=False))
    la = {s["id"]: s["final_loss"]["loss"] for s in a}
    lb = {s["id"]: s["final_loss"]["loss"] for s in b}
    for k in la:
        assert abs(la[k] - lb[k]) <= 1e-3 * abs(lb[k]) + 1e-5, (k, la[k], lb[k])


@pytest.mark.parametrize("objective", ["ddcd", "lm", "pit"])
def test_other_objectives_run(tiny_model, docs_dir, tmp_path, objective):
    out = tmp_path / objective
    index(str(docs_dir), tiny_cfg(tiny_model, out, objective=objective, steps=2, ddcd_window_tokens=16,
                                  ddcd_windows_per_chunk=2))
    meta = json.loads((out / "gamma" / "km.json").read_text())
    assert meta["objective"] == objective and meta["final_loss"]["loss"] > 0


def test_ddcd_windows_on_a_short_chunk_differ():
    """A chunk shorter than the window must still give distinct windows whose distilled tails cover
    more than the chunk's last tokens (a fixed full-chunk window made every DDCD example the same)."""
    ids = list(range(100, 300))
    cfg = IndexConfig(ddcd_window_tokens=512, ddcd_windows_per_chunk=16)
    tok = types.SimpleNamespace(bos_token_id=7, eos_token_id=8)
    ex = build_examples("ddcd", tok, ["x"], [ids], [], cfg, seed=3)
    assert len(ex) == 16
    tails = {tuple(e.student_ids) for e in ex}
    assert len(tails) > 8
    ends = {ids.index(e.student_ids[-1]) for e in ex}
    assert min(ends) < len(ids) - 50
    for e in ex:
        # both start with the start token, and the first distilled position is after it (position 0
        # holds the attention sink, which must not be pulled toward a mid-window teacher state)
        assert e.student_ids[0] == 7 and e.teacher_ids[0] == 7 and e.s_start == 1
        # the teacher window ends with the student's tokens, which it sees after its context
        assert e.teacher_ids[e.t_start:] == e.student_ids[e.s_start:] and e.n == len(e.student_ids) - 2
        win = e.teacher_ids[1:]
        assert win == ids[ids.index(win[0]):ids.index(win[0]) + len(win)]


@pytest.mark.parametrize("qa_format", ["pair", "chat", "both"])
def test_sdcd_qa_formats(tiny_model, qa_format):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    items = [{"chunk": 0, "prompt": SUMMARY_PROMPT, "target": "a summary"},
             {"chunk": 0, "prompt": QA_PROMPT, "target": qa_target("who rows", "the crew"),
              "question": "who rows", "answer": "the crew"},
             {"chunk": 0, "prompt": QA_PROMPT, "target": qa_target("when built", "in 1901")}]  # no fields: parsed
    ex = build_examples("sdcd", tok, ["the chunk text"], [[1, 2]], items, IndexConfig(qa_format=qa_format), seed=0)
    decoded = [tok.decode(e.student_ids[e.s_start + 1:]) for e in ex]
    pair = [d for d in decoded if "Question:" in d and "Answer:" in d]
    chat = [d for d in decoded if "Answer:" not in d and ("the crew" in d or "in 1901" in d)]
    assert len(ex) == {"pair": 3, "chat": 3, "both": 5}[qa_format]
    assert len(pair) == (0 if qa_format == "chat" else 2) and len(chat) == (0 if qa_format == "pair" else 2)
    for e in ex:  # teacher = chunk + the same user turn + the same reply; only the prompt differs
        assert e.teacher_ids[e.t_start + 1:] == e.student_ids[e.s_start + 1:]
        assert "the chunk text" in tok.decode(e.teacher_ids[:e.t_start])
    if qa_format != "pair":
        prompts = [tok.decode(e.student_ids[:e.s_start + 1]) for e in ex]
        assert sum(ANSWER_PROMPT.format(question="who rows") in p for p in prompts) == 1


@pytest.mark.parametrize("dtype,tol", [("bf16", 1e-2), ("fp8", 8e-2), ("fp32", 1e-6)])
def test_teacher_cache_round_trip(tiny_model, tmp_path, dtype, tol):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    g = torch.Generator().manual_seed(1)
    examples = [Example([1, 2, 3], 0, n, torch.randint(3, 300, (n + 5,), generator=g).tolist(), 4) for n in (3, 7, 1)]
    cfg = IndexConfig(cache_dtype=dtype, cache_layers=(0,) if dtype == "fp8" else None)
    path = tmp_path / "c.safetensors"
    build_cache(model, examples, path, 2, cfg, pad_id=0, batch_size=2)
    cache = TeacherCache(path)
    assert len(cache) == 3 and cache.layers == ([0, 1] if dtype != "fp8" else [0, 1])
    for i, e in enumerate(examples):
        (ref,) = teacher_hiddens(model, [e], cache.layers, pad_id=0)
        h, norms = cache.get(i)
        assert h.shape == ref.shape
        assert ((h.float() - ref).norm() / ref.norm()) < tol
        assert torch.allclose(norms, ref.abs().sum(dim=(1, 2)), rtol=1e-5)


def test_teacher_cache_shares_prefixes(tiny_model, tmp_path, monkeypatch):
    """Targets of one chunk and prompt share the teacher's prefix pass; the cached states must be
    those of each example run whole (float64 reference), in the examples' order."""
    import copy

    from transformers import AutoModelForCausalLM

    import kmtrain.teacher_cache as tc

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ref_model = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()  # noqa: E731
    p1, p2 = rand(9), rand(4)
    examples = []
    for prefix, n, extra in ((p1, 5, 0), (p2, 3, 2), (p1, 1, 0), (None, 4, 0), (p1, 8, 3), (p2, 2, 0)):
        head = prefix if prefix is not None else rand(6)
        tail = rand(n + extra + 1)
        # the last prefix position is distilled too (t_start = len(prefix)), as in sdcd examples
        examples.append(Example([1, 2], 0, n, head + tail, len(head)))
    calls = []
    real = tc.shared_prefix_hiddens
    monkeypatch.setattr(tc, "shared_prefix_hiddens", lambda m, prefix, ex, *a: calls.append(len(ex)) or real(m, prefix, ex, *a))
    path = tmp_path / "c.safetensors"
    build_cache(model, examples, path, 2, IndexConfig(cache_dtype="fp32"), pad_id=0, batch_size=2)
    assert sorted(calls) == [2, 3]  # two shared prefixes (3 and 2 examples), one example alone
    cache = TeacherCache(path)
    for i, e in enumerate(examples):
        (ref,) = teacher_hiddens(ref_model, [e], [0, 1], pad_id=0)
        h, norms = cache.get(i)
        assert h.shape == ref.shape == (2, e.n, 32)
        assert ((h.double() - ref).norm() / ref.norm()) < 1e-5
        assert torch.allclose(norms, ref.abs().sum(dim=(1, 2)), rtol=1e-5)
    with pytest.raises(ValueError, match="prefix"):
        tc.shared_prefix_hiddens(model, p2, [examples[0]], [0, 1], 0)


def test_bad_inputs_name_the_file(tmp_path, tiny_model):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "ok.txt").write_text("fine text")
    (d / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DocumentError, match="latin.txt: not valid UTF-8"):
        load_documents(str(d))
    (d / "latin.txt").unlink()
    (d / "empty.md").write_text("   \n")
    with pytest.raises(DocumentError, match="empty.md.*empty"):
        load_documents(str(d))
    (d / "empty.md").unlink()
    (d / "ok.md").write_text("same stem")
    with pytest.raises(DocumentError, match="duplicate document id 'ok'"):
        load_documents(str(d))
    j = tmp_path / "docs.jsonl"
    j.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(DocumentError, match=r"docs.jsonl:2: duplicate document id 'a'"):
        load_documents(str(j))
    j.write_text('{"id": "a", "text": "x"}\nnot json\n')
    with pytest.raises(DocumentError, match=r"docs.jsonl:2: invalid JSON"):
        load_documents(str(j))
    # nothing is written when the input is bad
    out = tmp_path / "never"
    with pytest.raises(DocumentError):
        index(str(d), tiny_cfg(tiny_model, out))
    assert not out.exists()
    with pytest.raises(ValueError, match="objective"):
        IndexConfig(objective="xyz").validate()


def test_ids_chunks_and_qa_parsing():
    assert sanitize_id("My Doc/../x?.txt") == "My_Doc_.._x_.txt"  # one path component, never a traversal
    assert sanitize_id("../../etc") == "etc"
    assert len(sanitize_id("a" * 300)) <= 100
    chunks = chunk_tokens(list(range(100)), 40, 0.1)
    assert chunks[0] == list(range(40)) and chunks[1][0] == 36 and chunks[-1][-1] == 99
    assert parse_qa("Question: Who? Answer: Ida.\nQuestion: When?\nAnswer: Tuesday") == [("Who?", "Ida."), ("When?", "Tuesday")]
    assert parse_qa("no pairs here") == []


def test_cli_errors(tmp_path, capsys):
    from kmtrain.cli import main

    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("")
    assert main(["index", str(d), "--out", str(tmp_path / "o")]) == 2
    assert "a.txt" in capsys.readouterr().err
    assert main(["ask", "--km", str(tmp_path / "nope"), "q?"]) == 2
    assert main(["ask", "q?", "--km", str(tmp_path / "x")]) == 2
    assert "has no question after it" in capsys.readouterr().err
    assert main(["ask", "--kms", "x", "q?"]) == 2
    assert "unknown option '--kms'" in capsys.readouterr().err


def test_cli_flags_to_config():
    from kmtrain.cli import _config_from_args, build_parser

    parse = lambda *argv: _config_from_args(build_parser().parse_args(["index", "docs", "--out", "o", *argv]))  # noqa: E731
    cfg = parse()
    assert cfg == IndexConfig(out="o").validate()  # no flags: exactly the library defaults
    paper = parse("--preset", "paper")
    assert (paper.steps, paper.temperature, paper.summaries_per_chunk, paper.lr) == (1500, 1.0, 8, 1e-3)
    assert parse("--preset", "paper", "--lr", "2e-3").lr == 2e-3
    mixed = parse("--preset", "paper", "--steps", "40", "--temperature", "0.7", "--qa-format", "chat")
    assert (mixed.steps, mixed.temperature, mixed.qa_format, mixed.max_new_tokens) == (40, 0.7, "chat", 768)
    assert parse("--base-dtype", "bf16").base_dtype == "bf16"


def test_base_dtype_resolution():
    from kmtrain.index import _base_dtype

    cpu, gpu, bf16 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16
    assert _base_dtype(IndexConfig(), cpu, None) == torch.float32  # fp32 training: fp32 weights
    assert _base_dtype(IndexConfig(), gpu, bf16) == bf16  # under bf16 autocast: bf16 weights
    assert _base_dtype(IndexConfig(), cpu, bf16) == bf16  # on a CPU too
    assert _base_dtype(IndexConfig(), gpu, None) == torch.float32  # --amp off keeps fp32
    assert _base_dtype(IndexConfig(base_dtype="fp32"), gpu, bf16) == torch.float32
    assert _base_dtype(IndexConfig(base_dtype="bf16"), cpu, None) == bf16
    with pytest.raises(ValueError, match="base_dtype"):
        IndexConfig(base_dtype="fp16").validate()


def test_amp_resolution_follows_native_bf16(monkeypatch):
    import importlib

    index_mod = importlib.import_module("kmtrain.index")  # the package re-exports index(), the function

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    for native in (True, False):
        monkeypatch.setattr(index_mod, "native_bf16", lambda device, native=native: native)
        assert index_mod._amp_dtype(IndexConfig(), cpu) == (bf16 if native else None)
        assert index_mod._amp_dtype(IndexConfig(amp="off"), cpu) is None  # off wins
        assert index_mod._amp_dtype(IndexConfig(amp="bf16"), cpu) == bf16  # asked for: honoured


def test_decoder_hidden_states_are_the_causal_lm_ones(tiny_model):
    """The training and teacher passes skip the lm_head: their hidden states must be exactly the
    causal LM's (the last one post-norm, what the lm_head reads), padding mask included."""
    from kmtrain.models import decoder_hidden_states, load_model

    model, _, _, _ = load_model(tiny_model)
    ids = torch.randint(0, 300, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = decoder_hidden_states(model, ids, mask)
    assert len(got) == model.config.num_hidden_layers == len(ref.hidden_states) - 1
    for a, b in zip(got, ref.hidden_states[1:]):
        assert torch.equal(a, b)
    logits = got[-1] @ model.get_output_embeddings().weight.T
    assert torch.allclose(logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_native_bf16_matches_the_cpu_flags():
    """oneDNN's answer agrees with what the CPU says it has (Linux /proc/cpuinfo)."""
    from kmtrain.models import native_bf16

    assert native_bf16(torch.device("meta")) is False
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this OS to compare with")
    flags = set(cpuinfo.read_text().split())
    assert native_bf16(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.slow
def test_smollm2_one_document_end_to_end(tmp_path):
    """Index one short document on the bundled SmolLM2 with few steps; the KM loads with plain PEFT
    and raises the log-likelihood of a correct answer to a question about the document."""
    pytest.importorskip("gguf")
    from peft import PeftModel

    from kmtrain.data import chat_prompt_ids
    from kmtrain.evaluate import question_prompt
    from kmtrain.models import load_model

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "tower.txt").write_text(
        "The Avrin clock tower has seven faces. Its keeper, Ida Solm, winds it every Tuesday morning. "
        "The tower was built in 1702 by the mason Oskar Brell, and its bell is called Big Marta.")
    cfg = IndexConfig(out=str(tmp_path / "kms"), steps=10, docs_per_step=1, examples_per_doc=2, summaries_per_chunk=3,
                      qa_per_chunk=1, max_new_tokens=64, progress=False)
    index(str(docs), cfg)
    model, tok, _, _ = load_model("smollm2-135m")
    peft = PeftModel.from_pretrained(model, str(tmp_path / "kms" / "tower")).eval()

    def answer_logprob(use_km: bool) -> float:
        prompt = chat_prompt_ids(tok, question_prompt("Who is the keeper of the Avrin clock tower?"))
        ans = tok("Ida Solm", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + ans])
        with torch.no_grad():
            if use_km:
                logits = peft(input_ids=ids).logits
            else:
                with peft.disable_adapter():
                    logits = peft(input_ids=ids).logits
        lp = logits[0, len(prompt) - 1:-1].log_softmax(-1)
        return float(lp.gather(1, torch.tensor(ans)[:, None]).sum())

    assert answer_logprob(True) > answer_logprob(False)


@pytest.mark.parametrize("n", [0, 5, 37])
def test_chunked_lm_loss_matches_float64_cross_entropy(n):
    """The LM/PIT loss without a [N, V] tensor: values and dh against a float64 reference, with
    chunks that do not divide N."""
    from kmtrain.train import chunked_lm_loss

    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, 24, generator=g, requires_grad=True)
    w = torch.randn(101, 24, generator=g)
    t = torch.randint(0, 101, (n,), generator=g)
    got = chunked_lm_loss(h, w, t, chunk=8)
    h64 = h.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h64 @ w.double().t(), t, reduction="none")
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    if n:
        weights = torch.rand(n, generator=g)
        (got * weights).sum().backward()
        (ref * weights.double()).sum().backward()
        torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)
