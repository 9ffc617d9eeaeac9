"""Command line: `kmtrain index DOCS --out DIR ...` and `kmtrain ask --km DIR/ID "question" ...`."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import typing
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .config import CHOICES, PRESETS, STEPS_DEFAULT_SAID, IndexConfig
from .data import DocumentError
from .index import OutputBusyError, library_versions, printable_output
from .synth import GeneratorError


# Flags that set an IndexConfig field of the same name (dashes for underscores), with their help.
# Each flag's default is None ("not given"), so that a preset only fills what the command line leaves
# unset: comparing values with the defaults, as before, let --preset paper override --steps 60.
_FIELD_FLAGS = {
    "model": "alias (smollm2-135m), local folder, GGUF file (converted once) or Hub name",
    "objective": "what a KM is trained with",
    "steps": "training steps",
    "docs_per_step": "documents trained together (one grouped-LoRA slot each)",
    "examples_per_doc": "examples of each document per step",
    "micro_batch_tokens": "run a step in passes of at most this many padded tokens, gradients summed: the same "
                          "update in less memory (0: one pass)",
    "lr": "AdamW learning rate",
    "lr_b_ratio": "LoRA+: the B matrices learn at lr times this (1: one lr for A and B)",
    "rank": "LoRA rank",
    "alpha": "LoRA alpha (scale alpha / rank)",
    "chunk_tokens": "chunk length in tokens",
    "chunk_overlap": "fraction of a chunk shared with the next",
    "summaries_per_chunk": "summaries the generator writes per chunk",
    "qa_per_chunk": "Q/A generations per chunk (each may hold several pairs)",
    "facts_per_chunk": "fact lists per chunk (names, dates, numbers, one sentence each; 0: none)",
    "max_new_tokens": "generation length of a synthetic target",
    "temperature": "sampling temperature of the generator",
    "focus_parts": "the generator also reads up to N runs of each chunk's paragraphs in turn (0: whole chunk only)",
    "recite_tokens": "sdcd: also distil each chunk itself, in sentence pieces of about N tokens cued by their "
                     "first words (0: generated targets only)",
    "qa_format": "sdcd: distil Q/A pairs as generated (pair), as the question a KM is asked (chat), or both",
    "heldout_per_chunk": "synthetic targets per chunk kept out of training; the KM written is the checkpoint of "
                         "lowest DCD loss on them (sdcd; 0: train on all, keep the last step)",
    "heldout_every": "steps between held-out evaluations (0: steps // 10; the last step is always evaluated)",
    "checkpoint_seconds": "save a wave's training state this often, so that a killed run resumes it (0: never)",
    "generator": "what writes the synthetic targets (vllm: when installed)",
    "gen_batch_size": "synthetic-target requests per generate call (hf generator; lower it where generation "
                      "runs out of memory)",
    "cache_dtype": "teacher cache precision",
    "cache_batch_size": "synthetic targets per teacher forward while a teacher cache is built (lower it where "
                        "that runs out of memory)",
    "backend": "kernels: triton or torch (auto: triton on a GPU)",
    "amp": "bf16 autocast (auto: where the device multiplies bf16 natively)",
    "base_dtype": "base weights in memory (auto: bf16 under bf16 autocast, else fp32)",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "seed": "run seed (each document's own seed derives from it and its id)",
}


# Defaults that depend on the machine, as --help says them
_DEFAULT_SAID = {"steps": STEPS_DEFAULT_SAID}


_TRUST_HELP = ("load a model that brings its own Python code (config.json's auto_map): transformers runs it, with "
               "your permissions")


def _index_parser(sub):
    p = sub.add_parser("index", help="train one Knowledge Module per document")
    p.add_argument("docs", nargs="+", help="folder of .txt/.md files, one such file, a .jsonl of {id, text}, or a "
                                           "Hugging Face dataset (Hub name, folder or one of its data files, "
                                           "save_to_disk output); several of these are indexed as one input")
    p.add_argument("--out", required=True, help="output folder: one PEFT adapter folder per document")
    p.add_argument("--split", default="train", help="dataset split (Hugging Face dataset input; default train)")
    p.add_argument("--id-field", default="id", help="id field (.jsonl or dataset input; default id)")
    p.add_argument("--text-field", default="text", help="text field (.jsonl or dataset input; default text)")
    p.add_argument("--limit", type=int, help="index at most this many documents")
    p.add_argument("--skip-bad-documents", action="store_true",
                   help="index the documents that have no problem and list those left out (empty, not UTF-8, an id "
                        "given twice, ...), rather than stop; an input wrong as a whole (no such folder) still stops")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="'paper': 2048-token chunks, 16 targets, 1500 steps, batch 8; flags given win over it")
    d, types = IndexConfig(), typing.get_type_hints(IndexConfig)
    for name, text in _FIELD_FLAGS.items():
        default = getattr(d, name)
        kind = types[name]
        if type(None) in typing.get_args(kind):  # Optional[int] (steps): unset, the machine's default
            kind = typing.get_args(kind)[0]
        said = _DEFAULT_SAID.get(name, f"default {default}")
        shown = "; ".join([said] + [f"{k} preset {v[name]}" for k, v in PRESETS.items()
                                    if v.get(name, default) != default])
        p.add_argument("--" + name.replace("_", "-"), type=kind, choices=CHOICES.get(name), help=f"{text} ({shown})")
    p.add_argument("--no-teacher-cache", action="store_true", help="re-run the teacher every step (reference recipe)")
    p.add_argument("--keep-teacher-cache", action="store_true",
                   help="keep each document's teacher cache after its KM is written (default: delete it; "
                        "kept, a retrain with other training settings reuses it)")
    p.add_argument("--cache-layers", help="comma-separated decoder layers to cache (the last is always kept)")
    p.add_argument("--retrain", action="store_true", help="retrain documents whose KM already exists")
    p.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    p.add_argument("--no-progress", action="store_true")
    return p


def _layer_list(text: str) -> Tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--cache-layers takes comma-separated layer numbers (e.g. 0,14,29), got {text!r}") from None


def _config_from_args(a) -> IndexConfig:
    cfg = IndexConfig(out=a.out)
    if a.preset:
        cfg = cfg.replace(**PRESETS[a.preset])
    given = {name: v for name in _FIELD_FLAGS if (v := getattr(a, name)) is not None}
    cfg = cfg.replace(**given, teacher_cache=not a.no_teacher_cache, keep_teacher_cache=a.keep_teacher_cache,
                      retrain=a.retrain, progress=not a.no_progress, trust_remote_code=a.trust_remote_code,
                      cache_layers=_layer_list(a.cache_layers) if a.cache_layers else None)
    return cfg.validate()


def _versions() -> str:
    v = library_versions()
    return f"kmtrain {v.pop('kmkernels')} ({', '.join(f'{name} {ver}' for name, ver in v.items())})"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kmtrain", description="Knowledge Modules: index documents, ask questions",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # --version on one line
    ap.add_argument("--version", action="version", version=_versions())
    sub = ap.add_subparsers(dest="cmd", required=True)
    _index_parser(sub)
    q = sub.add_parser("ask", help="answer questions closed book with KMs")
    q.add_argument("items", nargs="*", metavar="[--km DIR/ID] QUESTION",
                   help="questions, each optionally preceded by --km KM_FOLDER (its KM answers it)")
    q.add_argument("--km", action="append", metavar="DIR/ID", help="KM folder for the question that follows")
    q.add_argument("--questions", metavar="FILE", help='more questions, from a .jsonl of {"question": ..., "km": '
                   'DIR/ID or null} ("-": standard input), asked after those on the command line')
    q.add_argument("--json", action="store_true", help='one JSON object a line, {"km", "question", "answer"}, in '
                   "the order asked (for scripts)")
    q.add_argument("--model", help="base model (default: the one each KM was trained on)")
    q.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens (default 64)")
    q.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda:1, ...")
    q.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    return ap


_ASK_OPTIONS = ("--km", "--questions", "--model", "--max-new-tokens", "--device")  # each takes a value
_ASK_FLAGS = ("--json", "--trust-remote-code")


def _ask_pairs(argv: List[str]) -> List[Tuple[Optional[str], str]]:
    """(KM folder or None, question) in command-line order: each question goes with the --km just
    before it, or with the base model. argparse cannot keep the order of an option interleaved with
    positionals, so the raw arguments are read here."""
    tokens = argv[argv.index("ask") + 1:]
    pairs: List[Tuple[Optional[str], str]] = []
    km: Optional[str] = None
    i = 0
    while i < len(tokens):
        t = tokens[i]
        name, eq, value = t.partition("=")
        if name in _ASK_OPTIONS:
            if not eq:
                if i + 1 >= len(tokens):
                    raise ValueError(f"{name} needs a value")
                value, i = tokens[i + 1], i + 1
            if name == "--km":
                km = value
        elif t in _ASK_FLAGS:
            pass
        elif t.startswith("--") and t != "--":
            raise ValueError(f"unknown option {t!r} for ask (options: {', '.join(_ASK_OPTIONS + _ASK_FLAGS)})")
        elif t != "--":
            pairs.append((km, t))
            km = None
        i += 1
    if km is not None:
        raise ValueError(f"--km {km} has no question after it")
    return pairs


def reporting_errors(run: Callable[[], int], prog: str = "kmtrain", resumable: bool = True) -> int:
    """``run()``'s exit code, or one line on stderr and a code for what it raised: bad input 2, the
    machine's errors 1, Ctrl-C or SIGTERM 130 (with ``resumable``, the line says that finished work is kept)."""
    resume = _RESUME if resumable else ""
    # SIGTERM (a scheduler's stop, `kill`) ends the run as Ctrl-C does: one line, exit 130, temporaries
    # removed. By default it ended the process where it stood, without a word. (Training saves its
    # state first: train.stop_at_step_end.) Handlers can be set in the main thread only.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
    try:
        return run()
    except (ValueError, DocumentError, OutputBusyError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's, not the input's: out of disk, permissions, a file system gone
        print(f"{prog}: error: {e}{resume}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as e:  # a GPU's: which stage, and the settings that shrink it (index's note)
        said = "; ".join(getattr(e, "__notes__", ()))
        print(f"{prog}: error: {said + ': ' if said else ''}{' '.join(str(e).split())}{resume}", file=sys.stderr)
        return 1
    except GeneratorError as e:  # vLLM's process: its traceback (it is the useful one), then the line
        if e.traceback:
            print(e.traceback.rstrip(), file=sys.stderr)
        print(f"{prog}: error: {e}{resume}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: a line, not a traceback
        print(f"\n{prog}: interrupted{resume}", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: Optional[List[str]] = None) -> int:
    a, rest = build_parser().parse_known_args(argv)
    if a.cmd == "index" and rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")

    def run() -> int:
        if a.cmd == "index":
            from .data import load_sources
            from .index import index

            cfg = _config_from_args(a)
            left_out = ""
            try:
                docs = load_sources(a.docs, split=a.split, id_field=a.id_field, text_field=a.text_field,
                                    limit=a.limit, progress=not a.no_progress)
            except DocumentError as e:
                if not a.skip_bad_documents or e.documents is None:
                    raise
                if not e.documents:
                    raise DocumentError(f"{e}\nno document is left to index without them") from None
                # every one of them, as without the flag: the list is what is left to fix
                n = len(e.problems)
                named = "the document this problem names" if n == 1 else f"the documents these {n} problems name"
                print(f"kmtrain: --skip-bad-documents: {named} {'is' if n == 1 else 'are'} left out, no KM for "
                      f"{'it' if n == 1 else 'them'}:\n  " + "\n  ".join(e.problems), file=sys.stderr, flush=True)
                left_out = (f"kmtrain: --skip-bad-documents: {named.replace('these ', '')} {'was' if n == 1 else 'were'}"
                            f" left out, no KM for {'it' if n == 1 else 'them'} (listed at the start)")
                docs = e.documents
            summaries = index(docs, cfg)
            # the others are written; a script must still learn that these are missing
            missing = {why: [s["id"] for s in summaries if s["status"] == status]
                       for status, why in (("diverged", "training diverged"), ("no examples", "no training examples"))}
            # the first ten of each kind (each was said on its own line above): thousands of ids made one
            # line of tens of kilobytes
            said = [f"{why} for {', '.join(ids[:10])}{f' and {len(ids) - 10} more' if len(ids) > 10 else ''}"
                    for why, ids in missing.items() if ids]
            if left_out:  # asked for: the last line but an error's says what the run left out
                print(left_out, file=sys.stderr)
            if said:
                n = sum(map(len, missing.values()))
                print(f"kmtrain: error: {'; '.join(said)}; no KM written for {'it' if n == 1 else 'them'}",
                      file=sys.stderr)
                return 1
            return 0
        pairs = _ask_pairs(list(sys.argv[1:] if argv is None else argv))
        if a.questions is not None:
            from .data import load_questions

            pairs += load_questions(a.questions)
        if not pairs:
            raise ValueError("no question given (on the command line, or in a file with --questions FILE)")
        from .index import ask

        # Each answer is printed once those before it are: in the order asked, and as they come, so
        # that a long run stopped half-way (Ctrl-C) leaves what it answered on the screen or in the file.
        waiting: Dict[int, str] = {}
        shown = 0

        def show(k: int, answer: str) -> None:
            nonlocal shown
            waiting[k] = answer
            while shown in waiting:
                (km, question), said = pairs[shown], waiting.pop(shown)
                try:  # --json: ASCII escapes, so that the lines stay JSON on any stdout encoding
                    print(json.dumps({"km": km, "question": question, "answer": said}) if a.json
                          else f"[{km or 'base'}] {question}\n  {said}", flush=True)
                except BrokenPipeError:
                    raise _OutputClosed from None
                shown += 1

        try:
            ask(pairs, model=a.model, max_new_tokens=a.max_new_tokens, device=a.device, on_answer=show,
                trust_remote_code=a.trust_remote_code)
        except _OutputClosed:
            # `kmtrain ask ... | head`: the reader has what it wanted. Stop as a Unix tool does, without
            # an error line ("[Errno 32] Broken pipe", exit 1, before) or a traceback at exit
            _drop_stdout()
            return 128 + 13  # as if killed by SIGPIPE
        return 0

    with printable_output():  # the answers and summary lines, whatever stdout's encoding
        return reporting_errors(run, resumable=a.cmd == "index")


class _OutputClosed(Exception):
    """stdout's reader went away while answers were printed."""


def _drop_stdout() -> None:
    """Points stdout at the null device, so that Python's flush of it at exit finds no broken pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (io.UnsupportedOperation)
        pass


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


_RESUME = ("; finished KMs and stage outputs are kept (every file is written whole or not at all): "
           "run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
