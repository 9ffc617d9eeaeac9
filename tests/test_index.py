"""kmtrain.index: index + ask end to end (tiny random Llama, and the bundled SmolLM2), resume, precision choices."""
import copy
import dataclasses
import errno
import hashlib
import importlib
import json
import math
import os
import re
import shutil

import pytest
import torch

from conftest import DATED_TEMPLATE, DOCS, HAS_CUDA, on_day, tiny_cfg, write_docs
from kmtrain import IndexConfig, ask, index, load_documents
from kmtrain.config import DEFAULT_STEPS, FP32_CPU_STEPS, PRESETS
from kmtrain.data import chunk_recitation_pieces, recitation_items
from kmtrain.teacher_cache import TeacherCache


def test_index_and_ask_end_to_end(tiny_model, docs_dir, tmp_path, capsys):
    out = tmp_path / "kms"
    summaries = index(str(docs_dir), tiny_cfg(tiny_model, out, heldout_per_chunk=1))
    assert sorted(s["id"] for s in summaries) == sorted(DOCS)
    for doc_id in DOCS:
        km = out / doc_id
        meta = json.loads((km / "km.json").read_text())
        assert (km / "adapter_model.safetensors").is_file() and (km / "adapter_config.json").is_file()
        assert meta["objective"] == "sdcd" and meta["steps"] == 3 and meta["teacher_cache"]["bytes"] > 0
        assert meta["base_model_sha256"] and len(meta["document_sha256"]) == 64
        # every setting the KM's numbers depend on, enough to remake it: the run's config comes back from it
        again = IndexConfig(out=str(out), **meta["settings"])
        assert json.loads(json.dumps({k: v for k, v in dataclasses.asdict(again).items() if k in meta["settings"]})) \
            == meta["settings"] and meta["settings"]["steps"] == 3 and meta["settings"]["heldout_per_chunk"] == 1
        assert meta["device"] == "cpu" and meta["versions"]["torch"] == torch.__version__
        native_bf16 = importlib.import_module("kmtrain.index")._amp_dtype(again, torch.device("cpu")) is torch.bfloat16
        assert (meta["autocast"], meta["base_dtype"]) == (("bf16", "bf16") if native_bf16 else ("off", "fp32"))
        assert set(meta["final_loss"]) == {"loss", "kl", "hidden"} and all(v == v for v in meta["final_loss"].values())
        # one of the chunk's synthetic targets held out, evaluated at every step (3 steps // 10 rounds up to 1)
        held = meta["heldout"]
        assert held["examples"] == 1 and [s for s, _ in held["curve"]] == [0, 1, 2, 3] and held["best_step"] >= 1
        trained = dict(held["curve"][1:])
        assert held["best"]["loss"] == trained[held["best_step"]] == min(trained.values())
    # the KM loads with plain PEFT
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out / "alpha"))
    assert any("lora_A" in n for n, _ in peft.named_parameters())
    answers = ask([(str(out / "alpha"), "Which bell?"), (str(out / "beta"), "What grows?"), (None, "Hello?")],
                  model=tiny_model, max_new_tokens=5)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # a KM is refused on other base weights of the same shapes
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other_base"
    shutil.copytree(tiny_model, other, ignore=shutil.ignore_patterns(".kmtrain-hash.json"))
    for f in other.glob("*.safetensors"):
        save_file({k: v + 0.01 for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="was trained on other base weights"):
        ask([(str(out / "alpha"), "Which bell?")], model=str(other), max_new_tokens=2)
    # the CLI pairs each question with the --km before it, in command-line order, in one batch
    from kmtrain.cli import _ask_pairs, main

    argv = ["ask", "--km", str(out / "alpha"), "Which bell?", "--max-new-tokens", "5", "--km", str(out / "beta"),
            "What grows?", "--model", tiny_model, "Hello?"]
    assert _ask_pairs(argv) == [(str(out / "alpha"), "Which bell?"), (str(out / "beta"), "What grows?"), (None, "Hello?")]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for (km, q), a in zip(_ask_pairs(argv), answers):
        assert f"[{km or 'base'}] {q}\n  {a}" in printed


def test_heldout_schedule_and_off_switch(tiny_model, docs_dir, tmp_path):
    """Evaluations every heldout_every steps and at the last; heldout_per_chunk=0 trains on every target."""
    on = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "on", steps=5, heldout_per_chunk=1, heldout_every=2))
    off = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "off", steps=5))
    assert IndexConfig().heldout_per_chunk == 0 and PRESETS["paper"]["heldout_per_chunk"] == 1
    for a, b in zip(sorted(on, key=lambda s: s["id"]), sorted(off, key=lambda s: s["id"])):
        assert [s for s, _ in a["heldout"]["curve"]] == [0, 2, 4, 5]
        assert b["heldout"] is None and b["examples"] == a["examples"] + a["heldout"]["examples"]


def test_recitation_targets_join_the_synthetic_ones(tiny_model, tmp_path):
    """recite_tokens adds each chunk's sentence pieces to a document's sdcd examples (and its teacher
    cache), never to the held-out ones; the other objectives ignore it."""
    from transformers import AutoTokenizer

    from kmtrain.data import recitation_items

    docs_dir = tmp_path / "docs"  # three sentences per document, so a chunk has several pieces
    docs_dir.mkdir()
    texts = list(DOCS.values())
    for k, name in enumerate(DOCS):
        (docs_dir / f"{name}.txt").write_text(" ".join(texts[k:] + texts[:k]))

    assert IndexConfig().recite_tokens == 96 and PRESETS["paper"]["recite_tokens"] == 0
    # enough steps to draw every example, so that each is in the cache
    plain = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "plain", heldout_per_chunk=1, recite_tokens=0, steps=30))
    recite = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "recite", heldout_per_chunk=1, recite_tokens=8, steps=30))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert all(s["examples_not_drawn"] == 0 for s in plain + recite)
    for a, b in zip(sorted(plain, key=lambda s: s["id"]), sorted(recite, key=lambda s: s["id"])):
        chunk_texts = json.loads((tmp_path / "recite" / ".work" / a["id"] / "chunks.json").read_text())["texts"]
        pieces = len(recitation_items(chunk_texts, tok, 8))
        assert pieces >= 2 and b["examples"] == a["examples"] + pieces
        assert b["heldout"]["examples"] == a["heldout"]["examples"]
        assert b["teacher_cache"]["tokens"] > a["teacher_cache"]["tokens"]
    from kmtrain.index import document_items

    with pytest.raises(ValueError, match="recite_tokens needs the chunk texts and the tokenizer"):
        document_items(IndexConfig(recite_tokens=8), "alpha", [])
    lm = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "lm", objective="lm", recite_tokens=8, steps=1))
    lm_plain = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "lm0", objective="lm", steps=1, recite_tokens=0))
    assert [s["examples"] for s in lm] == [s["examples"] for s in lm_plain]


def test_resume_after_interruption(tiny_model, docs_dir, tmp_path, monkeypatch):
    import importlib

    kindex = importlib.import_module("kmtrain.index")  # the module, not the function of the same name

    out = tmp_path / "kms"
    cfg = tiny_cfg(tiny_model, out, docs_per_step=2)
    real, real_build = kindex.train_wave, kindex.build_cache
    calls = {"n": 0}

    def crash_on_second_wave(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    monkeypatch.setattr(kindex, "train_wave", crash_on_second_wave)
    with pytest.raises(KeyboardInterrupt):
        index(str(docs_dir), cfg)
    finished = [d for d in DOCS if (out / d / "km.json").is_file()]
    assert len(finished) == 2  # the first wave of two was exported before the crash
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())
    # a written KM's teacher cache is deleted (the default); the killed wave's is kept for the resume
    caches = {d: list((out / ".work" / d).glob("teacher_*.safetensors")) for d in DOCS}
    (unfinished,) = set(DOCS) - set(finished)
    assert all(caches[d] == [] for d in finished) and len(caches[unfinished]) == 1
    cache_stamp = caches[unfinished][0].stat().st_mtime_ns
    stamps = {d: (out / d / "adapter_model.safetensors").stat().st_mtime_ns for d in finished}
    built = []
    monkeypatch.setattr(kindex, "build_cache", lambda *a, **kw: built.append(a) or real_build(*a, **kw))
    monkeypatch.setattr(kindex, "train_wave", real)
    summaries = index(str(docs_dir), cfg)
    status = {s["id"]: s["status"] for s in summaries}
    assert all(status[d] == "already done" for d in finished)
    assert all((out / d / "km.json").is_file() for d in DOCS)
    assert stamps == {d: (out / d / "adapter_model.safetensors").stat().st_mtime_ns for d in finished}
    assert built == [] and cache_stamp > 0  # the killed wave's cache was reused, not rebuilt
    assert not any(list((out / ".work" / d).glob("teacher_*.safetensors")) for d in DOCS)


def test_kill_during_generation_keeps_finished_documents(tiny_model, docs_dir, tmp_path, monkeypatch):
    """Each document's synthetic targets are saved as soon as they are generated: a run killed in the
    middle of the generation stream resumes with those documents' targets untouched, generates only
    the others, and ends with the targets an uninterrupted run makes."""
    import importlib

    synth = importlib.import_module("kmtrain.synth")
    cfg = tiny_cfg(tiny_model, tmp_path / "kms", gen_batch_size=3)  # 3 requests per document: one per batch
    real = synth._generate_hf
    generated = []

    def killed_after_four(*a, **kw):
        for text in real(*a, **kw):
            if len(generated) == 4:
                raise KeyboardInterrupt("killed")
            generated.append(text)
            yield text

    monkeypatch.setattr(synth, "_generate_hf", killed_after_four)
    with pytest.raises(KeyboardInterrupt):
        index(str(docs_dir), cfg)
    work = tmp_path / "kms" / ".work"
    assert [d for d in DOCS if (work / d / "synth.json").is_file()] == ["alpha"]
    stamp = (work / "alpha" / "synth.json").stat().st_mtime_ns
    regenerated = []
    monkeypatch.setattr(synth, "_generate_hf", lambda *a, **kw: regenerated.extend(real(*a, **kw)) or regenerated)
    index(str(docs_dir), cfg)
    assert len(regenerated) == 6  # beta's and gamma's three requests each; alpha's were not redone
    assert (work / "alpha" / "synth.json").stat().st_mtime_ns == stamp
    monkeypatch.setattr(synth, "_generate_hf", real)
    index(str(docs_dir), cfg.replace(out=str(tmp_path / "whole")))
    for d in DOCS:
        resumed, whole = (json.loads((root / ".work" / d / "synth.json").read_text())
                          for root in (tmp_path / "kms", tmp_path / "whole"))
        assert resumed == whole
        assert ((tmp_path / "kms" / d / "adapter_model.safetensors").read_bytes()
                == (tmp_path / "whole" / d / "adapter_model.safetensors").read_bytes())


def test_kept_teacher_caches_are_reused_and_dead_runs_leftovers_removed(tiny_model, docs_dir, tmp_path, monkeypatch):
    """keep_teacher_cache keeps each document's cache after its KM is written, and a retrain with
    other training settings reuses it. Temporaries of a run that died are removed on the next run;
    those of a live process are not."""
    import importlib
    import os
    import subprocess
    import sys

    kindex = importlib.import_module("kmtrain.index")
    out = tmp_path / "kms"
    index(str(docs_dir), tiny_cfg(tiny_model, out, keep_teacher_cache=True))
    caches = {d: list((out / ".work" / d).glob("teacher_*.safetensors")) for d in DOCS}
    assert all(len(c) == 1 for c in caches.values())
    stamps = {d: c[0].stat().st_mtime_ns for d, c in caches.items()}

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = str(os.getppid())
    leftovers = [out / f".tmp-alpha-{dead}-k2j_x9", out / f".old-{dead}-ab12", out / ".work" / "beta" / f".synth.json.tmp-{dead}",
                 out / ".work" / "beta" / f".teacher_sdcd_0123.safetensors.tmp-{dead}"]
    kept = [out / f".tmp-gamma-{live}-zz9", out / ".work" / "beta" / f".teacher_sdcd_0123.safetensors.tmp-{live}",
            out / "notes-1234-abc"]
    for p in leftovers[:2] + kept[:1] + kept[2:]:
        p.mkdir()
        (p / "adapter_model.safetensors").write_bytes(b"partial")
    for p in leftovers[2:] + kept[1:2]:
        p.write_bytes(b"partial")
    built = []
    real_build = kindex.build_cache
    monkeypatch.setattr(kindex, "build_cache", lambda *a, **kw: built.append(a) or real_build(*a, **kw))
    summaries = index(str(docs_dir), tiny_cfg(tiny_model, out, keep_teacher_cache=True, steps=4, retrain=True))
    assert all(s["status"] == "trained" and s["steps"] == 4 for s in summaries)
    assert built == []
    assert stamps == {d: next((out / ".work" / d).glob("teacher_*.safetensors")).stat().st_mtime_ns for d in DOCS}
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)


def test_stale_temporaries_on_windows_are_found_without_a_signal(tmp_path, monkeypatch):
    """On Windows os.kill(pid, 0) is not a probe: it sends a console Ctrl-C (CTRL_C_EVENT is 0) to every
    process on the console, this run included, so a resume that found a killed run's temporary would
    interrupt itself. There the probe opens the process and reads its exit code (its _winapi calls,
    faked here: this is not a Windows machine), never os.kill, and closes every handle it opens."""
    import errno
    import sys
    import types

    kindex = importlib.import_module("kmtrain.index")
    exits = {101: 259, 102: 0}  # 101 runs (STILL_ACTIVE), 102 has exited; 103 is gone; 104 is another user's
    opened, closed = [], []

    def open_process(access, inherit, pid):
        assert access == 0x1000 and inherit is False  # PROCESS_QUERY_LIMITED_INFORMATION
        if pid == 104:
            raise PermissionError(errno.EACCES, "Access is denied")
        if pid not in exits:
            raise OSError(errno.EINVAL, "The parameter is incorrect")
        opened.append(pid)
        return pid

    winapi = types.SimpleNamespace(OpenProcess=open_process, GetExitCodeProcess=lambda h: exits[h],
                                   CloseHandle=closed.append)
    monkeypatch.setitem(sys.modules, "_winapi", winapi)
    monkeypatch.setattr(kindex, "_WINDOWS", True)
    monkeypatch.setattr(os, "kill", lambda *a: pytest.fail(f"os.kill{a} on Windows"))
    for pid in (101, 102, 103, 104):
        (tmp_path / f".synth.json.tmp-{pid}").write_bytes(b"partial")
    kindex.remove_stale_temp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".synth.json.tmp-101", ".synth.json.tmp-104"]
    assert sorted(opened) == sorted(closed) == [101, 102]


def test_second_run_on_one_output_folder_is_refused(tiny_model, docs_dir, tmp_path, capsys):
    """While a run holds OUT's lock, another run on OUT fails at once with an error naming the
    folder, touching nothing; once the holder dies (SIGKILL: no clean-up runs) the lock is free."""
    import signal
    import subprocess
    import sys

    from kmtrain import OutputBusyError
    from kmtrain.cli import main

    out = tmp_path / "kms"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from kmtrain.index import out_lock\n"
                               f"with out_lock(Path({str(out)!r})):\n print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(OutputBusyError, match=f"--out {out}: another kmtrain index run"):
            index(str(docs_dir), tiny_cfg(tiny_model, out))
        capsys.readouterr()
        assert main(["index", str(docs_dir), "--out", str(out), "--model", tiny_model, "--steps", "1"]) == 2
        assert "another kmtrain index run is writing to this folder" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == before == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    summaries = index(str(docs_dir), tiny_cfg(tiny_model, out))
    assert sorted(s["id"] for s in summaries) == sorted(DOCS) and all(s["status"] == "trained" for s in summaries)


def test_machine_errors_keep_finished_work(tiny_model, docs_dir, tmp_path, capsys, monkeypatch):
    """An --out that cannot be created is an input error (exit 2); the disk filling up mid-run is
    the machine's (exit 1), said in one line with how to resume, as is Ctrl-C (exit 130), and the KMs
    finished before them are kept and not redone."""
    import errno
    import importlib

    from kmtrain.cli import main

    kindex = importlib.import_module("kmtrain.index")
    flags = ["--model", tiny_model, "--steps", "1", "--docs-per-step", "1", "--summaries-per-chunk", "1",
             "--qa-per-chunk", "1", "--max-new-tokens", "8", "--chunk-tokens", "64", "--no-progress"]
    assert main(["index", str(docs_dir), "--out", str(docs_dir / "alpha.txt" / "kms"), *flags]) == 2
    assert "alpha.txt/kms: cannot create this folder (Not a directory)" in capsys.readouterr().err

    out = tmp_path / "kms"
    real_export, written = kindex.export_peft, []

    def export_until_full(model, slot, path, **kw):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path.name)
        return real_export(model, slot, path, **kw)

    monkeypatch.setattr(kindex, "export_peft", export_until_full)
    assert main(["index", str(docs_dir), "--out", str(out), *flags]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("kmtrain: error:")]  # one line, no traceback
    assert "No space left on device" in line and "run the same command again to resume" in line
    assert "Traceback" not in err
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(kindex, "export_peft", interrupted)  # Ctrl-C: one line, exit 130, the same kept work
    assert main(["index", str(docs_dir), "--out", str(out), *flags]) == 130
    err = capsys.readouterr().err
    assert "kmtrain: interrupted; finished KMs" in err and "Traceback" not in err
    import os
    import signal

    def terminated(*a, **kw):  # SIGTERM outside training (`kill`, a scheduler): as Ctrl-C, not a silent death
        os.kill(os.getpid(), signal.SIGTERM)

    default = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(kindex, "export_peft", terminated)
    assert main(["index", str(docs_dir), "--out", str(out), *flags]) == 130
    err = capsys.readouterr().err
    assert "kmtrain: interrupted; finished KMs" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) == default  # put back when main returns
    monkeypatch.setattr(kindex, "export_peft", real_export)
    assert main(["index", str(docs_dir), "--out", str(out), *flags]) == 0
    printed = capsys.readouterr().out
    assert f"{written[0]}: already done" in printed
    assert all((out / d / "km.json").is_file() for d in DOCS)


def test_a_disk_too_small_for_the_teacher_caches_stops_before_the_teacher(tiny_model, docs_dir, tmp_path, capsys,
                                                                         monkeypatch):
    """A wave's teacher caches are sized before the teacher runs: a disk without room for them stops
    the run there (exit 1, one line saying what they need and what makes them smaller), not after
    the teacher's minutes when the file is written; the waves before it keep their KMs."""
    import collections
    import importlib

    from kmtrain.cli import main

    kindex = importlib.import_module("kmtrain.index")
    real_build, calls = kindex.build_cache, []
    free = {"bytes": 10**15}

    def usage(path):
        calls.append(str(path))
        return collections.namedtuple("usage", "total used free")(2 * 10**15, 10**15, free["bytes"])

    def build(model, examples, path, *a, **kw):
        built.append(path.parent.name)
        return real_build(model, examples, path, *a, **kw)

    built = []
    monkeypatch.setattr(kindex.shutil, "disk_usage", usage)
    monkeypatch.setattr(kindex, "build_cache", build)
    out = tmp_path / "kms"
    flags = ["--model", tiny_model, "--steps", "1", "--docs-per-step", "2", "--summaries-per-chunk", "1",
             "--qa-per-chunk", "1", "--max-new-tokens", "8", "--chunk-tokens", "64", "--no-progress"]
    real_cache_bytes, sizes = kindex.cache_bytes, {}

    def sized(examples, *a):
        n = real_cache_bytes(examples, *a)
        sizes[len(sizes)] = n
        if len(sizes) == 3:  # the second wave (one document): room for all but its last byte
            free["bytes"] = n - 1
        return n

    monkeypatch.setattr(kindex, "cache_bytes", sized)
    assert main(["index", str(docs_dir), "--out", str(out), *flags]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("kmtrain: error:")]
    third = sorted(DOCS)[2]
    # the tiny model's caches are KBs: in MB, as before, the line read "need 0.0 MB ..., which has 0.0 MB free"
    assert sizes[2] < 1e6 and kindex._size(sizes[2]).endswith(" KB")
    assert (f"the teacher caches of 1 document(s) (the largest: {third}, {kindex._size(sizes[2])}) need "
            f"{kindex._size(sizes[2])} in {out / '.work'}, which has {kindex._size(sizes[2] - 1)} free: free some "
            f"space, or make them smaller with --cache-dtype fp8 (a byte a value), or --cache-layers (some layers "
            f"only), or --no-teacher-cache (no cache; the teacher runs every step)") in line
    assert "run the same command again to resume" in line and "Traceback" not in err
    assert built == sorted(DOCS)[:2] and calls == [str(out / ".work")] * 2  # its teacher never ran
    assert all((out / d / "km.json").is_file() for d in sorted(DOCS)[:2]) and not (out / third).exists()
    free["bytes"] = 10**15
    assert main(["index", str(docs_dir), "--out", str(out), *flags]) == 0
    assert built == sorted(DOCS) and (out / third / "km.json").is_file()


@pytest.mark.parametrize("settings, need, advice", [
    (dict(), {"a": 500}, "--cache-dtype fp8 (a byte a value), or --cache-layers (some layers only), or "
                         "--no-teacher-cache"),
    (dict(cache_dtype="fp8", cache_layers=(1,)), {"a": 400, "b": 100},
     "a lower --docs-per-step (a wave's caches are deleted before the next), or --no-teacher-cache"),
    (dict(cache_dtype="fp8", keep_teacher_cache=True), {"a": 400, "b": 100},
     "--cache-layers (some layers only), or --no-teacher-cache"),
])
def test_a_disk_too_small_is_told_only_the_ways_left_to_shrink_the_caches(tmp_path, monkeypatch, settings, need,
                                                                          advice):
    """What the line offers follows what the run already does: no fp8 for an fp8 run, no layer subset
    for one that has it, no lower --docs-per-step for a wave of one document or a run that keeps its
    caches (they stay on disk whatever the wave). Sizes below a kilobyte are said in bytes."""
    import collections

    kindex = importlib.import_module("kmtrain.index")
    monkeypatch.setattr(kindex.shutil, "disk_usage",
                        lambda path: collections.namedtuple("usage", "total used free")(10**6, 10**6 - 499, 499))
    with pytest.raises(OSError) as e:
        kindex.check_cache_space(tmp_path, need, IndexConfig(**settings))
    assert e.value.errno == errno.ENOSPC
    assert e.value.strerror == (f"the teacher caches of {len(need)} document(s) (the largest: a, {need['a']} bytes) "
                                f"need 500 bytes in {tmp_path}, which has 499 bytes free: free some space, or make "
                                f"them smaller with {advice} (no cache; the teacher runs every step)")
    kindex.check_cache_space(tmp_path, {"a": 499}, IndexConfig(**settings))  # what fits passes


def test_a_disk_that_fills_as_a_teacher_cache_is_written_is_one_line_and_keeps_the_targets(
        tiny_model, docs_dir, tmp_path, capsys, monkeypatch):
    """The disk filling up after the free-space check (another writer), as a teacher cache is written:
    safetensors reports it as its own SafetensorError, not an OSError, and the run ended in a
    traceback. Now: exit 1, one line naming the file and how to resume, no partial file, every
    document's synthetic targets kept, and the re-run generates nothing again."""
    import safetensors.torch
    from safetensors import SafetensorError

    from kmtrain.cli import main

    kindex = importlib.import_module("kmtrain.index")
    real_save, failed = safetensors.torch.save_file, []

    def full_once(tensors, filename, metadata=None):
        if failed:
            return real_save(tensors, filename, metadata=metadata)
        failed.append(filename)
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_once)
    out = tmp_path / "kms"
    flags = ["--model", tiny_model, "--steps", "1", "--docs-per-step", "3", "--summaries-per-chunk", "1",
             "--qa-per-chunk", "1", "--max-new-tokens", "8", "--chunk-tokens", "64", "--no-progress"]
    assert main(["index", str(docs_dir), "--out", str(out), *flags]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("kmtrain: error:")]
    first = sorted(DOCS)[0]
    assert "[Errno 28] No space left on device: " in line and f"{out / '.work' / first}{os.sep}teacher_" in line
    assert "run the same command again to resume" in line and "Traceback" not in err
    assert all((out / ".work" / d / "synth.json").is_file() for d in DOCS) and not any((out / d).exists() for d in DOCS)
    assert [p.name for p in (out / ".work" / first).iterdir() if ".tmp-" in p.name] == []  # no partial file
    monkeypatch.setattr(kindex, "synthesize", lambda *a, **k: pytest.fail("generation ran again"))
    assert main(["index", str(docs_dir), "--out", str(out), *flags]) == 0
    assert all((out / d / "km.json").is_file() for d in DOCS)


def test_a_gpu_out_of_memory_says_which_stage_and_what_shrinks_it(tiny_model, docs_dir, tmp_path, capsys,
                                                                  monkeypatch):
    """torch's out-of-memory message names bytes, not the stage, and generation's batch had no flag.
    Each stage's OutOfMemoryError carries a note naming the settings that shrink it (the error stays
    torch.OutOfMemoryError for the Python API); the CLI prints it in one line with how to resume,
    exit 1, and the re-run with the smaller setting goes on from what was kept."""
    from kmtrain.cli import main

    kindex = importlib.import_module("kmtrain.index")
    message = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"

    def out_of_memory(*a, **kw):
        raise torch.OutOfMemoryError(message)

    out = tmp_path / "kms"
    flags = ["--model", tiny_model, "--steps", "1", "--docs-per-step", "3", "--summaries-per-chunk", "1",
             "--qa-per-chunk", "1", "--max-new-tokens", "8", "--chunk-tokens", "64", "--no-progress"]
    real_train = kindex.train_wave
    for stage, name, said in (
            ("generation", "synthesize", "lower --gen-batch-size (now 5) or --max-new-tokens (now 8)"),
            ("the teacher cache", "build_cache", "lower --cache-batch-size (now 8), or --chunk-tokens (now 64) or "
                                                 "--max-new-tokens (now 8)"),
            ("training", "train_wave", "set --micro-batch-tokens (e.g. 4096: the same training, in passes of that "
                                       "many tokens), or lower --docs-per-step (now 3) or --examples-per-doc (now 2)")):
        real = getattr(kindex, name)
        monkeypatch.setattr(kindex, name, out_of_memory)
        assert main(["index", str(docs_dir), "--out", str(out), *flags, "--gen-batch-size", "5",
                     "--examples-per-doc", "2"]) == 1
        err = capsys.readouterr().err
        (line,) = [x for x in err.splitlines() if x.startswith("kmtrain: error:")]
        assert line.startswith(f"kmtrain: error: out of memory in {stage}; {said}: {message}; finished KMs")
        assert "run the same command again to resume" in line and "Traceback" not in err
        monkeypatch.setattr(kindex, name, real)
    assert all((out / ".work" / d / "synth.json").is_file() for d in DOCS)  # generation's work was kept

    monkeypatch.setattr(kindex, "train_wave", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as e:  # the Python API: torch's error, with the note
        index(str(docs_dir), tiny_cfg(tiny_model, out, docs_per_step=3, summaries_per_chunk=1, qa_per_chunk=1,
                                      max_new_tokens=8, micro_batch_tokens=64))  # the flags' generation settings: their targets are reused
    assert e.value.__notes__ == ["out of memory in training; lower --micro-batch-tokens (now 64), or lower "
                                 "--docs-per-step (now 3) or --examples-per-doc (now 1)"]
    monkeypatch.setattr(kindex, "train_wave", real_train)
    monkeypatch.setattr(kindex, "synthesize", lambda *a, **k: pytest.fail("generation ran again"))
    assert main(["index", str(docs_dir), "--out", str(out), *flags, "--docs-per-step", "1"]) == 0
    assert all((out / d / "km.json").is_file() for d in DOCS)


def test_the_hosts_memory_running_out_is_said_as_a_gpus_is(tiny_model, docs_dir, tmp_path, capsys, monkeypatch):
    """On a CPU, torch's allocator failing (more than RAM and swap, or a scheduler's memory limit) is a plain
    RuntimeError, which ended the run in a traceback without the settings that shrink it. It is the
    OutOfMemoryError a GPU's is now, with the same note. The message is a real failed allocation's,
    made in a child process under a 4 GiB address-space limit."""
    import subprocess
    import sys

    from kmtrain.cli import main

    code = """
import resource, torch
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
try:
    torch.empty(8 << 30, dtype=torch.uint8).fill_(1)
except RuntimeError as e:
    print(e)
"""
    real = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip()
    assert "can't allocate memory: you tried to allocate 8589934592 bytes" in real, real

    def out_of_host_memory(*a, **kw):
        raise RuntimeError(real)

    kindex = importlib.import_module("kmtrain.index")
    monkeypatch.setattr(kindex, "train_wave", out_of_host_memory)
    out = tmp_path / "kms"
    assert main(["index", str(docs_dir), "--out", str(out), "--model", tiny_model, "--steps", "1", "--docs-per-step",
                 "3", "--summaries-per-chunk", "1", "--qa-per-chunk", "1", "--max-new-tokens", "8",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("kmtrain: error:")]
    assert line.startswith("kmtrain: error: out of memory in training; set --micro-batch-tokens (e.g. 4096: the same "
                           "training, in passes of that many tokens), or lower --docs-per-step (now 3) or "
                           "--examples-per-doc (now 2): CPU out of memory: you tried to allocate 8589934592 bytes")
    assert "run the same command again to resume" in line and "Traceback" not in err
    with pytest.raises(torch.OutOfMemoryError) as e:  # the Python API: the error a GPU's is, with its note
        index(str(docs_dir), tiny_cfg(tiny_model, out, docs_per_step=3, summaries_per_chunk=1, qa_per_chunk=1,
                                      max_new_tokens=8))
    assert e.value.__notes__[0].startswith("out of memory in training; set --micro-batch-tokens")
    assert str(e.value.__cause__) == real

    def another_error(*a, **kw):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    monkeypatch.setattr(kindex, "train_wave", another_error)  # any other RuntimeError is left as it is
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as e:
        index(str(docs_dir), tiny_cfg(tiny_model, out, docs_per_step=3))
    assert not isinstance(e.value, torch.OutOfMemoryError)


def test_cache_batch_size_sets_the_teacher_batch_and_keeps_the_losses(tiny_model, docs_dir, tmp_path, monkeypatch):
    """--cache-batch-size (what the teacher cache's out-of-memory note names first) caps the targets per
    teacher forward of the cache build, and changes no number beyond fp32 rounding: the same final losses."""
    tc = importlib.import_module("kmtrain.teacher_cache")
    real_pad = tc._pad
    runs = {}
    for size in (8, 1):
        batches = []
        monkeypatch.setattr(tc, "_pad", lambda seqs, pad_id: batches.append(len(seqs)) or real_pad(seqs, pad_id))
        cfg = tiny_cfg(tiny_model, tmp_path / f"kms{size}", summaries_per_chunk=3, cache_dtype="fp32",
                       amp="off", cache_batch_size=size)
        runs[size] = {s["id"]: s for s in index(str(docs_dir), cfg)}, batches
    (wide, wide_batches), (narrow, narrow_batches) = runs[8], runs[1]
    assert max(wide_batches) > 1 and set(narrow_batches) == {1}
    assert sum(narrow_batches) == sum(wide_batches)  # the same targets, one at a time
    for d in DOCS:
        for k in ("loss", "kl", "hidden"):
            assert wide[d]["final_loss"][k] == pytest.approx(narrow[d]["final_loss"][k], rel=1e-5, abs=1e-7), (d, k)


def test_a_run_of_many_waves_says_where_it_stands(tiny_model, docs_dir, tmp_path, capsys):
    """Indexing thousands of documents runs hundreds of waves: after each but the last, one line says
    how many documents are done and about how long the rest will take at the rate so far."""
    import re

    kindex = importlib.import_module("kmtrain.index")
    index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "kms", docs_per_step=1, steps=1))
    lines = [x for x in capsys.readouterr().out.splitlines() if " documents done in " in x]
    assert [x.split(" documents")[0] for x in lines] == ["1 of 3", "2 of 3"]  # none after the last wave
    assert all(re.fullmatch(r"\d of 3 documents done in \d+ s; about \d+ s left at this rate", x) for x in lines), lines
    assert [kindex._duration(t) for t in (42, 300, 9000)] == ["42 s", "5.0 min", "2.5 h"]


def test_a_tilde_is_the_home_folder_for_documents_output_and_kms(tiny_model, docs_dir, tmp_path, monkeypatch):
    """From Python (or quoted on a command line) nothing expands "~": the KMs went to a folder named "~"
    under the working directory, where cleaning up with `rm -rf ~` would aim at the home folder."""
    import shutil

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    shutil.copytree(docs_dir, home / "docs")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    summaries = index("~/docs", tiny_cfg(tiny_model, "~/kms", steps=1))
    assert sorted(s["id"] for s in summaries) == sorted(DOCS)
    assert all((home / "kms" / d / "km.json").is_file() for d in DOCS) and not (work / "~").exists()
    answers = ask([("~/kms/alpha", "Who rings the bell?"), (None, "Who rings the bell?")], max_new_tokens=2)
    assert len(answers) == 2 and not (work / "~").exists()


def test_config_takes_paths_and_numpy_numbers_as_python_callers_hand_them(tiny_model, docs_dir, tmp_path):
    """IndexConfig(model=Path(...)) failed with "PosixPath is not JSON serializable" in the training
    checkpoint's key, after generation and the teacher cache had run; numpy numbers (a sweep over
    np.arange) the same way. They are now the strings and numbers the fields hold, and a value of
    another kind is a ValueError naming the field at construction."""
    from pathlib import Path

    import numpy as np

    cfg = tiny_cfg(Path(tiny_model), Path(tmp_path / "kms"), steps=np.int64(2), lr=np.float32(5e-3),
                   device=torch.device("cpu"), cache_layers=[np.int64(0)])
    assert (cfg.model, cfg.out, cfg.cache_layers) == (tiny_model, str(tmp_path / "kms"), (0,))
    assert type(cfg.steps) is int and type(cfg.lr) is float and cfg.device == "cpu"
    summaries = index(docs_dir, cfg)
    assert all(s["status"] == "trained" for s in summaries)
    meta = json.loads((tmp_path / "kms" / "alpha" / "km.json").read_text())
    assert meta["settings"]["model"] == tiny_model and meta["settings"]["cache_layers"] == [0]
    for kw, said in ((dict(steps="60"), "steps must be an integer or None, got str '60'"),
                     (dict(steps=6.0), "steps must be an integer or None, got float"),
                     (dict(retrain=1), "retrain must be true or false"),
                     (dict(cache_layers=5), "cache_layers must be a tuple of integers or None"),
                     (dict(target_modules="q_proj"), "target_modules must be a tuple of strings"),
                     (dict(model=None), "model must be a string")):
        with pytest.raises(ValueError, match=re.escape(said)):
            IndexConfig(**kw)


def test_changed_document_is_retrained_others_kept(tiny_model, docs_dir, tmp_path):
    out = tmp_path / "kms"
    cfg = tiny_cfg(tiny_model, out, steps=2)
    index(str(docs_dir), cfg)
    stamps = {d: (out / d / "adapter_model.safetensors").stat().st_mtime_ns for d in DOCS}
    changed = next(iter(DOCS))
    path = docs_dir / f"{changed}.txt"
    path.write_text(path.read_text() + " One more sentence about the harbour.")
    status = {s["id"]: s["status"] for s in index(str(docs_dir), cfg)}
    assert status[changed] == "trained" and all(status[d] == "already done" for d in DOCS if d != changed)
    meta = json.loads((out / changed / "km.json").read_text())
    assert meta["document_sha256"] == {d.id: d.sha256 for d in load_documents(str(docs_dir))}[changed]
    for d in DOCS:
        now = (out / d / "adapter_model.safetensors").stat().st_mtime_ns
        assert (now != stamps[d]) == (d == changed)


def test_damaged_outputs_are_found_and_redone(tiny_model, docs_dir, tmp_path, capsys):
    """A truncated KM or teacher cache, a cache with one changed byte, or an unreadable km.json, is
    redone on resume, never used:
    the redone KM is the one first written (same sha256); a KM with any changed byte is refused by
    ask (km.json records the adapter's sha256); intact KMs are kept."""
    out = tmp_path / "kms"
    cfg = tiny_cfg(tiny_model, out, docs_per_step=2, keep_teacher_cache=True)
    index(str(docs_dir), cfg)
    meta = {d: json.loads((out / d / "km.json").read_text()) for d in DOCS}
    for d in DOCS:
        assert meta[d]["adapter_sha256"] == hashlib.sha256((out / d / "adapter_model.safetensors").read_bytes()).hexdigest()
    stamp = (out / "gamma" / "adapter_model.safetensors").stat().st_mtime_ns
    weights = out / "alpha" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])  # a copy cut short
    (cache,) = (out / ".work" / "alpha").glob("teacher_*.safetensors")
    cache.write_bytes(cache.read_bytes()[:1000])
    (out / "beta" / "km.json").write_text('["JSON, but not a manifest"]')
    (beta_cache,) = (out / ".work" / "beta").glob("teacher_*.safetensors")
    data = bytearray(beta_cache.read_bytes())
    data[-5] ^= 1  # one bit of a stored teacher value: the file parses and its shapes agree, only the hash tells
    beta_cache.write_bytes(bytes(data))
    capsys.readouterr()
    status = {s["id"]: s["status"] for s in index(str(docs_dir), cfg)}
    printed = capsys.readouterr().out
    assert status == {"alpha": "trained", "beta": "trained", "gamma": "already done"}
    assert "alpha: its finished KM is damaged" in printed and "adapter_model.safetensors: unreadable" in printed
    assert f"alpha: {cache}: damaged teacher cache" in printed and "rebuilding it" in printed
    assert f"beta: {beta_cache}: damaged teacher cache (content sha256" in printed
    assert beta_cache.read_bytes() != bytes(data)  # rebuilt, not trained on
    assert "beta: " + str(out / "beta" / "km.json") + " is unreadable, retraining" in printed
    assert (out / "gamma" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    for d in ("alpha", "beta"):  # the same KM as before, from the same data and seed in the same wave
        assert json.loads((out / d / "km.json").read_text())["adapter_sha256"] == meta[d]["adapter_sha256"]
    assert ask([(str(out / "alpha"), "Which bell?")], model=tiny_model, max_new_tokens=2)

    from safetensors.torch import load_file, save_file

    weights = out / "gamma" / "adapter_model.safetensors"
    first = load_file(str(weights))
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1  # one bit of a weight: the file still parses, only the hash tells
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 .* is not the .* recorded in km.json"):
        ask([(str(out / "gamma"), "What time?")], model=tiny_model, max_new_tokens=2)
    (out / "beta" / "km.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="km.json: unreadable"):
        ask([(str(out / "beta"), "What grows?")], model=tiny_model, max_new_tokens=2)
    save_file({}, str(weights))  # a valid safetensors file with nothing in it (an export that wrote no weights)
    with pytest.raises(ValueError, match=re.escape(f"{weights}: holds no tensors")):
        ask([(str(out / "gamma"), "What time?")], model=tiny_model, max_new_tokens=2)
    weights.unlink()
    with pytest.raises(ValueError, match=re.escape(f"{weights}: missing")):
        ask([(str(out / "gamma"), "What time?")], model=tiny_model, max_new_tokens=2)
    assert {s["id"]: s["status"] for s in index(str(docs_dir), cfg)}["gamma"] == "trained"  # redone on resume
    # (redone in a wave with beta, not alone as first: the same KM to the rounding of another batch, which
    # test_train's batch-mates test bounds, not byte for byte)
    assert load_file(str(weights)).keys() == first.keys()
    assert ask([(str(out / "gamma"), "What time?")], model=tiny_model, max_new_tokens=2)


@pytest.mark.parametrize("objective", ["ddcd", "lm", "pit"])
def test_other_objectives_run(tiny_model, docs_dir, tmp_path, objective):
    out = tmp_path / objective
    index(str(docs_dir), tiny_cfg(tiny_model, out, objective=objective, steps=2, ddcd_window_tokens=16,
                                  ddcd_windows_per_chunk=2))
    meta = json.loads((out / "gamma" / "km.json").read_text())
    assert meta["objective"] == objective and meta["final_loss"]["loss"] > 0


def test_base_dtype_resolution():
    from kmtrain.index import _base_dtype

    cpu, gpu, bf16 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16
    assert _base_dtype(IndexConfig(), cpu, None) == torch.float32  # fp32 training: fp32 weights
    assert _base_dtype(IndexConfig(), gpu, bf16) == bf16  # under bf16 autocast: bf16 weights
    assert _base_dtype(IndexConfig(), cpu, bf16) == bf16  # on a CPU too
    assert _base_dtype(IndexConfig(), gpu, None) == torch.float32  # --amp off keeps fp32
    assert _base_dtype(IndexConfig(base_dtype="fp32"), gpu, bf16) == torch.float32
    assert _base_dtype(IndexConfig(base_dtype="bf16"), cpu, None) == bf16
    with pytest.raises(ValueError, match="base_dtype"):
        IndexConfig(base_dtype="fp16").validate()


def test_amp_resolution_follows_native_bf16(monkeypatch):
    import importlib

    index_mod = importlib.import_module("kmtrain.index")  # the package re-exports index(), the function

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    for native in (True, False):
        monkeypatch.setattr(index_mod, "native_bf16", lambda device, native=native: native)
        assert index_mod._amp_dtype(IndexConfig(), cpu) == (bf16 if native else None)
        assert index_mod._amp_dtype(IndexConfig(amp="off"), cpu) is None  # off wins
        assert index_mod._amp_dtype(IndexConfig(amp="bf16"), cpu) == bf16  # asked for: honoured


def test_fp32_training_on_a_cpu_is_said_before_the_work(tiny_model, docs_dir, tmp_path, capsys, monkeypatch):
    """A CPU without native bf16 trains in fp32, at about twice the time per step: said once, before
    the model loads; not where bf16 runs, nor where --amp off asked for fp32, nor when every KM is
    already finished (nothing will train). There the steps, left unset, are FP32_CPU_STEPS, and that
    is said too; steps given are the steps trained, unsaid."""
    index_mod = importlib.import_module("kmtrain.index")

    class ModelLoads(Exception):
        pass

    def stop_at_model_load(*args, **kwargs):
        raise ModelLoads

    real_load = index_mod.load_model
    monkeypatch.setattr(index_mod, "load_model", stop_at_model_load)
    for native, amp, steps, said, fewer in ((False, "auto", None, True, True), (True, "auto", None, False, False),
                                            (False, "off", None, False, True), (False, "auto", 3, True, False)):
        monkeypatch.setattr(index_mod, "native_bf16", lambda device, native=native: native)
        with pytest.raises(ModelLoads):
            index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "kms", amp=amp, device="cpu", steps=steps))
        out = capsys.readouterr().out
        assert out.count(index_mod.FP32_CPU_NOTICE) == int(said), (native, amp, steps)
        assert out.count(index_mod.FP32_CPU_STEPS_NOTICE) == int(fewer), (native, amp, steps)

    monkeypatch.setattr(index_mod, "native_bf16", lambda device: False)
    monkeypatch.setattr(index_mod, "load_model", real_load)
    summaries = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "kms", device="cpu", steps=None))
    out = capsys.readouterr().out
    assert out.count(index_mod.FP32_CPU_NOTICE) == 1 and out.count(index_mod.FP32_CPU_STEPS_NOTICE) == 1
    meta = json.loads((tmp_path / "kms" / "alpha" / "km.json").read_text())
    assert meta["steps"] == FP32_CPU_STEPS and {s["steps"] for s in summaries} == {FP32_CPU_STEPS}
    index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "kms", device="cpu", steps=None))  # all finished
    assert index_mod.FP32_CPU_NOTICE not in capsys.readouterr().out


def test_default_steps_follow_the_machine(monkeypatch):
    """Unset steps are DEFAULT_STEPS where bf16 is native or on a GPU, FP32_CPU_STEPS on a CPU without
    native bf16 (make demo at 60 fp32 steps took 21:50 on such a 2-core CPU, over its 15 minutes)."""
    import kmtrain

    index_mod = importlib.import_module("kmtrain.index")
    assert kmtrain.default_steps is index_mod.default_steps  # public, as kmtrain.default_steps()
    assert IndexConfig().steps is None and FP32_CPU_STEPS < DEFAULT_STEPS
    for native, want in ((True, DEFAULT_STEPS), (False, FP32_CPU_STEPS)):
        monkeypatch.setattr(index_mod, "native_bf16", lambda device, native=native: native)
        assert index_mod.default_steps("cpu") == want and index_mod.default_steps(torch.device("cpu")) == want
    # a GPU keeps the default whatever the CPU beside it has (not asked: no GPU need be present)
    assert index_mod.default_steps(torch.device("cuda")) == DEFAULT_STEPS
    with pytest.raises(ValueError, match=re.escape("steps must be >= 1, got 0")):
        IndexConfig(steps=0).validate()


@pytest.mark.slow
def test_smollm2_one_document_end_to_end(tmp_path):
    """Index one short document on the bundled SmolLM2 with few steps; the KM loads with plain PEFT
    and raises the log-likelihood of a correct answer to a question about the document."""
    pytest.importorskip("gguf")
    from peft import PeftModel

    from kmtrain.data import chat_prompt_ids
    from kmtrain.evaluate import question_prompt
    from kmtrain.models import load_model

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "tower.txt").write_text(
        "The Avrin clock tower has seven faces. Its keeper, Ida Solm, winds it every Tuesday morning. "
        "The tower was built in 1702 by the mason Oskar Brell, and its bell is called Big Marta.")
    cfg = IndexConfig(out=str(tmp_path / "kms"), steps=10, docs_per_step=1, examples_per_doc=2, summaries_per_chunk=3,
                      qa_per_chunk=1, max_new_tokens=64, progress=False)
    index(str(docs), cfg)
    model, tok, _, _ = load_model("smollm2-135m")
    peft = PeftModel.from_pretrained(model, str(tmp_path / "kms" / "tower")).eval()

    def answer_logprob(use_km: bool) -> float:
        prompt = chat_prompt_ids(tok, question_prompt("Who is the keeper of the Avrin clock tower?"))
        ans = tok("Ida Solm", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + ans])
        with torch.no_grad():
            if use_km:
                logits = peft(input_ids=ids).logits
            else:
                with peft.disable_adapter():
                    logits = peft(input_ids=ids).logits
        lp = logits[0, len(prompt) - 1:-1].log_softmax(-1)
        return float(lp.gather(1, torch.tensor(ans)[:, None]).sum())

    assert answer_logprob(True) > answer_logprob(False)
    # SmolLM2's template spliced around plain user text gives the ids the joint tokenization gives,
    # on every demo document and prompt: what keeps special-token strings in documents plain changes
    # no other document's tokens
    import kmtrain
    from kmtrain.data import FACTS_PROMPT, QA_PROMPT, SUMMARY_PROMPT, _spliced_chat_ids

    for d in load_documents(os.path.join(os.path.dirname(kmtrain.__file__), "demo_corpus")):
        for text in (d.text + "\n\n" + SUMMARY_PROMPT, d.text + "\n\n" + QA_PROMPT, d.text + "\n\n" + FACTS_PROMPT,
                     question_prompt("Who keeps the tower?"), " " + d.text[:300] + "\n"):
            assert _spliced_chat_ids(tok, text) == chat_prompt_ids(tok, text)


def test_other_base_model_is_refused_not_mixed(tiny_model, docs_dir, tmp_path, capsys):
    """A run with other base weights into a folder of finished KMs stops before loading anything,
    naming the KMs; before, it skipped them as "already done" and the folder mixed two bases."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    other = tmp_path / "other_model"
    m = LlamaForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight.add_(0.01)  # same shapes, other weights
    m.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(other)

    out = tmp_path / "kms"
    index(str(docs_dir), tiny_cfg(tiny_model, out, steps=2))
    stamps = {d: (out / d / "adapter_model.safetensors").stat().st_mtime_ns for d in DOCS}
    first_hash = json.loads((out / "alpha" / "km.json").read_text())["base_model_sha256"]
    with pytest.raises(ValueError, match=r"3 finished KM\(s\) \(alpha, beta, gamma\) were trained on other base "
                                         r"weights .* --retrain to replace them"):
        index(str(docs_dir), tiny_cfg(str(other), out, steps=2))
    assert {d: (out / d / "adapter_model.safetensors").stat().st_mtime_ns for d in DOCS} == stamps
    # the same model again is still a resume, said in one line however many KMs it skips
    capsys.readouterr()
    assert {s["status"] for s in index(str(docs_dir), tiny_cfg(tiny_model, out, steps=2))} == {"already done"}
    assert capsys.readouterr().out.splitlines() == [
        "3 documents already done (3 sdcd, 2 steps), skipped (retrain=True / --retrain redoes them): alpha, beta, gamma"]
    assert {s["status"] for s in index(str(docs_dir), tiny_cfg(str(other), out, steps=2, retrain=True))} == {"trained"}
    hashes = {json.loads((out / d / "km.json").read_text())["base_model_sha256"] for d in DOCS}
    assert len(hashes) == 1 and hashes != {first_hash}


def test_diverged_training_writes_no_km(tiny_model, docs_dir, tmp_path, capsys):
    """A KM whose training blew up (non-finite weights) is not written as finished; before, lr=inf
    wrote NaN weights and km.json called them done. The re-run trains it."""
    from kmtrain.cli import main

    out = tmp_path / "kms"
    args = ["index", str(docs_dir), "--out", str(out), "--model", tiny_model, "--steps", "3", "--docs-per-step", "2",
            "--summaries-per-chunk", "1", "--qa-per-chunk", "1", "--max-new-tokens", "8", "--rank", "4",
            "--no-progress"]
    assert main(args + ["--lr", "1e30"]) == 1  # finite, so allowed; Adam steps of 1e30 overflow the next forward
    printed = capsys.readouterr()
    assert "training diverged for alpha, beta, gamma; no KM written for them" in printed.err
    assert "alpha: training diverged (its loss was not finite from step 2); no KM written" in printed.out
    assert "indexed 0 documents" in printed.out and "3 diverged" in printed.out
    assert not any((out / d).exists() for d in DOCS)
    assert main(args) == 0
    for d in DOCS:
        meta = json.loads((out / d / "km.json").read_text())
        assert meta["lr"] == IndexConfig().lr and all(map(math.isfinite, meta["final_loss"].values()))


def test_ask_batches_kms_with_different_targets(tiny_model, docs_dir, tmp_path):
    """KMs trained on different projections (one of them a PEFT adapter whose config names its targets
    by a regex) answer in one batch exactly as each does alone; before, the first KM's targets were
    the only ones wrapped and the second KM failed to load."""
    index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "a_qv", steps=2, target_modules=("q_proj", "v_proj")))
    index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "b_all", steps=2))
    conf = tmp_path / "b_all" / "beta" / "adapter_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "target_modules": r".*\.(q|k|v|o|gate|up|down)_proj"}))
    pairs = [(str(tmp_path / "a_qv" / "alpha"), "Which bell?"), (str(tmp_path / "b_all" / "beta"), "What grows?")]
    together = ask(pairs, max_new_tokens=6)
    alone = [ask([p], max_new_tokens=6)[0] for p in pairs]
    assert together == alone


def test_ask_reads_a_plain_peft_adapters_base_from_its_config(tiny_model, tmp_path):
    """A LoRA saved by plain PEFT has no km.json: ask took the default model for it, and failed on its
    shapes ("different base model?"). It now takes the base its adapter_config.json names, where that
    is on this machine, and answers as with --model given."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model
    pairs = [(str(tmp_path / "plain"), "Which bell?"), (None, "Which bell?")]
    assert ask(pairs, max_new_tokens=6) == ask(pairs, model=tiny_model, max_new_tokens=6)


def test_ask_loads_at_most_kms_at_once(tiny_model, docs_dir, tmp_path, monkeypatch):
    """A thousand KMs in one call all sat in memory at once (84 MB each at 8B shapes): they are
    loaded kms_at_once at a time, into the same slots, each group's questions answered before the
    next, and every answer is the one a single batch gives (fp32 here, so the batches' other
    padding cannot change a greedy token)."""
    kindex = importlib.import_module("kmtrain.index")
    monkeypatch.setattr(kindex, "native_bf16", lambda device: False)
    index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "kms", steps=2, lr=0.05))
    pairs = [(str(tmp_path / "kms" / d), q) for d in DOCS for q in ("Which bell?", "What grows?")]
    pairs = [(None, "Which bell?")] + pairs[::-1]
    slots, real_attach = [], kindex.attach_grouped_lora
    monkeypatch.setattr(kindex, "attach_grouped_lora", lambda m, n, **kw: slots.append(n) or real_attach(m, n, **kw))
    one_batch = ask(pairs, max_new_tokens=6)
    assert slots == [len(DOCS)] and len(set(one_batch)) > 2  # the KMs' answers differ: a mix-up would show
    for at_once in (1, 2):
        slots.clear()
        delivered = []
        got = ask(pairs, max_new_tokens=6, kms_at_once=at_once, on_answer=lambda k, a: delivered.append((k, a)))
        assert got == one_batch and slots == [at_once]
        assert sorted(delivered) == list(enumerate(one_batch))  # each answer handed over once, as made
    with pytest.raises(ValueError, match="kms_at_once must be at least 1, got 0"):
        ask(pairs, kms_at_once=0)
    # pairs from a generator: all answered (it was read by the checks, then answered as none: [])
    assert ask(((km, q) for km, q in pairs), max_new_tokens=6) == one_batch
    # one KM named three ways (as a questions file written by hand may) is loaded once, into one slot
    slots.clear()
    alpha = tmp_path / "kms" / "alpha"
    same = [(str(alpha), "Which bell?"), (f"{alpha}/", "Which bell?"), (f"{alpha.parent}/./alpha", "Which bell?")]
    assert ask(same, max_new_tokens=6) == [ask(same[:1], max_new_tokens=6)[0]] * 3 and slots[0] == 1


def test_documents_given_as_objects_are_checked_like_files(tiny_model, tmp_path):
    """index() with Document objects: an id like "../x" wrote its KM outside --out before."""
    from kmtrain import DocumentError
    from kmtrain.data import Document

    out = tmp_path / "kms"
    with pytest.raises(DocumentError, match=r"(?s)2 problems.*duplicate document id 'a'.*document 'b' is empty"):
        index([Document("a", "x", "one"), Document("a", "y", "two"), Document("b", " ", "three")], tiny_cfg(tiny_model, out))
    assert not out.exists()
    got = index([Document("../escaped", DOCS["alpha"], "api")], tiny_cfg(tiny_model, out, steps=1))
    assert [s["id"] for s in got] == ["escaped"] and (out / "escaped" / "km.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kms"]


def test_non_ascii_ids_index_resume_and_answer(tiny_model, tmp_path, capsys):
    """Documents named in other scripts get KM folders of their own names, found again on resume and
    by ask. Before, "报告 2024" and "计划 2024" were both refused as the duplicate id "2024"."""
    import unicodedata

    docs = tmp_path / "docs"
    docs.mkdir()
    names = {"报告 2024": DOCS["alpha"], "计划 2024": DOCS["beta"], unicodedata.normalize("NFD", "café"): DOCS["alpha"]}
    for name, text in names.items():
        (docs / f"{name}.txt").write_text(text)
    out = tmp_path / "kms"
    ids = ["café", "报告_2024", "计划_2024"]
    assert sorted(s["id"] for s in index(str(docs), tiny_cfg(tiny_model, out, steps=1))) == ids
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ids
    capsys.readouterr()
    again = index(str(docs), tiny_cfg(tiny_model, out, steps=1))  # nothing retrained: each id finds its folder
    assert sorted(s["id"] for s in again) == ids and all(s["status"] == "already done" for s in again), again
    assert "3 documents already done" in capsys.readouterr().out
    answers = ask([(str(out / "报告_2024"), "Which bell?"), (str(out / "café"), "Which bell?")], model=tiny_model,
                  max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_a_document_too_short_to_train_says_why(tiny_model, tmp_path, capsys):
    from kmtrain.data import Document

    # skipped documents first, between and last: the two others still share one wave
    got = index([Document("tiny", "x", "api"), Document("ok", DOCS["alpha"], "api"), Document("tiny2", "y", "api"),
                 Document("ok2", DOCS["beta"], "api"), Document("tiny3", "z", "api")],
                tiny_cfg(tiny_model, tmp_path / "kms", steps=1, objective="ddcd", docs_per_step=2))
    assert [(s["id"], s["status"]) for s in got] == [("tiny", "no examples"), ("tiny2", "no examples"),
                                                     ("ok", "trained"), ("ok2", "trained"), ("tiny3", "no examples")]
    assert {s["docs_per_step"] for s in got if s["status"] == "trained"} == {2}
    out = capsys.readouterr().out
    assert "tiny: no training examples (the document is 1 token(s), too short for a ddcd example), skipped" in out
    assert "indexed 2 documents in" in out and "; 3 had no training examples, no KM written for them" in out
    # The CLI exited 0 with them missing: a script indexing thousands learnt of it only from the log
    from kmtrain.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ok.txt").write_text(DOCS["alpha"])
    (docs / "tiny.txt").write_text("x")
    assert main(["index", str(docs), "--out", str(tmp_path / "kms2"), "--model", tiny_model, "--objective", "ddcd",
                 "--steps", "1", "--rank", "4", "--no-progress"]) == 1
    assert "kmtrain: error: no training examples for tiny; no KM written for it" in capsys.readouterr().err
    assert (tmp_path / "kms2" / "ok" / "km.json").is_file() and not (tmp_path / "kms2" / "tiny").exists()
    # many: the first ten named, the rest counted (each has its own line in the output above)
    for k in range(12):
        (docs / f"tiny{k:02d}.txt").write_text("x")
    assert main(["index", str(docs), "--out", str(tmp_path / "kms2"), "--model", tiny_model, "--objective", "ddcd",
                 "--steps", "1", "--rank", "4", "--no-progress"]) == 1
    printed = capsys.readouterr()
    assert printed.err.splitlines()[-1] == (
        "kmtrain: error: no training examples for tiny, tiny00, tiny01, tiny02, tiny03, tiny04, tiny05, tiny06, "
        "tiny07, tiny08 and 3 more; no KM written for them")
    assert all(f"tiny{k:02d}: no training examples" in printed.out for k in range(12))


def test_a_document_whose_every_synthetic_output_is_dropped_says_why(tiny_model, docs_dir, tmp_path, capsys,
                                                                     monkeypatch):
    """A generator that writes nothing usable for one document (empty summaries, Q/A that does not
    parse): with recitation targets (the default) the document trains on its own text alone, its
    line counting the dropped outputs; without them it gets no KM, said with its counts, the others
    train, and a resumed run says the same from the saved targets without generating again."""
    from kmtrain import synth
    from kmtrain.cli import main

    real = synth._generate_hf

    def nothing_for_beta(model, tokenizer, prompts, *args, **kwargs):
        for prompt, text in zip(prompts, real(model, tokenizer, prompts, *args, **kwargs)):
            yield "" if "Quell valley" in tokenizer.decode(prompt) else text

    monkeypatch.setattr(synth, "_generate_hf", nothing_for_beta)
    argv = [str(docs_dir), "--model", tiny_model, "--steps", "1", "--rank", "4", "--summaries-per-chunk", "2",
            "--qa-per-chunk", "1", "--max-new-tokens", "10", "--no-progress"]
    assert main(["index", *argv, "--out", str(tmp_path / "recited")]) == 0
    assert re.search(r"^beta: 1 examples \(3 synthetic outputs dropped\), cache ", capsys.readouterr().out, re.M)
    km = json.loads((tmp_path / "recited" / "beta" / "km.json").read_text())
    assert km["synthetic_dropped"] == km["synthetic_requested"] == 3 and km["examples"] == 1

    out = tmp_path / "kms"
    argv += ["--recite-tokens", "0", "--out", str(out)]
    assert main(["index", *argv]) == 1
    printed = capsys.readouterr()
    assert "beta: no training examples (all 3 synthetic outputs were dropped (empty, or no Q/A pair parsed)), " \
           "skipped" in printed.out
    assert printed.err.splitlines()[-1] == "kmtrain: error: no training examples for beta; no KM written for it"
    assert not (out / "beta").exists()
    kept = {d: (out / d / "km.json").read_bytes() for d in ("alpha", "gamma")}
    saved = json.loads((out / ".work" / "beta" / "synth.json").read_text())
    assert saved["items"] == [] and saved["dropped"] == saved["requested"] == 3

    monkeypatch.setattr(synth, "_generate_hf", lambda *a, **k: pytest.fail("generation ran again"))
    assert main(["index", *argv]) == 1
    assert "beta: no training examples (all 3 synthetic outputs were dropped" in capsys.readouterr().out
    assert {d: (out / d / "km.json").read_bytes() for d in ("alpha", "gamma")} == kept


@pytest.mark.parametrize("record, why", [
    ({"items": {"chunk": 0}}, "needs a list 'items'"),
    ({"items": [], "requested": 3, "of_requests": 2}, "needs integers 0 <= 'requested' <= 'of_requests', got 3 and 2"),
    ({"items": [], "requested": "3"}, "needs integers 0 <= 'requested' <= 'of_requests', got '3' and '3'"),
    ({"items": [], "requested": True, "of_requests": 2}, "needs integers 0 <= 'requested' <= 'of_requests', got True"),
    ({"items": [{"chunk": 0, "prompt": "p", "target": "t"}, {"chunk": 2, "prompt": "p", "target": "t"}]},
     'item 1 needs an integer \'chunk\' in [0, 2) and string \'prompt\' and \'target\', got {"chunk": 2, '),
    ({"items": [{"chunk": 0, "prompt": "p", "target": None}]}, "item 0 needs an integer 'chunk'"),
    ({"items": [], "requested": 2, "of_requests": 4}, None),
])
def test_synth_records_out_of_form_are_named(record, why):
    """What makes a synth.json (parsed) unusable, said so that the redo's line tells what was wrong."""
    problem = importlib.import_module("kmtrain.index")._synth_problem(record, n_chunks=2)
    assert problem == why if why is None else problem.startswith(why), problem


def test_damaged_stage_files_are_redone(tiny_model, docs_dir, tmp_path, capsys):
    """chunks.json / synth.json that parse but are not in their form (a slip in a hand-curated
    synth.json, say) are redone with a line saying why; before, errors from deep in the run. So are
    those that do not parse (cut short), which were redone without a word."""
    out = tmp_path / "kms"
    cfg = tiny_cfg(tiny_model, out, steps=1)
    index(str(docs_dir), cfg)
    work = out / ".work"
    chunks = json.loads((work / "alpha" / "chunks.json").read_text())
    (work / "alpha" / "chunks.json").write_text(json.dumps({**chunks, "texts": "not a list"}))
    synth = json.loads((work / "beta" / "synth.json").read_text())
    synth["items"][0]["chunk"] = 7
    (work / "beta" / "synth.json").write_text(json.dumps(synth))
    (work / "gamma" / "synth.json").write_text("[1, 2]")  # JSON, not an object
    gamma_chunks = (work / "gamma" / "chunks.json").read_text()
    (work / "gamma" / "chunks.json").write_text(gamma_chunks[: len(gamma_chunks) // 2])  # cut short
    capsys.readouterr()
    assert {s["status"] for s in index(str(docs_dir), cfg.replace(retrain=True))} == {"trained"}
    printed = capsys.readouterr().out
    assert f"alpha: {work / 'alpha' / 'chunks.json'} is damaged (needs non-empty lists 'texts'" in printed
    assert f"beta: {work / 'beta' / 'synth.json'} is damaged (item 0 needs an integer 'chunk' in [0, 1)" in printed
    for name in ("chunks.json", "synth.json"):
        assert f"gamma: {work / 'gamma' / name} is damaged (unreadable, or not a JSON object), redoing it" in printed
    assert json.loads((work / "gamma" / "synth.json").read_text())["items"]
    assert (work / "gamma" / "chunks.json").read_text() == gamma_chunks


def test_chunks_from_before_plain_special_tokens_are_redone(tiny_model, tmp_path, monkeypatch, capsys):
    """Older chunks.json tokenized a "<|im_end|>" quoted in a document as the control token itself:
    on resume such a document is rechunked and its synthetic targets made again (they came from a
    prompt the token broke); a document without such strings keeps its targets."""
    from transformers import AutoTokenizer

    kindex = importlib.import_module("kmtrain.index")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "alpha.txt").write_text(DOCS["alpha"])
    (docs / "quoting.txt").write_text("A chat turn ends with <|im_end|> in the Moro format.")
    out = tmp_path / "kms"
    cfg = tiny_cfg(tiny_model, out, steps=1)
    index(str(docs), cfg)
    work, tok = out / ".work", AutoTokenizer.from_pretrained(tiny_model)
    for doc_id in ("alpha", "quoting"):  # as the older code wrote them: no "tokenized", special tokens parsed
        rec = json.loads((work / doc_id / "chunks.json").read_text())
        ids = tok((docs / f"{doc_id}.txt").read_text(), add_special_tokens=False)["input_ids"]
        rec.pop("tokenized", None)
        rec.pop("ids_int32le")  # and ids as lists of numbers
        (work / doc_id / "chunks.json").write_text(json.dumps({**rec, "ids": [ids], "texts": [tok.decode(ids)]}))
    synth_alpha = (work / "alpha" / "synth.json").read_text()
    made, real = [], kindex.synthesize

    def counted(model, tok, texts, *a, **k):  # which documents generation ran for
        made.append(sorted(texts))
        return real(model, tok, texts, *a, **k)

    monkeypatch.setattr(kindex, "synthesize", counted)
    capsys.readouterr()
    assert {s["status"] for s in index(str(docs), cfg.replace(retrain=True))} == {"trained"}
    printed = capsys.readouterr().out
    assert made == [["quoting"]]
    assert "quoting: the document quotes a special token" in printed and "alpha: the document" not in printed
    assert (work / "alpha" / "synth.json").read_text() == synth_alpha
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for doc_id in ("alpha", "quoting"):
        rec = json.loads((work / doc_id / "chunks.json").read_text())
        stored = kindex.stored_chunk_ids(rec)[0].tolist()
        assert rec["tokenized"] == "split_special_tokens" and end not in stored
        assert stored == tok((docs / f"{doc_id}.txt").read_text(), add_special_tokens=False,
                             split_special_tokens=True)["input_ids"]


def test_synthetic_targets_are_reused_only_under_the_settings_that_made_them(tiny_model, docs_dir, tmp_path,
                                                                             monkeypatch):
    """A resumed or retrained run reuses a document's synthetic targets only when they were made
    with its generation settings; a change to any (the new-token budget, --focus-parts, fact lists)
    makes them again. Options added later enter the record only when set, so targets made before
    them stay valid for runs that leave them off."""
    kindex = importlib.import_module("kmtrain.index")
    made, real = [], kindex.synthesize

    def counted(model, tok, texts, *a, **k):  # which documents generation ran for
        made.append(sorted(texts))
        return real(model, tok, texts, *a, **k)

    monkeypatch.setattr(kindex, "synthesize", counted)
    work = tmp_path / "kms" / ".work"
    cfg = tiny_cfg(tiny_model, tmp_path / "kms", steps=1, retrain=True)
    setting = lambda: json.loads((work / "alpha" / "synth.json").read_text())["setting"]  # noqa: E731
    for change, generated in ((dict(), True), (dict(), False), (dict(max_new_tokens=12), True),
                              (dict(max_new_tokens=12), False), (dict(max_new_tokens=12, focus_parts=2), True),
                              (dict(max_new_tokens=12, facts_per_chunk=1), True)):
        made.clear()
        index(str(docs_dir), cfg.replace(**change))
        assert made == ([sorted(DOCS)] if generated else []), change
        assert setting()["max_new_tokens"] == change.get("max_new_tokens", 10)
        assert setting().get("focus_parts") == change.get("focus_parts")
        assert setting().get("facts") == change.get("facts_per_chunk")


def test_a_training_checkpoint_of_other_settings_is_deleted_not_kept_or_used(tiny_model, docs_dir, tmp_path):
    """One training checkpoint at most is kept in OUT/.work: one left by a run of other settings (or
    of documents since trained) is deleted when a wave starts, not left to fill the disk (three
    fp32 copies of each document's LoRA: 469 MB for make demo's wave) nor resumed from."""
    out = tmp_path / "kms"
    stray = out / ".work" / "training_0123456789abcdef.safetensors"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"a checkpoint of another run")
    got = index(str(docs_dir), tiny_cfg(tiny_model, out, steps=1, docs_per_step=3))
    assert {s["status"] for s in got} == {"trained"}
    assert not stray.exists() and not list((out / ".work").glob("training_*"))
    assert all(json.loads((out / d / "km.json").read_text())["resumed_from_step"] == 0 for d in DOCS)


def test_chunk_ids_are_stored_as_int32_and_older_lists_still_read(tiny_model, docs_dir, tmp_path, capsys):
    """chunks.json holds each chunk's ids as base64 of little-endian int32: as JSON numbers a 70 MB
    document's 66M ids came back as 2.4 GB of Python ints. A record written before, with lists of
    numbers, is read as it is (not redone, its synthetic targets kept) and trains the same KMs."""
    import base64
    import struct

    from transformers import AutoTokenizer

    out = tmp_path / "kms"
    cfg = tiny_cfg(tiny_model, out, steps=2)
    first = {s["id"]: s["adapter_sha256"] for s in index(str(docs_dir), cfg)}
    tok, work = AutoTokenizer.from_pretrained(tiny_model), out / ".work"
    for doc_id in first:
        rec = json.loads((work / doc_id / "chunks.json").read_text())
        assert "ids" not in rec and len(rec["ids_int32le"]) == len(rec["texts"])
        stored = [list(struct.unpack(f"<{len(raw) // 4}i", raw)) for raw in map(base64.b64decode, rec["ids_int32le"])]
        assert [tok.decode(c) for c in stored] == rec["texts"]
        assert stored[0] == tok((docs_dir / f"{doc_id}.txt").read_text(), add_special_tokens=False,
                                split_special_tokens=True)["input_ids"][:len(stored[0])]
        (work / doc_id / "chunks.json").write_text(json.dumps({**{k: v for k, v in rec.items() if k != "ids_int32le"},
                                                               "ids": stored}))
    older = {doc_id: (work / doc_id / "chunks.json").read_text() for doc_id in first}
    synth = {doc_id: (work / doc_id / "synth.json").read_text() for doc_id in first}
    capsys.readouterr()
    again = {s["id"]: s["adapter_sha256"] for s in index(str(docs_dir), cfg.replace(retrain=True))}
    assert "damaged" not in capsys.readouterr().out and again == first
    for doc_id in first:  # read as they were: neither rewritten nor the targets made again
        assert (work / doc_id / "chunks.json").read_text() == older[doc_id]
        assert (work / doc_id / "synth.json").read_text() == synth[doc_id]


@pytest.mark.parametrize("ids, why", [
    (["AQAAAA==", "AgAAAAMAAAA="], None),  # [1], [2, 3]
    ([[1], [2, 3]], None),  # older records: lists of numbers, in "ids"
    (["AQAAAA==", "not base64!"], "not base64"),
    (["AQAAAA==", "AQID"], "3 bytes: not whole int32s"),
    (["AQAAAA==", "/////w=="], "a negative id"),
    (["AQAAAA=="], "one chunk's ids for two texts"),
    ([[1], [2, "3"]], "a string among the numbers"),
    ([[1], [2, 1 << 40]], "past int32"),
    ([[1], [2, -3]], "a negative id, in the older form"),
    ("AQAAAA==", "not a list"),
])
def test_malformed_chunk_ids_are_found(ids, why):
    """A chunks.json whose ids do not decode to one array of token ids per text is damaged (redone),
    in the current form and the older one."""
    kindex = importlib.import_module("kmtrain.index")
    field = "ids" if ids and isinstance(ids, list) and isinstance(ids[0], list) else "ids_int32le"
    record = {"texts": ["a", "b"], field: ids}
    problem = kindex._chunks_problem(record, kindex.stored_chunk_ids(record))
    assert (problem is None) == (why is None), why
    if why is None:
        assert [c.tolist() for c in kindex.stored_chunk_ids({field: ids})] == [[1], [2, 3]]


def test_km_records_a_local_base_by_absolute_path(tiny_model, docs_dir, tmp_path, monkeypatch):
    """A model folder given relative to where index ran is found by ask from anywhere else; a base
    moved away is an error that says --model takes its new place."""
    import os
    import shutil

    shutil.copytree(tiny_model, tmp_path / "base")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    index(str(docs_dir), tiny_cfg("base", tmp_path / "kms", steps=1))
    assert json.loads((tmp_path / "kms" / "alpha" / "km.json").read_text())["base_model_path"] == str(tmp_path / "base")
    monkeypatch.chdir(tmp_path / "elsewhere")
    alone = ask([(str(tmp_path / "kms" / "alpha"), "Which bell?")], max_new_tokens=3)
    os.rename(tmp_path / "base", tmp_path / "moved")
    with pytest.raises(ValueError, match=r"no such model folder.*km.json records; if its weights are elsewhere now, "
                                         r"pass --model"):
        ask([(str(tmp_path / "kms" / "alpha"), "Which bell?")], max_new_tokens=3)
    assert ask([(str(tmp_path / "kms" / "alpha"), "Which bell?")], model=str(tmp_path / "moved"), max_new_tokens=3) == alone


def test_a_model_without_the_lora_targets_fails_before_generation(tiny_model, docs_dir, tmp_path, monkeypatch):
    import importlib

    kindex = importlib.import_module("kmtrain.index")  # the module, not the function of the same name
    monkeypatch.setattr(kindex, "synthesize", lambda *a, **k: pytest.fail("generation ran"))
    with pytest.raises(ValueError, match=r"no linear layer to adapt: wanted the LoRA targets wq, wo; its linear "
                                         r"layers: down_proj, gate_proj, .*q_proj, up_proj, v_proj"):
        index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "kms", target_modules=("wq", "wo")))


def test_a_model_whose_logits_the_losses_cannot_recompute_is_refused_before_generation(tiny_model, docs_dir,
                                                                                       tmp_path, monkeypatch):
    """The KM losses compute logits from the last hidden state and the head: a model whose config
    transforms them otherwise (here a Cohere logit_scale of 0) is refused with why, before any
    generation, not trained towards other distributions than its own."""
    from transformers import AutoTokenizer, CohereConfig, CohereForCausalLM

    kindex = importlib.import_module("kmtrain.index")
    monkeypatch.setattr(kindex, "synthesize", lambda *a, **k: pytest.fail("generation ran"))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    folder = tmp_path / "cohere"
    CohereForCausalLM(CohereConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=512, logit_scale=0.0, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.eos_token_id,
                                   eos_token_id=tok.eos_token_id)).save_pretrained(folder)
    _copy_tiny_tokenizer(tiny_model, folder)
    with pytest.raises(ValueError, match=rf"^--model {re.escape(str(folder))}: its config sets logit_scale=0.0, not a "
                                         r"positive finite factor of the logits\. The KM losses compute logits as the "
                                         r"last hidden state times the output head's weight.*: not supported$"):
        index(str(docs_dir), tiny_cfg(str(folder), tmp_path / "kms"))
    assert not list((tmp_path / "kms").glob("*/km.json"))


def test_a_run_resumed_the_next_day_keeps_its_work(tiny_model, docs_dir, tmp_path, monkeypatch):
    """A model whose chat template prints today's date (Llama 3.2's, SmolLM3's): its prompts, so its
    examples' tokens, so the keys of the teacher cache and of the training checkpoint, changed at
    midnight. Resumed the next day, a run rebuilt the cache and lost the wave's training; now the cache
    is kept (the checkpoint's key is made of the same tokens), and the KMs of the two days are the same."""
    kindex = importlib.import_module("kmtrain.index")
    dated = tmp_path / "dated"
    shutil.copytree(tiny_model, dated)
    template = dated / "chat_template.jinja"
    template.write_text(DATED_TEMPLATE + template.read_text())
    builds = []
    real_build = kindex.build_cache
    monkeypatch.setattr(kindex, "build_cache", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    out = tmp_path / "kms"
    on_day(monkeypatch, 5)
    index(str(docs_dir), tiny_cfg(str(dated), out, keep_teacher_cache=True))
    assert len(builds) == len(DOCS)
    first = {d: json.loads((out / d / "km.json").read_text())["adapter_sha256"] for d in DOCS}
    on_day(monkeypatch, 6)
    index(str(docs_dir), tiny_cfg(str(dated), out, keep_teacher_cache=True, retrain=True))
    assert len(builds) == len(DOCS)  # every cache of the day before reused
    assert {d: json.loads((out / d / "km.json").read_text())["adapter_sha256"] for d in DOCS} == first


@pytest.mark.parametrize("family", ["gemma3", "qwen2vl"])
def test_a_multimodal_model_indexes_its_language_model(tiny_model, docs_dir, tmp_path, family):
    """A multimodal model keeps its layer count, hidden size and positions in its text_config: a Gemma 3
    (4B and up are multimodal) failed with "'Gemma3Config' object has no attribute 'num_hidden_layers'".
    Qwen2-VL is no causal LM to transformers (AutoModelForImageTextToText), and failed with its list of
    ~200 configurations; its generate also prepares positions of its own, so no prompt keys are reused
    for it. Now each indexes, its KMs adapt the language model alone, and they answer."""
    import transformers

    vocab = transformers.AutoConfig.from_pretrained(tiny_model).vocab_size + 8
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    if family == "gemma3":
        model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
            text_config=dict(text, head_dim=8), mm_tokens_per_image=4, image_token_index=vocab - 3,
            boi_token_index=vocab - 2, eoi_token_index=vocab - 1,
            vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                               image_size=28, patch_size=14)))
    else:
        model = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
            text_config=dict(text, model_type="qwen2_vl_text", rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
            vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, patch_size=14, spatial_merge_size=2),
            image_token_id=vocab - 3, video_token_id=vocab - 2, vision_start_token_id=vocab - 1))
    folder = tmp_path / family
    model.save_pretrained(folder)
    _copy_tiny_tokenizer(tiny_model, folder)
    got = index(str(docs_dir), tiny_cfg(str(folder), tmp_path / "kms", steps=2))
    assert {s["status"] for s in got} == {"trained"}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "kms" / "alpha" / "adapter_model.safetensors"), "pt") as f:
        adapted = {k.split(".lora_")[0] for k in f.keys()}
    assert len(adapted) == 14 and all("language_model" in k for k in adapted)  # 2 layers x 7 projections
    assert len(ask([(str(tmp_path / "kms" / "alpha"), "Which bell?")], max_new_tokens=3)) == 1


def test_an_moe_model_indexes_its_experts_weights_too(tiny_model, docs_dir, tmp_path):
    """Mixtral's experts are 3-D parameters in transformers 5: its KMs adapted the attention alone. Now
    they adapt every expert's projections too, each document's in its own slot, and the KM loads in
    plain PEFT (target_parameters) to the outputs `ask` gets from it."""
    import transformers
    from peft import PeftModel

    vocab = transformers.AutoConfig.from_pretrained(tiny_model).vocab_size
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, num_local_experts=4, num_experts_per_tok=2))
    folder = tmp_path / "mixtral"
    model.save_pretrained(folder)
    _copy_tiny_tokenizer(tiny_model, folder)
    got = index(str(docs_dir), tiny_cfg(str(folder), tmp_path / "kms", steps=2))
    assert {s["status"] for s in got} == {"trained"}
    km = tmp_path / "kms" / "alpha"
    from safetensors.torch import load_file

    weights = load_file(str(km / "adapter_model.safetensors"))
    expert_b = [t for k, t in weights.items() if ".mlp.experts." in k and "lora_B" in k]
    assert len(expert_b) == 4 and all(bool(t.abs().sum() > 0) for t in expert_b)  # trained, 2 layers x 2 weights
    config = json.loads((km / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(km)).eval()
    kindex = importlib.import_module("kmtrain.index")
    grouped = kindex.attach_grouped_lora(copy.deepcopy(base), 1, rank=16, alpha=16,
                                         target_modules=tuple(kindex.adapter_targets(str(km))), backend="torch")
    kindex.load_peft(grouped, 0, str(km))
    kindex.set_adapter_ids(grouped, [0])
    ids = torch.randint(0, vocab, (1, 9))
    with torch.no_grad():
        assert torch.allclose(grouped(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert len(ask([(str(km), "Which bell?"), (str(tmp_path / "kms" / "beta"), "What grows?")], max_new_tokens=3)) == 2


def _copy_tiny_tokenizer(tiny_model, folder) -> None:
    for name in os.listdir(tiny_model):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(os.path.join(tiny_model, name), folder / name)


def _spy_on_losses(monkeypatch, keyword: str, dcd_keyword: "str | None" = None) -> list:
    """A list that gets (name, the call's ``keyword`` argument) for every call of the teacher's KL
    statistics ("stats"), the DCD loss ("kl", its ``dcd_keyword`` where given) and the LM loss ("lm")."""
    import kmtrain.teacher_cache as kcache
    import kmtrain.train as ktrain

    seen = []

    def spy(fn, name):
        def wrapped(*a, **kw):
            seen.append((name, kw.get(dcd_keyword or keyword if name == "kl" else keyword)))
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(kcache, "teacher_kl_stats", spy(kcache.teacher_kl_stats, "stats"))
    monkeypatch.setattr(ktrain, "dcd_loss", spy(ktrain.dcd_loss, "kl"))
    monkeypatch.setattr(ktrain, "chunked_lm_loss", spy(ktrain.chunked_lm_loss, "lm"))
    return seen


def _tiny_gemma2(tiny_model, folder, cap: float):
    """A random 2-layer Gemma 2 with the tiny tokenizer, its logits capped at ``cap`` * tanh(z / ``cap``);
    weights of std 0.2, so that its logits (~1) are bent by a cap of 0.5."""
    from transformers import AutoConfig, Gemma2Config, Gemma2ForCausalLM

    llama = AutoConfig.from_pretrained(tiny_model)
    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(
        vocab_size=llama.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, eos_token_id=llama.eos_token_id,
        bos_token_id=llama.eos_token_id, pad_token_id=llama.pad_token_id, tie_word_embeddings=True,
        initializer_range=0.2, final_logit_softcapping=cap)).save_pretrained(folder)
    _copy_tiny_tokenizer(tiny_model, folder)
    return folder


@pytest.mark.parametrize("objective", ["sdcd", "lm"])
def test_a_model_that_soft_caps_its_logits_trains_on_its_own_distributions(tiny_model, docs_dir, tmp_path,
                                                                          monkeypatch, objective):
    """Gemma 2 caps its logits at c * tanh(z / c) after the head (final_logit_softcapping); it was refused,
    as the KM losses took logits as h @ W^T. Now the KL and the LM loss take the cap in every call, with
    and without the cache. No KL statistics are cached (they need logits linear in h): the cache holds
    the teacher's last layer for the KL instead, and the cached run's losses equal the re-run
    teacher's in fp32."""
    from safetensors import safe_open

    import kmtrain.train as ktrain

    gemma2 = _tiny_gemma2(tiny_model, tmp_path / "gemma2", cap=0.5)
    seen = _spy_on_losses(monkeypatch, "softcap")
    final = {}
    for caching in (True, False):
        seen.clear()
        out = tmp_path / f"kms_{caching}"
        got = index(str(docs_dir), tiny_cfg(str(gemma2), out, objective=objective, teacher_cache=caching, amp="off",
                                            cache_dtype="fp32", keep_teacher_cache=caching))
        assert {s["status"] for s in got} == {"trained"}
        final[caching] = {s["id"]: s["final_loss"] for s in got}
        assert set(seen) == {("kl" if objective == "sdcd" else "lm", 0.5)}, (caching, seen)
        if caching and objective == "sdcd":
            for d in DOCS:
                (path,) = (out / ".work" / d).glob("teacher_sdcd_*.safetensors")
                with safe_open(str(path), framework="pt") as f:
                    assert "kl_hidden" in f.keys() and "kl_embedding" not in f.keys()
    for d in DOCS:
        for part, value in final[False][d].items():
            assert abs(final[True][d][part] - value) <= 1e-5 * abs(value) + 1e-6, (d, part, final[True][d], value)
    # the cap bends this model's logits: without it, the same run's first loss differs
    if objective == "sdcd":
        monkeypatch.setattr(ktrain, "logit_softcap", lambda model: None)
        uncapped = index(str(docs_dir), tiny_cfg(str(gemma2), tmp_path / "uncapped", objective=objective,
                                                 teacher_cache=False, amp="off", cache_dtype="fp32"))
        assert all(abs(s["final_loss"]["kl"] - final[False][s["id"]]["kl"]) > 1e-2 * final[False][s["id"]]["kl"]
                   for s in uncapped)


@pytest.mark.parametrize("objective", ["sdcd", "lm"])
def test_a_model_whose_output_head_has_a_bias_trains_on_its_own_distributions(tiny_model, docs_dir, tmp_path,
                                                                              monkeypatch, objective):
    """Phi-1/1.5/2 (and GPT-J, CodeGen) add a bias to their logits in the output head; they were refused,
    as the KM losses took logits as h @ W^T. Now the teacher's KL statistics, the KL and the LM loss get
    the head's bias in every call, with and without the cache, and the cached run's losses equal the
    re-run teacher's in fp32. A KM loads in plain PEFT, and ask answers with it."""
    from peft import PeftModel
    from transformers import AutoConfig, PhiConfig, PhiForCausalLM

    import kmtrain.train as ktrain

    llama = AutoConfig.from_pretrained(tiny_model)
    torch.manual_seed(0)
    phi = PhiForCausalLM(PhiConfig(
        vocab_size=llama.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, eos_token_id=llama.eos_token_id,
        bos_token_id=llama.eos_token_id, pad_token_id=llama.pad_token_id, initializer_range=0.2))
    torch.nn.init.normal_(phi.lm_head.bias, std=1.0)  # transformers starts it at 0; Phi-2's is ~1 in size
    bias = phi.lm_head.bias.detach().clone()
    folder = tmp_path / "phi"
    phi.save_pretrained(folder)
    _copy_tiny_tokenizer(tiny_model, folder)
    seen = _spy_on_losses(monkeypatch, "bias", dcd_keyword="lm_head_bias")
    final = {}
    for caching in (True, False):
        seen.clear()
        out = tmp_path / f"kms_{caching}"
        got = index(str(docs_dir), tiny_cfg(str(folder), out, objective=objective, teacher_cache=caching, amp="off",
                                            cache_dtype="fp32"))
        assert {s["status"] for s in got} == {"trained"}
        final[caching] = {s["id"]: s["final_loss"] for s in got}
        want = {"sdcd": {"stats", "kl"} if caching else {"kl"}, "lm": {"lm"}}[objective]
        assert {name for name, _ in seen} == want, (caching, seen)
        assert all(isinstance(b, torch.Tensor) and torch.equal(b.detach().cpu(), bias) for _, b in seen)
    for d in DOCS:
        for part, value in final[False][d].items():
            assert abs(final[True][d][part] - value) <= 1e-5 * abs(value) + 1e-6, (d, part, final[True][d], value)
    if objective == "sdcd":
        # the bias moves this model's distributions: without it, the same run's KL differs
        monkeypatch.setattr(ktrain, "head_bias", lambda model: None)
        unbiased = index(str(docs_dir), tiny_cfg(str(folder), tmp_path / "unbiased", teacher_cache=False, amp="off",
                                                 cache_dtype="fp32"))
        assert all(abs(s["final_loss"]["kl"] - final[False][s["id"]]["kl"]) > 1e-2 * final[False][s["id"]]["kl"]
                   for s in unbiased)
        km = PeftModel.from_pretrained(PhiForCausalLM.from_pretrained(folder), str(tmp_path / "kms_True" / "alpha"))
        assert km.peft_config["default"].r == 4
        answers = ask([(str(tmp_path / "kms_True" / "alpha"), "Which bell rings?"), (None, "Which bell rings?")],
                      model=str(folder), max_new_tokens=4)
        assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("objective", ["sdcd", "lm"])
def test_a_model_that_scales_its_logits_trains_at_its_own_temperature(tiny_model, docs_dir, tmp_path, monkeypatch,
                                                                       objective):
    """Granite divides its logits by logits_scaling (Cohere multiplies by logit_scale): the teacher's
    cached KL statistics, the KL and the LM loss all take it as their temperature, so that the KM
    learns the model's own distributions. Every call is checked, with and without the cache."""
    from transformers import AutoConfig, GraniteConfig, GraniteForCausalLM

    llama = AutoConfig.from_pretrained(tiny_model)
    torch.manual_seed(0)
    granite = tmp_path / "granite"
    GraniteForCausalLM(GraniteConfig(
        vocab_size=llama.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=llama.eos_token_id,
        pad_token_id=llama.pad_token_id, tie_word_embeddings=True, logits_scaling=4.0)).save_pretrained(granite)
    _copy_tiny_tokenizer(tiny_model, granite)
    seen = _spy_on_losses(monkeypatch, "temperature")
    for caching in (True, False):
        seen.clear()
        index(str(docs_dir), tiny_cfg(str(granite), tmp_path / f"kms_{caching}", objective=objective,
                                      teacher_cache=caching))
        want = {"sdcd": {("stats", 4.0), ("kl", 4.0)} if caching else {("kl", 4.0)}, "lm": {("lm", 4.0)}}[objective]
        assert set(seen) == want, (caching, seen)
    if objective == "sdcd":  # a kept cache is not reused at another scale: its statistics are of the old one
        index(str(docs_dir), tiny_cfg(str(granite), tmp_path / "kept", keep_teacher_cache=True))
        conf = granite / "config.json"
        conf.write_text(json.dumps({**json.loads(conf.read_text()), "logits_scaling": 2.0}))
        seen.clear()
        index(str(docs_dir), tiny_cfg(str(granite), tmp_path / "kept", keep_teacher_cache=True, retrain=True))
        assert set(seen) == {("stats", 2.0), ("kl", 2.0)}


def test_triton_path_writes_the_same_kms_as_the_torch_path(tiny_model, docs_dir, tmp_path, monkeypatch):
    """The whole indexing run on the Triton kernels (grouped LoRA forward and backward, the KL from
    cached teacher statistics, the hidden-state term; through the interpreter on a CPU, compiled on a
    GPU) trains the same KMs as on the PyTorch path, in fp32, to rounding."""
    from safetensors.torch import load_file

    from reference import rel_err

    kms = {}
    for backend in ("torch", "triton"):
        index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / backend, steps=3, backend=backend, amp="off",
                                      cache_dtype="fp32"))
        kms[backend] = {d: load_file(str(tmp_path / backend / d / "adapter_model.safetensors")) for d in DOCS}
    for d in DOCS:
        ours, ref = kms["triton"][d], kms["torch"][d]
        assert ours.keys() == ref.keys()
        assert rel_err(torch.cat([ours[k].flatten() for k in ref]), torch.cat([ref[k].flatten() for k in ref])) < 1e-5, d
        assert any(float(ref[k].abs().max()) > 0 for k in ref if "lora_B" in k)  # trained: B moved off zero
    # Several KMs answer in one batch on either path alike. Three steps barely move a KM, so each is
    # given large B weights first (a plain PEFT folder: no km.json) to make its answer its own.
    import importlib

    from safetensors.torch import save_file

    torch.manual_seed(0)
    pairs = []
    for d in DOCS:
        loud = tmp_path / "loud" / d
        loud.mkdir(parents=True)
        (loud / "adapter_config.json").write_text((tmp_path / "torch" / d / "adapter_config.json").read_text())
        save_file({k: v + torch.randn_like(v) if "lora_B" in k else v for k, v in kms["torch"][d].items()},
                  str(loud / "adapter_model.safetensors"))
        pairs.append((str(loud), "Which bell?"))
    pairs.append((None, "Which bell?"))
    # ask loads the base in bf16 where bf16 is native, and the Triton interpreter cannot load bf16: refused
    # (it answered from garbage), on index's side too, where bf16 autocast trained to losses of ~1e20
    kindex = importlib.import_module("kmtrain.index")
    monkeypatch.setattr(kindex, "native_bf16", lambda device: True)
    with pytest.raises(ValueError, match="backend triton on a CPU runs Triton's interpreter, which loads bf16 "
                                         "tensors wrongly: this CPU answers in bf16; use backend='torch'"):
        ask(pairs, model=tiny_model, max_new_tokens=4, backend="triton")
    with pytest.raises(ValueError, match=r"interpreter, which loads bf16 tensors wrongly: add --amp off"):
        index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "bf16", backend="triton", amp="bf16"))
    # fp32 on both paths also makes the comparison exact
    monkeypatch.setattr(kindex, "native_bf16", lambda device: False)
    answers = ask(pairs, model=tiny_model, max_new_tokens=4, backend="triton")
    assert answers == ask(pairs, model=tiny_model, max_new_tokens=4, backend="torch")
    assert len(set(answers)) == len(answers)  # every KM's answer differs from the base's and the others'


def test_a_document_with_more_examples_than_draws_is_told(tiny_model, docs_dir, tmp_path, capsys):
    """Only the examples training will draw are cached: the others cost teacher time and disk and
    were never read (a 2.5 MB text made 35,401 examples for 4 draws)."""
    cfg = tiny_cfg(tiny_model, tmp_path / "kms", steps=2, examples_per_doc=1, keep_teacher_cache=True)
    got = {s["id"]: s for s in index(str(docs_dir), cfg)}
    n = {d: s["examples"] + s["examples_not_drawn"] for d, s in got.items()}
    printed = capsys.readouterr().out
    for d in DOCS:
        assert n[d] > 2 and got[d]["examples"] == 2
        assert (f"{d}: {n[d]} training examples, but 2 steps x 1 per step draw only 2: a random 2 of them are "
                f"cached and trained on, the rest never (--steps {n[d]} draws each once)") in printed
        (path,) = (tmp_path / "kms" / ".work" / d).glob("teacher_*.safetensors")
        assert len(TeacherCache(path)) == 2
    enough = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "enough", steps=max(n.values()), examples_per_doc=1))
    assert "trained on, the rest never" not in capsys.readouterr().out
    assert all(s["examples"] == n[s["id"]] and s["examples_not_drawn"] == 0 for s in enough)


def test_a_long_documents_generation_is_cut_to_what_training_draws(tiny_model, tmp_path, capsys, monkeypatch):
    """A document whose chunks make far more generation requests than its training draws examples
    has only a random share of them made, and as large a share of its recitation pieces kept. The
    requests made give the texts they give when all are made (in fp32, as here; bf16 rounds each
    batch its own way); fewer steps make a subset of the requests more steps make; a re-run keeps
    them, and more steps make them again."""
    from transformers import AutoTokenizer

    from kmtrain.index import document_items
    from kmtrain.synth import GENERATION_MARGIN, MIN_SOURCES

    docs = tmp_path / "docs"
    docs.mkdir()
    sentences = [f"The keeper of tower {k} rings its bell {k + 2} times at noon." for k in range(60)]
    (docs / "long.txt").write_text(" ".join(sentences))
    (docs / "alpha.txt").write_text(DOCS["alpha"])

    def run(out, steps, **kw):
        cfg = tiny_cfg(tiny_model, tmp_path / out, steps=steps, examples_per_doc=1, recite_tokens=16, amp="off",
                       base_dtype="fp32", **kw)
        got = {s["id"]: s for s in index(str(docs), cfg)}
        return cfg, got, capsys.readouterr().out, json.loads((tmp_path / out / ".work" / "long" / "synth.json").read_text())

    # all made: enough steps that every source is drawn about once
    cfg, _, printed, full = run("all", 200)
    assert "generation requests" not in printed
    chunks = len(json.loads((tmp_path / "all" / ".work" / "long" / "chunks.json").read_text())["texts"])
    n_requests = chunks * (cfg.summaries_per_chunk + cfg.qa_per_chunk)
    assert chunks >= 8 and full["requested"] == full["of_requests"] == n_requests
    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = json.loads((tmp_path / "all" / ".work" / "long" / "chunks.json").read_text())["texts"]
    pieces = len(recitation_items(texts, tok, 16))

    cfg, got, printed, cut = run("cut", 6)
    made = math.ceil(n_requests * max(math.ceil(GENERATION_MARGIN * 6), MIN_SOURCES) / (n_requests + pieces))
    assert 0 < made < n_requests and cut["requested"] == made and cut["of_requests"] == n_requests
    all_steps = math.ceil((n_requests + pieces) / GENERATION_MARGIN)
    assert (f"long: {chunks} chunks make {n_requests} generation requests and {pieces} recitation pieces, but 6 "
            f"steps x 1 per step draw only 6 examples: a random {made} of the requests are made and as large a "
            f"share of the pieces kept, which keeps what is drawn as it was (--steps {all_steps} makes them all)") in printed
    assert [line for line in printed.splitlines() if "generation requests" in line][0].startswith("long: ")
    assert len([line for line in printed.splitlines() if "generation requests" in line]) == 1  # not alpha's
    # the line on drawing says no --steps: more steps would also make more requests
    assert f"long: {got['long']['examples'] + got['long']['examples_not_drawn']} training examples, but 6 steps x 1 " \
           "per step draw only 6: a random 6 of them are cached and trained on, the rest never\n" in printed
    meta = json.loads((tmp_path / "cut" / "long" / "km.json").read_text())
    assert meta["synthetic_requested"] == made and meta["synthetic_requests_not_made"] == n_requests - made
    assert json.loads((tmp_path / "cut" / "alpha" / "km.json").read_text())["synthetic_requests_not_made"] == 0

    def keyed(rec):  # (chunk, prompt, target) of every item: the requests' texts, from either run
        return sorted((it["chunk"], it["prompt"], it["target"]) for it in rec["items"])

    assert set(keyed(cut)) < set(keyed(full)) and len(keyed(cut)) < len(keyed(full))
    assert len({it["chunk"] for it in cut["items"]}) > 1  # not the first chunks only: a random share
    # the recitation pieces: as large a share, drawn per document
    kept, _ = document_items(cfg, "long", [], texts, tok, cut["requested"] / cut["of_requests"])
    assert len(kept) == math.ceil(pieces * made / n_requests) and set(map(str, kept)) < set(
        map(str, document_items(cfg, "long", [], texts, tok)[0]))

    # synth.json keeps the pieces per chunk its requests were counted with
    counts = [len(chunk_recitation_pieces(t, tok, 16)) for t in texts]
    assert cut["recitation_pieces"] == {"tokens": 16, "per_chunk": counts} and sum(counts) == pieces

    # a re-run keeps them (nothing said, nothing made), and does not cut every chunk again to count
    # its pieces: only the chunks holding a kept piece are cut
    kindex = importlib.import_module("kmtrain.index")
    calls, real_cut = [], kindex.chunk_recitation_pieces
    monkeypatch.setattr(kindex, "chunk_recitation_pieces", lambda text, *a: calls.append(text) or real_cut(text, *a))
    before = (tmp_path / "cut" / ".work" / "long" / "synth.json").stat().st_mtime_ns
    _, again, _, _ = run("cut", 6, retrain=True)
    assert (tmp_path / "cut" / ".work" / "long" / "synth.json").stat().st_mtime_ns == before
    assert 0 < len(calls) <= math.ceil(pieces * made / n_requests) < chunks
    assert again["long"]["final_loss"] == got["long"]["final_loss"]
    # without the stored counts (a record from before they were kept) every chunk is cut to count them
    calls.clear()
    (tmp_path / "cut" / ".work" / "long" / "synth.json").write_text(
        json.dumps({k: v for k, v in cut.items() if k != "recitation_pieces"}))
    _, again, _, _ = run("cut", 6, retrain=True)
    assert len(calls) >= chunks and again["long"]["final_loss"] == got["long"]["final_loss"]
    monkeypatch.undo()
    _, _, printed, more = run("cut", 30, retrain=True)
    assert made < more["requested"] < n_requests and "a random" in printed
    assert set(keyed(cut)) < set(keyed(more)) <= set(keyed(full))
    # fewer steps than the targets were made for: kept as they are (and at most MIN_SOURCES sources are kept)
    _, _, printed, fewer = run("cut", 1, retrain=True)
    assert fewer == more and "generation requests" not in printed
    # a record from before requests were cut (no "of_requests") holds them all: kept, and trained on whole
    old = {k: v for k, v in full.items() if k != "of_requests"}
    (tmp_path / "all" / ".work" / "long" / "synth.json").write_text(json.dumps(old))
    _, got, printed, kept_rec = run("all", 6, retrain=True)
    assert kept_rec == old and "generation requests" not in printed
    assert got["long"]["examples"] + got["long"]["examples_not_drawn"] == len(full["items"]) + pieces


def test_a_long_documents_recitation_cues_are_made_for_the_pieces_it_keeps(tiny_model, monkeypatch):
    """A document that keeps a share of its recitation pieces cues only those: the cues of all of a
    48 MB text's pieces took 69 s to keep a few. The kept items are those all items give at the
    sampled positions, cue included. Given each chunk's count of pieces (counted before generation),
    only the chunks that hold a kept piece are cut again: cutting all of a 70 MB text's took 175 s,
    a second time, for 4 pieces."""
    import random

    from transformers import AutoTokenizer

    import kmtrain.data as kdata
    from kmtrain.index import doc_seed, document_items

    kindex = importlib.import_module("kmtrain.index")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rng = random.Random()
    words = "bell tower keeper harbour lamp copper salt river ledger".split()
    chunk_texts = [" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + "." for _ in range(12))
                   for _ in range(6)] + ["", "one short line."] * 10  # chunks of no piece, and of one
    rng.shuffle(chunk_texts)
    cfg = IndexConfig(recite_tokens=8)
    everything = kdata.recitation_items(chunk_texts, tok, 8)
    counts = [len(kdata.chunk_recitation_pieces(t, tok, 8)) for t in chunk_texts]
    assert 0 in counts and sum(counts) == len(everything)
    cued, cut, real_cue, real_cut = [], [], kdata._cue, kindex.chunk_recitation_pieces
    monkeypatch.setattr(kdata, "_cue", lambda target, *a: cued.append(target) or real_cue(target, *a))
    monkeypatch.setattr(kindex, "chunk_recitation_pieces", lambda text, *a: cut.append(text) or real_cut(text, *a))
    for share in (0.2, 0.05, 1e-9):
        for pieces_per_chunk in (None, counts):
            cued.clear(), cut.clear()
            train, held = document_items(cfg, "doc", [], chunk_texts, tok, made_share=share,
                                         pieces_per_chunk=pieces_per_chunk)
            assert held == [] and len(everything) > 20 and len(train) == math.ceil(share * len(everything))
            assert cued == [it["target"] for it in train]  # one cue per kept piece, none for the others
            kept = sorted(random.Random(f"pieces:{doc_seed(cfg.seed, 'doc')}").sample(range(len(everything)),
                                                                                       len(train)))
            assert train == [everything[i] for i in kept]
            if pieces_per_chunk is not None:  # each chunk holding a kept piece cut once, no other
                assert sorted(cut) == sorted(chunk_texts[it["chunk"]] for it in {it["chunk"]: it for it in train}.values())
    # counts that do not fit the chunks are refused, not trained on
    with pytest.raises(ValueError, match="pieces counted for 3 chunks, not its 26"):
        document_items(cfg, "doc", [], chunk_texts, tok, made_share=0.5, pieces_per_chunk=counts[:3])
    with pytest.raises(RuntimeError, match="recitation pieces, counted"):
        document_items(cfg, "doc", [], chunk_texts, tok, made_share=0.5, pieces_per_chunk=[c + 1 for c in counts])


def test_notices_that_fit_every_document_are_told_for_the_first_few(tiny_model, docs_dir, tmp_path, capsys,
                                                                     monkeypatch):
    """A corpus of long documents outruns the steps in every document: the two notices (requests cut,
    examples not drawn) are printed in full for the first NOTICES_IN_FULL documents only, then summed up
    in one line each, and each document's summary line says how many of its examples are drawn. A run
    over 1,600 documents printed one such notice per document beside its summary line."""
    kindex = importlib.import_module("kmtrain.index")
    monkeypatch.setattr(kindex, "NOTICES_IN_FULL", 1)
    for k in (1, 2):  # two long documents: their requests are cut; the three short ones' are not
        (docs_dir / f"long{k}.txt").write_text(" ".join(f"The keeper of tower {k}{j} rings its bell {j + 2} times "
                                                        f"at noon." for j in range(60)))
    got = {s["id"]: s for s in index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "kms", steps=6, examples_per_doc=1,
                                                           recite_tokens=16, amp="off", base_dtype="fp32"))}
    lines = capsys.readouterr().out.splitlines()
    cut = [line for line in lines if "generation requests" in line]
    meta = json.loads((tmp_path / "kms" / "long2" / "km.json").read_text())
    made, of = meta["synthetic_requested"], meta["synthetic_requested"] + meta["synthetic_requests_not_made"]
    assert 0 < made < of
    assert len(cut) == 2 and cut[0].startswith("long1: ") and "(--steps " in cut[0]
    assert cut[1] == (f"1 more document likewise: {made} of its {of} generation requests are made (km.json counts "
                      "synthetic_requests_not_made)")
    assert sorted(d for d, s in got.items() if s["examples_not_drawn"]) == ["long1", "long2"]
    told = [line for line in lines if "training examples, but" in line]
    assert len(told) == 1 and told[0].startswith("long1: ")
    assert sum(line.startswith("more documents have more training examples than their steps draw") for line in lines) == 1
    for d, s in got.items():  # the summary line carries the count, for the documents not told too
        n = s["examples"] + s["examples_not_drawn"]
        head = f"{d}: 6 of {n} examples drawn (" if d.startswith("long") else f"{d}: {n} examples ("
        assert sum(line.startswith(head) for line in lines) == 1, (head, lines)

    # below the limit each document is told, and nothing is summed up
    monkeypatch.setattr(kindex, "NOTICES_IN_FULL", 5)
    index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "kms", steps=6, examples_per_doc=1, recite_tokens=16,
                                  amp="off", base_dtype="fp32", retrain=True))
    lines = capsys.readouterr().out.splitlines()
    assert sum("training examples, but" in line for line in lines) == 2
    assert sum("generation requests" in line for line in lines) == 0  # the kept records: no requests made again
    assert not any("more document" in line for line in lines)


def test_ask_names_a_malformed_pair():
    with pytest.raises(ValueError, match=r"pair 1: expected \(KM folder or None, question\), got 'Which bell\?'"):
        ask(["Which bell?"])


def test_ask_names_every_km_it_cannot_use_in_one_error(tmp_path):
    """Questions over many KMs with a few typos: every KM that cannot be used is named in one error,
    before the model loads (the first one alone was, a run at a time); a KM asked twice is named once."""
    nope, doc, meta = tmp_path / "nope", tmp_path / "doc.txt", tmp_path / "bad_meta"
    doc.write_text("a document, not its KM")
    meta.mkdir()
    (meta / "adapter_config.json").write_text('{"r": 4}')
    (meta / "km.json").write_text("[1]")
    with pytest.raises(ValueError) as e:
        ask([(str(nope), "a?"), (str(doc), "b?"), (None, "c?"), (str(meta), "d?"), (str(nope), "e?")])
    assert str(e.value).splitlines() == [
        "3 problems in the KMs asked:", f"  --km {nope}: no such folder", f"  --km {doc}: a file, not a KM folder",
        f"  {meta / 'km.json'}: unreadable (not a JSON object); re-index the document with --retrain"]
    with pytest.raises(ValueError) as e:  # one problem: the line alone, as before
        ask([(str(nope), "a?")])
    assert str(e.value) == f"--km {nope}: no such folder"


def test_ask_refuses_a_question_past_the_models_positions(tiny_model):
    """The tiny Llama takes 512 positions: a 600-word question was answered with nothing and a warning."""
    with pytest.raises(ValueError, match=r"question 2 \('word word word word word word word word \.\.\.', for the base "
                                         r"model\) is \d+ tokens as prompted: with "
                                         r"--max-new-tokens 8 it passes the 512 positions"):
        ask([(None, "Which bell?"), (None, "word " * 600)], model=tiny_model, max_new_tokens=8)
    # at the edge: prompt + new tokens = 512 still answers
    from transformers import AutoTokenizer

    from kmtrain.data import chat_prompt_ids
    from kmtrain.evaluate import question_prompt

    n = len(chat_prompt_ids(AutoTokenizer.from_pretrained(tiny_model), question_prompt("word " * 100)))
    assert len(ask([(None, "word " * 100)], model=tiny_model, max_new_tokens=512 - n)) == 1
    with pytest.raises(ValueError, match="passes the 512 positions"):
        ask([(None, "word " * 100)], model=tiny_model, max_new_tokens=513 - n)


def test_index_refuses_chunks_past_the_models_positions(tiny_model, docs_dir, tmp_path):
    """A chunk whose generation prompt and new tokens pass the model's 512 positions is refused
    before generation (transformers only warned, and the targets and KM came out of positions the
    model never learnt), naming the document; the KMs of a run before it are kept."""
    out = tmp_path / "kms"
    index(str(docs_dir), tiny_cfg(tiny_model, out))
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/adapter_model.safetensors")}
    (docs_dir / "long.txt").write_text(" ".join(["The harbour bell Moro rings at every high tide."] * 60))
    with pytest.raises(ValueError, match=r"long: a chunk of \d+ tokens makes a \d+-token generation prompt, which "
                                         r"with --max-new-tokens 10 passes the 512 positions .*: lower --chunk-tokens "
                                         r"\(by at least \d+\)$"):
        index(str(docs_dir), tiny_cfg(tiny_model, out, chunk_tokens=2048))
    # too many new tokens for any chunk: only the new tokens are named, with what fits
    with pytest.raises(ValueError, match=r"long: a chunk of (\d+) tokens makes a (\d+)-token generation prompt, which "
                                         r"with --max-new-tokens 100000 passes the 512 positions .*: lower "
                                         r"--max-new-tokens to at most \d+$") as got:
        index(str(docs_dir), tiny_cfg(tiny_model, out, max_new_tokens=100000))
    prompt = int(re.search(r"makes a (\d+)-token", str(got.value)).group(1))
    assert str(got.value).endswith(f"to at most {512 - prompt}")
    with pytest.raises(ValueError, match=r"long: ddcd sequences of 513 tokens pass the 512 positions"):
        index(str(docs_dir), tiny_cfg(tiny_model, out, chunk_tokens=2048, objective="ddcd"))
    # the generator fits, but a recitation piece the length of the chunk doubles the teacher's sequence
    with pytest.raises(ValueError, match=r"long: a chunk of \d+ tokens and its longest recitation piece make a "
                                         r"\d+-token teacher sequence, past the 512 positions"):
        index(str(docs_dir), tiny_cfg(tiny_model, out, chunk_tokens=400, recite_tokens=2000))
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/adapter_model.safetensors")} == before
    assert not (out / "long").exists()
    # the lm windows (512 tokens) fit; a chunk short enough fits the generator and the recitation pieces too
    index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "lm", chunk_tokens=2048, objective="lm"))
    index(str(docs_dir), tiny_cfg(tiny_model, out, chunk_tokens=256))
    assert (out / "long" / "km.json").is_file()


def test_ask_takes_kms_of_one_base_under_two_paths(tiny_model, docs_dir, tmp_path):
    """KMs indexed with the same weights under two paths (a copy, or an alias and its folder) answer
    together; KMs of other weights are still told apart."""
    import shutil

    shutil.copytree(tiny_model, tmp_path / "copy", ignore=shutil.ignore_patterns(".kmtrain-hash.json"))
    index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "a", steps=1))
    index(str(docs_dir), tiny_cfg(str(tmp_path / "copy"), tmp_path / "b", steps=1))
    pairs = [(str(tmp_path / "a" / "alpha"), "Which bell?"), (str(tmp_path / "b" / "beta"), "What grows?")]
    assert len(ask(pairs, max_new_tokens=2)) == 2
    meta = tmp_path / "b" / "beta" / "km.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "base_model_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="KMs were trained on different base models"):
        ask(pairs, max_new_tokens=2)


def test_already_done_line_lists_a_few_ids_and_counts_the_rest(capsys):
    kindex = importlib.import_module("kmtrain.index")
    done = [(f"doc{i:02d}", {"objective": "sdcd" if i < 11 else "lm", "steps": 60}) for i in range(13)]
    kindex._print_already_done(done)
    kindex._print_already_done(done[:1])
    kindex._print_already_done([])
    assert capsys.readouterr().out.splitlines() == [
        "13 documents already done (11 sdcd, 60 steps; 2 lm, 60 steps), skipped (retrain=True / --retrain redoes them): "
        + ", ".join(f"doc{i:02d}" for i in range(10)) + " and 3 more",
        "doc00: already done (sdcd, 60 steps), skipped (retrain=True / --retrain redoes it)"]


def test_examples_exist_only_for_the_wave_in_training(tiny_model, docs_dir, tmp_path, monkeypatch):
    """A document's training examples (its chunk repeated once per target) are built with its wave and
    dropped with it. Built for every document up front, they made a run's memory grow with the corpus:
    seen at 480 documents of 2000 words, 1.85 GB peak against 1.46 GB with waves built one at a time."""
    import gc

    from kmtrain.train import DocState

    kindex = importlib.import_module("kmtrain.index")
    real, alive = kindex.train_wave, []

    def counting(model, tok, wave, *a, **kw):
        gc.collect()
        # type(o), not isinstance: isinstance reads o.__class__, which on torch.distributed's deprecated
        # reduce_op object warns (DocState has no subclasses)
        alive.append((len(wave), sum(type(o) is DocState for o in gc.get_objects())))
        return real(model, tok, wave, *a, **kw)

    monkeypatch.setattr(kindex, "train_wave", counting)
    summaries = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "kms", docs_per_step=2))
    assert [s["status"] for s in summaries] == ["trained"] * 3
    assert alive == [(2, 2), (1, 1)]


_KILLED_CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import tiny_cfg
from kmtrain import index

where, seen = {where!r}, []
real_rename, real_replace = os.rename, os.replace

def die_if(hit):
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)  # no except, finally or atexit runs: as a kill -9 or an OOM kill

def rename(src, dst):  # export_peft: a KM's finished temporary folder renamed into place
    die_if(where == "km" and os.path.basename(src).startswith(".tmp-"))
    return real_rename(src, dst)

def replace(src, dst):  # data.atomic_write: a stage file's temporary renamed into place
    name = os.path.basename(dst)
    seen.append(name)
    die_if(where == "cache" and name.startswith("teacher_")
           or where == "synth" and name == "synth.json" and seen.count(name) == 2
           or where == "training" and name.startswith("training_") and seen.count(name) == 2)
    return real_replace(src, dst)

os.rename, os.replace = rename, replace
# where == "training": a checkpoint after every step; killed as the second one (step 2 of 3) is renamed
index({docs!r}, tiny_cfg({model!r}, {out!r}, **({{"checkpoint_seconds": 1e-9}} if where == "training" else {{}})))
"""


@pytest.fixture(scope="module")
def uninterrupted_kms(tiny_model, tmp_path_factory):
    """The tiny documents' KMs from one run that nobody killed, shared by the kill tests."""
    root = tmp_path_factory.mktemp("uninterrupted")
    index(str(write_docs(root / "docs")), tiny_cfg(tiny_model, root / "kms"))
    return root / "kms"


def test_a_dict_of_texts_indexes_as_the_same_files_do(tiny_model, tmp_path, uninterrupted_kms):
    """index({id: text}) for texts a caller already holds: the KMs the same files give, byte for byte,
    and the files' checks (here an empty text and a case-colliding id, named with the dict's keys)."""
    from kmtrain import DocumentError

    index(dict(DOCS), tiny_cfg(tiny_model, tmp_path / "kms"))
    for d in DOCS:
        assert ((tmp_path / "kms" / d / "adapter_model.safetensors").read_bytes()
                == (uninterrupted_kms / d / "adapter_model.safetensors").read_bytes())
    with pytest.raises(DocumentError) as e:
        index({"a": "text", "b": " ", "A": "more text"}, tiny_cfg(tiny_model, tmp_path / "kms2"))
    assert "docs['b']: document 'b' is empty" in str(e.value) and "docs['A']" in str(e.value)
    assert not (tmp_path / "kms2").exists()


def test_ask_takes_questions_from_a_file_and_prints_json_lines(tiny_model, tmp_path, uninterrupted_kms, capsys,
                                                                 monkeypatch):
    """`kmtrain ask --questions FILE --json`: the file's questions are asked after the command line's, in one
    call, and each answer comes back as one JSON line {"km", "question", "answer"} in the order asked: the
    answers ask() gives the same pairs."""
    from kmtrain.cli import main

    monkeypatch.chdir(uninterrupted_kms)  # a relative km in the file is taken from here, as --km is
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(json.dumps(r) for r in [
        {"question": "What grows?", "km": "beta", "gold": "violet barley"}, {"question": "Hello?"},
        {"question": "Which bell?", "km": "alpha"}]))
    pairs = [("gamma", "Who winds it?"), ("beta", "What grows?"), (None, "Hello?"), ("alpha", "Which bell?")]
    answers = ask(pairs, model=tiny_model, max_new_tokens=5)
    capsys.readouterr()
    assert main(["ask", "--model", tiny_model, "--max-new-tokens", "5", "--json", "--km", "gamma", "Who winds it?",
                 "--questions", str(questions)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [{"km": km, "question": q, "answer": a} for (km, q), a in zip(pairs, answers)]
    # The tiny model's answers are all empty, which the lines above cannot tell apart: each answer goes
    # on its own question's line, answers in another script included (as escapes, still JSON), and in
    # the order asked whatever order they are made in
    asked = []

    def fake_ask(given, on_answer, **kw):
        asked.append(given)
        for k in (2, 0, 3, 1):
            on_answer(k, f"{given[k][0]}: {given[k][1]} 答")
        return [f"{km}: {q} 答" for km, q in given]

    monkeypatch.setattr(importlib.import_module("kmtrain.index"), "ask", fake_ask)
    assert main(["ask", "--json", "--km", "gamma", "Who winds it?", "--questions", str(questions)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert asked == [pairs] and all(line.isascii() for line in lines)
    assert [json.loads(line) for line in lines] == [{"km": km, "question": q, "answer": f"{km}: {q} 答"}
                                                     for km, q in pairs]


def test_ask_prints_answers_as_they_come_so_a_stop_keeps_them(tiny_model, capsys, monkeypatch):
    """`kmtrain ask` over many questions printed nothing until the last was answered: stopped half-way
    (Ctrl-C, a crash), a long run left no answer. Each batch's answers are printed as it ends."""
    from kmtrain.cli import main

    kindex = importlib.import_module("kmtrain.index")
    real, calls = kindex.generate_answers, []

    def stopped_in_the_second_batch(*a, **kw):
        calls.append(len(a[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(kindex, "generate_answers", stopped_in_the_second_batch)
    questions = [f"Question {i}?" for i in range(kindex.ANSWER_BATCH + 4)]
    assert main(["ask", "--model", tiny_model, "--max-new-tokens", "2", "--json", *questions]) == 130
    out, err = capsys.readouterr()
    assert calls == [kindex.ANSWER_BATCH, 4] and "kmtrain: interrupted" in err
    assert [json.loads(line)["question"] for line in out.splitlines()] == questions[:kindex.ANSWER_BATCH]


@pytest.mark.parametrize("where", ["synth", "cache", "training", "km"])
def test_a_real_kill_mid_write_resumes_to_the_same_kms(tiny_model, docs_dir, tmp_path, where, uninterrupted_kms,
                                                        capsys):
    """SIGKILL (no clean-up code runs) with a file written but not yet renamed into place: a
    document's synthetic targets mid-stream, a teacher cache, a training checkpoint (the run resumes
    its wave from the one before), a finished KM's folder. The temporary
    is left under the name the code really gives it, the next run removes it, and the KMs end byte
    for byte as an uninterrupted run's. (The test with made-up leftover names cannot see a temporary
    name that the clean-up stopped matching.)"""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "kms"
    code = _KILLED_CHILD.format(tests=str(Path(__file__).parent), where=where, docs=str(docs_dir),
                                model=tiny_model, out=str(out))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert len(leftovers) == 1, leftovers  # the one write the kill interrupted
    assert {"synth": ".synth.json.tmp-", "cache": ".teacher_", "training": ".training_",
            "km": ".tmp-alpha"}[where] in leftovers[0].name

    capsys.readouterr()
    # after a kill in training, settings that change no training number keep the checkpoint
    other = (dict(gen_batch_size=4, cache_batch_size=2, device="cpu", checkpoint_seconds=0.0) if where == "training"
             else {})
    summaries = index(str(docs_dir), tiny_cfg(tiny_model, out, **other))
    resumed = "resumed from its checkpoint at step 1 of 3" in capsys.readouterr().out
    assert resumed == (where == "training")  # the checkpoint of step 1, written before the kill, was used
    assert [s.get("resumed_from_step") for s in summaries if s["status"] == "trained"][:1] == [
        1 if where == "training" else 0]
    assert not list((out / ".work").glob("training_*.safetensors"))  # each wave's is deleted once its KMs are written
    assert sorted(s["id"] for s in summaries) == sorted(DOCS)
    assert all(s["status"] in ("trained", "already done") for s in summaries)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or p.name.startswith(".old-")]
    for d in DOCS:
        assert ((out / d / "adapter_model.safetensors").read_bytes()
                == (uninterrupted_kms / d / "adapter_model.safetensors").read_bytes())


_INDEX_WITHOUT_TRITON = """
import os
sys.path.insert(0, {tests!r})
from conftest import tiny_cfg
os.environ.pop("TRITON_INTERPRET", None)  # conftest sets it where there is no GPU; a laptop does not
from kmtrain import index

try:
    index({docs!r}, tiny_cfg({model!r}, {out!r}, backend="triton"))
    raise SystemExit("--backend triton ran without triton")
except ValueError as e:
    assert "triton is not installed" in str(e), e
assert not os.path.exists({out!r})
index({docs!r}, tiny_cfg({model!r}, {out!r}, device="cpu"))
assert not [m for m in sys.modules if m.split(".")[0] == "triton"]
"""


def test_index_without_triton_installed_writes_the_same_kms(tiny_model, docs_dir, tmp_path, uninterrupted_kms):
    """Where Triton is not installed (macOS, Windows laptops), kmtrain index runs on the PyTorch path and
    writes the same KMs byte for byte; --backend triton is refused before anything is written."""
    from pathlib import Path

    from conftest import run_without_triton

    out = tmp_path / "kms"
    child = run_without_triton(_INDEX_WITHOUT_TRITON.format(tests=str(Path(__file__).parent), docs=str(docs_dir),
                                                            model=tiny_model, out=str(out)))
    assert child.returncode == 0, child.stderr[-3000:]
    reference = uninterrupted_kms
    if HAS_CUDA:  # the shared reference trained on the GPU; the child trained on the CPU
        reference = tmp_path / "cpu_kms"
        index(str(docs_dir), tiny_cfg(tiny_model, reference, device="cpu"))
    for d in DOCS:
        assert ((out / d / "adapter_model.safetensors").read_bytes()
                == (reference / d / "adapter_model.safetensors").read_bytes())


def test_stored_piece_counts_are_used_only_as_they_were_cut():
    """synth.json's recitation piece counts stand in for cutting the chunks again only at the
    --recite-tokens they were cut at and in the shape one chunk each; anything else is counted again."""
    from kmtrain.index import _stored_piece_counts

    cfg = IndexConfig(recite_tokens=96)
    good = {"recitation_pieces": {"tokens": 96, "per_chunk": [3, 0, 5]}}
    assert _stored_piece_counts(good, cfg, 3) == [3, 0, 5]
    assert _stored_piece_counts(good, IndexConfig(recite_tokens=48), 3) is None  # cut at another length
    assert _stored_piece_counts(good, cfg, 4) is None  # not one per chunk
    for bad in ({}, {"recitation_pieces": [3, 0, 5]}, {"recitation_pieces": {"tokens": 96}},
                {"recitation_pieces": {"tokens": 96, "per_chunk": [3, -1, 5]}},
                {"recitation_pieces": {"tokens": 96, "per_chunk": [3, 0.5, 5]}},
                {"recitation_pieces": {"tokens": 96, "per_chunk": [3, True, 5]}}):
        assert _stored_piece_counts(bad, cfg, 3) is None, bad
