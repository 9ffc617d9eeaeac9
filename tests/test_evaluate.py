"""kmtrain.evaluate: the short-answer rule every accuracy figure rests on."""
import pytest

from kmtrain.evaluate import is_correct


@pytest.mark.parametrize("answer,accepted,expected", [
    ("It was founded by Odile Marchetti.", ["Odile Marchetti"], True),
    ("THE OLD LANTERN, they call it", ["Old Lantern"], True),     # case and trailing punctuation
    ("The clock has 2,118 parts.", ["2,118"], True),              # thousands separators on both sides
    ("The clock has 2118 parts.", ["2,118"], True),
    ("It rests for 1893 years", ["1893"], True),
    ("In 18934", ["1893"], False),                                # whole words only
    ("The boat Wrenfield", ["Wren"], False),
    ("the village of Saint-Averell", ["Averell"], True),          # a hyphen separates words
    ("three of them", ["3"], False),
    ("three of them", ["3", "three"], True),                      # any accepted form
    ("", ["Odile Marchetti"], False),
    ("Answer: Pendulum", ["pendulum"], True),
])
def test_is_correct(answer, accepted, expected):
    assert is_correct(answer, accepted) is expected


def test_shared_prefixes_answer_as_whole_prompts_do_and_read_each_document_once(tiny_model, monkeypatch):
    """ICL with share_prefixes: the questions of a document read it once (one prefix pass per
    document, then only each question's own tokens), and the greedy answers are those of the plain
    batched prefill (fp32), with a group of questions split across batches and a closed-book prompt
    among them; with a grouped LoRA attached, as make demo has, through slot -1. An active slot is refused."""
    import torch
    from transformers import DynamicCache

    import kmtrain.evaluate as ev
    from kmkernels import attach_grouped_lora, set_adapter_ids
    from kmtrain.evaluate import generate_answers, question_prompt
    from kmtrain.models import cache_kwarg, load_model

    from conftest import DOCS

    model, tok, _, _ = load_model(tiny_model)
    # the random model's greedy answer is the end of turn, or one token over and over: both kept
    # out, so that the answers have words to compare
    model.generation_config.suppress_tokens = tok.all_special_ids
    model.generation_config.no_repeat_ngram_size = 1
    questions = ("Which bell?", "Who winds it?", "When?")
    prompts = [question_prompt(q, DOCS[d]) for d in ("alpha", "beta") for q in questions]
    prompts.insert(4, question_prompt("Which bell?"))
    reads = []
    real = ev.prompt_kv

    def counting(model, ids, past=None):
        reads.append((len(ids), past is not None))
        return real(model, ids, past=past)

    def checked_cache(model, batch, width, kv, new_tokens):
        # the batch's cache, built from the shared prefixes, continues as the whole prompts' forward does
        cache = real_cache(model, batch, width, kv, new_tokens)
        copy = DynamicCache([(la.keys.clone(), la.values.clone()) for la in cache.layers], config=model.config)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        if attached:
            set_adapter_ids(model, torch.full((len(batch),), -1))
        with torch.no_grad():
            whole = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            step = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos[:, -1:],
                         **{cache_kwarg(model): copy}).logits[:, -1]
        gaps.append(float((step - whole).abs().max() / whole.abs().max()))
        return cache

    real_cache, gaps = ev.prompt_cache, []
    monkeypatch.setattr(ev, "prompt_kv", counting)
    monkeypatch.setattr(ev, "prompt_cache", checked_cache)
    for attached in (False, True):
        if attached:
            attach_grouped_lora(model, 2, rank=4, alpha=4)
        slots = [-1] * len(prompts) if attached else None
        plain = generate_answers(model, tok, prompts, slots, max_new_tokens=8, batch_size=3)
        reads.clear()
        shared = generate_answers(model, tok, prompts, slots, max_new_tokens=8, batch_size=3, share_prefixes=True)
        assert shared == plain
        assert len(gaps) == 3 and max(gaps) < 1e-5, gaps
        gaps.clear()
        assert len(set(plain)) > 2 and all(plain)
        # two documents read once each (no past), then each of their 6 questions' own tokens (with it)
        doc_reads = [n for n, with_past in reads if not with_past]
        own = [n for n, with_past in reads if with_past]
        assert len(doc_reads) == 2 and len(own) == 6, reads
        assert min(doc_reads) > 2 * max(own)
    with pytest.raises(ValueError, match="share_prefixes.*slot -1"):
        generate_answers(model, tok, prompts, [0] * len(prompts), share_prefixes=True)
