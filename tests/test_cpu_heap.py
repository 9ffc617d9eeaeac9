"""kmtrain.cpu_heap: memory freed during a CPU run stays in the process (no page fault when it is
used again) and goes back to the system when the run ends; index() runs inside it on a CPU."""
import importlib
import json
import platform
import subprocess
import sys

import pytest
import torch

from conftest import tiny_cfg
from kmtrain import index
from kmtrain.cpu_heap import heap_kept

# Rounds of 32 tensors of 16 MB (the size of an fp32 [14, 166, 1536] activation in a demo step), each
# round freed before the next: what a training step does with its activations. Printed: the most page
# faults of any round after the first two (which grow the heap), and the resident memory freed by
# leaving the block. Under glibc's defaults most rounds fault every page in again; one now and then
# reuses the heap, when a small allocation of torch's or Python's happened to stay at its top.
ROUNDS = r"""
import json, resource, sys, torch
from kmtrain.cpu_heap import heap_kept

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def rounds():
    most = 0
    for r in range(8):
        before = faults()
        xs = [torch.ones(4 << 20) for _ in range(32)]
        del xs
        if r >= 2:
            most = max(most, faults() - before)
    return most

if sys.argv[1] == "kept":
    with heap_kept(torch.device("cpu")) as kept:
        most = rounds()
        held = resident()
    print(json.dumps({"kept": kept, "most_faults_in_a_round": most, "returned": held - resident()}))
else:
    print(json.dumps({"kept": False, "most_faults_in_a_round": rounds(), "returned": 0}))
"""
PAGES_PER_ROUND = 32 * (16 << 20) // 4096


def _rounds(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the heap kept is glibc's (Linux)")
def test_freed_memory_is_reused_without_faults_and_returned_at_the_end():
    # glibc's own defaults: a round's 512 MB was handed back to the kernel and faulted in again (in
    # about 5 of 6 processes; in the others a small allocation pinned the top of the heap all along)
    controls = []
    for _ in range(5):
        controls.append(_rounds("default"))
        if controls[-1]["most_faults_in_a_round"] > PAGES_PER_ROUND // 2:
            break
    else:
        raise AssertionError(f"glibc's defaults never gave a round back to the kernel: {controls}")
    kept = _rounds("kept")
    assert kept["kept"] is True
    # at most a tensor or two of a round faults in (where the freed heap had no hole its size)
    assert kept["most_faults_in_a_round"] < PAGES_PER_ROUND // 8, kept
    # what the block kept is returned when it ends: a caller's process does not hold the run's peak
    assert kept["returned"] > 256 << 20, kept


def test_an_accelerator_run_leaves_the_heap_alone():
    with heap_kept(torch.device("meta")) as kept:
        assert kept is False


@pytest.mark.parametrize("system, libc", [("Darwin", ("", "")), ("Linux", ("musl", "1.2")), ("Windows", ("", ""))])
def test_without_glibc_the_heap_is_left_alone_and_said_so(monkeypatch, system, libc):
    """macOS, Windows and musl (Alpine) have no mallopt of glibc's: the block runs with the heap as it
    is (kept False) and return_free_memory does nothing (False), neither fails."""
    import kmtrain.cpu_heap as cpu_heap

    monkeypatch.setattr(cpu_heap.platform, "system", lambda: system)
    monkeypatch.setattr(cpu_heap.platform, "libc_ver", lambda: libc)
    cpu_heap._glibc.cache_clear()
    try:
        with heap_kept(torch.device("cpu")) as kept:
            assert kept is False
        assert cpu_heap.return_free_memory() is False
    finally:
        cpu_heap._glibc.cache_clear()  # this machine's own answer again for the tests after


def test_index_runs_inside_the_kept_heap_on_a_cpu(tiny_model, docs_dir, tmp_path, monkeypatch):
    index_mod = importlib.import_module("kmtrain.index")  # the package's `index` is the function
    entered = []
    real = index_mod.heap_kept

    def recording(device):
        entered.append(device)
        return real(device)

    monkeypatch.setattr(index_mod, "heap_kept", recording)
    index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "kms", steps=1))
    assert entered == [torch.device("cpu")]
    # a device this machine lacks is refused before the output folder is made
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "elsewhere", steps=1, device="cuda"))
        assert not (tmp_path / "elsewhere").exists()
