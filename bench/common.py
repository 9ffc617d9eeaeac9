"""Timing, memory and environment helpers shared by the benchmark tables."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch


def environment() -> Dict[str, str]:
    """Device, versions and date: every results table carries them."""
    from kmtrain.index import library_versions

    versions = library_versions()
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        dev = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {
        "device": dev,
        **{name: versions[name] for name in ("torch", "triton", "transformers")},
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], warmup: int = 2, reps: int = 7, min_time_s: float = 0.0) -> float:
    """Median wall time in ms. On CUDA uses triton.testing.do_bench (events, median)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times: List[float] = []
    t_end = time.perf_counter() + min_time_s
    while len(times) < reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_cuda_graph_ms(fn: Callable[[], object]) -> float:
    """Median time of ``fn`` replayed from a CUDA graph: the GPU time of its kernels without the
    host's per-launch cost, which is how a captured training step or a serving engine runs it
    (inside a model, the host launches layer l+1 while the GPU runs layer l). CUDA only."""
    import triton.testing

    side = torch.cuda.Stream()  # warm up (Triton compiles, the allocator settles) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return float(triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median"))


def projection_sizes(config) -> Dict[str, int]:
    """A Llama-layout decoder's linear widths from its HF config: hidden, q (heads x head dim),
    kv (key/value heads x head dim) and the MLP's intermediate size."""
    H, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or H // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return {"hidden": H, "q": heads * head_dim, "kv": kv_heads * head_dim, "intermediate": config.intermediate_size}


def matmul_rate_flops(dtype: torch.dtype, device: str, n: int = 2048) -> float:
    """Measured dense matmul rate (FLOP/s) in ``dtype`` on random data."""
    if device == "cuda":
        n = 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = time_ms(lambda: torch.mm(a, b), warmup=1, reps=3)
    return 2 * n**3 / (ms * 1e-3)


def copy_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    if device == "cpu":
        nbytes = 1 << 27
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=2, reps=5)
    return 2 * nbytes / (ms * 1e-3)


def peak_rss_child(module: str, spec: Dict) -> Dict:
    """Run ``python -m module --child JSON`` in a fresh process and return the JSON it prints.

    On CPU the only honest peak-memory figure is the process's peak RSS: the child records
    ru_maxrss after building its inputs and again after one fwd+bwd, and reports the difference.
    """
    out = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(spec)], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Return freed heap to the OS, reset the kernel's peak-RSS mark, return the current RSS in bytes.

    Without malloc_trim, memory freed while building inputs is reused silently and the peak
    under-counts; clear_refs=5 resets VmHWM (Linux >= 4.0).
    """
    from kmtrain.cpu_heap import return_free_memory

    return_free_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _proc_status_kib("VmHWM") * 1024


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def env_block(env: Dict[str, str]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in env.items())


def write_report(text: str, out: Optional[str]) -> None:
    """Print a benchmark's markdown report and, with --out, write it there."""
    print(text)
    if out:
        Path(out).write_text(text)


def km_records(folder: Path) -> Dict[str, dict]:
    """{document id: its km.json} for the KMs in a `kmtrain index` output folder, in id order (empty
    where there are none). The benches that read finished KMs take their base model and LoRA shape
    from these records, not from defaults."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*/km.json"))}


def set_overrides(ap: argparse.ArgumentParser, items: List[str]) -> Dict:
    """The IndexConfig overrides of a bench's repeated ``--set FIELD=VALUE``; a malformed one ends
    the command with argparse's usage error naming it."""
    from kmtrain.config import IndexConfig

    try:
        return dict(IndexConfig.parse_override(item) for item in items)
    except ValueError as e:
        ap.error(str(e))
