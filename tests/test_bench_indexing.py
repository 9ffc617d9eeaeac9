"""The throughput benchmark's work model counts what the decoder really multiplies."""
import torch

from bench.indexing import decoder_flops_per_token


def test_decoder_flops_are_two_per_linear_weight():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2)  # grouped-query attention: k, v narrower
    model = LlamaForCausalLM(cfg)
    weights = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert decoder_flops_per_token(cfg) == 2 * weights
