"""kmtrain.cli: flags to config, errors as one clear line."""
import json

import pytest

from kmtrain import IndexConfig


def test_cli_errors(tmp_path, capsys, monkeypatch):
    from kmtrain.cli import main

    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("")
    assert main(["index", str(d), "--out", str(tmp_path / "o")]) == 2
    assert "a.txt" in capsys.readouterr().err
    assert main(["ask", "--km", str(tmp_path / "nope"), "q?"]) == 2
    assert f"--km {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
    assert main(["ask", "--km", str(d / "a.txt"), "q?"]) == 2  # a document given for its KM
    assert f"--km {d / 'a.txt'}: a file, not a KM folder" in capsys.readouterr().err
    for doc in ("alpha", "beta"):  # an index run's --out handed over instead of one of its KMs
        (tmp_path / "kms" / doc).mkdir(parents=True)
        (tmp_path / "kms" / doc / "adapter_config.json").write_text('{"r": 4}')
    assert main(["ask", "--km", str(tmp_path / "kms"), "q?"]) == 2
    assert (f"--km {tmp_path / 'kms'} is a folder of 2 KMs, not one KM: name one, e.g. --km {tmp_path / 'kms' / 'alpha'}"
            in capsys.readouterr().err)
    assert main(["ask", "q?", "--km", str(tmp_path / "x")]) == 2
    assert "has no question after it" in capsys.readouterr().err
    # an unset shell variable ("$OUT") is an empty path, which is the working directory: indexed, written
    # into or asked as a KM there before
    monkeypatch.chdir(d)  # holds a.txt, which an index of "" would read (and fail on as empty)
    for argv, said in ((["index", str(d), "--out", ""], "out is empty (an unset shell variable?)"),
                       (["index", "", "--out", str(tmp_path / "o")], "the documents' path is empty"),
                       (["index", str(d), "--out", str(tmp_path / "o"), "--model", " "], "model is empty"),
                       (["ask", "--km", "", "q?"], "--km for question 1 is empty"),
                       (["ask", "--model", "", "q?"], "model is empty")):
        assert main(argv) == 2
        assert f"kmtrain: error: {said}" in capsys.readouterr().err
    assert sorted(p.name for p in d.iterdir()) == ["a.txt"]  # nothing written in the working directory
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "adapter_config.json").write_text('{"r": 16,')
    assert main(["ask", "--km", str(tmp_path / "damaged"), "q?"]) == 2
    assert "adapter_config.json: unreadable" in capsys.readouterr().err
    from kmtrain.cli import _ask_pairs

    assert _ask_pairs(["ask", "--device", "cpu", "q?", "--device=cuda", "--km", "k", "r?"]) == [(None, "q?"), ("k", "r?")]
    assert main(["ask", "--kms", "x", "q?"]) == 2
    assert ("unknown option '--kms' for ask (options: --km, --questions, --model, --max-new-tokens, --device, "
            "--json, --trust-remote-code)" in capsys.readouterr().err)
    # a flag between questions is not a question: "--trust-remote-code" is not asked of the base model
    assert _ask_pairs(["ask", "--km", "k", "q?", "--trust-remote-code", "r?"]) == [("k", "q?"), (None, "r?")]
    with pytest.raises(ValueError, match="^--max-new-tokens needs a value$"):  # (main: argparse says it first)
        _ask_pairs(["ask", "q?", "--max-new-tokens"])
    assert main(["index", str(d), "--out", str(tmp_path / "o"), "--focus-parts", "-1"]) == 2
    assert "focus_parts must be >= 0" in capsys.readouterr().err
    assert main(["index", str(d), "--out", str(tmp_path / "o"), "--heldout-every", "-2"]) == 2
    assert "heldout_every must be >= 0" in capsys.readouterr().err
    assert main(["index", str(d), "--out", str(tmp_path / "o"), "--recite-tokens", "-1"]) == 2
    assert "recite_tokens must be >= 0" in capsys.readouterr().err
    assert main(["index", str(d), "--out", str(tmp_path / "o"), "--lr-b-ratio", "0"]) == 2
    assert "lr_b_ratio must be > 0" in capsys.readouterr().err
    # caught before the model loads
    (d / "a.txt").write_text("A document.")
    out = ["index", str(d), "--out", str(tmp_path / "o")]
    for flags, message in ((["--chunk-overlap", "1.5"], "chunk_overlap must be in [0, 1), got 1.5"),
                           (["--temperature", "0"], "temperature must be > 0"),
                           (["--cache-layers", "1,x"], "--cache-layers takes comma-separated layer numbers"),
                           (["--model", str(tmp_path / "no_model")], "no such model folder"),
                           (["--limit", "0"], "--limit must be at least 1, got 0"),
                           (["--alpha", "0"], "alpha must be > 0, got 0.0"),
                           (["--lr", "inf"], "lr must be a finite number, got inf"),
                           (["--checkpoint-seconds", "-5"], "checkpoint_seconds must be >= 0, got -5.0"),
                           (["--checkpoint-seconds", "nan"], "checkpoint_seconds must be a finite number"),
                           (["--device", "gpu"], "device 'gpu' is not a device torch knows"),
                           (["--device", "cuda:99"], "device 'cuda:99': "),
                           (["--limit", "-1"], "--limit must be at least 1, got -1")):
        assert main(out + flags) == 2
        assert message in capsys.readouterr().err, flags
    # ask: checked before the model loads (the missing model folder would be the error otherwise)
    ask = ["ask", "--model", str(tmp_path / "no_model")]
    for args, message in ((["--max-new-tokens", "0", "q?"], "--max-new-tokens must be at least 1, got 0"),
                          (["--device", "gpu", "q?"], "device 'gpu' is not a device torch knows"),
                          (["--device=cuda:99", "q?"], "device 'cuda:99': "),
                          (["q?", "--km", str(tmp_path / "x"), "  "], f"question 2 (for {tmp_path / 'x'}) is empty"),
                          ([], "no question given (on the command line, or in a file with --questions FILE)")):
        assert main(ask + args) == 2
        assert message in capsys.readouterr().err, args
    # what argparse refuses is its usage error (exit 2): an option without its value, a stray index argument
    for argv, message in ((ask + ["q?", "--km"], "argument --km: expected one argument"),
                          (["index", str(d), "--out", str(tmp_path / "o"), "--kms", "x"],
                           "unrecognized arguments: --kms x")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(["index", str(d), "--out", str(tmp_path / "a_file")]) == 2
    assert "a_file: exists and is not a folder" in capsys.readouterr().err


def test_cli_flags_to_config(capsys):
    from kmtrain.cli import _config_from_args, build_parser

    parse = lambda *argv: _config_from_args(build_parser().parse_args(["index", "docs", "--out", "o", *argv]))  # noqa: E731
    cfg = parse()
    assert cfg == IndexConfig(out="o").validate()  # no flags: exactly the library defaults
    # steps unset: the machine's default, which --help names (not "default None")
    assert cfg.steps is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["index", "--help"])
    steps_help = " ".join(capsys.readouterr().out.split())
    assert "training steps (default 60, 30 on a CPU without native bf16 matmuls; paper preset 1500)" in steps_help
    paper = parse("--preset", "paper")
    assert (paper.steps, paper.temperature, paper.summaries_per_chunk, paper.lr) == (1500, 1.0, 8, 1e-3)
    assert parse("--preset", "paper", "--lr", "2e-3").lr == 2e-3
    # a flag given with the library default's value still wins over the preset (it did not: 1500, 1e-3)
    same = parse("--preset", "paper", "--steps", "60", "--lr", "0.005", "--recite-tokens", "96")
    assert (same.steps, same.lr, same.recite_tokens, same.chunk_tokens) == (60, 0.005, 96, 2048)
    # every flag of an IndexConfig field sets that field
    from kmtrain.cli import _FIELD_FLAGS

    for name in _FIELD_FLAGS:
        value = {"model": "m", "objective": "lm", "qa_format": "both", "generator": "hf", "cache_dtype": "fp32",
                 "backend": "torch", "amp": "off", "base_dtype": "fp32", "device": "cpu", "chunk_overlap": 0.25,
                 "steps": 7}.get(name)
        if value is None:
            value = getattr(IndexConfig(), name) + 1
        assert getattr(parse("--" + name.replace("_", "-"), str(value)), name) == value, name
    assert (cfg.trust_remote_code, parse("--trust-remote-code").trust_remote_code) == (False, True)
    mixed = parse("--preset", "paper", "--steps", "40", "--temperature", "0.7", "--qa-format", "chat")
    assert (mixed.steps, mixed.temperature, mixed.qa_format, mixed.max_new_tokens) == (40, 0.7, "chat", 768)
    assert parse("--base-dtype", "bf16").base_dtype == "bf16"
    assert parse("--focus-parts", "3").focus_parts == 3
    assert parse("--recite-tokens", "96").recite_tokens == 96
    assert parse("--lr-b-ratio", "4").lr_b_ratio == 4.0
    assert (parse("--heldout-per-chunk", "0").heldout_per_chunk, parse("--heldout-every", "5").heldout_every) == (0, 5)

    assert (cfg.keep_teacher_cache, parse("--keep-teacher-cache").keep_teacher_cache) == (False, True)
    assert (cfg.teacher_cache, parse("--no-teacher-cache").teacher_cache) == (True, False)


def test_set_overrides_parse_to_each_fields_type(capsys):
    """`--set FIELD=VALUE` (make demo's and bench.quality_demo's overrides): every field's default,
    written out, parses back to itself; booleans are words, not Python truthiness ("false" was True
    through bool(str)); a bad field or value fails with an error naming it."""
    import dataclasses

    import pytest

    from kmtrain.demo import main as demo_main

    d = IndexConfig()
    for f in dataclasses.fields(IndexConfig):
        v = getattr(d, f.name)
        text = "none" if v is None else ",".join(map(str, v)) if isinstance(v, tuple) else str(v).lower()
        assert IndexConfig.parse_override(f"{f.name}={text}") == (f.name, v), f.name
    assert IndexConfig.parse_override("teacher_cache=false") == ("teacher_cache", False)
    assert IndexConfig.parse_override("retrain=1") == ("retrain", True)
    assert IndexConfig.parse_override("cache_layers=0, 14,29") == ("cache_layers", (0, 14, 29))
    assert IndexConfig.parse_override("lr=3e-3") == ("lr", 3e-3)
    for bad, message in (("steps=five", "steps takes int, got 'five'"), ("stepz=5", "no field 'stepz'"),
                         ("teacher_cache=maybe", "not a boolean"), ("steps", "expected FIELD=VALUE"),
                         ("cache_layers=a", "cache_layers takes")):
        with pytest.raises(ValueError, match=message):
            IndexConfig.parse_override(bad)
    # the demo refuses a bad override, or a value out of range, before it loads anything
    for argv, message in ((["--set", "stepz=5"], "no field 'stepz'"), (["--set", "steps=0"], "steps must be >= 1")):
        with pytest.raises(SystemExit) as e:
            demo_main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_config_rejects_what_would_train_nothing_or_garbage():
    import pytest

    for kw, message in ((dict(kl_weight=0.0, hidden_weight=0.0), "both 0"),
                        (dict(hidden_weight=-1.0), "hidden_weight must be >= 0"),
                        (dict(weight_decay=float("nan")), "weight_decay must be a finite number"),
                        (dict(objective="lm", lm_seq_tokens=1), "lm_seq_tokens must be >= 2"),
                        (dict(ddcd_windows_per_chunk=0), "ddcd_windows_per_chunk must be >= 1"),
                        (dict(gen_batch_size=0), "gen_batch_size must be >= 1"),
                        (dict(cache_batch_size=0), "cache_batch_size must be >= 1"),
                        (dict(chunk_tokens=7), r"chunk_tokens must be >= 8, got 7"),
                        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
                        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
                        (dict(warmup_frac=-0.1), r"warmup_frac must be in \[0, 1\], got -0.1"),
                        (dict(objective="ddcd", ddcd_student_frac=1.0),
                         r"ddcd_student_frac must be in \(0, 1\), got 1.0")):
        with pytest.raises(ValueError, match=message):
            IndexConfig(**kw).validate()
    IndexConfig(objective="lm", kl_weight=0.0, hidden_weight=0.0).validate()  # lm takes neither


def test_a_triton_backend_that_cannot_run_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """--backend triton on a CPU without the interpreter failed only after the model had loaded and
    the synthetic targets were generated; now it is a config error, and nothing is written."""
    from kmtrain.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("A document.")
    out = tmp_path / "o"
    assert main(["index", str(d), "--out", str(out), "--device", "cpu", "--backend", "triton",
                 "--model", str(tmp_path / "no_model")]) == 2  # the model's own error would come later
    assert "backend='triton' needs CUDA tensors (got device cpu)" in capsys.readouterr().err
    assert not out.exists()
    import pytest

    from kmtrain import ask

    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ask([(None, "q?")], model=str(tmp_path / "no_model"), device="cpu", backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        ask([(None, "q?")], model=str(tmp_path / "no_model"), backend="cuda")


def test_no_progress_means_no_bars_from_the_libraries_either(tiny_model, tmp_path, capsys):
    """`--no-progress` left transformers' "Loading weights" bar and `datasets`' "Generating train split"
    bar in the log; now stderr has no bar at all, and each library's own setting is restored after."""
    import json

    import datasets
    from transformers.utils import logging as hf_logging

    from kmtrain.cli import main

    docs = tmp_path / "docs.json"  # a dataset's data file: read through `datasets`
    docs.write_text(json.dumps({"id": "bell", "text": "The harbour bell Moro rings at every high tide."}) + "\n")
    out = tmp_path / "kms"
    assert main(["index", str(docs), "--out", str(out), "--model", tiny_model, "--steps", "1", "--docs-per-step", "1",
                 "--examples-per-doc", "1", "--summaries-per-chunk", "1", "--qa-per-chunk", "1", "--max-new-tokens",
                 "4", "--chunk-tokens", "64", "--rank", "4", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert (out / "bell" / "km.json").is_file() and "bell:" in captured.out
    assert "%|" not in captured.err and "Loading weights" not in captured.err, captured.err
    assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()


def test_version_names_the_libraries_behind_the_numbers(capsys, monkeypatch):
    import pytest
    import torch
    import transformers

    from kmkernels import __version__
    from kmtrain.cli import main

    monkeypatch.setenv("COLUMNS", "40")  # one line however narrow the terminal: it is pasted into bug reports
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"kmtrain {__version__} (torch {torch.__version__}, ")
    assert f"transformers {transformers.__version__}" in out and "peft " in out


def test_sigterm_is_reported_as_an_interrupt_by_both_entry_points(capsys):
    """`kmtrain` and `make demo` both go through reporting_errors: a SIGTERM (a scheduler's stop)
    ends either with one line and exit 130, as Ctrl-C does, where it killed the process without a
    word; the handler before it is back afterwards, also after a normal return."""
    import os
    import signal

    from kmtrain.cli import reporting_errors

    before = signal.getsignal(signal.SIGTERM)
    for prog in ("kmtrain", "make demo"):
        assert reporting_errors(lambda: os.kill(os.getpid(), signal.SIGTERM) or 0, prog=prog) == 130
        err = capsys.readouterr().err
        assert err.strip().startswith(f"{prog}: interrupted; finished KMs") and "Traceback" not in err
        assert signal.getsignal(signal.SIGTERM) == before
    assert reporting_errors(lambda: 0) == 0 and signal.getsignal(signal.SIGTERM) == before


def test_output_in_another_script_never_fails_on_a_narrow_stdout(tiny_model, tmp_path, monkeypatch):
    """stdout redirected to a file on Windows writes cp1252: a document id or an answer in another
    script raised UnicodeEncodeError in a print (after the KM was written, then in every resumed run's
    "already done" line, reported as bad input). Now it is written as escapes, and stdout is as it was."""
    import importlib
    import io
    import re
    import sys

    from conftest import tiny_cfg
    from kmtrain import index
    from kmtrain.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "日本.txt").write_text("鐘は正午に鳴る。The bell of Lissen rings at noon.", encoding="utf-8")
    narrow = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", narrow)
    for _ in range(2):  # trained, then "already done"
        (summary,) = index(str(docs), tiny_cfg(tiny_model, tmp_path / "kms", steps=1))
        assert summary["id"] == "日本" and (tmp_path / "kms" / "日本" / "km.json").is_file()
    def fake_ask(pairs, on_answer, **kw):
        on_answer(0, "答えは正午")
        return ["答えは正午"]

    monkeypatch.setattr(importlib.import_module("kmtrain.index"), "ask", fake_ask)
    assert main(["ask", "--km", str(tmp_path / "kms" / "日本"), "いつ?"]) == 0
    assert narrow.errors == "strict"  # put back
    narrow.flush()
    said = narrow.buffer.getvalue().decode("cp1252")
    assert re.search(r"^\\u65e5\\u672c: (\d+ of )?\d+ examples", said, re.M), said
    assert "already done" in said and "\\u7b54\\u3048\\u306f\\u6b63\\u5348" in said


def _two_inputs(tmp_path, tiny_model):
    """Two document folders, notes/ (bell.md, tower.md) and more/ (harbour.txt), and the flags of a
    seconds-long index run on the tiny model."""
    notes, more = tmp_path / "notes", tmp_path / "more"
    notes.mkdir()
    more.mkdir()
    (notes / "bell.md").write_text("The bell of Lissen rings at noon.")
    (notes / "tower.md").write_text("The tower of Lissen is 40 metres tall.")
    (more / "harbour.txt").write_text("The harbour freezes in January.")
    flags = ["--model", tiny_model, "--steps", "1", "--summaries-per-chunk", "1", "--qa-per-chunk", "1",
             "--max-new-tokens", "8", "--chunk-tokens", "64", "--no-progress"]
    return notes, more, flags


def test_index_takes_several_inputs_as_one(tiny_model, tmp_path, capsys):
    """`kmtrain index notes/*.md more/ --out kms`: a shell glob hands over several paths, which argparse
    refused ("unrecognized arguments"). They are indexed as one input: ids unique across them, and the
    problems of every input in one error."""
    from kmtrain.cli import main

    notes, more, flags = _two_inputs(tmp_path, tiny_model)
    assert main(["index", str(notes / "bell.md"), str(notes / "tower.md"), str(more), "--out", str(tmp_path / "kms"),
                 *flags]) == 0
    assert sorted(p.name for p in (tmp_path / "kms").iterdir() if not p.name.startswith(".")) == [
        "bell", "harbour", "tower"]
    # --limit counts across the inputs; once it is reached the rest are not read (the last is not there)
    assert main(["index", str(notes), str(more), str(tmp_path / "nowhere"), "--out", str(tmp_path / "kms2"),
                 "--limit", "2", *flags]) == 0
    assert sorted(p.name for p in (tmp_path / "kms2").iterdir() if not p.name.startswith(".")) == ["bell", "tower"]

    (more / "Bell.txt").write_text("Another bell.")  # the same id as notes/bell.md but for letter case
    (more / "tower.txt").write_text("Another tower.")  # the same id as notes/tower.md
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "text": "fine"}\nnot json\n')
    capsys.readouterr()
    assert main(["index", str(notes), str(more), str(bad), "--out", str(tmp_path / "kms3"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kmtrain: error: 3 problems in the input documents:"), err
    assert f"{bad}:2: invalid JSON" in err and f"{more / 'tower.txt'}: duplicate document id 'tower'" in err
    assert f"{more / 'Bell.txt'}: document id 'Bell' differs from 'bell'" in err
    assert not (tmp_path / "kms3").exists()


def test_skip_bad_documents_indexes_the_rest_and_lists_what_it_left_out(tiny_model, tmp_path, capsys):
    """A corpus of thousands with a few empty or clashing files: --skip-bad-documents indexes the
    others and lists every problem (first and, counted, last on stderr), exit 0 as asked. An input
    wrong as a whole, or nothing left, still stops with exit 2 and writes nothing."""
    from kmtrain.cli import main

    notes, more, flags = _two_inputs(tmp_path, tiny_model)
    (notes / "empty.md").write_text("  \n")
    (more / "Bell.txt").write_text("Another bell.")  # the same id as notes/bell.md but for letter case
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "text": "The ferry leaves at six."}\nnot json\n')
    inputs = [str(notes), str(more), str(bad)]
    assert main(["index", *inputs, "--out", str(tmp_path / "strict"), *flags]) == 2  # without the flag: stops
    assert not (tmp_path / "strict").exists()
    capsys.readouterr()
    assert main(["index", *inputs, "--out", str(tmp_path / "kms"), "--skip-bad-documents", *flags]) == 0
    got = capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "kms").iterdir() if not p.name.startswith(".")) == [
        "harbour", "tower", "x"]
    err = got.err.splitlines()
    assert err[0] == "kmtrain: --skip-bad-documents: the documents these 3 problems name are left out, no KM for them:"
    assert sorted(err[1:4]) == sorted([f"  {notes / 'empty.md'}: document 'empty' is empty", f"  {bad}:2: invalid JSON "
                                       "(Expecting value)", f"  {more / 'Bell.txt'}: document id 'Bell' differs from "
                                       f"'bell' ({notes / 'bell.md'}) only in letter case; their KM folders would "
                                       "collide on case-insensitive file systems"])
    assert err[-1] == ("kmtrain: --skip-bad-documents: the documents 3 problems name were left out, no KM for them "
                       "(listed at the start)")
    assert "indexed 3 documents" in got.out
    # an input that is not there is no document's problem: the run stops, with the flag too
    assert main(["index", *inputs, str(tmp_path / "nowhere"), "--out", str(tmp_path / "kms2"), "--skip-bad-documents",
                 *flags]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err and not (tmp_path / "kms2").exists()
    # nothing left once the bad ones are out
    assert main(["index", str(notes / "empty.md"), "--out", str(tmp_path / "kms3"), "--skip-bad-documents",
                 *flags]) == 2
    assert capsys.readouterr().err.endswith("is empty\nno document is left to index without them\n")
    assert not (tmp_path / "kms3").exists()


def test_ask_into_a_closed_pipe_stops_quietly(tmp_path, capsys, monkeypatch):
    """`kmtrain ask ... --json | head -2`: once head has its lines the pipe closes. ask said
    "kmtrain: error: [Errno 32] Broken pipe" and exited 1; it now stops as a Unix tool does, with no
    line on stderr and exit 141 (128 + SIGPIPE), after the lines the reader took."""
    import importlib
    import sys

    from kmtrain.cli import main

    class ReaderGoneAfterTwo:  # stdout into a pipe whose reader exits after two lines
        errors, lines = "strict", []

        def write(self, text):
            if len(self.lines) == 2:
                raise BrokenPipeError(32, "Broken pipe")
            self.lines += [text] if text.strip() else []
            return len(text)

        def flush(self):
            pass

    def fake_ask(pairs, on_answer, **kw):
        for k in range(len(pairs)):
            on_answer(k, f"answer {k}")
        return [f"answer {k}" for k in range(len(pairs))]

    monkeypatch.setattr(importlib.import_module("kmtrain.index"), "ask", fake_ask)
    stdout = ReaderGoneAfterTwo()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["ask", "--json", "a?", "b?", "c?", "d?"]) == 141
    monkeypatch.undo()
    assert [json.loads(line)["answer"] for line in stdout.lines] == ["answer 0", "answer 1"]
    assert capsys.readouterr().err == ""
