"""`index` (documents -> one KM each) and `ask` (questions answered with KMs), as Python functions.

Stages, each with its output on disk under OUT/.work/<doc id>/ so that a killed run resumes:
  chunks.json -> synth.json -> teacher_<objective>_<key>.safetensors -> OUT/<doc id>/
(while a wave trains, also its checkpoint OUT/.work/training_<key>.safetensors, see checkpoint.py)
(the examples are rebuilt from chunks.json and synth.json, deterministically from the document's seed;
the cache key hashes their tokens, so a changed layout never meets a stale cache). The examples and
the last two run wave by wave (D documents at a time, nothing of a wave kept after it), and a
teacher cache is deleted once its KM is written unless cfg.keep_teacher_cache. A finished KM
(OUT/<id>/km.json readable, its files intact) is never retrained unless cfg.retrain; damaged
outputs are redone, never used. One run at a time holds OUT (out_lock).
"""
from __future__ import annotations

import base64
import bisect
import dataclasses
import errno
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import time
from array import array
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from kmkernels import (adapter_targets, attach_grouped_lora, export_peft, load_peft, lora_targets,
                       read_adapter_config, set_adapter_ids, slot_parameters)
from kmkernels.utils import resolve_backend

from .checkpoint import TrainingCheckpoint
from .config import DEFAULT_STEPS, FP32_CPU_STEPS, IndexConfig, resolve_device
from .cpu_heap import heap_kept
from .data import (Document, atomic_write_json, chat_prompt_ids, check_documents, chunk_recitation_pieces,
                   chunk_tokens, document_ids, file_sha256, load_documents, problems_message, recitation_item,
                   recitation_items, recitation_pieces, target_ids, whole_character_cuts)
from .evaluate import ANSWER_BATCH, generate_answers, question_prompt
from .models import (hub_snapshot, load_model, logit_softcap, logit_temperature, logits_problem, native_bf16,
                     resolve_model, text_config, weights_hash)
from .synth import GENERATION_MARGIN, PROMPT_OF, requested_kinds, requests_to_make, split_heldout, synthesize
from .teacher_cache import TeacherCache, build_cache, build_examples, cache_bytes, select_layers
from .train import DocState, train_wave

# IndexConfig fields that do not change a wave's training numbers: a checkpoint stays valid across them.
# (The generator's settings act through the examples, and the device as resolved, both in the key; the
# cache build's batch through the teacher cache, which the checkpoint's wave keeps until its KMs are written.)
NOT_TRAINING_SETTINGS = ("out", "retrain", "progress", "keep_teacher_cache", "checkpoint_seconds", "device",
                         "generator", "gen_batch_size", "cache_batch_size", "trust_remote_code")


# km.json's names for the training precision, as the --amp / --base-dtype flags spell them
_DTYPE_NAME = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def library_versions() -> Dict[str, str]:
    """The installed versions of the libraries a KM's numbers depend on (km.json, ``kmtrain --version``)."""
    from importlib.metadata import PackageNotFoundError, version

    from kmkernels import __version__

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"kmkernels": __version__, **{name: of(name) for name in ("torch", "triton", "transformers", "peft")}}


def _bar(cfg, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not cfg.progress, file=sys.stderr, **kw)


@contextmanager
def out_of_memory_note(stage: str, shrink: str) -> Iterator[None]:
    """A GPU or the host running out of memory in ``stage`` gets a note (``shrink``) saying which settings
    shrink it: the error is torch.OutOfMemoryError for a caller to catch, the CLI prints it in one line.
    Why: torch's message names bytes, not the stage, and generation's batch had no flag at all."""
    note = f"out of memory in {stage}; {shrink}"
    try:
        yield
    except torch.OutOfMemoryError as e:
        # what BaseException.add_note does, spelled out for Python 3.10, which lacks it
        e.__notes__ = [*getattr(e, "__notes__", ()), note]
        raise
    except RuntimeError as e:
        # The host's memory running out (more than RAM and swap, or a memory limit set by a scheduler)
        # is a plain RuntimeError from torch's CPU allocator, which ended the run in a traceback: it is
        # made the OutOfMemoryError a GPU's is, with the same note.
        if _CPU_ALLOCATION_FAILED not in str(e):
            raise
        rest = str(e).split(_CPU_ALLOCATION_FAILED, 1)[1]  # ": you tried to allocate N bytes. Error code 12 (...)"
        oom = torch.OutOfMemoryError("CPU out of memory" + " ".join(rest.split()))
        oom.__notes__ = [note]
        raise oom from e


_CPU_ALLOCATION_FAILED = "DefaultCPUAllocator: can't allocate memory"


@contextmanager
def printable_output() -> Iterator[None]:
    """For the call's length, stdout writes what its encoding cannot hold as escapes (\\u65e5) instead
    of raising (stderr does so by default). Why: where stdout is redirected to a file on Windows it
    writes cp1252, and a document id in another script raised UnicodeEncodeError in the line printed
    after its KM was written, and again in every resumed run's "already done" line; the CLI reported
    it as bad input. A model's answer in `kmtrain ask` went the same way."""
    stream = sys.stdout
    strict = getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure")
    if strict:
        stream.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        if strict:
            stream.reconfigure(errors="strict")


def _amp_dtype(cfg, device: torch.device):
    """bf16 autocast: asked for (--amp bf16), or (auto) where the device has native bf16 matmuls."""
    if cfg.amp == "off":
        return None
    if cfg.amp == "bf16" or native_bf16(device):
        return torch.bfloat16
    return None


# Said once, before any work, where training falls back to fp32 on a CPU: on a 2-core AMD EPYC with
# AVX2 only, make demo took 21:36 at 14.7 s per training step, where hosts with AVX512-BF16 or AMX
# took 8-12 minutes at 5.5-7.8 s per step (bench/results/make_demo_cpu.md). A user should not have
# to find that out from the progress bar.
FP32_CPU_NOTICE = ("this CPU has no native bf16 matmuls (AVX512-BF16 or AMX): training runs in fp32, at about "
                   "twice the time per step of a CPU that has them")
# ... and, where the steps were left to their default, that there are fewer of them (`default_steps`)
FP32_CPU_STEPS_NOTICE = (f"a KM trains {FP32_CPU_STEPS} steps by default on a CPU without native bf16 matmuls, where "
                         f"other machines train {DEFAULT_STEPS}: --steps {DEFAULT_STEPS} trains as they do, in about "
                         "twice the time here")


def default_steps(device: Union[str, torch.device] = "auto") -> int:
    """The training steps of a run that leaves ``IndexConfig.steps`` unset (None): ``FP32_CPU_STEPS``
    on a CPU without native bf16 matmuls, where a step takes ~2x the time (training runs in fp32; a
    bf16 one would be emulated, slower still), else ``DEFAULT_STEPS``. A property of the machine,
    not of --amp, so that one CPU trains the same steps whatever the precision asked for."""
    dev = resolve_device(device) if isinstance(device, str) else device
    return FP32_CPU_STEPS if dev.type == "cpu" and not native_bf16(dev) else DEFAULT_STEPS


def _fp32_cpu_by_default(cfg, device: torch.device, amp) -> bool:
    """Whether training falls back to fp32 on a CPU for want of native bf16 (not by --amp off)."""
    return device.type == "cpu" and cfg.amp == "auto" and amp is None


def _base_dtype(cfg, device: torch.device, amp) -> torch.dtype:
    """Base weights: bf16 when asked, or (auto) whenever training runs under bf16 autocast (every
    matmul runs in bf16 there anyway; fp32 weights would double the memory and add a cast per matmul,
    which on a CPU cost 1.6x the step time); else fp32."""
    if cfg.base_dtype == "bf16" or (cfg.base_dtype == "auto" and amp == torch.bfloat16):
        return torch.bfloat16
    return torch.float32


def _refuse_interpreted_bf16(backend: str, device: torch.device, bf16: bool, fix: str) -> None:
    """Triton kernels on a CPU run in Triton's interpreter, whose bf16 loads are broken: under bf16
    autocast (the default on a CPU with native bf16) they trained to losses of ~1e20 without an error
    (in fp32 they match the torch path). Refused before any work."""
    if backend == "triton" and device.type == "cpu" and bf16:
        raise ValueError(f"backend triton on a CPU runs Triton's interpreter, which loads bf16 tensors wrongly: {fix}")


def doc_seed(seed: int, doc_id: str) -> int:
    """A document's own seed (its KM's initialisation, data order and held-out split): from the run's
    seed and the document's id only, so it does not depend on the other documents."""
    return int(hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()[:12], 16)


def document_items(cfg, doc_id: str, items: List[dict], chunk_texts: Sequence[str] = (),
                   tokenizer=None, made_share: float = 1.0,
                   pieces_per_chunk: Optional[Sequence[int]] = None) -> Tuple[List[dict], List[dict]]:
    """(items trained on, items held out for model selection) of one document, as index() has them:
    its generated ``items`` split (cfg.heldout_per_chunk), and with cfg.recite_tokens its recitation
    items (given ``chunk_texts`` and ``tokenizer``) added to the training side, never held out: they
    are the document itself. ``made_share``: the share of its generation requests that were made
    (`share_of_requests_made`); as large a random share of its recitation pieces is kept (see
    `requests_to_make`). ``pieces_per_chunk`` (`_requests_needed` counted them): then only the
    chunks that hold a kept piece are cut into pieces again, the same pieces (a 70 MB document's
    648,325 pieces took 175 s to cut, for the 4 it kept)."""
    if cfg.objective != "sdcd":
        return list(items), []
    train, held = split_heldout(items, cfg.heldout_per_chunk, doc_seed(cfg.seed, doc_id))
    if cfg.recite_tokens:
        if tokenizer is None or not chunk_texts:
            raise ValueError("recite_tokens needs the chunk texts and the tokenizer")
        if made_share < 1 and pieces_per_chunk is not None:
            pieces = _kept_pieces(cfg, doc_id, chunk_texts, tokenizer, made_share, pieces_per_chunk)
        else:
            pieces = recitation_pieces(chunk_texts, tokenizer, cfg.recite_tokens)
            if made_share < 1:
                pieces = [pieces[i] for i in _kept_positions(cfg, doc_id, len(pieces), made_share)]
        train += [recitation_item(c, target, tokenizer) for c, target in pieces]  # cued: only those kept
    return train, held


def _kept_positions(cfg, doc_id: str, n_pieces: int, made_share: float) -> List[int]:
    """Which of a document's ``n_pieces`` recitation pieces are kept when ``made_share`` of its
    generation requests were made: as large a share, drawn by the document's seed, in order."""
    return sorted(random.Random(f"pieces:{doc_seed(cfg.seed, doc_id)}").sample(range(n_pieces),
                                                                                math.ceil(made_share * n_pieces)))


def _kept_pieces(cfg, doc_id: str, chunk_texts: Sequence[str], tokenizer, made_share: float,
                 pieces_per_chunk: Sequence[int]) -> List[Tuple[int, str]]:
    """`document_items`' kept (chunk, piece) pairs, cutting only the chunks that hold one."""
    if len(pieces_per_chunk) != len(chunk_texts):
        raise ValueError(f"{doc_id}: pieces counted for {len(pieces_per_chunk)} chunks, not its {len(chunk_texts)}")
    starts = list(itertools.accumulate(pieces_per_chunk, initial=0))  # the first piece of each chunk
    cut: Dict[int, List[str]] = {}
    kept = []
    for i in _kept_positions(cfg, doc_id, starts[-1], made_share):
        c = bisect.bisect_right(starts, i) - 1  # the last chunk starting at or before piece i: its holder
        if c not in cut:
            cut[c] = chunk_recitation_pieces(chunk_texts[c], tokenizer, cfg.recite_tokens)
            if len(cut[c]) != pieces_per_chunk[c]:
                raise RuntimeError(f"{doc_id}: chunk {c} has {len(cut[c])} recitation pieces, counted "
                                   f"{pieces_per_chunk[c]} (a hand-edited 'recitation_pieces' in its synth.json? "
                                   f"delete that entry and they are counted again)")
        kept.append((c, cut[c][i - starts[c]]))
    return kept


def share_of_requests_made(made: dict) -> float:
    """The share of a document's generation requests that its synth.json record ``made`` holds the
    outputs of (1 for records written before requests were limited, which hold all)."""
    n = made.get("requested", 0)
    return n / made["of_requests"] if made.get("of_requests") else 1.0


def _requests_needed(cfg, chunk_texts: Sequence[str], tokenizer,
                     counts: Optional[List[int]] = None) -> Tuple[int, int, List[int]]:
    """(requests to make, requests in all, recitation pieces of each chunk) of one document:
    `requests_to_make`. ``counts``: the pieces per chunk as synth.json stored them (see
    `_stored_piece_counts`), else each chunk is cut to count them."""
    n_requests = len(chunk_texts) * sum(n for _, n in requested_kinds(cfg))
    recite = cfg.objective == "sdcd" and cfg.recite_tokens > 0
    if not recite:
        counts = []
    elif counts is None:
        counts = [len(chunk_recitation_pieces(t, tokenizer, cfg.recite_tokens)) for t in chunk_texts]
    return requests_to_make(n_requests, sum(counts), cfg.steps * cfg.examples_per_doc), n_requests, counts


def _stored_piece_counts(got: dict, cfg, n_chunks: int) -> Optional[List[int]]:
    """The recitation pieces per chunk that synth.json recorded when its requests were counted, if
    they were cut at the --recite-tokens in force; None otherwise (a record from before they were
    kept, another length, or a malformed entry: counted again). A re-run of a long document whose
    requests were made in part had cut every chunk again to count them (73 s of a 75 MB document's
    re-run, 15 s without: bench/results/huge_document_cpu.md)."""
    rec = got.get("recitation_pieces")
    if not (isinstance(rec, dict) and rec.get("tokens") == cfg.recite_tokens):
        return None
    per_chunk = rec.get("per_chunk")
    if not (isinstance(per_chunk, list) and len(per_chunk) == n_chunks
            and all(type(n) is int and n >= 0 for n in per_chunk)):
        return None
    return per_chunk


def _read_json(path: Path) -> Optional[dict]:
    """A JSON object from ``path``; None for a missing or unreadable file, or JSON that is not an object."""
    try:
        got = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) else None


def _read_stage_record(doc_id: str, path: Path, problem: Callable[[dict], Optional[str]]) -> Optional[dict]:
    """A document's stage record (chunks.json, synth.json), or None where there is none to keep:
    missing, or damaged, which is said in one line as it is redone (``problem``: what is wrong with
    a record that parses, or None). A file cut short or overwritten was redone without a word."""
    got = _read_json(path)
    why = "unreadable, or not a JSON object" if got is None and path.exists() else (problem(got) if got else None)
    if why is not None:
        print(f"{doc_id}: {path} is damaged ({why}), redoing it", flush=True)
        return None
    return got


# how chunks.json's ids were made (data.document_ids); a record without it, or with another, is redone
CHUNK_TOKENIZATION = "split_special_tokens"


def _ids_field(chunk_ids: Sequence[array]) -> List[str]:
    """chunks.json's "ids_int32le": each chunk's token ids as base64 of little-endian int32. As JSON
    lists of numbers, a 70 MB document's 66M ids came back from the file as 2.4 GB of Python ints;
    so they take 0.35 GB, and 0.26 GB as arrays."""
    def le(a: array) -> array:
        if sys.byteorder == "big":
            a = array("i", a)
            a.byteswap()
        return a
    return [base64.b64encode(le(a).tobytes()).decode("ascii") for a in chunk_ids]


def stored_chunk_ids(record: dict) -> Optional[List[array]]:
    """The token ids of a chunks.json ``record`` (OUT/.work/<id>/chunks.json, parsed), one int32
    array per chunk: from "ids_int32le", or from "ids" (lists of ints) in records written before
    it. None where they are missing, malformed or negative."""
    try:
        if "ids_int32le" in record:
            out = []
            for field in record["ids_int32le"]:
                raw = base64.b64decode(field, validate=True)
                # whole int32s, none negative: the last byte of each little-endian one holds its sign
                if len(raw) % 4 or max(raw[3::4], default=0) >= 0x80:
                    return None
                a = array("i", raw)
                if sys.byteorder == "big":
                    a.byteswap()
                out.append(a)
            return out
        ids = record["ids"]
        if not all(type(c) is list and all(type(i) is int and i >= 0 for i in c) for c in ids):
            return None
        return [array("i", c) for c in ids]
    except (KeyError, TypeError, ValueError, OverflowError):  # not a list, not base64, an id past int32
        return None


# What is wrong with a stage file that parses as an object, or None: such a file is redone, never
# trained on (a hand-edited synth.json, say, with a slip in it failed deep in training).
def _chunks_problem(got: dict, ids: Optional[List[array]]) -> Optional[str]:
    """``ids``: stored_chunk_ids(got), decoded once by the caller, which keeps them."""
    texts = got.get("texts")
    if not (isinstance(texts, list) and ids is not None and len(texts) == len(ids) > 0
            and all(isinstance(t, str) for t in texts)):
        return "needs non-empty lists 'texts' (strings) and 'ids_int32le' (token ids) of one length"
    return None


def _synth_problem(got: dict, n_chunks: int) -> Optional[str]:
    items = got.get("items")
    if not isinstance(items, list):
        return "needs a list 'items'"
    made, of = got.get("requested", 0), got.get("of_requests", got.get("requested", 0))
    if not (type(made) is int and type(of) is int and 0 <= made <= of):
        return f"needs integers 0 <= 'requested' <= 'of_requests', got {made!r} and {of!r}"
    for k, it in enumerate(items):
        if not (isinstance(it, dict) and type(it.get("chunk")) is int and 0 <= it["chunk"] < n_chunks
                and isinstance(it.get("prompt"), str) and isinstance(it.get("target"), str)):
            return (f"item {k} needs an integer 'chunk' in [0, {n_chunks}) and string 'prompt' and 'target', "
                    f"got {json.dumps(it)[:120]}")
    return None


# Temporary names with the pid of the process writing them: data.atomic_write's .<name>.tmp-<pid>
# files, export_peft's .tmp-<id>-<pid>-<random> and .old-<pid>-<random> folders.
_TEMP_PID = re.compile(r"^\..*\.tmp-(\d+)$|^\.tmp-.+-(\d+)-[a-z0-9_]+$|^\.old-(\d+)-[a-z0-9_]+$")


def remove_stale_temp(folder: Path) -> None:
    """Delete what runs that died (killed, out of disk) left before renaming it into place; a live
    process's temporaries are left alone, so two runs on different documents of one output folder
    do not disturb each other."""
    if not folder.is_dir():
        return
    for tmp in folder.iterdir():
        m = _TEMP_PID.match(tmp.name)
        pid = int(next(g for g in m.groups() if g)) if m else None
        if pid is not None and pid != os.getpid() and not _alive(pid):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


_WINDOWS = os.name == "nt"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a live run's temporaries are left alone). POSIX: signal 0, which
    delivers nothing. Not on Windows: there os.kill(pid, 0) sends a console Ctrl-C (CTRL_C_EVENT is 0)
    to every process sharing the console, this run included, so a resume that found a killed run's
    temporary would have interrupted itself. There the process is opened and its exit code read."""
    if _WINDOWS:
        import _winapi

        try:
            handle = _winapi.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        except PermissionError:  # exists, owned by someone else
            return True
        except OSError:  # no such process (ERROR_INVALID_PARAMETER)
            return False
        try:
            return _winapi.GetExitCodeProcess(handle) == 259  # STILL_ACTIVE
        finally:
            _winapi.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def km_problem(folder: Path, sha256: Optional[str] = None) -> Optional[str]:
    """Why the KM folder ``folder`` cannot be used, or None when it is intact: its adapter config
    must read, and its weights file must open as safetensors covering the whole file (a truncated
    copy fails here). Given ``sha256`` (km.json's adapter_sha256), the weights file is also hashed
    against it, which catches any changed byte; resume skips that (it reads every KM's weights)
    and ask does it for the KMs it loads."""
    from safetensors import safe_open

    try:
        read_adapter_config(folder)
    except ValueError as e:
        return str(e)
    weights = Path(folder) / "adapter_model.safetensors"
    if not weights.is_file():
        return f"{weights}: missing"
    try:
        with safe_open(str(weights), framework="pt") as f:
            if not list(f.keys()):
                return f"{weights}: holds no tensors"
    except Exception as e:  # safetensors raises its own error type for a truncated or damaged file
        return f"{weights}: unreadable ({e})"
    if sha256:
        got = file_sha256(str(weights))
        if got != sha256:
            return (f"{weights}: sha256 {got[:12]} is not the {sha256[:12]} recorded in km.json "
                    f"(the file changed after it was written)")
    return None


def _check_positions(cfg: IndexConfig, model, tok, chunks: Dict[str, Tuple[List[str], List[array]]]) -> None:
    """Refuses, before generation, a run whose sequences would pass the model's positions (a
    2048-position model under the paper preset's 2048-token chunks and 768 new tokens would generate
    and distil past its last position, quietly: transformers only warns). ``chunks``: each
    document's (chunk texts, chunk token ids); the longest chunk decides."""
    positions = getattr(text_config(model), "max_position_embeddings", None)
    if not positions or not chunks:
        return
    n, doc_id, text = max((len(ids), d, t) for d, (texts, chunk_ids) in chunks.items()
                          for t, ids in zip(texts, chunk_ids))
    if cfg.objective in ("sdcd", "pit"):  # the generator reads the chunk and an instruction, then writes
        prompt = max(len(chat_prompt_ids(tok, text + "\n\n" + PROMPT_OF[k])) for k, _ in requested_kinds(cfg))
        over = prompt + cfg.max_new_tokens - positions
        if over > 0:
            # what would fit: a shorter chunk where it can give the tokens over, fewer new tokens where
            # the prompt leaves room (`--max-new-tokens 100000` was told to cut a 95-token chunk by 99647)
            fixes = ([f"lower --chunk-tokens (by at least {over})"] if over < n else []) + (
                [f"lower --max-new-tokens to at most {positions - prompt}"] if prompt < positions else [])
            raise ValueError(
                f"{doc_id}: a chunk of {n} tokens makes a {prompt}-token generation prompt, which with "
                f"--max-new-tokens {cfg.max_new_tokens} passes the {positions} positions --model {cfg.model} "
                f"takes: {' or '.join(fixes) or 'lower --chunk-tokens and --max-new-tokens'}")
        if cfg.objective == "sdcd" and cfg.recite_tokens:  # the teacher reads the chunk, a cue and a piece of it
            longest = max(len(chat_prompt_ids(tok, text + "\n\n" + it["prompt"])) + len(target_ids(tok, it["target"]))
                          for it in recitation_items([text], tok, cfg.recite_tokens))
            if longest > positions:
                raise ValueError(f"{doc_id}: a chunk of {n} tokens and its longest recitation piece make a "
                                 f"{longest}-token teacher sequence, past the {positions} positions --model "
                                 f"{cfg.model} takes: lower --chunk-tokens or --recite-tokens")
    else:  # ddcd: a start token and a window of the chunk; lm: a run of the chunk
        field, longest = (("ddcd_window_tokens", min(n, cfg.ddcd_window_tokens) + 1) if cfg.objective == "ddcd"
                          else ("lm_seq_tokens", min(n, cfg.lm_seq_tokens)))
        if longest > positions:
            raise ValueError(f"{doc_id}: {cfg.objective} sequences of {longest} tokens pass the {positions} "
                             f"positions --model {cfg.model} takes: lower --chunk-tokens (or IndexConfig.{field})")


def index(docs: Union[str, os.PathLike, Mapping[str, str], Sequence[Document]], cfg: Optional[IndexConfig] = None,
          **overrides) -> List[dict]:
    """Train one KM per document. ``docs``: what `kmtrain index` takes (a folder, a file, a dataset), a
    dict {id: text}, or Documents. Returns one summary dict per document (also printed, one line each)."""
    cfg = (cfg or IndexConfig()).replace(**overrides).validate() if overrides else (cfg or IndexConfig()).validate()
    if isinstance(docs, (str, os.PathLike)):
        documents = load_documents(docs, progress=cfg.progress)
    elif isinstance(docs, Mapping):  # {id: text}: texts a caller already holds, checked as files are
        documents = check_documents([Document(k, v, f"docs[{k!r}]") for k, v in docs.items()])
    else:
        documents = check_documents(docs)
    device = resolve_device(cfg.device)  # a device this machine lacks fails before --out is made
    # "~" is the home folder, as in a shell: from Python (or quoted) nothing expanded it, and the KMs went
    # to a folder named "~" under the working directory, where a later `rm -rf ~` would aim at the home folder
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, a read-only or missing mount
        raise ValueError(f"--out {out}: cannot create this folder ({e.strerror or e})") from None
    with out_lock(out), printable_output(), heap_kept(device):
        return _index_locked(documents, cfg, out, device)


class OutputBusyError(RuntimeError):
    """Another run holds the output folder's lock."""


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _size(n: int) -> str:
    """Bytes for a message, in the unit that keeps a digit: a nearly full disk's 40 KB was "0.0 MB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_cache_space(work: Path, need: Dict[str, int], cfg: IndexConfig) -> None:
    """Raise OSError (ENOSPC) before the teacher runs when a wave's new teacher caches (``need``: bytes
    by document, from ``cache_bytes``) do not fit in the free space of ``work``'s file system. Why: a
    full disk showed only when the cache was written, after the teacher's minutes, and again on
    every re-run. At Llama-3.1-8B shapes a bf16 cache takes 278 KB per target token (32 layers of 4096
    values, and the KL's fp32 statistics)."""
    total, free = sum(need.values()), shutil.disk_usage(work).free
    if total <= free:
        return
    largest = max(need, key=need.__getitem__)
    ways = [] if cfg.cache_dtype == "fp8" else ["--cache-dtype fp8 (a byte a value)"]
    if cfg.cache_layers is None:
        ways.append("--cache-layers (some layers only)")
    if len(need) > 1 and not cfg.keep_teacher_cache:
        ways.append("a lower --docs-per-step (a wave's caches are deleted before the next)")
    ways.append("--no-teacher-cache (no cache; the teacher runs every step)")
    raise OSError(errno.ENOSPC, f"the teacher caches of {len(need)} document(s) (the largest: {largest}, "
                                f"{_size(need[largest])}) need {_size(total)} in {work}, which has {_size(free)} free: "
                                f"free some space, or make them smaller with {', or '.join(ways)}")


def out_lock(out: Path):
    """An exclusive lock on the output folder for one run's lifetime (OUT/.lock, an OS file lock that
    the kernel releases when the process dies, so a killed run never leaves it held). Two runs on one
    folder would train the same documents twice and one would delete the teacher caches the other is
    reading; the second fails at once instead, before it loads anything."""
    from filelock import FileLock, Timeout

    try:
        return FileLock(str(out / ".lock"), timeout=0).acquire()  # a context manager that releases it
    except Timeout:
        raise OutputBusyError(f"--out {out}: another kmtrain index run is writing to this folder "
                              f"(it holds {out / '.lock'}); wait for it to finish, or index into another "
                              f"--out") from None
    except OSError as e:  # no write permission, a read-only file system
        raise ValueError(f"--out {out}: cannot write in this folder ({e.strerror or e})") from None


def check_same_base(out: Path, model: str, finished: Dict[str, Optional[dict]]) -> None:
    """Refuses a run whose base weights differ from those the finished KMs in ``out`` were trained on
    (``finished``: document id -> its km.json, or None). Without it a run with another --model
    skipped those KMs as "already done", leaving a folder of KMs for two bases that the summary
    called finished; retraining them instead would overwrite finished work unasked. Runs before the
    model loads (the weights hash is memoised); a Hub model not downloaded yet is not hashed
    ("unknown") and not compared."""
    recorded = {i: m.get("base_model_sha256") for i, m in finished.items() if isinstance(m, dict)}
    recorded = {i: h for i, h in recorded.items() if h and h != "unknown"}
    if not recorded:
        return
    current = weights_hash(resolve_model(model)[0])
    other = sorted(i for i, h in recorded.items() if h != current)
    if current == "unknown" or not other:
        return
    names = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
    raise ValueError(f"--out {out}: {len(other)} finished KM(s) ({names}) were trained on other base weights "
                     f"(sha256 {recorded[other[0]][:12]}) than --model {model} ({current[:12]}); index into "
                     f"another --out, or pass --retrain to replace them")


def _print_already_done(done: List[Tuple[str, dict]], shown: int = 10) -> None:
    """One line for the finished KMs a run skips (document id, its km.json), however many: a run
    that adds a few documents to a folder of thousands would otherwise print thousands of lines."""
    if not done:
        return
    if len(done) == 1:
        doc_id, km = done[0]
        print(f"{doc_id}: already done ({km.get('objective')}, {km.get('steps')} steps), skipped "
              f"(retrain=True / --retrain redoes it)", flush=True)
        return
    kinds = Counter(f"{km.get('objective')}, {km.get('steps')} steps" for _, km in done)
    ids = ", ".join(i for i, _ in done[:shown]) + (f" and {len(done) - shown} more" if len(done) > shown else "")
    print(f"{len(done)} documents already done ({'; '.join(f'{n} {k}' for k, n in kinds.items())}), skipped "
          f"(retrain=True / --retrain redoes them): {ids}", flush=True)


# A notice that can apply to every document (a corpus of long ones outruns the steps) is printed in
# full for this many documents; a run over thousands printed one or two per document beside each
# document's summary line, burying the rest of the output.
NOTICES_IN_FULL = 3


class _Notices:
    """Counts one kind of per-document notice and prints only the first ``NOTICES_IN_FULL`` of them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, message: str) -> bool:
        """Prints ``message`` if it is among the first few; returns whether it was printed."""
        self.count += 1
        if self.count <= NOTICES_IN_FULL:
            print(message, flush=True)
        return self.count <= NOTICES_IN_FULL

    @property
    def untold(self) -> int:
        return max(0, self.count - NOTICES_IN_FULL)


def _index_locked(documents: List[Document], cfg: IndexConfig, out: Path, device: torch.device) -> List[dict]:
    work = out / ".work"
    remove_stale_temp(out)
    remove_stale_temp(work)  # a training checkpoint's write cut short
    amp = _amp_dtype(cfg, device)
    base_dtype = _base_dtype(cfg, device, amp)
    _refuse_interpreted_bf16(cfg.backend, device, torch.bfloat16 in (amp, base_dtype),
                             "add --amp off (and leave --base-dtype at auto or fp32), or use --backend torch")
    t_start = time.time()

    finished = {d.id: _read_json(out / d.id / "km.json") for d in documents}
    if not cfg.retrain:
        check_same_base(out, cfg.model, finished)

    summaries: List[dict] = []
    todo, already = [], []
    for d in documents:
        km_json = out / d.id / "km.json"
        done = finished[d.id]
        if cfg.retrain:
            todo.append(d)
        elif done is None:
            if km_json.exists():
                print(f"{d.id}: {km_json} is unreadable, retraining", flush=True)
            todo.append(d)
        elif done.get("document_sha256") != d.sha256:
            print(f"{d.id}: the document changed since its KM was trained, retraining", flush=True)
            todo.append(d)
        elif (problem := km_problem(out / d.id)) is not None:
            print(f"{d.id}: its finished KM is damaged ({problem}), retraining", flush=True)
            todo.append(d)
        else:
            summaries.append({**done, "status": "already done"})
            already.append((d.id, done))
    _print_already_done(already)
    if not todo:
        return summaries
    if _fp32_cpu_by_default(cfg, device, amp):
        print(FP32_CPU_NOTICE, flush=True)
    if cfg.steps is None:
        cfg = cfg.replace(steps=default_steps(device))
        if cfg.steps != DEFAULT_STEPS:
            print(FP32_CPU_STEPS_NOTICE, flush=True)

    model, tok, model_name, model_hash = load_model(cfg.model, str(device), dtype=base_dtype, progress=cfg.progress,
                                                    trust_remote_code=cfg.trust_remote_code)
    model_folder = resolve_model(cfg.model)[0]  # what vLLM loads: the converted folder for an alias
    # what km.json records for `ask`: a local folder as an absolute path (a relative one would name
    # another folder, or none, when asked from elsewhere); aliases and Hub names as given
    local = os.path.expanduser(cfg.model)
    model_path = os.path.abspath(local) if os.path.isdir(local) else cfg.model
    num_layers = text_config(model).num_hidden_layers
    select_layers(num_layers, cfg.cache_layers)  # a layer the model lacks fails now, not after generation
    try:  # attach_grouped_lora would refuse such a model too, but only after generation
        lora_targets(model, cfg.target_modules)
    except ValueError as e:
        raise ValueError(f"--model {cfg.model}: {e} (IndexConfig.target_modules names the ones to adapt)") from None
    problem = logits_problem(model)
    if problem is not None:
        raise ValueError(f"--model {cfg.model}: {problem}. The KM losses compute logits as the last hidden state "
                         f"times the output head's weight, plus its bias (the teacher's from its cache; with the "
                         f"model's logit scale or soft cap, where its config names one), so they would train towards "
                         f"other distributions than this model's: not supported")
    # Cohere's and Granite's logit scale (else 1) and Gemma 2's soft cap (else None): in the cache's key
    temperature, softcap = logit_temperature(model), logit_softcap(model)
    setting = {"model": model_hash, "chunk_tokens": cfg.chunk_tokens, "chunk_overlap": cfg.chunk_overlap}

    # 2. chunks
    chunks: Dict[str, Tuple[List[str], List[array]]] = {}
    n_chunks: Dict[str, int] = {}
    read: Dict[str, Optional[List[array]]] = {}  # the ids of the record read, decoded once, by its check

    def chunks_problem(rec: dict) -> Optional[str]:
        read["ids"] = stored_chunk_ids(rec)
        return _chunks_problem(rec, read["ids"])

    for d in todo:
        remove_stale_temp(work / d.id)  # what a dead run left in this document's stage folder
        path = work / d.id / "chunks.json"
        read.clear()
        got = _read_stage_record(d.id, path, chunks_problem)
        same_source = bool(got) and got.get("doc_sha") == d.sha256 and got.get("setting") == setting
        if not same_source or got.get("tokenized") != CHUNK_TOKENIZATION:
            ids = document_ids(tok, d.text)
            pieces = chunk_tokens(ids, cfg.chunk_tokens, cfg.chunk_overlap, whole_character_cuts(tok, ids))
            del ids  # the whole document's ids: only its chunks' are kept
            texts = [tok.decode(p.tolist()) for p in pieces]
            # Older code tokenized a "<|im_end|>" quoted in a document as the control token itself.
            # "tokenized" is kept out of `setting`, which synth.json is keyed on too, so a document
            # whose ids come out the same keeps its synthetic targets; one whose ids change loses
            # them, as they were written from a prompt the quoted token had broken.
            if same_source and read["ids"] != pieces:
                print(f"{d.id}: the document quotes a special token, which older chunks.json held as the "
                      f"token itself; rechunked, and its synthetic targets are made again", flush=True)
                (work / d.id / "synth.json").unlink(missing_ok=True)
            record = {"doc_sha": d.sha256, "setting": setting, "tokenized": CHUNK_TOKENIZATION, "texts": texts,
                      "ids_int32le": _ids_field(pieces)}
            atomic_write_json(path, record)
            del record
        else:
            texts, pieces = got["texts"], read["ids"]
        got = None  # the record as read (its ids in base64): not kept past this document
        # token ids as int32 arrays until the document's wave: a tenth of a list of Python ints
        chunks[d.id] = (texts, pieces)
        n_chunks[d.id] = len(texts)

    _check_positions(cfg, model, tok, chunks)

    # 3. synthetic targets (all documents that need them in one generation stream)
    needs_synth = cfg.objective in ("sdcd", "pit")
    synth_setting = {**setting, "n": [cfg.summaries_per_chunk, cfg.qa_per_chunk], "max_new_tokens": cfg.max_new_tokens,
                     "top_p": cfg.top_p, "temperature": cfg.temperature, "seed": cfg.seed}
    # only when set, so synthetic targets made before these options stay valid
    if cfg.focus_parts:
        synth_setting["focus_parts"] = cfg.focus_parts
    if cfg.facts_per_chunk:
        synth_setting["facts"] = cfg.facts_per_chunk
    synth: Dict[str, dict] = {}
    # each document's recitation pieces per chunk, where _requests_needed counted them: its wave
    # then cuts again only the chunks that hold the pieces it keeps (document_items)
    pieces_per_chunk: Dict[str, List[int]] = {}
    if needs_synth:
        missing, to_make = [], {}
        cut, cut_requests = _Notices(), [0, 0]  # the untold documents' requests: made, of
        for d in todo:
            path = work / d.id / "synth.json"
            got = _read_stage_record(d.id, path, lambda rec: _synth_problem(rec, n_chunks[d.id]))
            needed = None
            if got and got.get("setting") == synth_setting and got.get("doc_sha") == d.sha256:
                made = got.get("requested", 0)
                if made < got.get("of_requests", made):  # a share made: as many as these steps need? (more steps: more)
                    needed = _requests_needed(cfg, chunks[d.id][0], tok, _stored_piece_counts(got, cfg, n_chunks[d.id]))
                    pieces_per_chunk[d.id] = needed[2]
                if needed is None or made >= needed[0]:
                    synth[d.id] = got
                    continue
            missing.append(d)
            needed = needed or _requests_needed(cfg, chunks[d.id][0], tok)
            to_make[d.id], n_requests, pieces_per_chunk[d.id] = needed
            pieces = sum(needed[2])
            if to_make[d.id] < n_requests:
                draws = cfg.steps * cfg.examples_per_doc
                # the fewest steps whose sources_to_keep holds them all
                all_steps = math.ceil((n_requests + pieces) / (GENERATION_MARGIN * cfg.examples_per_doc))
                if not cut(f"{d.id}: {n_chunks[d.id]} chunks make {n_requests} generation requests"
                           + (f" and {pieces} recitation pieces" if pieces else "")
                           + f", but {cfg.steps} steps x {cfg.examples_per_doc} per step draw only {draws} examples: "
                           f"a random {to_make[d.id]} of the requests are made" + (" and as large a share of the "
                           "pieces kept" if pieces else "") + f", which keeps what is drawn as it was (--steps "
                           f"{all_steps} makes them all)"):
                    cut_requests[0] += to_make[d.id]
                    cut_requests[1] += n_requests
        if cut.untold:
            print(f"{cut.untold} more document{'s' if cut.untold > 1 else ''} likewise: {cut_requests[0]} of "
                  f"{'their' if cut.untold > 1 else 'its'} {cut_requests[1]} generation requests are made (km.json "
                  "counts synthetic_requests_not_made)", flush=True)
        if missing:
            sha = {d.id: d.sha256 for d in missing}

            def save(doc_id: str, made: dict) -> None:  # as each document finishes: a kill keeps those done
                rec = {**made, "setting": synth_setting, "doc_sha": sha[doc_id]}
                if pieces_per_chunk.get(doc_id):  # counted for its requests: a re-run need not cut them again
                    rec["recitation_pieces"] = {"tokens": cfg.recite_tokens, "per_chunk": pieces_per_chunk[doc_id]}
                atomic_write_json(work / doc_id / "synth.json", rec)
                synth[doc_id] = rec

            with out_of_memory_note("generation", f"lower --gen-batch-size (now {cfg.gen_batch_size}) or "
                                                  f"--max-new-tokens (now {cfg.max_new_tokens})"):
                synthesize(model, tok, {d.id: chunks[d.id][0] for d in missing}, cfg, model_path=model_folder,
                           progress_factory=lambda **kw: _bar(cfg, **kw), on_document=save, requests=to_make)

    # 4-5. wave by wave: D documents' training examples, their teacher caches, training, and one
    # PEFT folder per document. A document's examples exist only while its wave runs: they repeat
    # its chunk once per target (the teacher's context), megabytes of token lists per long
    # document that, built for all documents up front, made a run's memory grow with the corpus.
    D = min(cfg.docs_per_step, len(todo))
    caching = cfg.objective in ("sdcd", "ddcd") and cfg.teacher_cache
    layers_key = "all" if cfg.cache_layers is None else "-".join(map(str, cfg.cache_layers))
    no_adapter = lambda b: set_adapter_ids(model, torch.full((b,), -1, dtype=torch.long))  # noqa: E731
    sha = {d.id: d.sha256 for d in todo}
    attached, trained = False, 0
    doc_counts: Dict[str, dict] = {}
    versions = library_versions()  # for every km.json: looked up once, not once per KM
    undrawn = _Notices()

    def doc_state(d: Document) -> Optional[DocState]:
        """The document's training (and held-out) examples, or None (said why) when it has none."""
        texts, ids = chunks.pop(d.id)  # from here on its examples carry what training needs
        made = synth.pop(d.id, {})
        doc_counts[d.id] = {"requested": made.get("requested", 0), "dropped": made.get("dropped", 0),
                            "not_made": made.get("of_requests", made.get("requested", 0)) - made.get("requested", 0)}
        items = made.get("items", [])
        items, held_items = document_items(cfg, d.id, items, texts, tok, share_of_requests_made(made),
                                           pieces_per_chunk.pop(d.id, None))
        seed = doc_seed(cfg.seed, d.id)
        examples = build_examples(cfg.objective, tok, texts, ids, items, cfg, seed)
        if not examples:
            if cfg.objective in ("sdcd", "pit"):
                why = f"all {made.get('requested', 0)} synthetic outputs were dropped (empty, or no Q/A pair parsed)"
            else:  # the examples are windows of the document itself
                why = f"the document is {sum(map(len, ids))} token(s), too short for a {cfg.objective} example"
            print(f"{d.id}: no training examples ({why}), skipped", flush=True)
            return None
        held = build_examples(cfg.objective, tok, texts, ids, held_items, cfg, seed) if held_items else []
        drawn = cfg.steps * cfg.examples_per_doc
        doc_counts[d.id]["not_drawn"] = max(0, len(examples) - drawn)
        if drawn < len(examples):  # steps do not grow with a document: a long one outruns them
            # Training would draw `drawn` of them (one epoch's first draws), so only that many are kept,
            # chosen by the document's seed: caching the rest cost teacher time and disk for nothing
            # (a 2.5 MB text: 35,401 examples, a 506 MB cache on a 2-layer test model, 67 GB on SmolLM2).
            # With its requests cut (the line before), more steps also make more of them: no step count
            # known here draws every example once.
            hint = "" if share_of_requests_made(made) < 1 else \
                f" (--steps {math.ceil(len(examples) / cfg.examples_per_doc)} draws each once)"
            if not undrawn(f"{d.id}: {len(examples)} training examples, but {cfg.steps} steps x {cfg.examples_per_doc} "
                           f"per step draw only {drawn}: a random {drawn} of them are cached and trained on, the rest "
                           f"never{hint}") and undrawn.untold == 1:
                print("more documents have more training examples than their steps draw: they are not told one by "
                      "one, each one's summary line says how many of its examples are drawn (km.json: "
                      "examples_not_drawn)", flush=True)
            keep = sorted(random.Random(f"draws:{seed}").sample(range(len(examples)), drawn))
            examples = [examples[i] for i in keep]
        # the held-out examples go last: the cache holds them too, training never draws them
        return DocState(d.id, examples + held, seed, heldout=list(range(len(examples), len(examples) + len(held))))

    def run_wave(wave: List[DocState], first: int, last: int) -> None:
        """Teacher caches, training and export of one wave; ``first``-``last``: the positions of its
        documents among those to index, for the progress bars."""
        nonlocal attached, trained
        if not attached:
            attach_grouped_lora(model, D, rank=cfg.rank, alpha=cfg.alpha, target_modules=cfg.target_modules,
                                seed=cfg.seed, backend=cfg.backend)
            attached = True
        cache_info: Dict[str, dict] = {}
        span = f"docs {first}-{last} of {len(todo)}"
        examples_json = {st.id: [e.to_json() for e in st.examples] for st in wave}
        if caching:
            paths = {}
            for st in wave:
                # The cache is a function of the teacher weights, what is stored, and the examples' tokens
                # (which carry the document, the synthetic data and the example layout): a change in any
                # of them never meets a stale cache.
                # "fp8_scale_per_example": the format version (caches from before "kl_stats" lack the KL's
                # teacher statistics; before "kl_stats_exact" they came from the last layer as rounded for
                # the cache; before "fp8_scale_per_example" an fp8 cache had one scale per document and layer)
                version = "fp8_scale_per_example"
                # the KL statistics' temperature: the model's logit scale (its config, which the weights' hash
                # does not cover), named only where it is not 1, so that other models' caches keep their keys;
                # a soft cap (also the config's) stores the KL's teacher as its last layer, not as statistics
                scaled = (([] if temperature == 1.0 else [f"logit_temperature={temperature!r}"])
                          + ([] if softcap is None else [f"logit_softcap={softcap!r}"]))
                key = hashlib.sha256(json.dumps([model_hash, str(base_dtype), cfg.cache_dtype, layers_key, version]
                                                + scaled + examples_json[st.id]).encode()).hexdigest()[:16]
                path = paths[st.id] = work / st.id / f"teacher_{cfg.objective}_{key}.safetensors"
                for old in (work / st.id).glob(f"teacher_{cfg.objective}_*.safetensors"):
                    if old != path:  # superseded caches only take disk
                        old.unlink()
            kl_bytes = None if softcap is None else model.get_output_embeddings().weight.element_size()
            hidden_size = text_config(model).hidden_size
            check_cache_space(work, {st.id: cache_bytes(st.examples, num_layers, hidden_size, cfg, kl_bytes)
                                     for st in wave if not paths[st.id].is_file()}, cfg)
            bar = _bar(cfg, total=len(wave), desc=f"teacher cache {span}")
            for st in wave:
                path = paths[st.id]
                if path.is_file():
                    try:
                        # written by an earlier run: its bytes are checked against its recorded hash too
                        st.cache = TeacherCache(path, examples=len(st.examples), verify=True)
                    except ValueError as e:  # a damaged file is rebuilt, never trained on
                        print(f"{st.id}: {e}; rebuilding it", flush=True)
                        path.unlink()
                if st.cache is None:
                    with (out_of_memory_note("the teacher cache",
                                             f"lower --cache-batch-size (now {cfg.cache_batch_size}), or "
                                             f"--chunk-tokens (now {cfg.chunk_tokens}) or --max-new-tokens "
                                             f"(now {cfg.max_new_tokens})"),
                          torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)):
                        build_cache(model, st.examples, path, num_layers, cfg, tok.pad_token_id, no_adapter,
                                    batch_size=cfg.cache_batch_size)
                    st.cache = TeacherCache(path, examples=len(st.examples))
                cache_info[st.id] = {"bytes": path.stat().st_size, "tokens": st.cache.offsets[-1]}
                bar.update(1)
            bar.close()

        # The training checkpoint's key: whatever the wave's numbers depend on. One checkpoint at most is
        # kept: another wave's is of documents since trained, or of a run with other settings.
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_TRAINING_SETTINGS}
        train_key = hashlib.sha256(json.dumps([model_hash, str(base_dtype), str(amp), str(device), caching, settings,
                                               [[st.id, st.seed, st.heldout, examples_json[st.id]] for st in wave]]
                                              ).encode()).hexdigest()[:16]
        del examples_json
        checkpoint = TrainingCheckpoint(work / f"training_{train_key}.safetensors", train_key, cfg.checkpoint_seconds)
        for old in work.glob("training_*.safetensors"):
            if old != checkpoint.path:
                old.unlink()
        t0 = time.time()
        bar = _bar(cfg, total=cfg.steps, desc=f"training {span}")
        passes = (f"lower --micro-batch-tokens (now {cfg.micro_batch_tokens})" if cfg.micro_batch_tokens else
                  "set --micro-batch-tokens (e.g. 4096: the same training, in passes of that many tokens)")
        with out_of_memory_note("training", f"{passes}, or lower --docs-per-step (now {cfg.docs_per_step}) or "
                                            f"--examples-per-doc (now {cfg.examples_per_doc})"):
            resumed_from = train_wave(model, tok, wave, cfg, device, amp, progress=bar, checkpoint=checkpoint)
        bar.close()
        wave_s = time.time() - t0
        for slot, st in enumerate(wave):
            cache, st.cache = st.cache, None  # unmapped with the wave, kept on disk or deleted below
            if not all(bool(torch.isfinite(p[slot]).all()) for p in slot_parameters(model)):
                # Never written as finished: a re-run retrains it. The other slots are unaffected
                # (per-slot losses, clipping and AdamW state).
                bad = next((i + 1 for i, x in enumerate(st.losses) if not math.isfinite(x["loss"])), None)
                when = f"its loss was not finite from step {bad}" if bad else "its weights are not finite"
                print(f"{st.id}: training diverged ({when}); no KM written. Run again with a lower --lr "
                      f"(now {cfg.lr:g}) to train it", flush=True)
                summaries.append({"id": st.id, "status": "diverged", "diverged_at_step": bad})
                continue
            tail = st.losses[-max(1, cfg.steps // 10):]
            final = {k: sum(x[k] for x in tail) / len(tail) for k in tail[0]}
            heldout = None
            if st.heldout_curve:
                best = next(c for c in st.heldout_curve if c["step"] == st.best_step)
                heldout = {"per_chunk": cfg.heldout_per_chunk, "examples": len(st.heldout), "best_step": st.best_step,
                           "best": {k: v for k, v in best.items() if k != "step"},
                           "untrained": {k: v for k, v in st.heldout_curve[0].items() if k != "step"},
                           "curve": [[c["step"], c["loss"]] for c in st.heldout_curve]}
            s = doc_counts[st.id]
            meta = {
                "id": st.id, "base_model": model_name, "base_model_path": model_path, "base_model_sha256": model_hash,
                "document_sha256": sha[st.id], "objective": cfg.objective, "steps": cfg.steps,
                "docs_per_step": len(wave), "examples_per_doc": cfg.examples_per_doc,
                "chunks": n_chunks[st.id], "examples": len(st.examples) - len(st.heldout),
                "examples_not_drawn": s["not_drawn"],
                "synthetic_requested": s.get("requested", 0), "synthetic_dropped": s.get("dropped", 0),
                "synthetic_requests_not_made": s.get("not_made", 0),
                "teacher_cache": cache_info.get(st.id), "final_loss": final, "heldout": heldout,
                # a resumed wave's times are of its last run: the steps from resumed_from_step on
                "train_seconds_wave": round(wave_s, 2), "train_seconds_per_doc": round(wave_s / len(wave), 2),
                "resumed_from_step": resumed_from,
                "rank": cfg.rank, "alpha": cfg.alpha, "lr": cfg.lr,
                "lr_b_ratio": cfg.lr_b_ratio, "seed": cfg.seed,
                # what else the KM's numbers depend on, so a KM can be remade or its difference explained
                "settings": settings, "device": str(device),
                "autocast": _DTYPE_NAME[amp] if amp is not None else "off", "base_dtype": _DTYPE_NAME[base_dtype],
                "versions": versions,
            }
            # km.json records the adapter file's sha256, which ask checks before loading it
            digest = export_peft(model, slot, out / st.id, base_model_name_or_path=model_name,
                                 extra_files={"km.json": lambda sha: json.dumps({**meta, "adapter_sha256": sha}, indent=1)})
            meta["adapter_sha256"] = digest
            summaries.append({**meta, "status": "trained"})
            trained += 1
            loss_txt = " ".join(f"{k}={v:.4f}" for k, v in final.items())
            cache_txt = f", cache {_size(cache_info[st.id]['bytes'])}" if st.id in cache_info else ""
            held_txt = "" if heldout is None else (f", held-out loss {heldout['best']['loss']:.4f} at step "
                                                   f"{heldout['best_step']} (untrained {heldout['untrained']['loss']:.4f})")
            n_txt = (f"{meta['examples']} examples" if not s["not_drawn"] else
                     f"{meta['examples']} of {meta['examples'] + s['not_drawn']} examples drawn")
            n_txt += f" + {len(st.heldout)} held out" if st.heldout else ""
            print(f"{st.id}: {n_txt} ({s.get('dropped', 0)} synthetic outputs dropped){cache_txt}, {cfg.steps} steps, "
                  f"{loss_txt}{held_txt}, {wave_s / len(wave):.1f} s", flush=True)
            if cache is not None and not cfg.keep_teacher_cache:  # its KM is written: the cache is done with
                path, cache = cache.path, None
                path.unlink()
        checkpoint.path.unlink(missing_ok=True)  # every KM of the wave is written (or diverged: retrained from 0)

    wave: List[DocState] = []
    t_waves = time.time()
    for k, d in enumerate(todo, 1):
        st = doc_state(d)
        if st is None:
            summaries.append({"id": d.id, "status": "no examples"})
        else:
            if not wave:
                first = k  # the wave's first document, for its progress bars
            wave.append(st)
        if wave and (len(wave) == D or k == len(todo)):
            run_wave(wave, first, k)
            wave = []
            if k < len(todo):  # a run of many waves (thousands of documents): where it stands, when it ends
                spent = time.time() - t_waves
                print(f"{k} of {len(todo)} documents done in {_duration(spent)}; about "
                      f"{_duration(spent / k * (len(todo) - k))} left at this rate", flush=True)
    diverged = sum(s["status"] == "diverged" for s in summaries)
    empty = sum(s["status"] == "no examples" for s in summaries)
    print(f"indexed {trained} documents in {time.time() - t_start:.1f} s"
          + (f"; {diverged} diverged, no KM written for them" if diverged else "")
          + (f"; {empty} had no training examples, no KM written for them" if empty else ""), flush=True)
    return summaries


def _asked_km(km: str) -> Tuple[Optional[str], dict]:
    """(why the KM folder ``km`` cannot be asked, or None; its km.json, {} where it has none). Why:
    not there, a document's file, an index run's --out, an unreadable km.json, a damaged or changed
    weights file."""
    folder = Path(km)
    if not folder.is_dir():
        return f"--km {km}: " + ("a file, not a KM folder" if folder.exists() else "no such folder"), {}
    if not (folder / "adapter_config.json").exists():
        inside = sorted(p.name for p in folder.iterdir() if (p / "adapter_config.json").is_file())
        if inside:  # the --out of an index run, not one of its KMs
            return (f"--km {km} is a folder of {len(inside)} KMs, not one KM: name one, "
                    f"e.g. --km {folder / inside[0]}"), {}
    meta_path = folder / "km.json"
    meta = _read_json(meta_path) if meta_path.exists() else {}
    if not isinstance(meta, dict):
        return f"{meta_path}: unreadable (not a JSON object); re-index the document with --retrain", {}
    problem = km_problem(folder, meta.get("adapter_sha256"))
    return (None if problem is None else f"{problem}; re-index the document with --retrain"), meta


def ask(pairs: Iterable[Tuple[Optional[str], str]], *, model: Optional[str] = None, max_new_tokens: int = 64,
        device: str = "auto", backend: str = "auto", kms_at_once: int = 64,
        on_answer: Optional[Callable[[int, str], None]] = None, trust_remote_code: bool = False) -> List[str]:
    """Answer questions closed book. ``pairs``: (KM folder or None for the base model, question).
    All questions go through one model in one batch stream, each with its own KM slot: up to
    ``kms_at_once`` KMs are loaded at a time (each group's questions answered before the next
    group replaces them), so that a thousand KMs do not all sit in memory (84 MB each at
    Llama-3.1-8B shapes in bf16). With no more KMs than that, one batch stream as before.
    KMs are loaded in the order ``pairs`` first names them; the base model's questions go with the
    first group.

    on_answer: called with (position in ``pairs``, answer) for each answer as its batch finishes,
    so that a caller can keep what is done: a long call stopped half-way (Ctrl-C, a crash) has
    delivered its answers so far. trust_remote_code: load a base model that brings its own Python
    code (as IndexConfig.trust_remote_code). Returns every answer, in the order of ``pairs``."""
    pairs = list(pairs)  # a generator was read by the checks below and then answered as no questions at all
    if not pairs:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if kms_at_once < 1:
        raise ValueError(f"kms_at_once must be at least 1, got {kms_at_once}")
    dev = resolve_device(device)
    resolve_backend(backend, dev)  # before the model loads
    _refuse_interpreted_bf16(backend, dev, native_bf16(dev),
                             "this CPU answers in bf16; use backend='torch' (the default here)")
    for k, pair in enumerate(pairs, 1):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"pair {k}: expected (KM folder or None, question), got {pair!r}")
        km, question = pair
        if km is not None and not str(km).strip():  # Path("") is the working directory
            raise ValueError(f"--km for question {k} is empty (an unset shell variable?)")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question {k} (for {km or 'the base model'}) is empty")
    # "~": as in a shell; "kms/a", "kms/a/" and "./kms/a" are one KM, loaded into one slot
    pairs = [(None if km is None else os.path.normpath(os.path.expanduser(km)), q) for km, q in pairs]
    kms = list(dict.fromkeys(km for km, _ in pairs if km is not None))  # as first named: answers stream in order
    base, base_hash = model, None
    configs, trained_on = [], {}
    # A missing or damaged KM fails here, before the model loads, every one of them in one error (a
    # thousand questions over hundreds of KMs with a few typos were told one KM a run). km.json is
    # optional (any PEFT LoRA folder is accepted) but must read where it exists: it carries the checks below.
    checked = {km: _asked_km(km) for km in kms}
    problems = [problem for problem, _ in checked.values() if problem is not None]
    if problems:
        raise ValueError(problems_message(problems, "the KMs asked"))
    for km, (_, meta) in checked.items():
        configs.append(read_adapter_config(km))
        trained_on[km] = km_hash = meta.get("base_model_sha256")
        km_base = meta.get("base_model_path")
        if base is None:
            base, base_hash = km_base, km_hash
        elif km_base is not None and model is None and km_base != base:
            # the same weights under two paths (an alias and its folder, a copy) are one base
            if not (km_hash and km_hash != "unknown" and km_hash == base_hash):
                raise ValueError(f"KMs were trained on different base models ({base} vs {km_base}); "
                                 f"ask them separately")
    if base is None:  # no km.json names one: a plain PEFT folder's own base, where it is on this machine
        named = [c.get("base_model_name_or_path") for c in configs if isinstance(c.get("base_model_name_or_path"), str)]
        local = [b for b in named if os.path.isdir(os.path.expanduser(b)) or hub_snapshot(b) is not None]
        base = local[0] if local else None
    base = "smollm2-135m" if base is None else base  # "" goes on to resolve_model, which names it as empty
    # Where bf16 is native the base runs in bf16 (as it trained there); the KMs' fp32 weights are
    # rounded per matmul.
    bf16 = native_bf16(dev)
    # A KM is a delta on its own base weights; on other weights of the same shapes it loads and
    # answers, wrongly. Checked from the weight files' hash (memoised beside them) before the model
    # loads. ("unknown": a Hub model not downloaded yet, whose weights are not hashed.)
    try:
        model_hash = weights_hash(resolve_model(base)[0])
    except ValueError as e:
        if model is not None:
            raise
        raise ValueError(f"{e}. It is the base model the KMs' km.json records; if its weights are elsewhere "
                         f"now, pass --model (model=) with their folder") from None
    for km, h in trained_on.items():
        if h and h != "unknown" and model_hash != "unknown" and h != model_hash:
            raise ValueError(f"{km} was trained on other base weights (sha256 {h[:12]}) than {base}'s "
                             f"({model_hash[:12]}); ask it with the model it was trained on")
    m, tok, _, _ = load_model(base, str(dev), dtype=torch.bfloat16 if bf16 else torch.float32,
                              trust_remote_code=trust_remote_code)
    groups = [kms[i:i + kms_at_once] for i in range(0, len(kms), kms_at_once)] or [[]]
    if kms:
        cfg = configs[0]
        rank = max(c["r"] for c in configs)
        # every KM's targets are wrapped (a KM without some has zeros there); each slot keeps its own alpha / r
        targets = tuple(dict.fromkeys(t for km in kms for t in adapter_targets(km)))
        attach_grouped_lora(m, len(groups[0]), rank=rank, alpha=cfg.get("lora_alpha", rank),
                            target_modules=targets, backend=backend)
    else:
        attach_grouped_lora(m, 1, rank=1, backend=backend)
    # A prompt past the model's positions made transformers warn and the answer come out as noise
    # (or as nothing): say which question, as every other bad input here is said.
    positions = getattr(text_config(m), "max_position_embeddings", None)
    for k, (km, question) in enumerate(pairs, 1):
        n = len(chat_prompt_ids(tok, question_prompt(question)))
        if positions and n + max_new_tokens > positions:
            words = question.split()  # its first words say which one, where the questions came from a file
            start = " ".join(words[:8]) + (" ..." if len(words) > 8 else "")
            start = start if len(start) <= 60 else start[:57] + "..."
            raise ValueError(f"question {k} ({start!r}, for {km or 'the base model'}) is {n} tokens as prompted: "
                             f"with --max-new-tokens {max_new_tokens} it passes the {positions} positions {base} takes")
    answers: List[Optional[str]] = [None] * len(pairs)
    for g, group in enumerate(groups):
        slot_of = {}
        for slot, km in enumerate(group):
            load_peft(m, slot, km)  # zeroes the slot first: nothing of the group before stays
            slot_of[km] = slot
        asked = [k for k, (km, _) in enumerate(pairs) if km in slot_of or (km is None and g == 0)]
        with out_of_memory_note("answering", f"lower --max-new-tokens (now {max_new_tokens}), or ask fewer questions "
                                             f"at once"):
            # a batch at a time (the batches generate_answers makes of them all), each delivered as it ends
            for i in range(0, len(asked), ANSWER_BATCH):
                part = asked[i:i + ANSWER_BATCH]
                got = generate_answers(m, tok, [question_prompt(pairs[k][1]) for k in part],
                                       [slot_of.get(pairs[k][0], -1) for k in part], max_new_tokens=max_new_tokens,
                                       batch_size=ANSWER_BATCH, share_prefixes=True)  # the chat header once per KM
                for k, answer in zip(part, got):
                    answers[k] = answer
                    if on_answer is not None:
                        on_answer(k, answer)
    return answers
