"""One very long document through `kmtrain index`: wall time and peak memory of a run, and of a
re-run that reads its stages back (--retrain), for one or more source trees side by side.

    python -m bench.huge_document [--chars 24000000] [--tree DIR ...] [--out bench/results/huge_document_cpu.md]

The document is made here, the same every time: the demo corpus's sentences, Chinese sentences
without spaces and lines of code, in a seeded random order, to ``--chars`` characters. The model
is a two-layer Llama with random weights (bench.indexing's "tiny" shape) and SmolLM2's tokenizer,
or with ``--tokenizer llama2-style`` one built as Llama 2's is (`llama2_style_tokenizer`):
the stages a long document strains (tokenizing, chunking, counting and cutting recitation pieces,
choosing the generation requests) are the tokenizer's and Python's, not the model's. Each run is
`python -m kmtrain index` in its own process, with ``--tree``'s kmtrain (give a worktree of an
older commit to compare); its peak is that process's peak resident memory (wait4's ru_maxrss).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from bench.common import env_block, environment, markdown_table, write_report
from bench.indexing import random_model_folder
from kmtrain.demo import CORPUS

ROOT = Path(__file__).resolve().parent.parent
# what the run takes: few steps, short chunks and generations, so the stages above dominate
INDEX_ARGS = ["--steps", "4", "--chunk-tokens", "256", "--max-new-tokens", "16", "--no-progress"]
_HAN = "钟楼港口大麦紫罗兰守护者市场河流铜盐灯账本旧城新桥夜晚清晨学校医生"


def long_text(chars: int, seed: int = 0) -> str:
    """A text of exactly ``chars`` characters: English sentences (the demo corpus's), Chinese
    sentences without spaces and lines of code, in random order (``seed``)."""
    rng = random.Random(seed)
    english = [s.strip().rstrip(".") + "." for p in sorted(CORPUS.glob("*.txt")) for s in p.read_text().split(". ")
               if s.strip()]
    parts: List[str] = []
    n = 0
    while n < chars:
        kind = rng.random()
        if kind < 0.6:
            part = " ".join(rng.choice(english) for _ in range(rng.randint(1, 6))) + rng.choice([" ", "\n", "\n\n"])
        elif kind < 0.8:
            part = "".join(rng.choice(_HAN) for _ in range(rng.randint(8, 60))) + "。"
        else:
            k = rng.randint(0, 10 ** 6)
            part = f"def step_{k}(x, y={k % 97}):\n    return [x * y + {k}] * {rng.randint(1, 9)}\n\n"
        parts.append(part)
        n += len(part)
    return "".join(parts)[:chars]


LLAMA2_STYLE = "llama2-style"


def llama2_style_tokenizer(text: str, vocab_size: int, special_tokens: Sequence[str] = ("<unk>", "<s>", "</s>")):
    """A fast tokenizer built as Llama 2's tokenizer.json is (and Phi-3's and Mistral 7B's, which use
    it): a BPE vocabulary learned between spaces (as SentencePiece learns it) on ``text``, applied
    to the whole text after a normalizer that writes "▁" for each space and prepends one, so that
    every text's start is marked. No byte fallback: a character ``text`` lacks is "<unk>"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=special_tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")  # learn within words only
    pieces = [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
    tok.train_from_iterator(pieces, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                                        show_progress=False))
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    named = dict(zip(("unk_token", "bos_token", "eos_token"), special_tokens))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def _run(tree: Path, docs: Path, out: Path, model: str, retrain: bool) -> Dict[str, str]:
    """One `kmtrain index` process: wall seconds, its peak resident memory, the document's summary line."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "kmtrain", "index", str(docs), "--out", str(out), "--model", model, *INDEX_ARGS]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd + (["--retrain"] if retrain else []), cwd=tree, env=env, stdout=stdout,
                                stderr=stderr, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak alone
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        printed, errors = stdout.read(), stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {tree} failed ({proc.returncode}): {errors.strip()[-500:]}")
    line = next((ln for ln in printed.splitlines() if re.match(r"huge: \d+ (of \d+ )?examples", ln)), "")
    return {"seconds": f"{seconds:.0f}", "peak_gb": f"{usage.ru_maxrss / 2 ** 20:.2f}",
            "summary": re.sub(r", [0-9.]+ s$", "", line)}


def _revision(tree: Path) -> str:
    got = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (got.stdout.strip() or "?") + (" + changes" if dirty else "")


def main(argv: Optional[List[str]] = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chars", type=int, default=24_000_000, help="the document's length in characters")
    ap.add_argument("--tree", action="append", type=Path, help="a checkout whose kmtrain runs (repeatable; "
                                                              "default: this one)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "huge_document")
    ap.add_argument("--tokenizer", default="smollm2-135m",
                    help=f"tokenizer of the random model: a folder, an alias, or {LLAMA2_STYLE} (built here, a "
                         f"32K vocabulary learned on the document's first 4M characters)")
    ap.add_argument("--out", help="write the report here too")
    args = ap.parse_args(argv)
    trees = [t.resolve() for t in (args.tree or [ROOT])]
    args.work = args.work.resolve()  # the runs start in each tree: a relative path would be read from there
    docs = args.work / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    text = long_text(args.chars)
    (docs / "huge.txt").write_text(text, encoding="utf-8")
    tokenizer = args.tokenizer
    if tokenizer == LLAMA2_STYLE:
        learned_on = min(len(text), 4_000_000)  # the text's start is the same at any --chars
        tokenizer = str(args.work / f"{LLAMA2_STYLE}-{learned_on}")
        if not Path(tokenizer, "tokenizer.json").is_file():
            llama2_style_tokenizer(text[:learned_on], 32000).save_pretrained(tokenizer)
    # one model folder per tokenizer: a folder made with another would be read as it is
    slug = Path(tokenizer).name + "-" + hashlib.sha256(tokenizer.encode()).hexdigest()[:8]
    model = random_model_folder("tiny", tokenizer, args.work / f"random-tiny-{slug}")
    rows = []
    for k, tree in enumerate(trees):
        out = args.work / f"out{k}"
        for retrain in (False, True):
            got = _run(tree, docs, out, model, retrain)
            rows.append([_revision(tree), "re-run, stages read back (--retrain)" if retrain else "first run",
                         got["seconds"], got["peak_gb"], f"`{got['summary']}`"])
    env = environment()
    report = "\n\n".join([
        "# One very long document through `kmtrain index`, CPU",
        env_block(env),
        f"- document: {len(text):,} characters, {len(text.encode()) / 1e6:.1f} MB in UTF-8 (bench.huge_document."
        f"long_text: English, Chinese and code); model: a 2-layer Llama with random weights and the "
        f"{args.tokenizer} tokenizer; `kmtrain index {' '.join(INDEX_ARGS)}`",
        markdown_table(["kmtrain at", "run", "seconds", "peak memory (GiB)", "the document's summary line"], rows),
    ]) + "\n"
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
