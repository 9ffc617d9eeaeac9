"""Where a training step of `kmtrain index` spends its time: torch.profiler over a few steady-state
steps, each op's self time put in one of a few kinds (decoder projection GEMMs, the fused KL's
LM-head GEMMs, LoRA batched matmuls, attention, other ops, Python between ops).

    python -m bench.step_profile [--docs kmtrain/demo_corpus] [--work runs/step_profile] [--steps 10]
        [--skip 5] [--active 3] [--set FIELD=VALUE ...] [--out bench/results/step_profile_cpu.md]

It runs `kmtrain.index` with its defaults (but ``--steps`` and any ``--set``) on the documents; a
second run on the same ``--work`` reuses the synthetic targets (``retrain=True``) and rebuilds only
the teacher caches. The first ``--skip`` steps are not profiled: their allocations page-fault in the
heap the later steps reuse (seen on the demo corpus: ~100k-230k minor faults in each of steps 1-3,
~100 by step 5), so they are not the steady state that 60 steps mostly are.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from bench.common import (env_block, environment, markdown_table, matmul_rate_flops, projection_sizes, set_overrides,
                          write_report)
from kmtrain.config import IndexConfig, resolve_device
from kmtrain.demo import CORPUS

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
KINDS = ("decoder projections (mm)", "LM head, the fused KL's (mm)", "LoRA (bmm, rank r)", "attention",
         "other ops", "Python and dispatch between ops")


def op_kind(name: str, shapes: Sequence[Sequence[int]], vocab: int, rank: int, features: Iterable[int]) -> str:
    """The kind of one profiled op, from its name and input shapes. ``features``: the in and out
    sizes of the LoRA-wrapped projections; a LoRA bmm has the rank in one operand's last two dims
    and a feature size in the other's (an attention bmm has head and sequence sizes instead)."""
    if name.startswith("ProfilerStep"):
        return KINDS[5]
    dims = [tuple(s[-2:]) for s in shapes if len(s) >= 2]
    if name == "aten::mm" and len(dims) >= 2:
        return KINDS[1] if vocab in dims[0] + dims[1] else KINDS[0]
    if name in ("aten::bmm", "aten::baddbmm") and len(dims) >= 2:
        feats = set(features)
        a, b = dims[0], dims[1]
        if (rank in a and feats & set(b)) or (rank in b and feats & set(a)):
            return KINDS[2]
        return KINDS[3]
    if name in ("aten::_softmax", "aten::_softmax_backward_data"):
        return KINDS[3]
    # PyTorch's fused CPU attention, which fp32 steps run (kmtrain's own bf16 path is the bmm and
    # softmax above); before, an fp32 profile filed it under other ops and showed attention at 0
    if name.startswith("aten::_scaled_dot_product_"):
        return KINDS[3]
    return KINDS[4]


class _ProfiledBar:
    """Stands in for the training progress bar that `train_wave` updates once per finished step:
    each step advances the profiler's schedule and is timed."""

    def __init__(self, bar, prof):
        self.bar, self.prof, self.ends = bar, prof, []

    def update(self, n: int) -> None:
        self.bar.update(n)
        for _ in range(n):
            self.prof.step()
            self.ends.append(time.perf_counter())

    def set_postfix(self, **kw) -> None:
        self.bar.set_postfix(**kw)


@contextlib.contextmanager
def profiled_training(prof, seen: List[_ProfiledBar]):
    """`kmtrain.index` with its waves' training bars wrapped in _ProfiledBar (kept in ``seen``), and
    without training checkpoints: a wave resumed from an earlier, killed run's checkpoint would skip
    the steps the profile times, and a save would put disk writes into a profiled step."""
    index_mod = importlib.import_module("kmtrain.index")  # the package's `index` is the function
    train_wave = index_mod.train_wave

    def wrapped(*args, progress=None, checkpoint=None, **kwargs):
        seen.append(_ProfiledBar(progress, prof))
        return train_wave(*args, progress=seen[-1], checkpoint=None, **kwargs)

    index_mod.train_wave = wrapped
    try:
        yield index_mod
    finally:
        index_mod.train_wave = train_wave


def model_sizes(model: str) -> Tuple[int, List[int]]:
    """(vocab, the in and out sizes of a Llama-style model's projections) from its config.json."""
    from transformers import AutoConfig

    from kmtrain.models import resolve_model

    c = AutoConfig.from_pretrained(resolve_model(model)[0])
    return c.vocab_size, sorted(set(projection_sizes(c).values()))


def breakdown(events, vocab: int, rank: int, features: List[int]) -> Tuple[Dict[str, float], float]:
    """Self seconds per kind over the profiled steps, and the decoder projections' GEMM rate (FLOP/s)."""
    per_kind: Dict[str, float] = collections.defaultdict(float)
    flops = secs = 0.0
    for e in events:
        kind = op_kind(e.key, e.input_shapes or [], vocab, rank, features)
        t = e.self_cpu_time_total / 1e6
        per_kind[kind] += t
        if kind == KINDS[0]:
            (m, k), (_, n) = e.input_shapes[0], e.input_shapes[1]
            flops += 2.0 * m * k * n * e.count
            secs += t
    return per_kind, (flops / secs if secs else float("nan"))


def main(argv: Optional[List[str]] = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", help="documents as `kmtrain index` takes them (default: the demo corpus)")
    ap.add_argument("--work", default="runs/step_profile")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip", type=int, default=5, help="steps not profiled (the warm-up)")
    ap.add_argument("--active", type=int, default=3, help="steps profiled")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.skip < 1 or a.active < 1 or a.skip + a.active > a.steps:
        ap.error(f"need 1 <= --skip, 1 <= --active and --skip + --active <= --steps, got {a.skip}, {a.active}, "
                 f"{a.steps}")
    # the profiler's schedule counts steps from 0: `wait` of them unrecorded, then one warm-up step
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                   schedule=schedule(wait=a.skip - 1, warmup=1, active=a.active, repeat=1))
    overrides = set_overrides(ap, a.set)
    cfg = IndexConfig(**{**overrides, "steps": a.steps, "retrain": True, "progress": False})
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        ap.error(str(e))
    if device.type != "cpu":
        ap.error("this profiles a CPU step (each op's CPU self time); on a GPU it would time kernel launches: "
                 "--set device=cpu")
    vocab, features = model_sizes(cfg.model)  # before the run: a model that cannot load fails here
    bars: List[_ProfiledBar] = []
    with profiled_training(prof, bars) as index_mod:
        prof.start()
        index_mod.index(a.docs or str(CORPUS), cfg, out=a.work)
        prof.stop()
    if len(bars) != 1:
        raise SystemExit(f"the documents trained in {len(bars)} waves; profile one (fewer documents or "
                         f"--set docs_per_step=N)")
    ends = bars[0].ends
    step_s = [b - e for e, b in zip(ends, ends[1:])]
    profiled = step_s[a.skip - 1:a.skip - 1 + a.active]
    per_kind, rate = breakdown(prof.key_averages(group_by_input_shape=True), vocab, cfg.rank, features)
    total = sum(per_kind.values())
    rows = [[k, f"{per_kind.get(k, 0.0) / a.active:.3f}", f"{100 * per_kind.get(k, 0.0) / total:.1f}"]
            for k in KINDS]
    rows.append(["all (profiler's self times)", f"{total / a.active:.3f}", "100.0"])
    # the host's rate in the dtype the step's GEMMs ran in: bf16 under autocast, else fp32 (on a CPU
    # without native bf16 a bf16 GEMM is emulated, and its rate says nothing about the step)
    step_dtype = index_mod._amp_dtype(cfg, device) or torch.float32  # the module the run above used
    host = matmul_rate_flops(step_dtype, "cpu")
    text = "\n".join([
        "# Where a training step goes (`python -m bench.step_profile`)", "",
        env_block(environment()),
        f"- documents: {f'`{a.docs}`' if a.docs else 'the demo corpus'}; settings: the defaults of "
        f"`kmtrain index` but steps={a.steps}" + "".join(f", {s}" for s in a.set),
        f"- profiled: steps {a.skip + 1}-{a.skip + a.active} of {a.steps} (torch.profiler, CPU, self time of each op)",
        f"- wall seconds of steps 2-{a.steps} (a step timed from the end of the one before): "
        f"{', '.join(f'{s:.2f}' for s in step_s)} (profiled: "
        f"{', '.join(f'{s:.2f}' for s in profiled)}, the profiler's overhead included)",
        f"- decoder projection GEMMs ran at {rate / 1e9:.0f} GFLOP/s; a {DTYPE_NAMES[step_dtype]} [2048, 2048] "
        f"GEMM at {host / 1e9:.0f} GFLOP/s on this host", "",
        markdown_table(["kind", "s per step", "%"], rows), ""])
    write_report(text, a.out)
    return text


if __name__ == "__main__":
    main()
