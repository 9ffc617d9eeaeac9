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


def test_shared_prefixes_answer_as_whole_prompts_do_and_read_each_prefix_once_per_slot(tiny_model, monkeypatch):
    """share_prefixes: the questions of a document read it once for each adapter slot that asks
    them, and closed-book questions their common chat header and instruction once per slot (one
    prefix pass each). Each batch's prefill then reads every prompt's own tokens after its prefix's
    keys and values and a gap of padding: its last-position logits are those of the whole
    left-padded prompts (fp32, 1e-5), and the greedy answers those of the plain batched prefill.
    With a document's questions split across batches and a closed-book prompt among the ICL ones;
    without a grouped LoRA, with one through slot -1, and with active slots of other weights."""
    import torch

    import kmtrain.evaluate as ev
    from kmkernels import attach_grouped_lora, set_adapter_ids
    from kmkernels.lora import grouped_lora_modules
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
    prompts += [question_prompt(q) for q in ("Who winds it?", "Which market?")]
    reads, gaps = [], []
    real_kv, generate = ev.prompt_kv, model.generate

    def counting(model, ids, past=None):
        reads.append((tuple(ids), past is None))
        return real_kv(model, ids, past=past)

    def checked_generate(input_ids, attention_mask, **kw):
        cache = kw.get(cache_kwarg(model))
        if cache is not None:
            # the prefill from the cache (gap and all) against the whole prompts, left-padded
            cols = cache.get_seq_length()
            copy = type(cache)([(la.keys.clone(), la.values.clone()) for la in cache.layers], config=model.config)
            pos = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            rows = [r[m.bool()].tolist() for r, m in zip(input_ids, attention_mask)]
            width = max(map(len, rows))
            whole = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            with torch.no_grad():
                got = model(input_ids=input_ids[:, cols:], attention_mask=attention_mask, position_ids=pos[:, cols:],
                            **{cache_kwarg(model): copy}).logits[:, -1]
                want = model(input_ids=whole, attention_mask=mask,
                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
            gaps.append(float((got - want).abs().max() / want.abs().max()))
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(ev, "prompt_kv", counting)
    model.generate = checked_generate
    for case in ("none", "slot -1", "slots"):
        if case == "slot -1":
            attach_grouped_lora(model, 2, rank=4, alpha=4)
        if case == "slots":
            with torch.no_grad():
                for m in grouped_lora_modules(model).values():
                    m.lora_B.normal_(0, 0.5)
        # alpha's questions through slots 0, 0, 1; beta's through 1; the closed-book ones through 0, -1, 0
        slots = {"none": None, "slot -1": [-1] * len(prompts), "slots": [0, 0, 1, 1, 0, 1, 1, -1, 0]}[case]
        plain = generate_answers(model, tok, prompts, slots, max_new_tokens=8, batch_size=3)
        reads.clear()
        shared = generate_answers(model, tok, prompts, slots, max_new_tokens=8, batch_size=3, share_prefixes=True)
        assert shared == plain, case
        assert len(gaps) == 3 and max(gaps) < 1e-5, (case, gaps)
        gaps.clear()
        assert len(set(plain)) > 2 and all(plain)
        # every read is a prefix, alone: alpha's and beta's documents and the closed-book header,
        # once per slot that reads it (alpha in slots 0 and 1, the header in 0 and -1)
        assert all(alone for _, alone in reads)
        assert len(reads) == (3 if case != "slots" else 5), (case, reads)
        assert len(set(ids for ids, _ in reads)) == 3
        if slots is not None:
            set_adapter_ids(model, torch.tensor([-1]))
    # the check can tell: rows handed each other's prefixes (the batch's keys and values reversed)
    real = ev.prefix_cache
    monkeypatch.setattr(ev, "prefix_cache", lambda m, kvs, cols, reserve: real(m, kvs[::-1], cols, reserve))
    generate_answers(model, tok, prompts, [0] * len(prompts), max_new_tokens=8, batch_size=3, share_prefixes=True)
    assert max(gaps) > 1e-2, gaps
