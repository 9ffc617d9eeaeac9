"""Grouped LoRA benchmark table: ``python -m bench.lora [--out bench/results/lora_<device>.md]``.

Delta only (y = s_d * x A_d^T B_d^T): our Triton path, a per-adapter Python loop (our torch
path), and ``torch._grouped_mm`` (rows physically sorted first, as it requires) where it runs;
each once with the batch's row layout computed per call and once with it given (as inside a
model, where one layout serves every LoRA layer). On a GPU the batch-layout rows are also timed
replayed from a CUDA graph (", CUDA graph"): the kernels' own time, without the host's launch
cost, which a model hides (the host runs ahead of the GPU) or a captured step removes.
Layer forward (base matmul + delta), for serving: ours against PEFT's mixed-batch forward
(``adapter_names=``), one adapter per sequence of 128 tokens.
Memory floor: forward reads x and A, B once and writes the delta once; backward reads dy, x,
A, B once and writes dx, dA, dB once. Fraction = floor time at the measured copy bandwidth
over measured time.
GPU shapes: N in {2048, 8192}, in->out in {4096->4096, 4096->14336}, r in {16, 64},
D in {1, 8, 32, 128}, bf16. CPU: N in {512, 2048}, 576->576 and 576->1536 (SmolLM2-135M),
r=16, D in {1, 8, 32}, fp32, torch paths only (the Triton interpreter is a test tool).

``--training-layer``: instead, a GroupedLoRALinear's fwd+bwd in the training layout of `kmtrain
index` (torch path, one slot per sequence, SEQS sequences of TOKENS tokens over D slots, fp32, the
frozen base's dX included) at each of SmolLM2-135M's seven projection shapes: the base layer alone,
the delta added after the base's GEMM (``_sequence_lora_torch``), and the adds fused into the GEMMs
(``SequenceLoRALinearFunction``, what the layer runs there), with whether the two give the same bits.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
from typing import List

import torch
from torch import nn

from bench.common import (copy_bandwidth, env_block, environment, markdown_table, time_cuda_graph_ms, time_ms,
                          write_report)

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
SEQ = 128  # tokens per sequence: adapter ids are per sequence
# Rows with this suffix replay the op from a CUDA graph: the GPU time of its kernels without the
# host's launch cost (in a model the host runs ahead of the GPU, or the step is captured).
GRAPHED = ", CUDA graph"


def make(N, din, dout, r, D, dtype, grad):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(N, din, device=DEV, generator=g).to(dtype).requires_grad_(grad)
    A = (torch.randn(D, r, din, device=DEV, generator=g) / din**0.5).to(dtype).requires_grad_(grad)
    B = (torch.randn(D, dout, r, device=DEV, generator=g) * 0.01).to(dtype).requires_grad_(grad)
    seq_ids = torch.randint(0, D, (max(1, N // SEQ),), device=DEV, generator=g)
    ids = seq_ids.repeat_interleave(SEQ)[:N]
    if ids.numel() < N:
        ids = torch.cat([ids, ids.new_zeros(N - ids.numel())])
    return x, A, B, ids, seq_ids


def grouped_mm_layout(ids, D):
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=D)
    return order, torch.cumsum(counts, 0).to(torch.int32)


def grouped_mm_delta(x, A, B, ids, scaling, layout=None):
    """torch._grouped_mm needs rows physically grouped: gather, two grouped GEMMs, scatter back."""
    order, offs = layout if layout is not None else grouped_mm_layout(ids, A.shape[0])
    xs = x.index_select(0, order)
    h = torch._grouped_mm(xs, A.transpose(1, 2), offs=offs)
    ys = torch._grouped_mm(h, B.transpose(1, 2), offs=offs) * scaling
    return torch.empty_like(ys).index_copy(0, order, ys)


def delta_fn(method, x, A, B, ids):
    from kmkernels import grouped_lora

    if method == "kmkernels-triton":
        return lambda: grouped_lora(x, A, B, ids, 1.0, backend="triton", check_ids=False)
    if method == "loop (torch path)":
        return lambda: grouped_lora(x, A, B, ids, 1.0, backend="torch", check_ids=False)
    if method == "torch._grouped_mm":
        return lambda: grouped_mm_delta(x, A, B, ids, 1.0)
    # Inside a model the row layout of a batch is computed once and shared by every LoRA layer
    # (7 per decoder layer): these two rows time the per-layer cost with the layout given.
    if method == "kmkernels-triton, batch layout":
        from kmkernels.lora import build_segments

        seg = build_segments(ids, A.shape[0])
        return lambda: grouped_lora(x, A, B, ids, 1.0, backend="triton", segments=seg, check_ids=False)
    if method == "torch._grouped_mm, batch layout":
        layout = grouped_mm_layout(ids, A.shape[0])
        return lambda: grouped_mm_delta(x, A, B, ids, 1.0, layout)
    raise ValueError(method)


class OneLayer(nn.Module):
    def __init__(self, din, dout):
        super().__init__()
        self.proj = nn.Linear(din, dout, bias=False)

    def forward(self, x):
        return self.proj(x)


def layer_fns(N, din, dout, r, D, dtype):
    """(ours, peft) forward of base linear + per-sequence LoRA, no grad (serving)."""
    from peft import LoraConfig, get_peft_model

    from kmkernels import attach_grouped_lora, set_adapter_ids

    x, A, B, ids, seq_ids = make(N, din, dout, r, D, dtype, False)
    base = OneLayer(din, dout).to(DEV, dtype)
    ours = attach_grouped_lora(copy.deepcopy(base), D, rank=r, alpha=r, target_modules=("proj",))
    set_adapter_ids(ours, seq_ids)
    xb = x.reshape(-1, SEQ, din) if N % SEQ == 0 else x.reshape(1, N, din)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=r, target_modules=["proj"]),
                          adapter_name="a0")
    for d in range(1, D):
        peft.add_adapter(f"a{d}", LoraConfig(r=r, lora_alpha=r, target_modules=["proj"]))
    peft.eval()  # mixed-batch adapter_names is inference only in PEFT
    names = [f"a{d}" for d in seq_ids.tolist()][: xb.shape[0]]

    def ours_fn():
        with torch.no_grad():
            return ours(xb)

    def peft_fn():
        with torch.no_grad():
            return peft(xb, adapter_names=names)

    return ours_fn, peft_fn


# SmolLM2-135M's projections (in, out): q, k, v, o, gate, up, down; kmtrain index's default layout on
# the demo corpus: 8 documents x 2 examples per step, targets of up to ~150 tokens with their prompt.
SMOLLM2_PROJECTIONS = (("q", 576, 576), ("k", 576, 192), ("v", 576, 192), ("o", 576, 576), ("gate", 576, 1536),
                       ("up", 576, 1536), ("down", 1536, 576))
SEQS, TOKENS, SLOTS = 16, 150, 8


def training_layer_fns(din: int, dout: int, seqs: int, tokens: int, slots: int, r: int = 16,
                       dtype: torch.dtype = torch.float32):
    """fwd+bwd closures of one GroupedLoRALinear on x [seqs, tokens, din] (each slot on seqs / slots
    sequences, in a shuffled order): (base only, delta added after the base, fused), and a function
    that runs the last two once and returns [y, dx, dA, dB] of each."""
    from kmkernels import lora as lora_mod

    g = torch.Generator().manual_seed(0)
    ids = lora_mod.AdapterIds(slots, "torch")
    base = nn.Linear(din, dout, bias=False).to(dtype)
    layer = lora_mod.GroupedLoRALinear(base, slots, r, alpha=r, ids=ids)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(slots, r, din, generator=g) / din**0.5)
        layer.lora_B.copy_(torch.randn(slots, dout, r, generator=g) * 0.01)
    ids.set((torch.arange(seqs) % slots)[torch.randperm(seqs, generator=g)])
    x = torch.randn(seqs, tokens, din, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(seqs, tokens, dout, generator=g).to(dtype)
    params = (x, layer.lora_A, layer.lora_B)

    def base_only():
        return torch.autograd.grad(base(x), (x,), dy)

    def run(fused: bool):
        real = lora_mod.fuses_into_linear
        if not fused:
            lora_mod.fuses_into_linear = lambda *a: False
        try:
            y = layer(x)
            return [y.detach(), *torch.autograd.grad(y, params, dy)]
        finally:
            lora_mod.fuses_into_linear = real

    return base_only, lambda: run(False), lambda: run(True), lambda: (run(False), run(True))


ROUNDS = 40


def interleaved_ms(fns, rounds: int, warmup: int = 3) -> List[float]:
    """Median ms of each of ``fns``, timed in turn within each round: a shared CPU's speed drifts by
    tens of percent within a minute, which timing one function's repetitions after another's mistakes
    for a difference between them."""
    for _ in range(warmup):
        for f in fns:
            f()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for f, t in zip(fns, times):
            t0 = time.perf_counter()
            f()
            t.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def training_layer_report(quick: bool) -> str:
    shapes = SMOLLM2_PROJECTIONS[:1] if quick else SMOLLM2_PROJECTIONS
    seqs, tokens, slots = (4, 16, 2) if quick else (SEQS, TOKENS, SLOTS)
    rounds = 5 if quick else ROUNDS
    rows, sums = [], [0.0, 0.0, 0.0]
    for name, din, dout in shapes:
        base_only, separate, fused, both = training_layer_fns(din, dout, seqs, tokens, slots)
        times = interleaved_ms((base_only, separate, fused), rounds=rounds)
        sums = [a + b for a, b in zip(sums, times)]
        a, b = both()
        same = all(torch.equal(u, v) for u, v in zip(a, b))
        diff = max(((u - v).abs().max() / v.abs().max().clamp_min(1e-30)).item() for u, v in zip(a, b))
        rows.append([f"{name} {din}->{dout}", *(f"{t:.2f}" for t in times), f"{1 - times[2] / times[1]:.1%}",
                     "yes" if same else f"no (max diff {diff:.1e} of the largest)"])
        print(" | ".join(rows[-1]), flush=True)
    if len(shapes) > 1:  # a decoder layer's projections
        rows.append(["all seven", *(f"{t:.2f}" for t in sums), f"{1 - sums[2] / sums[1]:.1%}", ""])
    table = markdown_table(["projection", "base alone ms", "base + delta after it ms", "fused ms", "fused saves",
                            "same bits (y, dx, dA, dB)"], rows)
    return (f"# GroupedLoRALinear fwd+bwd in the training layout (`python -m bench.lora --training-layer`)\n\n"
            f"{env_block(environment())}\n- dtype: float32 (torch path, no autocast)\n"
            f"- layout: x [{seqs}, {tokens}, in], {slots} slots, {seqs // slots} sequences each in a shuffled order, "
            f"r=16; fwd + bwd (dx, dA, dB; the base is frozen); the three timed in turn, {rounds} rounds after 3 "
            f"warm-ups, medians\n\n{table}\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--training-layer", action="store_true",
                    help="time the training layout's layer fwd+bwd, the delta fused and not (see above)")
    args = ap.parse_args(argv)
    if args.training_layer:
        text = training_layer_report(args.quick)
        write_report(text, args.out)
        return text
    env = environment()
    if GPU:
        dtype, Ns, dims, ranks, Ds = torch.bfloat16, [2048, 8192], [(4096, 4096), (4096, 14336)], [16, 64], [1, 8, 32, 128]
        methods = ["kmkernels-triton", "loop (torch path)", "torch._grouped_mm", "kmkernels-triton, batch layout",
                   "torch._grouped_mm, batch layout", "kmkernels-triton, batch layout" + GRAPHED,
                   "torch._grouped_mm, batch layout" + GRAPHED]
        ours_backend = "kmkernels-triton"
    else:
        dtype, Ns, dims, ranks, Ds = torch.float32, [512, 2048], [(576, 576), (576, 1536)], [16], [1, 8, 32]
        methods = ["loop (torch path)", "torch._grouped_mm"]
        ours_backend = "loop (torch path)"
    if args.quick:
        Ns, dims, Ds = Ns[:1], dims[:1], Ds[:2]
    bw = copy_bandwidth(DEV)
    esize = torch.tensor([], dtype=dtype).element_size()
    print(f"copy bandwidth (read+write): {bw / 1e9:.1f} GB/s", flush=True)
    rows = []
    for N, (din, dout), r, D in itertools.product(Ns, dims, ranks, Ds):
        ab = D * r * (din + dout) * esize
        fwd_floor = (N * din * esize + N * dout * esize + ab) / bw * 1e3
        bwd_floor = (N * dout + 2 * N * din) * esize / bw * 1e3 + 2 * ab / bw * 1e3
        shape = f"N={N} {din}->{dout} r={r} D={D}"
        for method in methods:
            try:
                x, A, B, ids, _ = make(N, din, dout, r, D, dtype, True)
                f = delta_fn(method.removesuffix(GRAPHED), x, A, B, ids)
                timer = time_cuda_graph_ms if method.endswith(GRAPHED) else time_ms
                dy = torch.ones(N, dout, device=DEV, dtype=dtype)

                def fwd_only():
                    with torch.no_grad():
                        return f()

                fwd = timer(fwd_only)
                fb = timer(lambda: torch.autograd.grad(f(), (x, A, B), dy))
                row = [shape, "delta", method, f"{fwd:.3f}", f"{fwd_floor / fwd:.0%}", f"{fb:.3f}",
                       f"{(fwd_floor + bwd_floor) / fb:.0%}"]
            except Exception as e:
                row = [shape, "delta", method, "n/a", "", "n/a", f"{type(e).__name__}: {str(e)[:50]}"]
            print(" | ".join(row), flush=True)
            rows.append(row)
        if D in (Ds[0], Ds[-1]) and r == ranks[0]:  # serving rows: base + delta, forward only
            try:
                ours_fn, peft_fn = layer_fns(N, din, dout, r, D, dtype)
                base_bytes = din * dout * esize
                floor = (N * din * esize + N * dout * esize + ab + base_bytes) / bw * 1e3
                for name, f in ((f"{ours_backend} (base+delta)", ours_fn), ("peft adapter_names= (base+delta)", peft_fn)):
                    t = time_ms(f)
                    row = [shape, "layer fwd", name, f"{t:.3f}", f"{floor / t:.0%}", "", ""]
                    print(" | ".join(row), flush=True)
                    rows.append(row)
            except Exception as e:
                rows.append([shape, "layer fwd", "peft", "n/a", f"{type(e).__name__}: {str(e)[:50]}", "", ""])
    table = markdown_table(["shape", "what", "method", "fwd ms", "fwd of mem floor", "fwd+bwd ms",
                            "fwd+bwd of mem floor"], rows)
    text = (f"# Grouped LoRA benchmarks\n\n{env_block(env)}\n- dtype: {str(dtype).split('.')[-1]}\n"
            f"- measured copy bandwidth (read+write): {bw / 1e9:.1f} GB/s\n"
            f"- adapters are assigned per sequence of {SEQ} tokens, uniformly at random over D slots\n\n{table}\n")
    print()
    write_report(text, args.out)


if __name__ == "__main__":
    main()
