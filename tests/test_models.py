"""kmtrain.models: hidden states as the trainer reads them, native-bf16 detection."""
from pathlib import Path

import pytest
import torch


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
