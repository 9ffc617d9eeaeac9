"""kmtrain.teacher_cache: token layouts of the objectives, the cache's round trip and its shared-prefix build."""
import types

import pytest
import torch

from kmtrain import IndexConfig
from kmtrain.data import ANSWER_PROMPT, QA_PROMPT, SUMMARY_PROMPT, qa_target
from kmtrain.teacher_cache import (Example, TeacherCache, build_cache, build_examples, cache_bytes, select_layers,
                                   teacher_hiddens)


@pytest.mark.parametrize("dtype,tol", [("bf16", 1e-2), ("fp8", 8e-2), ("fp32", 1e-6)])
def test_teacher_cache_round_trip(tiny_model, tmp_path, dtype, tol):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():  # a peaked teacher distribution (the random model's is near uniform)
        model.get_output_embeddings().weight.mul_(30)
    g = torch.Generator().manual_seed(1)
    examples = [Example([1, 2, 3], 0, n, torch.randint(3, 300, (n + 5,), generator=g).tolist(), 4) for n in (3, 7, 1)]
    cfg = IndexConfig(cache_dtype=dtype, cache_layers=(0,) if dtype == "fp8" else None)
    path = tmp_path / "c.safetensors"
    build_cache(model, examples, path, 2, cfg, pad_id=0, batch_size=2)
    cache = TeacherCache(path)
    assert len(cache) == 3 and cache.layers == [0, 1]  # fp8 asked for layer 0: the last is always kept
    # the estimate index checks free disk space with, before the teacher runs: the file less its header
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size - header == cache_bytes(examples, 2, model.config.hidden_size, cfg)
    errors = []  # (the stored statistics', those from the rounded layer's) largest error of e_t, per example
    for i, e in enumerate(examples):
        (ref,) = teacher_hiddens(model, [e], cache.layers, pad_id=0)
        h, norms = cache.get(i)
        assert h.shape == ref.shape
        assert ((h.float() - ref).norm() / ref.norm()) < tol
        assert torch.allclose(norms, ref.abs().sum(dim=(1, 2)), rtol=1e-5)
        # the KL's statistics: those of the last layer as the teacher computed it, not as the cache
        # rounds it (so the KL is exact under any cache dtype), against float64
        w = model.get_output_embeddings().weight.detach().double()
        z = ref[-1].double() @ w.T
        p = z.softmax(-1)
        assert p.max() > 0.2  # peaked enough for a wrong temperature or layer to show
        emb, negent = cache.kl_stats(i)
        assert emb.dtype == negent.dtype == torch.float32
        # ref is the teacher's whole-sequence pass, the cache the shared-prefix one: the same states to
        # fp32 rounding, which the peaked softmax (logits up to ~|z|) magnifies
        torch.testing.assert_close(emb.double(), p @ w, rtol=1e-4, atol=1e-5)
        # negent = e.h - lse: a difference of logit-sized terms
        torch.testing.assert_close(negent.double(), (p * p.log()).sum(-1), rtol=0, atol=4e-6 * float(z.abs().max()))
        p_rounded = (h[-1].double() @ w.T).softmax(-1)
        errors.append(((emb.double() - p @ w).abs().max(), (p_rounded @ w - p @ w).abs().max()))
    if dtype == "fp8":  # from the rounded layer, the statistics would be this far off: farther than the above
        stored, rounded = map(max, zip(*errors))
        assert rounded > 10 * stored, errors


def _no_full_kv_model(kind: str, vocab: int):
    """A tiny model whose cache does not keep every key: a 16-token sliding window (Mistral v0.1's kind,
    Gemma 3's), a Mamba layer's recurrent state (Granite 4.0's hybrids), no cache at all (GPT-1), or
    a config that turns the cache off (MPT's use_cache=False)."""
    from transformers import (GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM, MistralConfig,
                              MistralForCausalLM, MptConfig, MptForCausalLM, OpenAIGPTConfig, OpenAIGPTLMHeadModel)

    torch.manual_seed(0)
    if kind == "off":
        return MptForCausalLM(MptConfig(vocab_size=vocab, d_model=32, n_heads=4, n_layers=2, max_seq_len=512,
                                        initializer_range=0.2)).eval()  # words to compare, not empty answers
    if kind == "none":
        return OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=vocab, n_positions=512, n_embd=32, n_layer=2,
                                                    n_head=4)).eval()
    if kind == "sliding":
        return MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=8, sliding_window=16, initializer_range=0.2)).eval()
    return GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=32,
        mamba_d_state=16, mamba_n_groups=1, num_local_experts=0, shared_intermediate_size=64)).eval()


@pytest.mark.parametrize("kind", ["sliding", "recurrent", "none", "off"])
def test_models_whose_cache_keeps_not_every_key_reuse_none(tiny_model, tmp_path, kind):
    """A sliding-window layer (Gemma 3: 512 tokens at 1B, Mistral v0.1) keeps only its window's last
    keys; a Mamba or linear-attention layer (Granite 4.0 hybrids, Qwen3-Next) keeps a state, no keys;
    GPT-1 keeps no cache at all; MPT's config turns it off. A prefix run once and reused then gave the
    teacher wrong states without a word (sliding: max error 7.5 on this model, the cache of a Gemma 3
    at 2048-token chunks), or failed (recurrent: "no attribute 'keys'"; none: "KeyError: 'cache'"), and
    the generator and ICL answers failed, or (off: generate fed the whole sequence on top of the reused
    cache) sampled from wrong logits. Such prefixes now run whole: the cache holds each example's own
    states, and generation and answers are those of the plain batched prefill."""
    from transformers import AutoTokenizer

    from conftest import DOCS
    from kmtrain.data import SUMMARY_PROMPT, chat_prompt_ids
    from kmtrain.evaluate import generate_answers, question_prompt
    from kmtrain.models import kv_reuse_ok
    from kmtrain.synth import _generate_hf

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = _no_full_kv_model(kind, len(tok))
    if kind == "sliding":
        assert kv_reuse_ok(model, 15) and not kv_reuse_ok(model, 16)  # the layer keeps its window less one
    else:
        assert not kv_reuse_ok(model, 1)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, len(tok), (30,), generator=g).tolist()  # two targets after one 30-token prefix
    examples = [Example([1, 2], 0, n, prefix + torch.randint(3, len(tok), (n + 2,), generator=g).tolist(), 31)
                for n in (4, 7)]
    path = tmp_path / "c.safetensors"
    build_cache(model, examples, path, 2, IndexConfig(cache_dtype="fp32"), pad_id=0)
    cache = TeacherCache(path)
    for i, e in enumerate(examples):
        (ref,) = teacher_hiddens(model, [e], cache.layers, pad_id=0)
        torch.testing.assert_close(cache.get(i)[0], ref, rtol=1e-5, atol=1e-5)
    # generation: prompts of ~60 tokens, past the window
    cfg = IndexConfig(max_new_tokens=6, gen_batch_size=3)
    prompts = [chat_prompt_ids(tok, DOCS[k] + "\n\n" + SUMMARY_PROMPT) for k in ("alpha", "alpha", "beta", "gamma")]
    assert min(map(len, prompts)) > 16
    seeds = list(range(len(prompts)))
    assert list(_generate_hf(model, tok, prompts, cfg, seeds)) == list(_generate_hf(model, tok, prompts, cfg, seeds,
                                                                                      share_prompts=False))
    # ICL answers: a document's questions share it as their prefix
    model.generation_config.suppress_tokens = tok.all_special_ids  # words to compare, not the end of turn
    asked = [question_prompt(q, DOCS["alpha"]) for q in ("Which bell?", "Where?", "When?")]
    shared = generate_answers(model, tok, asked, max_new_tokens=5, batch_size=2, share_prefixes=True)
    assert shared == generate_answers(model, tok, asked, max_new_tokens=5, batch_size=2) and any(shared)  # words


def test_soft_capped_model_caches_its_last_layer_for_the_kl(tmp_path):
    """A model that soft-caps its logits (Gemma 2) has no KL statistics (they need logits linear in h):
    its cache holds the teacher's last layer as computed, in the LM head's dtype, in their place, sized
    as cache_bytes says; a kl_hidden of another shape is refused as damage."""
    from safetensors.torch import load_file, save_file
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=0.5)).eval()
    examples = [Example([1, 2, 3], 0, n, list(range(3, n + 8)), 4) for n in (3, 6)]
    cfg = IndexConfig(cache_dtype="bf16")
    path = tmp_path / "c.safetensors"
    build_cache(model, examples, path, 2, cfg, pad_id=0)
    cache = TeacherCache(path, examples=2, verify=True)
    assert cache.has_kl_hidden and not cache.has_kl_stats
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size - header == cache_bytes(examples, 2, 32, cfg, kl_hidden_bytes=4)
    for i, e in enumerate(examples):
        (ref,) = teacher_hiddens(model, [e], cache.layers, pad_id=0)
        kl = cache.kl_hidden(i)
        assert kl.dtype == torch.float32 and kl.shape == ref[-1].shape
        torch.testing.assert_close(kl, ref[-1], rtol=1e-5, atol=1e-6)  # unrounded: the bf16 hidden is not
        assert (cache.get(i)[0][-1].float() - ref[-1]).abs().max() > 1e-4
    tensors = load_file(str(path))
    save_file({**tensors, "kl_hidden": tensors["kl_hidden"][:, :5].contiguous()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"damaged teacher cache \(kl_hidden \(9, 5\), expected \(9, 32\)\)"):
        TeacherCache(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("dtype", ["bf16", "fp8", "fp32"])
def test_teacher_cache_builds_under_bf16_autocast(tiny_model, tmp_path, dtype):
    """index builds the cache under the training's bf16 autocast: each cache dtype must build there
    (an fp8 concatenation once failed under it) and store the teacher's states within bf16 compute."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    examples = [Example([1, 2, 3], 0, n, list(range(3 + n, 2 * n + 11)), 4) for n in (3, 5)]
    path = tmp_path / "c.safetensors"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        build_cache(model, examples, path, 2, IndexConfig(cache_dtype=dtype), pad_id=0)
    cache = TeacherCache(path, examples=2, verify=True)
    for i, e in enumerate(examples):
        (ref,) = teacher_hiddens(model, [e], [0, 1], pad_id=0)  # fp32
        h, _ = cache.get(i)
        assert h.shape == ref.shape
        # measured: 2e-3 (bf16 compute, any cache but fp8), 2.6e-2 (fp8)
        assert ((h.float() - ref).norm() / ref.norm()) < (6e-2 if dtype == "fp8" else 1e-2), i


def test_damaged_teacher_cache_is_refused(tiny_model, tmp_path):
    """A truncated file, a file of another run's example count, tensors whose shapes disagree, or
    (verify=True) any changed byte of the tensors raise ValueError naming the file (index rebuilds
    the cache on it)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    examples = [Example([1, 2, 3], 0, n, list(range(3, n + 8)), 4) for n in (3, 5)]
    path = tmp_path / "c.safetensors"
    build_cache(model, examples, path, 2, IndexConfig(), pad_id=0)
    assert len(TeacherCache(path, examples=2)) == 2
    with pytest.raises(ValueError, match="damaged teacher cache .*2 examples, the run has 3"):
        TeacherCache(path, examples=3)
    tensors = load_file(str(path))
    bad = tmp_path / "bad.safetensors"
    save_file({**tensors, "norms": tensors["norms"][:1]}, str(bad))
    with pytest.raises(ValueError, match=r"damaged teacher cache \(norms \(1, 2\), expected \(2, 2\)\)"):
        TeacherCache(bad)
    tokens, H = tensors["hidden"].shape[1:]
    assert tensors["tok_offsets"].tolist() == [0, 3, 8] and tensors["kl_embedding"].shape == (tokens, H)
    for name, value, why in [
            ("tok_offsets", torch.tensor([0, 8, 3]), r"token offsets \[0, 8, 3\]\.\.\. are not a rising list from 0"),
            ("tok_offsets", torch.tensor([1, 3, 8]), r"token offsets \[1, 3, 8\]\.\.\. are not a rising list from 0"),
            ("hidden", tensors["hidden"][:, 1:].contiguous(), rf"hidden \(2, 7, {H}\), expected \(2, 8, H\)"),
            ("kl_embedding", tensors["kl_embedding"][1:].contiguous(),
             rf"kl_embedding \(7, {H}\) / kl_neg_entropy \(8,\), expected \(8, {H}\) / \(8,\)"),
            ("kl_neg_entropy", tensors["kl_neg_entropy"][:, None].contiguous(),
             rf"kl_embedding \(8, {H}\) / kl_neg_entropy \(8, 1\), expected")]:
        save_file({**tensors, name: value}, str(bad))
        with pytest.raises(ValueError, match=rf"{bad}: damaged teacher cache \({why}"):
            TeacherCache(bad)
    save_file({k: v for k, v in tensors.items() if k != "tok_offsets"}, str(bad))
    with pytest.raises(ValueError, match="no tok_offsets tensor"):
        TeacherCache(bad)
    bad.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{bad}: damaged teacher cache"):
        TeacherCache(bad)
    # verify: the bytes against the content hash recorded when the file was written
    assert len(TeacherCache(path, examples=2, verify=True)) == 2
    from safetensors import safe_open

    from kmtrain.teacher_cache import tensors_sha256

    with safe_open(str(path), framework="pt") as f:  # read in many small blocks: the same digest
        assert tensors_sha256({k: f.get_slice(k) for k in f.keys()}, block_bytes=64) == f.metadata()["content_sha256"]
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    for at in (header, (header + len(data)) // 2, len(data) - 1):  # first, middle and last byte of the tensors
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        bad.write_bytes(bytes(flipped))
        TeacherCache(bad, examples=2)  # parses, shapes agree: only the hash can tell
        with pytest.raises(ValueError, match=r"damaged teacher cache \(content sha256 \w+ is not the \w+ recorded"):
            TeacherCache(bad, examples=2, verify=True)
    save_file(tensors, str(bad))  # the same tensors without the hash in the header (an earlier version's file)
    with pytest.raises(ValueError, match="no content_sha256 in its header"):
        TeacherCache(bad, verify=True)
    with pytest.raises(ValueError, match="no examples to cache"):
        build_cache(model, [], tmp_path / "none.safetensors", 2, IndexConfig(), pad_id=0)
    # fp8: one scale per example and layer; a file with one per layer (the format before) is refused
    build_cache(model, examples, path, 2, IndexConfig(cache_dtype="fp8"), pad_id=0)
    tensors = load_file(str(path))
    assert tensors["hidden_scale"].shape == (2, 2)
    save_file({**tensors, "hidden_scale": tensors["hidden_scale"].amax(dim=1)}, str(bad))
    with pytest.raises(ValueError, match=r"damaged teacher cache \(hidden_scale \(2,\), expected \(2, 2\)\)"):
        TeacherCache(bad)


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


def test_pieces_with_prompts_of_their_own_share_their_chunk(tiny_model, tmp_path, monkeypatch):
    """Recitation pieces each have their own cue, so no two share chunk + prompt; they must still
    share the chunk before the cue (one prefix pass per chunk), but not the short chat template
    that examples of different chunks have in common. States as each example run whole (float64)."""
    import copy

    from transformers import AutoModelForCausalLM

    import kmtrain.teacher_cache as tc

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ref_model = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()  # noqa: E731
    template, chunks = rand(3), [rand(12), rand(12)]
    examples = []
    for k in range(7):  # chunks interleaved: the grouping must not rely on the examples' order
        head = template + chunks[k % 2] + rand(2) if k < 6 else template + rand(14)  # the last: another chunk, alone
        n = 2 + k % 3
        examples.append(Example([1, 2], 0, n, head + rand(n + 1), len(head)))
    shared, alone = tc.prefix_groups(examples)
    assert sorted((len(p), idx) for p, idx in shared.items()) == [(15, [0, 2, 4]), (15, [1, 3, 5])]
    assert alone == [6]
    calls = []
    real = tc.shared_prefix_hiddens
    monkeypatch.setattr(tc, "shared_prefix_hiddens", lambda m, prefix, ex, *a: calls.append(len(ex)) or real(m, prefix, ex, *a))
    path = tmp_path / "c.safetensors"
    build_cache(model, examples, path, 2, IndexConfig(cache_dtype="fp32"), pad_id=0, batch_size=2)
    assert calls == [3, 3]
    cache = TeacherCache(path)
    for i, e in enumerate(examples):
        (ref,) = teacher_hiddens(ref_model, [e], [0, 1], pad_id=0)
        h, _ = cache.get(i)
        assert h.shape == ref.shape and ((h.double() - ref).norm() / ref.norm()) < 1e-5


def test_pieces_whose_common_prefix_is_another_groups_prompt_join_that_group():
    """Two examples share chunk + prompt K; two others have prompts that extend K, each its own.
    The latter's common prefix is K itself: all four run from K's one prefix pass, none is lost."""
    from kmtrain.teacher_cache import prefix_groups

    g = torch.Generator().manual_seed(4)
    rand = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()  # noqa: E731
    k = rand(16)
    heads = [k, k, k + [301], k + [302]]
    examples = [Example([1, 2], 0, 2, h + rand(3), len(h)) for h in heads]
    shared, alone = prefix_groups(examples)
    assert shared == {tuple(k): [0, 1, 2, 3]} and alone == []


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


def test_select_layers():
    assert select_layers(4, None) == [0, 1, 2, 3]
    assert select_layers(30, (0, -2, 14)) == [0, 14, 28, 29]  # negative from the end; the last always kept
    for bad in ((30,), (0, -31)):
        with pytest.raises(ValueError, match=r"do not exist \(the model has 30 decoder layers"):
            select_layers(30, bad)


def test_cache_build_keeps_one_group_of_states_at_a_time(tiny_model, tmp_path, monkeypatch):
    """The build stores each group's fp32 states as they come and lets them go: it kept all of a
    document's on the device until the end (1 MB a target token at Llama-3.1-8B shapes)."""
    import gc
    import weakref

    from transformers import AutoModelForCausalLM

    import kmtrain.teacher_cache as tc

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    g = torch.Generator().manual_seed(2)
    examples = []
    for _ in range(3):  # three chunks, two targets each, and a DDCD-like example of its own
        prefix = torch.randint(3, 300, (9,), generator=g).tolist()
        examples += [Example([1, 2], 0, n, prefix + torch.randint(3, 300, (n,), generator=g).tolist(), 9)
                     for n in (4, 6)]
    examples.append(Example([1, 2], 0, 5, torch.randint(3, 300, (12,), generator=g).tolist(), 7))
    refs, alive = [], []
    for name in ("shared_prefix_hiddens", "teacher_hiddens"):
        def spy(*a, _real=getattr(tc, name), **kw):
            gc.collect()
            alive.append(sum(r() is not None for r in refs))  # states of the groups before this one
            out = _real(*a, **kw)
            refs.extend(weakref.ref(h) for h in out)
            return out
        monkeypatch.setattr(tc, name, spy)
    path = tmp_path / "c.safetensors"
    build_cache(model, examples, path, 2, IndexConfig(cache_dtype="fp32"), pad_id=0)
    assert alive == [0, 0, 0, 0] and len(refs) == len(examples)
    cache = TeacherCache(path)
    for i, e in enumerate(examples):  # and every example's states landed in its own place
        (ref,) = teacher_hiddens(model, [e], cache.layers, pad_id=0)
        torch.testing.assert_close(cache.get(i)[0], ref, rtol=1e-5, atol=1e-5)
