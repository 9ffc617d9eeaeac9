"""bench/gpu_session.sh refuses what it cannot run before a lent GPU's minutes go by.

Its stages themselves run the benches and tests that have their own tests (test_bench_indexing
runs bench.indexing end to end as the `indexing` stage does)."""
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_session.sh"


def run(tmp_path, *args):
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "GPU_WORK": str(tmp_path / "work"),
           "GPU_CARRY": str(tmp_path / "no_carry")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_unknown_stage_is_refused_by_name_before_anything_runs(tmp_path):
    r = run(tmp_path, "kernels", "benchmarks")
    assert r.returncode == 2
    assert "unknown stage 'benchmarks'" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_no_stage_or_no_carried_tokenizer_is_refused(tmp_path):
    r = run(tmp_path)
    assert r.returncode == 2 and "usage:" in r.stderr
    for stage in ("indexing", "memory"):  # both build a random model with the carried tokenizer
        r = run(tmp_path, stage)
        assert r.returncode == 2
        assert "no_carry/tokenizer: run 'make gpu-carry'" in r.stderr
        assert not (tmp_path / "out").exists()
