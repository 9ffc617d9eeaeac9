"""kmtrain.cpu_attention: the bf16 CPU training attention against float64 and PyTorch's math path."""
import types

import pytest
import torch
import torch.nn.functional as F

from kmtrain.cpu_attention import cpu_training_attention, training_attention

B, HQ, HKV, T, D = 3, 6, 2, 21, 16


def _mask() -> torch.Tensor:
    """[B, 1, T, T] causal, row 1 right-padded to 15 tokens, row 2 left-padded by 5 (its first 5
    query rows attend to nothing)."""
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 15:] = False
    keep[2, :5] = False
    return torch.ones(T, T, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]


def _reference(q, k, v, mask, scale):
    """float64 attention over the mask, fully masked rows 0; [B, T, Hq, D]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


def _math_path(q, k, v, mask, scale):
    """PyTorch's math path as transformers calls it with a mask (k and v repeated per query head)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = q.shape[1] // k.shape[1]
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1),
                                             attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def _run(fn, q, k, v, grad):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad.to(out.dtype))
    return [out.detach().double(), q.grad.double(), k.grad.double(), v.grad.double()]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_attention_tracks_float64_as_closely_as_the_math_path(dtype):
    """Output and the gradients of q, k and v on fresh random inputs (grouped-query heads, right and
    left padding, fully masked rows): within the dtype's tolerance of float64, and in bf16 no
    further from it than PyTorch's math path (the path it replaces), by more than a tenth."""
    torch.manual_seed(0)
    q = torch.randn(B, HQ, T, D).to(dtype)
    k = torch.randn(B, HKV, T, D).to(dtype)
    v = torch.randn(B, HKV, T, D).to(dtype)
    grad = torch.randn(B, T, HQ, D)
    mask, scale = _mask(), D ** -0.5
    module = types.SimpleNamespace(is_causal=True)
    ours = _run(lambda q, k, v: training_attention(module, q, k, v, mask, scaling=scale)[0], q, k, v, grad)
    ref = _run(lambda q, k, v: _reference(q, k, v, mask, scale), q.double(), k.double(), v.double(), grad.double())
    math = _run(lambda q, k, v: _math_path(q, k, v, mask, scale), q, k, v, grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, m, r in zip(("out", "dq", "dk", "dv"), ours, math, ref):
        assert _rel(a, r) <= tol, (name, _rel(a, r))
        if dtype == torch.bfloat16:
            assert _rel(a, r) <= 1.1 * _rel(m, r) + 1e-4, (name, _rel(a, r), _rel(m, r))
    assert ours[0][2, :5].abs().max() == 0  # rows with no key to attend to are 0, as in the math path


def test_training_attention_without_a_mask_is_causal():
    """transformers passes no mask when the batch has no padding: the causal mask is then implied."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    module = types.SimpleNamespace(is_causal=True)
    got = training_attention(module, q, k, v, None, scaling=0.3)[0]
    ref = _reference(q.double(), k.double(), v.double(), torch.ones(9, 9, dtype=torch.bool).tril(), 0.3)
    assert _rel(got.double(), ref) <= 1e-6


def test_training_attention_hands_what_it_does_not_cover_to_sdpa():
    """Dropout, a non-causal pass without a mask, an additive mask or a soft-cap go to the fallback."""
    calls = []

    def fallback(module, q, k, v, mask, **kw):
        calls.append(kw)
        return "fallback", None

    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    causal = types.SimpleNamespace(is_causal=True)
    assert training_attention(causal, q, k, k, None, dropout=0.1, fallback=fallback)[0] == "fallback"
    assert training_attention(types.SimpleNamespace(is_causal=False), q, k, k, None, fallback=fallback)[0] == "fallback"
    assert training_attention(causal, q, k, k, torch.zeros(1, 1, 4, 4), fallback=fallback)[0] == "fallback"
    assert training_attention(causal, q, k, k, None, softcap=30.0, fallback=fallback)[0] == "fallback"
    assert len(calls) == 4
    assert torch.is_tensor(training_attention(causal, q, k, k, None, fallback=fallback)[0]) and len(calls) == 4


def test_the_context_swaps_sdpa_for_the_training_attention_and_restores_it(tiny_model):
    """Inside, a decoder forward with gradient goes through training_attention; after, sdpa is
    transformers' own again, and the hidden states agree with the math path's within bf16 error."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import kmtrain.cpu_attention as cpu_attention
    from kmtrain.models import load_model

    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    model, _, _, _ = load_model(tiny_model, dtype=torch.bfloat16)
    ids = torch.randint(0, 300, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    seen = []
    real = cpu_attention.CPUTrainingAttentionFunction.apply
    try:
        cpu_attention.CPUTrainingAttentionFunction.apply = lambda *a: seen.append(1) or real(*a)
        with cpu_training_attention():
            got = model.get_decoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    finally:
        cpu_attention.CPUTrainingAttentionFunction.apply = real
    assert len(seen) == model.config.num_hidden_layers
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        ref = model.get_decoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    keep = mask.bool()
    for a, b in zip(got[1:], ref[1:]):
        assert _rel(a[keep].double(), b[keep].double()) <= 2e-2
