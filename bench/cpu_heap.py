"""Training on a CPU with glibc's heap kept for the run (`kmtrain.cpu_heap`, what `kmtrain index`
does) against glibc's own defaults, which hand freed memory back to the kernel: page faults, system
and user CPU time, and wall time of each training step.

    python -m bench.cpu_heap [--docs kmtrain/demo_corpus] [--work runs/cpu_heap] [--steps N]
        [--set FIELD=VALUE ...] [--out bench/results/cpu_heap_cpu.md]

Each setting runs `kmtrain.index` with its defaults (but ``--steps`` and any ``--set``) in a fresh
process, glibc's defaults first; both train on the same synthetic targets (the first run on
``--work`` writes them, a later one reuses them with ``retrain=True``), so each step draws the same
examples in both. Steps are timed from the end of the one before (the first step is not timed).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import resource
import time
from typing import Dict, List, Optional

from bench.common import env_block, environment, markdown_table, set_overrides, write_report
from bench.step_profile import profiled_training
from kmtrain import default_steps
from kmtrain.config import IndexConfig, resolve_device
from kmtrain.demo import CORPUS, in_fresh_process

SETTINGS = ("glibc's defaults", "heap kept (kmtrain)")


class _StepUsage:
    """Stands in for the profiler that _ProfiledBar steps: the process's page faults and CPU times
    at the end of every step."""

    def __init__(self):
        self.marks: List[resource.struct_rusage] = []

    def step(self) -> None:
        self.marks.append(resource.getrusage(resource.RUSAGE_SELF))


def run_setting(kept: bool, docs: str, work: str, overrides: Dict) -> Dict:
    """One `kmtrain.index` run (in the calling process) with the heap kept or with glibc's defaults;
    per-step wall seconds, page faults, user and system seconds, and the peak resident size."""
    index_mod = importlib.import_module("kmtrain.index")  # the package's `index` is the function
    heap_kept = index_mod.heap_kept
    if not kept:
        index_mod.heap_kept = lambda device: contextlib.nullcontext(False)
    usage, bars = _StepUsage(), []
    cfg = IndexConfig(**{**overrides, "retrain": True, "progress": False})
    try:
        with profiled_training(usage, bars) as patched:
            patched.index(docs, cfg, out=work)
    finally:
        index_mod.heap_kept = heap_kept
    if len(bars) != 1:
        raise SystemExit(f"the documents trained in {len(bars)} waves; time one (fewer documents or "
                         f"--set docs_per_step=N)")
    ends, marks = bars[0].ends, usage.marks
    return {"wall": [b - a for a, b in zip(ends, ends[1:])],
            "faults": [b.ru_minflt - a.ru_minflt for a, b in zip(marks, marks[1:])],
            "user": [b.ru_utime - a.ru_utime for a, b in zip(marks, marks[1:])],
            "sys": [b.ru_stime - a.ru_stime for a, b in zip(marks, marks[1:])],
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv: Optional[List[str]] = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", help="documents as `kmtrain index` takes them (default: the demo corpus)")
    ap.add_argument("--work", default="runs/cpu_heap")
    ap.add_argument("--steps", type=int, help="default: what `kmtrain index` trains on this machine")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    overrides = set_overrides(ap, a.set)
    if a.steps is not None:
        if a.steps < 2:
            ap.error(f"--steps must be at least 2 (the first step is not timed), got {a.steps}")
        overrides["steps"] = a.steps
    try:
        device = resolve_device(IndexConfig(**overrides).device)
    except ValueError as e:
        ap.error(str(e))
    if device.type != "cpu":
        ap.error("this times glibc's heap on a CPU run: --set device=cpu")
    docs = a.docs or str(CORPUS)
    runs = {}
    for kept, name in zip((False, True), SETTINGS):
        t0 = time.perf_counter()
        runs[name] = in_fresh_process(run_setting, kept, docs, a.work, overrides)
        runs[name]["run_s"] = time.perf_counter() - t0
    rows = []
    for name, r in runs.items():
        n = len(r["wall"])
        rows.append([name, f"{sum(r['wall']):.1f}", f"{sum(r['wall']) / n:.2f}", f"{min(r['wall']):.2f}",
                     f"{max(r['wall']):.2f}", f"{sum(r['faults']):,}", f"{sum(r['user']):.1f}", f"{sum(r['sys']):.1f}",
                     f"{r['peak_rss'] / 2**30:.2f}", f"{r['run_s']:.0f}"])
    base, kept_run = (runs[s] for s in SETTINGS)
    saved = 1 - sum(kept_run["wall"]) / sum(base["wall"])
    steps = overrides.get("steps") or default_steps(device)
    text = "\n".join([
        "# Training with glibc's heap kept (`python -m bench.cpu_heap`)", "",
        env_block(environment()),
        f"- documents: {f'`{a.docs}`' if a.docs else 'the demo corpus'}; settings: the defaults of `kmtrain index`"
        f" (steps={steps})" + "".join(f", {s}" for s in a.set),
        f"- each setting in a fresh process, glibc's defaults first, on the same synthetic targets; steps 2-{steps} "
        f"timed, each from the end of the one before", "",
        markdown_table(["setting", f"training s (steps 2-{steps})", "s per step", "fastest", "slowest",
                        "page faults", "user CPU s", "system CPU s", "peak RSS GiB", "whole run s"], rows), "",
        f"Kept heap: {100 * saved:.1f}% less training wall time than glibc's defaults in this run.", "",
        "Per step (wall s / page faults), glibc's defaults then heap kept:", "",
        markdown_table(["step", *SETTINGS],
                       [[str(i + 2), f"{bw:.2f} / {bf:,}", f"{kw:.2f} / {kf:,}"]
                        for i, (bw, bf, kw, kf) in enumerate(zip(base["wall"], base["faults"], kept_run["wall"],
                                                                 kept_run["faults"]))]), ""])
    write_report(text, a.out)
    return text


if __name__ == "__main__":
    main()
