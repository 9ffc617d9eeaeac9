"""MoE experts' grouped LoRA in training: memory kept for the backward and fwd+bwd time, in activation
space (each routed row's s B_e (A_e x), what experts on transformers' experts interface run) and in
weight space (each slot's W + delta, what other experts run), that made again in the backward
(``GroupedLoRAExperts.recompute``, the default) or kept.

    python -m bench.lora_experts [--experts 16] [--hidden 256] [--intermediate 512] [--docs 4]
        [--tokens 64] [--rank 16] [--top-k 2] [--out bench/results/lora_experts_<device>.md]

One Mixtral experts module (random weights, transformers' own forward) in kmtrain's training layout:
``--docs`` sequences of ``--tokens`` tokens, each on its own slot, routed to ``--top-k`` experts at
random. Kept for the backward: the bytes of the tensors autograd saves in the forward that are not
parameters (each storage once). On a GPU also the peak memory the fwd+bwd allocates beyond what was
allocated before it. fp32 on a CPU, bf16 base weights on a GPU.
"""
from __future__ import annotations

import argparse
from typing import Dict

import torch

from bench.common import env_block, environment, markdown_table, sync, time_ms, write_report

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def build(args):
    """(experts module with grouped LoRA, its inputs)."""
    import transformers

    from kmkernels.lora import GroupedLoRAExperts, attach_grouped_lora, set_adapter_ids

    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=97, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=args.experts, num_experts_per_tok=args.top_k)
    model = transformers.MixtralForCausalLM(config).eval().to(DEV, torch.bfloat16 if GPU else torch.float32)
    grouped = attach_grouped_lora(model, args.docs, rank=args.rank, backend="torch")
    experts = next(m for m in grouped.modules() if isinstance(m, GroupedLoRAExperts))
    with torch.no_grad():  # B = 0 at init would leave A without a gradient
        for u in experts.adapters.values():
            u.lora_B.normal_(0, 0.01)
    n = args.docs * args.tokens
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, args.hidden, generator=g).to(DEV, model.dtype)
    top_k_index = torch.stack([torch.randperm(args.experts, generator=g)[:args.top_k] for _ in range(n)]).to(DEV)
    top_k_weights = torch.rand(n, args.top_k, generator=g).softmax(-1).to(DEV, model.dtype)
    set_adapter_ids(grouped, list(range(args.docs)))
    grouped._grouped_lora["ids"].tokens = args.tokens
    return grouped, experts, (x, top_k_index, top_k_weights)


def measure(grouped, experts, inputs, weight_space: bool, recompute: bool) -> Dict[str, float]:
    experts.weight_space, experts.recompute = weight_space, recompute
    params = {p.untyped_storage().data_ptr() for p in grouped.parameters()}
    kept: Dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = experts(*inputs)
    del out

    def step():
        experts(*inputs).float().square().sum().backward()

    peak = float("nan")
    if GPU:
        step()
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return {"kept": sum(kept.values()) / 2**20, "ms": time_ms(step), "peak": peak}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    grouped, experts, inputs = build(args)
    weight_mb = sum(getattr(experts.base, p).numel() * getattr(experts.base, p).element_size()
                    for p in experts.adapters) / 2**20
    rows = []
    modes = [("activation space (default)", False, True),  # (label, weight_space, recompute)
             ("weight space, W + delta made again in the backward", True, True),
             ("weight space, W + delta kept for the backward", True, False)]
    for label, weight_space, recompute in modes:
        r = measure(grouped, experts, inputs, weight_space, recompute)
        rows.append([label, f"{r['kept']:.2f}", f"{r['ms']:.1f}"] + ([f"{r['peak']:.1f}"] if GPU else []))
    header = ["the experts' LoRA", "MB kept for the backward", "fwd+bwd ms"] + (["peak MB"] if GPU else [])
    text = (f"# MoE experts' grouped LoRA in training (`python -m bench.lora_experts`)\n\n{env_block(environment())}\n"
            f"- shape: {args.experts} experts, hidden {args.hidden}, intermediate {args.intermediate}, "
            f"top-{args.top_k}; {args.docs} documents (slots) x {args.tokens} tokens; r={args.rank}; "
            f"{'bf16' if GPU else 'fp32'}; the experts' adapted weights: {weight_mb:.1f} MB\n\n"
            + markdown_table(header, rows) + "\n")
    write_report(text, args.out)


if __name__ == "__main__":
    main()
