"""Documents, chunks, prompts and the token layout of distillation examples (SPEC.md sections 1-2)."""
from __future__ import annotations

import codecs
import contextlib
import datetime
import errno
import hashlib
import json
import os
import re
import sys
import threading
import unicodedata
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

from kmkernels.utils import naming_file_on_error

if TYPE_CHECKING:
    import torch

SUMMARY_PROMPT = "Summarize the preceding passage."
QA_PROMPT = "Generate a question-answer pair given the preceding passage."
# Fact-list targets (cfg.facts_per_chunk): one fact a line, each a whole sentence that names its subject.
FACTS_PROMPT = ("List the facts stated in the preceding passage, one per line: every name, date, number and "
                "place, each in a full sentence.")
# Recitation targets (cfg.recite_tokens): the chunk itself, a piece at a time, cued by its first words.
RECITE_PROMPT = 'Repeat the preceding passage, starting from "{cue}".'
# Where a sentence ends (recitation pieces and the generator's focus runs cut there): ". ", "! ", "? ",
# and the CJK full stops, which no space follows ("。", "！", "？").
_CJK_ENDS = ("。", "！", "？")
SENTENCE_END = re.compile(rf"(?<=[.!?])\s+|(?<=[{''.join(_CJK_ENDS)}])\s*")
# How a KM is asked (kmtrain ask, the demo, the evaluations); Q/A targets can be distilled in this form.
ANSWER_PROMPT = ("Answer the following question. Give only the answer, and no extra commentary, formatting, "
                 "or chattiness. Question: {question}")


class DocumentError(ValueError):
    """Bad input documents: the message names the file or record. ``problems``: each problem on its own
    (one error lists all of an input's). ``documents``: where every problem is one document's or record's
    (empty, not UTF-8, an id given twice), the input's other documents, which can be indexed without the
    bad ones (`kmtrain index --skip-bad-documents`); None where the input as a whole is at fault (no such
    folder, a field the dataset lacks)."""

    def __init__(self, message: str, problems: Optional[List[str]] = None,
                 documents: Optional[List["Document"]] = None):
        super().__init__(message)
        self.problems = problems or [message]
        self.documents = documents


@dataclass
class Document:
    id: str
    text: str
    source: str  # file path or "file.jsonl:line" or "dataset[split][index]", for error messages

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


# Letters and digits of any script (\w is Unicode-aware), "_", "." and "-" are kept; everything else
# (separators, spaces, punctuation, control and bidi characters) becomes "_". ASCII-only would turn
# "报告 2024" and "计划 2024" both into "2024", and "日本語" into nothing.
_UNSAFE = re.compile(r"[^\w.-]+")
_MAX_ID_BYTES = 100  # UTF-8 bytes: a file name may have 255, and temporaries add a prefix and suffix
# Names Windows reserves for devices, whatever the extension ("nul.txt" is the device too)
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


def sanitize_id(raw: str) -> str:
    """A document id usable as a folder name on any OS: letters and digits of any script, "_", "."
    and "-"; Unicode NFC (macOS hands out file names decomposed: "café" is one id whichever way it
    came); no leading or trailing dot; not a Windows device name (those get a trailing "_");
    <= 100 UTF-8 bytes (a longer id is cut and ends in a short hash of the whole, so it stays unique)."""
    s = _UNSAFE.sub("_", unicodedata.normalize("NFC", str(raw).strip())).strip("._")
    if len(s.encode()) > _MAX_ID_BYTES:
        head = s.encode()[:_MAX_ID_BYTES - 12].decode("utf-8", errors="ignore")  # never half a character
        s = head + "_" + hashlib.sha1(str(raw).encode()).hexdigest()[:11]
    if s.split(".", 1)[0].upper() in _WINDOWS_RESERVED:
        s += "_"
    return s


def _dead_link(p: Path) -> Optional[str]:
    """What is wrong with a link that leads to no file; None where ``p`` is not such a link."""
    if not p.is_symlink():
        return None
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:  # links that lead to each other: each is there as a link, none as a file
            return f"{p}: a link in a loop of links (to {os.readlink(p)}), no file at its end"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"{p}: a link to {os.readlink(p)}, which does not exist"
    return None


def _add(docs: Dict[str, Document], problems: List[str], raw_id, text, source: str, clashes: Set[str]) -> None:
    """Adds one document, or records why it cannot be added (the caller reports every problem at once).
    ``clashes``: ids given twice, whose every copy is left out where bad documents are skipped (which
    of them was meant cannot be told)."""
    if text is None:  # an empty CSV cell, a JSON null
        problems.append(f"{source}: document {raw_id!r} has no text (null)")
        return
    if not isinstance(text, str):
        problems.append(f"{source}: document text must be a string, got {type(text).__name__}")
        return
    if raw_id is None:  # str(None) would make it the document "None"
        problems.append(f"{source}: document id is missing (null)")
        return
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):  # {"a": 1} became the folder "a_1"
        problems.append(f"{source}: document id must be a string or an integer, got {type(raw_id).__name__} {raw_id!r}")
        return
    doc_id = sanitize_id(raw_id)
    if not doc_id:
        problems.append(f"{source}: document id {raw_id!r} is empty after sanitising")
    elif not text.strip():
        problems.append(f"{source}: document {raw_id!r} is empty")
    elif "\x00" in text:  # UTF-16 without a byte-order mark decodes as UTF-8: a NUL after every ASCII letter
        problems.append(f"{source}: document {raw_id!r} holds {text.count(chr(0))} NUL characters (the first at "
                        f"character {text.index(chr(0))}): a UTF-16 file, or not text; save it as UTF-8")
    elif doc_id in docs:
        problems.append(f"{source}: duplicate document id {doc_id!r} (also in {docs[doc_id].source})")
        clashes.add(doc_id.casefold())
    else:
        docs[doc_id] = Document(doc_id, text, source)


def _not_utf8(path, e: UnicodeDecodeError) -> str:
    # Windows PowerShell 5's `>` and Out-File write UTF-16 with a byte-order mark: say so, not just "byte 0".
    head = e.object[:4]
    return _wide_file(path, head) or f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})"


def _wide_file(path, head: bytes) -> Optional[str]:
    """What is wrong with a file whose first bytes ``head`` are a UTF-16 or UTF-32 byte-order mark."""
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if head.startswith(bom):
            return f"{path}: a {name} file (it starts with a {name} byte-order mark), not UTF-8: save it as UTF-8"
    return None


def _jsonl_lines(lines: Iterable[bytes]) -> Iterator[Tuple[int, Optional[str], Optional[str]]]:
    """(line number, text, problem) of each line of a JSON Lines input that is not blank: text, or
    None and what is wrong with it. Lines end at "\n" alone: str.splitlines also ends them at
    U+2028, U+0085 and form feeds, which JSON strings may hold unescaped (json.dumps(...,
    ensure_ascii=False) writes them so), and a document holding one was refused as invalid JSON. Each
    line is decoded on its own, so a line that is not UTF-8 is that record's problem, not the file's."""
    for i, raw in enumerate(lines, 1):
        if i == 1 and raw.startswith(codecs.BOM_UTF8):  # Windows editors' byte-order mark is not text
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield i, None, f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)"
            continue
        if line.strip():
            yield i, line, None


def _undecodable(name: str) -> bool:
    """Whether a file name holds bytes the file-name encoding could not decode (Python keeps them as
    lone surrogates, U+DC80-U+DCFF)."""
    return any("\udc80" <= ch <= "\udcff" for ch in name)


def _name_not_utf8(path: Path) -> str:
    # Such bytes (a Latin-1 name from an old archive: "\xe9t\xe9.txt") left the id as what sanitising
    # kept ("t"), or nothing at all; said instead, with what to do
    enc = sys.getfilesystemencoding()
    fix = ("rename it" if codecs.lookup(enc).name == "utf-8" else
           f"this Python reads file names as {enc}: run it with PYTHONUTF8=1, or rename the file")
    return f"a file in {path.parent}, named {os.fsencode(path.name)!r} in bytes: the name is not valid {enc}; {fix}"


def _check_limit(limit: Optional[int]) -> None:
    if limit is not None and limit < 1:  # 0 indexed nothing and said nothing; -1 dropped the last document
        raise ValueError(f"--limit must be at least 1, got {limit}")


def load_documents(source: str, *, split: str = "train", id_field: str = "id", text_field: str = "text",
                   limit: Optional[int] = None, progress: bool = True) -> List[Document]:
    """Documents from a folder of .txt/.md files (id = file stem; hidden files skipped), one such file,
    a .jsonl of {"id", "text"},
    or a Hugging Face dataset: a Hub name, a local folder of its data files or one data file
    (``datasets.load_dataset(source, split=split)``), or a folder written by ``save_to_disk``.

    Every problem (duplicate id, empty document, non-UTF-8 file, bad JSON line) is collected
    and raised as one DocumentError that names each file or record, so one run lists everything
    to fix; nothing is written before the whole input is checked. ``progress``: `datasets`' own bars
    (off for `kmtrain index --no-progress`).
    """
    if not str(source).strip():  # Path("") is the working directory: `kmtrain index "$DOCS"` with DOCS unset indexed it
        raise DocumentError("the documents' path is empty (an unset shell variable?)")
    _check_limit(limit)
    docs: Dict[str, Document] = {}
    problems: List[str] = []
    clashes: Set[str] = set()
    source = os.path.expanduser(source)  # "~" is the home folder, as in a shell (from Python, nothing expanded it)
    path = Path(source)
    files = []
    if path.is_dir():
        # Hidden files are not documents: macOS writes "._name.txt" (binary resource forks) beside
        # every file copied to a non-Apple disk, which would otherwise fail as non-UTF-8.
        # A link to a file that is gone is kept, to be reported as unreadable: skipped, its document
        # went missing without a word.
        files = sorted(p for p in path.iterdir()
                       if p.suffix.lower() in (".txt", ".md") and not p.name.startswith(".")
                       and (p.is_file() or (p.is_symlink() and not p.exists())))
        if not files and not _dataset_folder(path):
            nested = sorted({q.parent for q in path.glob("*/**/*") if q.suffix.lower() in (".txt", ".md")
                             and not any(part.startswith(".") for part in q.relative_to(path).parts)})
            hint = (f"; its subfolders hold some ({', '.join(str(q) for q in nested[:3])}"
                    f"{f' and {len(nested) - 3} more' if len(nested) > 3 else ''}): index each of them"
                    if nested else "")
            raise DocumentError(f"{source}: no .txt or .md files in this folder (nor a dataset's data files){hint}")
    elif path.is_file() and path.suffix.lower() in (".txt", ".md"):  # one document: `kmtrain index notes.md`
        files = [path]
    if files:
        for p in files:
            if _undecodable(p.name):
                problems.append(_name_not_utf8(p))
                continue
            try:
                text = p.read_bytes().decode("utf-8-sig")  # a byte-order mark (Windows editors) is not text
            except UnicodeDecodeError as e:
                problems.append(_not_utf8(p, e))
                continue
            except OSError as e:  # no read permission, a file gone since listed: one problem among the rest
                problems.append(_dead_link(p) or f"{p}: cannot be read ({e.strerror or e})")
                continue
            _add(docs, problems, p.stem, text, str(p), clashes)
    elif path.is_file() and path.suffix.lower() == ".jsonl":
        with open(path, "rb") as f:  # a line at a time: a corpus's .jsonl can be gigabytes
            wide = _wide_file(path, f.read(4))
            if wide:
                raise DocumentError(wide)
            f.seek(0)
            for i, line, problem in _jsonl_lines(f):
                where = f"{path}:{i}"
                if problem:
                    problems.append(f"{where}: {problem}")
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(f"{where}: invalid JSON ({e.msg})")
                    continue
                if not isinstance(rec, dict) or id_field not in rec or text_field not in rec:
                    problems.append(f"{where}: each line needs {id_field!r} and {text_field!r} fields")
                    continue
                _add(docs, problems, rec[id_field], rec[text_field], where, clashes)
    elif path.is_file() and not path.name.lower().endswith(_DATA_SUFFIXES):
        raise DocumentError(f"{source}: expected a folder of .txt/.md files, one .txt/.md file, a .jsonl file, or a "
                            f"dataset's data file ({', '.join(_DATA_SUFFIXES)})")
    elif (dead := _dead_link(path)) is not None:  # not a Hub name to look up: it is here, and leads nowhere
        raise DocumentError(dead)
    else:  # a Hub dataset name, a local dataset folder (data files, or save_to_disk's), a data file
        ds = _load_dataset(source, path, split, progress)
        for field in (id_field, text_field):
            if field not in ds.column_names:
                raise DocumentError(f"{source}[{split}]: no field {field!r} (fields: {ds.column_names})")
        for i, rec in enumerate(ds):
            if limit is not None and len(docs) >= limit:
                break
            _add(docs, problems, rec[id_field], rec[text_field], f"{source}[{split}][{i}]", clashes)
    return _checked(docs, problems, clashes, limit, source)


def check_documents(documents: Sequence[Document]) -> List[Document]:
    """Documents handed to index() as objects get load_documents' checks: ids sanitised for use as
    folder names (an id like "../x" wrote its KM outside --out), duplicate and case-colliding ids,
    empty texts; every problem in one DocumentError."""
    docs: Dict[str, Document] = {}
    problems: List[str] = []
    clashes: Set[str] = set()
    for k, d in enumerate(documents):
        if not isinstance(d, Document):
            problems.append(f"document {k}: expected a kmtrain Document, got {type(d).__name__}")
            continue
        _add(docs, problems, d.id, d.text, d.source or f"document {k} ({d.id!r})", clashes)
    return _checked(docs, problems, clashes, source="the documents given")


def _checked(docs: Dict[str, Document], problems: List[str], clashes: Set[str], limit: Optional[int] = None,
             source: str = "the input") -> List[Document]:
    """The documents, after the checks that need all of them; every problem found so far in one error,
    which carries the documents free of them (``DocumentError.documents``). No documents at all is an
    error too: an empty .jsonl indexed nothing and exited 0."""
    # Ids that differ only in letter case name one folder on case-insensitive file systems (macOS,
    # Windows): one KM would overwrite the other there, so they are refused everywhere.
    first_of: Dict[str, Document] = {}
    for d in docs.values():
        other = first_of.setdefault(d.id.casefold(), d)
        if other is not d:
            problems.append(f"{d.source}: document id {d.id!r} differs from {other.id!r} ({other.source}) only in "
                            f"letter case; their KM folders would collide on case-insensitive file systems")
            clashes.add(d.id.casefold())
    usable = [d for d in docs.values() if d.id.casefold() not in clashes]
    _raise_problems(problems, usable[:limit] if limit is not None else usable)
    if not docs:
        raise DocumentError(f"{source}: no documents in it")
    out = list(docs.values())
    return out[:limit] if limit is not None else out


def problems_message(problems: List[str], where: str) -> str:
    """One problem as it is, several as a count and a list (every problem of an input in one error)."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in {where}:\n  " + "\n  ".join(problems)


def _raise_problems(problems: List[str], documents: Optional[List[Document]]) -> None:
    """Every problem in one DocumentError; ``documents``: those free of them (None: the input as a whole is at fault)."""
    if problems:
        raise DocumentError(problems_message(problems, "the input documents"), problems, documents)


def load_sources(sources: Sequence[str], *, limit: Optional[int] = None, **kw) -> List[Document]:
    """``load_documents`` over several inputs as one (`kmtrain index a.md b.md notes/`, as a shell glob
    hands them over): ids unique across them, and every problem of every input in one error."""
    if len(sources) == 1:
        return load_documents(sources[0], limit=limit, **kw)
    _check_limit(limit)  # before the loop, which would stop at once for a limit of 0
    found: List[Document] = []
    problems: List[str] = []
    whole = False  # an input at fault as a whole: nothing to index without the bad documents
    for source in sources:
        if limit is not None and len(found) >= limit:  # a Hub dataset after them is not read at all
            break
        try:
            found += load_documents(source, limit=None if limit is None else limit - len(found), **kw)
        except DocumentError as e:
            problems += e.problems
            whole = whole or e.documents is None
            found += e.documents or []
    try:  # across the inputs: an id twice, or twice but for letter case (none found: each input said why)
        found = check_documents(found) if found else found
    except DocumentError as e:
        problems += e.problems
        found = e.documents
    found = found[:limit] if limit is not None else found
    _raise_problems(problems, None if whole else found)
    return found


def load_questions(source: str) -> List[Tuple[Optional[str], str]]:
    """Questions for ``ask`` from a .jsonl file (``"-"``: standard input), one JSON object a line:
    ``{"question": str, "km": KM folder or null}``. A line without ``km`` (or with null) asks the
    base model; a relative ``km`` is taken from the working directory, as ``--km`` is. Other fields
    (a gold answer, an id) are allowed and ignored. Returns (KM folder or None, question) pairs in
    the file's order. Every bad line (invalid JSON, no question, a field of the wrong type, a KM
    folder that is not there) is named by its line number, all of them in one ValueError."""
    if not str(source).strip():
        raise ValueError("the questions file's path is empty (an unset shell variable?)")
    if source == "-":
        name, raw = "<stdin>", sys.stdin.buffer.read()
    else:
        path = Path(os.path.expanduser(source))
        if path.is_dir():
            raise ValueError(f"{source}: a folder, not a .jsonl file of questions")
        try:
            name, raw = source, path.read_bytes()
        except FileNotFoundError:
            raise ValueError(f"{source}: no such file") from None
        except OSError as e:  # no read permission: the input's problem, named as such (exit 2)
            raise ValueError(f"{source}: cannot be read ({e.strerror or e})") from None
    wide = _wide_file(name, raw[:4])
    if wide:
        raise ValueError(wide)
    pairs: List[Tuple[Optional[str], str]] = []
    problems: List[Tuple[int, str]] = []  # (line, what is wrong there)
    missing: Dict[str, List[int]] = {}  # a KM folder that is not there: the lines that name it
    for i, line, problem in _jsonl_lines(raw.split(b"\n")):
        if problem:
            problems.append((i, problem))
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append((i, f"invalid JSON ({e.msg})"))
            continue
        if not isinstance(rec, dict):
            problems.append((i, f'expected an object {{"question": ..., "km": ...}}, got {type(rec).__name__}'))
            continue
        question, km = rec.get("question"), rec.get("km")
        if not isinstance(question, str) or not question.strip():
            problems.append((i, "no 'question' field" if "question" not in rec
                             else "'question' must be a non-empty string"))
        elif km is not None and (not isinstance(km, str) or not km.strip()):
            # "" is the working directory as a path: named here, with the line, not later as question k
            problems.append((i, f"'km' must be a KM folder's path or null, got {km!r}"))
        elif km is not None and (km in missing or not os.path.isdir(os.path.expanduser(km))):
            # named here with its lines (ask() would name it as "--km PATH", and only the first such KM):
            # one problem per missing KM, where a typo in a thousand-line file repeats it on many lines
            missing.setdefault(km, []).append(i)
        else:
            pairs.append((km, question))
    for km, (first, *more) in missing.items():
        also = ", ".join(map(str, more[:5])) + (f" and {len(more) - 5} more" if len(more) > 5 else "")
        what = "a file, not a KM folder" if os.path.exists(os.path.expanduser(km)) else "no such folder"
        lines_word = "lines" if len(more) > 1 else "line"
        problems.append((first, f"km {km}: {what}" + (f" (also on {lines_word} {also})" if more else "")))
    if problems:  # in line order, a missing KM at its first line
        raise ValueError(problems_message([f"{name}:{i}: {what}" for i, what in sorted(problems)], name))
    if not pairs:
        raise ValueError(f"{name}: no questions in it")
    return pairs


# data files `datasets` reads, and its builder for each
_BUILDER_OF = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json",
               ".json.gz": "json", ".jsonl.gz": "json"}
_DATA_SUFFIXES = tuple(_BUILDER_OF)


def _saved_dataset(path: Path) -> bool:
    """A folder written by ``save_to_disk`` (a DatasetDict, or one Dataset)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _dataset_folder(path: Path) -> bool:
    """A folder ``datasets`` can read: save_to_disk's output, or data files (also in split subfolders)."""
    return _saved_dataset(path) or any(p.is_file() and p.name.lower().endswith(_DATA_SUFFIXES)
                                       and not p.name.startswith(".") for p in path.rglob("*"))


@contextlib.contextmanager
def library_bars(enabled: bool, is_enabled: Callable[[], bool], enable: Callable[[], None],
                 disable: Callable[[], None]) -> Iterator[None]:
    """A library's own progress bars (transformers' "Loading weights", `datasets`' "Generating train
    split") on or off for the block, then as they were: `kmtrain index --no-progress` promises a log
    without bars. The three callables are the library's switch."""
    was = is_enabled()
    (enable if enabled else disable)()
    try:
        yield
    finally:
        (enable if was else disable)()


def _load_dataset(source: str, path: Path, split: str, progress: bool = True):
    """One split of a dataset: a local folder (save_to_disk's output, or data files), one data file
    (whose one split is "train"), or a Hub name."""
    try:
        import datasets
    except ImportError:
        what = "reading it" if path.exists() else "no such file or folder; reading it as a Hub dataset name"
        raise DocumentError(f"{source}: {what} needs `datasets` (pip install 'kmkernels[train]')") from None
    from .models import hub_unreachable

    bars = (datasets.is_progress_bar_enabled, datasets.enable_progress_bars, datasets.disable_progress_bars)
    unreachable = None if path.exists() else hub_unreachable()  # a Hub name: can the Hub be reached?
    try:
        with library_bars(progress, *bars):
            if _saved_dataset(path):
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise DocumentError(f"{source}: no split {split!r} (splits: {', '.join(ds)})")
                    ds = ds[split]
                return ds
            if path.is_file():
                if split != "train":
                    raise DocumentError(f"{source}: one data file is one split, 'train' (asked for {split!r})")
                builder = next(b for suffix, b in _BUILDER_OF.items() if path.name.lower().endswith(suffix))
                return datasets.load_dataset(builder, data_files=str(path), split="train")
            # A Hub name with no network: `datasets` in offline mode reads a copy in its cache at
            # once, or fails at once, where it would otherwise retry the Hub for 25 s first (its
            # setting is read at import, so the flag is set on its config for this call alone)
            was = getattr(datasets.config, "HF_HUB_OFFLINE", False)
            datasets.config.HF_HUB_OFFLINE = was or unreachable is not None
            try:
                return datasets.load_dataset(source, split=split)
            finally:
                datasets.config.HF_HUB_OFFLINE = was
    except DocumentError:
        raise
    except Exception as e:  # network, name, split or file problems: say what was asked for
        if path.exists():
            raise DocumentError(f"{source}: loading it as a dataset failed: {e}") from None
        if unreachable is not None:
            raise DocumentError(f"{source}: no such file or folder, not a dataset in the Hugging Face cache, and "
                                f"the Hub cannot be reached from here ({unreachable})") from None
        raise DocumentError(f"{source}: no such file or folder, and loading it as a Hub dataset name failed: {e}"
                            ) from None


def chunk_tokens(ids: Sequence[int], chunk_tokens: int, overlap: float,
                 clean_cut: Optional[Callable[[int], bool]] = None) -> List[Sequence[int]]:
    """Windows of ``chunk_tokens`` tokens with ``overlap`` (a fraction) shared between neighbours,
    of the type of ``ids`` where it is a list or an ``array`` (slices of it), else lists.

    ``clean_cut(i)``: whether a cut before token i splits no character (``whole_character_cuts``
    makes it for a tokenizer). Where given, each cut moves back, by up to 7 tokens, to the nearest
    clean one: a byte-level tokenizer spells a rare character (most CJK ones for an English model)
    in several tokens, and a chunk cut between them began or ended in U+FFFD, in the teacher's
    context and in recitation targets. A chunk stays within ``chunk_tokens`` and the chunks still
    cover the document."""
    if chunk_tokens < 8:
        raise ValueError(f"chunk_tokens must be >= 8, got {chunk_tokens}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if not isinstance(ids, (list, array)):
        ids = list(ids)
    if len(ids) <= chunk_tokens:
        return [ids[:]]
    stride = max(1, int(round(chunk_tokens * (1 - overlap))))

    def snap(i: int) -> int:  # monotone in i, so the next chunk never starts after this one ends
        if clean_cut is None:
            return i
        return next((j for j in range(i, max(i - 8, 0), -1) if clean_cut(j)), i)

    chunks = []
    start = 0
    while start + chunk_tokens < len(ids):
        chunks.append(ids[start:snap(start + chunk_tokens)])
        following = snap(start + stride)
        start = following if following > start else start + stride
    chunks.append(ids[start:])
    return chunks


def whole_character_cuts(tokenizer, ids: Sequence[int]) -> Callable[[int], bool]:
    """``chunk_tokens``' test of a cut before ``ids[i]``: the text decoded from there begins with a
    whole character, not with the rest of one (U+FFFD)."""
    return lambda i: not tokenizer.decode(list(ids[i:i + 4])).startswith("\ufffd")


_Q = r"(?<![\w])(?:Question|Q)\s*\d*\s*[:：]"
_A = r"(?<![\w])(?:Answer|A)\s*\d*\s*[:：]"
# "Question: ... Answer: ..." or "Q: ... A: ...", optionally numbered, several pairs per output.
_QA = re.compile(_Q + r"\s*(?P<q>.+?)\s+" + _A + r"\s*(?P<a>.+?)(?=\s*(?:\d+[.)]\s*)?" + _Q + r"|\Z)", re.S | re.I)


def parse_qa(text: str) -> List[Tuple[str, str]]:
    """All (question, answer) pairs in a generation; [] when none parses."""
    pairs = []
    for m in _QA.finditer(text.replace("**", "")):
        q = " ".join(m.group("q").split())
        a = " ".join(m.group("a").split())
        if q and a and len(q) < 500 and len(a) < 800:
            pairs.append((q, a))
    return pairs


def qa_target(q: str, a: str) -> str:
    return f"\nQuestion: {q}\nAnswer: {a}"


def text_ids(tokenizer, text: Union[str, List[str]]):
    """Token ids of ``text`` (or of each text in a list) as plain text. A special token's string in
    it (a document about chat formats quoting "<|im_end|>", a hostile one opening a fake turn)
    stays characters: tokenized as the control token, it ended the chat turn in the teacher's and the
    generator's prompts and put an end-of-turn in the middle of recitation targets. Text without
    such strings gets the ids it always had.

    A text of more than ``2 * BLOCK_CHARS`` characters is tokenized a block at a time, each cut where
    a test on its context shows that it changes no token (``clean_cut``), with the same ids: in one
    call, a 48 MB text took a 6.1 GB process peak with SmolLM2's tokenizer (8.4M tokens), which a
    laptop does not have for one document; in blocks 0.9 GB. Where no cut near a block's end passes,
    the text is tokenized whole, as before."""
    if isinstance(text, str) and len(text) > 2 * BLOCK_CHARS:
        return document_ids(tokenizer, text).tolist()
    return _plain_ids(tokenizer, text)


def document_ids(tokenizer, text: str) -> array:
    """`text_ids` of a document, as an int32 array: 4 bytes a token where a list of Python ints takes
    up to 36 (a 70 MB text's 66M tokens: 0.26 GB against 2.4 GB)."""
    if len(text) > 2 * BLOCK_CHARS:
        ids = _blockwise_ids(tokenizer, text)
        if ids is not None:
            return ids
    return array("i", _plain_ids(tokenizer, text))


def _plain_ids(tokenizer, text: Union[str, List[str]]):
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


BLOCK_CHARS = 1 << 18  # characters a block, tokenized 8 blocks a call
_SEAM_CHARS = 512  # context on each side of a cut when testing it
_CUT_TRIES = 16


def _split_point(before: str, ch: str, after: str) -> bool:
    """Whether a cut between ``before`` and ``ch`` (``after`` follows ``ch``) is where every
    pre-tokenizer splits: before a single space between two non-space characters, or at the start
    of a line or of a CJK sentence."""
    if ch.isspace():
        return ch == " " and not before.isspace() and not after.isspace()
    return before in "\n" + "".join(_CJK_ENDS)


def _class_change(before: str, ch: str, after: str) -> bool:
    """A change between letters, digits and other characters, where byte-level pre-tokenizers split:
    the only cuts in text without spaces (base64, minified JSON)."""
    return not (before.isspace() or ch.isspace()) and \
        (before.isalpha(), before.isdigit()) != (ch.isalpha(), ch.isdigit())


def clean_cut(tokenizer, text: str, near: int) -> Optional[int]:
    """A position at or before ``near`` (within 64K characters) where cutting ``text`` leaves its
    tokens as they are, or None. Candidates are `_split_point`s, then `_class_change`s (a tokenizer
    that splits on spaces alone would spend its tries on those first); each is tested on its
    context by `_cut_keeps_tokens`."""
    lo = max(_SEAM_CHARS, near - (1 << 16))
    for candidate in (_split_point, _class_change):
        pos, tried = near, 0
        while pos > lo and tried < _CUT_TRIES:
            if candidate(text[pos - 1], text[pos], text[pos + 1:pos + 2]):
                tried += 1
                if _cut_keeps_tokens(tokenizer, text, pos):
                    return pos
            pos -= 1
    return None


def _cut_keeps_tokens(tokenizer, text: str, pos: int) -> bool:
    """Whether cutting ``text`` at ``pos`` changes no token, tested on the 512 characters on each
    side, ``a`` before and ``b`` after: ``a``'s tokens stay the same with ``b`` after them (the cut
    falls between two tokens), and ``b``'s tokens after ``a`` are those after the one character
    before the cut (what comes before does not change them). Pre-tokenization (a regular expression
    or a split on spaces) and the merges within a pre-token look no further than that, so a cut that
    passes changes no token.

    ``b``'s tokens are always read after some text, never from ``b`` alone: a tokenizer that marks
    the start of every text (Llama 2's, Phi-3's and Mistral 7B's normalizer prepends "▁") marks
    ``b``'s first word, which in the document is not a text's start. `_blockwise_ids` tokenizes
    each block after the same one character, for the same reason."""
    a, b = text[pos - _SEAM_CHARS:pos], text[pos:pos + _SEAM_CHARS]
    c = a[-1]
    a_ids, c_ids, a_b, c_b = _plain_ids(tokenizer, [a, c, a + b, c + b])
    return a_b[:len(a_ids)] == a_ids and c_b[:len(c_ids)] == c_ids and a_b[len(a_ids):] == c_b[len(c_ids):]


def _blockwise_ids(tokenizer, text: str) -> Optional[array]:
    """``text``'s ids, tokenized in blocks of about BLOCK_CHARS cut at clean cuts; None where a block
    end has none near it. Every block but the first is tokenized after the character before its cut,
    whose tokens are then dropped, as `_cut_keeps_tokens` tested it."""
    cuts = [0]
    while len(text) - cuts[-1] > 2 * BLOCK_CHARS:
        cut = clean_cut(tokenizer, text, cuts[-1] + BLOCK_CHARS)
        if cut is None or cut <= cuts[-1]:
            return None
        cuts.append(cut)
    cuts.append(len(text))
    ids = array("i")
    for k in range(0, len(cuts) - 1, 8):  # a batch of blocks at a time: the tokenizer's memory is per call
        spans = list(zip(cuts[k:k + 9], cuts[k + 1:k + 9]))
        lead = [text[a - 1] if a else "" for a, _ in spans]  # the character before each cut, none at the start
        blocks = _plain_ids(tokenizer, [c + text[a:b] for c, (a, b) in zip(lead, spans)])
        for c, c_ids, block in zip(lead, _plain_ids(tokenizer, lead), blocks):
            if c:
                if block[:len(c_ids)] != c_ids:  # the leading character's tokens ran into the block's
                    return None
                block = block[len(c_ids):]
            ids.extend(block)
    return ids


def _control_strings(tokenizer) -> Tuple[str, ...]:
    """The strings the tokenizer turns into special tokens."""
    return tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content)


_CONTENT = "kmtrainusercontentmarker"  # stands for the user text in a rendered template: letters only,
# so that no template's filters (trim, escaping) change it


# What every chat template kmtrain renders is told: no thinking. Qwen3's and SmolLM3's templates let the
# model reason in a <think> block before it answers unless told otherwise; a summary, a Q/A pair or an
# answer then began with reasoning that took the --max-new-tokens budget, without a word. (Templates
# without the switch ignore it: SmolLM2's prompts are the same.)
TEMPLATE_KWARGS = {"enable_thinking": False}


# The day a chat template may print: Llama 3.2's and 3.3's, SmolLM3's and others' system prompts say
# "Today Date: ..." through transformers' strftime_now. Rendered with the real clock, a document's
# prompts changed at midnight, and with them its examples' tokens: a run resumed the next day rebuilt
# the wave's teacher cache and restarted its training from step 0 (both are keyed by those tokens), and
# the same command on two days trained two different KMs. Every prompt kmtrain renders (generation,
# teacher, student, questions) says this day instead: Llama 3.1's own template falls back to it.
TEMPLATE_DATE = datetime.datetime(2024, 7, 26)


class _TemplateClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return TEMPLATE_DATE.replace(tzinfo=tz)


_CLOCK_LOCK = threading.Lock()
_clock = {"users": 0, "real": None}  # renders under way in this process, and the clock to put back after them


@contextlib.contextmanager
def _template_date_pinned() -> Iterator[None]:
    """transformers' strftime_now (the clock its chat templates read) reads TEMPLATE_DATE inside.
    Counted across threads (`ask` in a server): the first render in puts the pinned clock in, the last
    out puts the real one back. (Each saving and restoring its own, two overlapping renders left the
    pinned clock in for good.) Other code's renders that overlap one of ours see the pinned day too."""
    from transformers.utils import chat_template_utils

    with _CLOCK_LOCK:
        if _clock["users"] == 0:
            _clock["real"] = chat_template_utils.datetime  # strftime_now calls .now() on it, looked up each call
            chat_template_utils.datetime = _TemplateClock
        _clock["users"] += 1
    try:
        yield
    finally:
        with _CLOCK_LOCK:
            _clock["users"] -= 1
            if _clock["users"] == 0:
                chat_template_utils.datetime = _clock["real"]


def chat_prompt_ids(tokenizer, user_text: str) -> List[int]:
    """Token ids of the chat template with one user turn and the assistant generation prompt. The
    user text is plain text (see `text_ids`): the template's own markers are the only control tokens.
    A template that prints today's date prints TEMPLATE_DATE, and one that can turn thinking on is
    told it is off (TEMPLATE_KWARGS)."""
    if not getattr(tokenizer, "chat_template", None):
        return text_ids(tokenizer, f"User: {user_text}\nAssistant:")
    with _template_date_pinned():
        if any(c in user_text for c in _control_strings(tokenizer)):
            return _spliced_chat_ids(tokenizer, user_text)
        out = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                            tokenize=True, **TEMPLATE_KWARGS)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _spliced_chat_ids(tokenizer, user_text: str) -> List[int]:
    """The template's ids with the user text as plain text: the template is rendered around a marker
    and tokenized with its control tokens, as `apply_chat_template` does; then the stretch of text
    between the control tokens on each side of the marker, which the tokenizer reads as one piece
    (added tokens split a text into pieces, each normalized and tokenized alone), is tokenized again
    with the user text in it, as plain text. For text without special strings these are the joint
    tokenization's ids, also for a tokenizer that marks the start of every piece (Llama 2's prepends
    "▁"): tokenized apart, the template's text and the user's each got a mark of their own. Where
    the pieces do not give the template's own ids back, the parts are tokenized apart."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _CONTENT}], add_generation_prompt=True,
                                             tokenize=False, **TEMPLATE_KWARGS)
    if rendered.count(_CONTENT) != 1:
        raise ValueError(f"the tokenizer's chat template does not place the user text once, as written, so text "
                         f"with special-token strings in it ({', '.join(_control_strings(tokenizer)[:3])}) "
                         f"cannot be kept plain")
    lo = rendered.index(_CONTENT)
    hi = lo + len(_CONTENT)
    # the user text as the template writes it (Llama 2's strips it): what it renders between the two parts
    real = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                         tokenize=False, **TEMPLATE_KWARGS)
    if real.startswith(rendered[:lo]) and real.endswith(rendered[hi:]) and len(real) >= len(rendered) - len(_CONTENT):
        user_text = real[lo:len(real) - (len(rendered) - hi)]
    if getattr(tokenizer, "is_fast", False):  # offsets come from fast tokenizers alone
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = enc["input_ids"], enc["offset_mapping"]
        control = set(tokenizer.convert_tokens_to_ids(list(_control_strings(tokenizer))))
        marks = [j for j, t in enumerate(ids) if t in control]
        k = max((j for j in marks if spans[j][1] <= lo), default=-1)  # the last control token before the marker
        m = min((j for j in marks if spans[j][0] >= hi), default=len(ids))  # the first after it
        piece_lo = spans[k][1] if k >= 0 else 0  # a control token's span holds the spaces it strips
        piece_hi = spans[m][0] if m < len(ids) else len(rendered)
        if _plain_ids(tokenizer, rendered[piece_lo:piece_hi]) == ids[k + 1:m]:
            piece = rendered[piece_lo:lo] + user_text + rendered[hi:piece_hi]
            return ids[:k + 1] + text_ids(tokenizer, piece) + ids[m:]
    before, after = rendered.split(_CONTENT)
    return (tokenizer(before, add_special_tokens=False)["input_ids"] + text_ids(tokenizer, user_text)
            + tokenizer(after, add_special_tokens=False)["input_ids"])


def target_ids(tokenizer, text: str) -> List[int]:
    """Target tokens followed by the end-of-turn token, so a KM also learns where answers end."""
    ids = text_ids(tokenizer, text)
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def _cut_long(sentence: str, tokenizer, n_tokens: int, piece_tokens: int) -> List[Tuple[str, int, str]]:
    """A run of text of more than 2 x ``piece_tokens`` tokens with no sentence end in it (code, a
    transcript, a list, a table) as (text, tokens) parts of about ``piece_tokens`` tokens each: cut
    at spaces, and a word longer than that (a URL, CJK text without full stops) by characters in
    proportion to its tokens. Left whole, it made one recitation target of up to a whole chunk.
    Each part comes with the separator that goes before it in a piece: " ", or "" inside a word."""
    words = sentence.split()
    parts: List[Tuple[str, int, str]] = []
    for word, n in zip(words, [len(ids) for ids in text_ids(tokenizer, words)] if len(words) > 1 else [n_tokens]):
        if n <= piece_tokens:
            parts.append((word, n, " "))
            continue
        step = max(1, len(word) * piece_tokens // n)
        for i in range(0, len(word), step):  # the parts of one word join again with no space
            parts.append((word[i:i + step], min(piece_tokens, n), " " if i == 0 else ""))
    return parts


def _cue(target: str, tokenizer, words: int) -> str:
    """A recitation piece's cue: its first ``words`` words, at most 4 tokens a word (the demo corpus's
    longest cue, 6 words, is 13 tokens). Why the cap: text without spaces (Chinese, Japanese, Thai) is
    one "word" a whole piece long, and its cue was the whole target, put in the student's prompt."""
    cue = " ".join(target.split()[:words])
    limit = 4 * words
    if len(text_ids(tokenizer, cue)) <= limit:
        return cue
    lo, hi = 1, len(cue)  # the longest run of characters within the limit (one character is <= 4 byte tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(text_ids(tokenizer, cue[:mid])) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return cue[:lo].rstrip()


def recitation_pieces(chunks: Sequence[str], tokenizer, piece_tokens: int) -> List[Tuple[int, str]]:
    """(chunk, piece) for each recitation piece of ``chunks``, in order: `recitation_items` without
    the cues, which cost as much again and which a long document needs for the few pieces it keeps
    (`recitation_item` makes an item of one)."""
    return [(c, piece) for c, text in enumerate(chunks)
            for piece in chunk_recitation_pieces(text, tokenizer, piece_tokens)]


def chunk_recitation_pieces(text: str, tokenizer, piece_tokens: int) -> List[str]:
    """The recitation pieces of one chunk (`recitation_items`): they depend on that chunk alone."""
    sentences = [s for s in SENTENCE_END.split(text.strip()) if s]
    units: List[Tuple[str, int, str]] = []  # (text, tokens, separator before it)
    for sent, n in zip(sentences, [len(ids) for ids in text_ids(tokenizer, sentences)] if sentences else []):
        cut = [(sent, n, " ")] if n <= 2 * piece_tokens else _cut_long(sent, tokenizer, n, piece_tokens)
        if units and units[-1][0].endswith(_CJK_ENDS):  # no space follows a CJK full stop
            cut[0] = (*cut[0][:2], "")
        units += cut
    pieces: List[str] = []
    piece: List[str] = []
    n = 0
    for k, (unit, length, sep) in enumerate(units):
        piece.append(sep + unit if piece else unit)
        n += length
        if n >= piece_tokens or k == len(units) - 1:
            pieces.append("".join(piece))
            piece, n = [], 0
    return pieces


def recitation_item(chunk: int, target: str, tokenizer, cue_words: int = 6) -> dict:
    """The synthetic item of one recitation piece: the piece as target, cued by its first words."""
    return {"chunk": chunk, "prompt": RECITE_PROMPT.format(cue=_cue(target, tokenizer, cue_words)), "target": target}


def recitation_items(chunks: Sequence[str], tokenizer, piece_tokens: int, cue_words: int = 6) -> List[dict]:
    """Synthetic items that need no generator: each chunk cut at sentence ends into pieces of about
    ``piece_tokens`` tokens (a sentence longer than that is a piece of its own, up to twice that;
    a longer one is cut: ``_cut_long``), each piece a target under RECITE_PROMPT cued by its first
    ``cue_words`` words (``_cue``: at most 4 tokens a word). The teacher, with the chunk in context,
    copies the piece; the student learns to recall it from the cue, so every fact of the chunk is in
    some target, not only what the generated summaries mention."""
    return [recitation_item(c, target, tokenizer, cue_words)
            for c, target in recitation_pieces(chunks, tokenizer, piece_tokens)]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the file at a temporary sibling, .<name>.tmp-<pid> (the pid tells a
    later run whether its writer died: index.remove_stale_temp), which is then renamed into place.
    A failed write (out of disk, interrupted) leaves no partial file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming_file_on_error(path):  # out of disk names the file being written
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: os.PathLike, obj) -> None:
    """``obj`` as JSON, written atomically (`atomic_write`) and encoded as it is written: a long
    document's chunks.json was a string of several hundred MB before the first byte went out."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f)
    atomic_write(path, write)


@contextlib.contextmanager
def safetensors_io_errors(path: os.PathLike) -> Iterator[None]:
    """Inside, safetensors' failed writes (out of disk, a file-size limit, a file system gone) raise
    the OSError they are, naming ``path``. safetensors raises its own SafetensorError for them,
    which is no OSError: training's "checkpoint not saved; training goes on" and the CLI's one-line
    report of the machine's errors missed it, and a full disk ended the run in a traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))  # how Rust prints an io::Error's errno
        if code is None:  # not an I/O failure (a tensor it cannot store, say): as it was
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), os.fspath(path)) from e


def atomic_save_tensors(path: os.PathLike, tensors: Dict[str, torch.Tensor],
                        metadata: Optional[Dict[str, str]] = None) -> None:
    """safetensors' save_file through atomic_write; a failed write raises OSError (safetensors_io_errors)."""
    from safetensors.torch import save_file

    with safetensors_io_errors(path):
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
