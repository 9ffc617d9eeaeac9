"""Configuration of an indexing run: one dataclass, CPU-sized defaults, a paper preset for GPUs."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:  # for annotations; the functions below import torch where they use it
    import torch

OBJECTIVES = ("sdcd", "ddcd", "lm", "pit")
# The values each string option takes: validate() checks them, the CLI offers them as choices.
CHOICES = {"objective": OBJECTIVES, "qa_format": ("pair", "chat", "both"), "generator": ("hf", "vllm"),
           "cache_dtype": ("bf16", "fp8", "fp32"), "backend": ("auto", "triton", "torch"),
           "amp": ("auto", "bf16", "off"), "base_dtype": ("auto", "fp32", "bf16")}
# kmkernels' DEFAULT_TARGETS (not imported: this module stays free of torch, for the CLI's start), PEFT's
# shorthand for every linear layer but the output head: a KM adapts all of them, whatever their names
TARGETS = ("all-linear",)


# Training steps when IndexConfig.steps is unset. 60: `make demo` takes 8-12 minutes from a cold
# start on 2-core CPUs with native bf16 (AVX512-BF16 or AMX; bench/results/make_demo_cpu.md). A CPU
# without them trains in fp32 at ~2x the time per step (15.2 s against 5.5-7.8 s), and there make demo
# took 21:50 at 60 steps, so it trains FP32_CPU_STEPS by default. Measured on such a CPU (AVX2 only)
# on the same synthetic targets, KM accuracy on the demo corpus at 30 against 60 steps: 33 against 35
# of 64 at seed 0, 36 against 38 at seed 1, and 26 at 24 steps at both (bench/results/steps_fp32_cpu.md).
# make demo there at 30 steps: 13:55 and 15:10, at the edge of its 15 minutes.
DEFAULT_STEPS = 60
FP32_CPU_STEPS = 30
# the default as --help says it (kmtrain index, kmtrain.demo)
STEPS_DEFAULT_SAID = f"default {DEFAULT_STEPS}, {FP32_CPU_STEPS} on a CPU without native bf16 matmuls"


@dataclass
class IndexConfig:
    """Everything `kmtrain index` does. Defaults fit a 2-core CPU with SmolLM2-135M (`make demo`)."""
    out: str = "kms"
    model: str = "smollm2-135m"
    objective: str = "sdcd"
    # data
    chunk_tokens: int = 2048
    chunk_overlap: float = 0.1
    # 12 summaries: on the demo corpus a KM answers what several targets repeat (facts in a summary
    # and a Q/A target: 10/16 right; in one kind only: 12/37). sdcd at 60 steps, two seeds:
    # 26 and 25 of 64 with 12 summaries, 22-24 and 22 with 6 (bench/results/ablations/).
    summaries_per_chunk: int = 12
    qa_per_chunk: int = 6
    # Fact lists per chunk (data.FACTS_PROMPT): a generation meant to state the chunk's names, dates
    # and numbers one sentence each, where a summary keeps the gist. 0: summaries and Q/A only. On the
    # demo corpus, 6 lists in place of 6 of the 12 summaries: 34, 30, 34 of 64 over seeds 0-2 against
    # 28, 38, 33; at 128 tokens the lists repeat what the summaries state (ablations/sdcd_6_summaries_6_facts*).
    facts_per_chunk: int = 0
    max_new_tokens: int = 128
    top_p: float = 0.8
    # A 135M generator invents details at temperature 1.0 and the KM learns them (seen on the demo
    # corpus: misspelt names); 0.5 keeps the targets closer to the chunk. The paper preset uses 1.0.
    temperature: float = 0.5
    # >0: the generator reads, in turn, the whole chunk and each of up to this many runs of its
    # paragraphs, so the targets cover the whole chunk, not only what a summary of it leads with.
    focus_parts: int = 0
    # sdcd, >0: the chunk itself is also distilled, in sentence-aligned pieces of about this many
    # tokens, each cued by its first words (data.recitation_items): targets that state every fact
    # of the chunk, where a 135M generator's summaries leave some out. 0: the generated targets
    # only (the paper's recipe, and the paper preset). On the demo corpus at 96, on the same
    # generated targets as without: 31/64 against 29/64 at seed 1, 38/64 against 29/64 at seed 2
    # (bench/results/ablations/sdcd_recite_96_seed*_cpu.md), and make demo (seed 0) 32/64 against
    # 28/64; training time unchanged.
    recite_tokens: int = 96
    generator: str = "hf"  # or "vllm" when installed
    # sdcd: how a Q/A pair is distilled: "pair" (as generated), "chat" (as a KM is asked), "both"
    qa_format: str = "pair"
    # Requests per generate call. Larger batches spread each decoding step's fixed cost (30 layers
    # of small ops) over more rows: make demo's 144 requests took 114 s at 16, 90 s at 48, 85 s at
    # 72 and 91 s at 144 (bf16, 2-core CPU, 2026-11-24). A request's target does not depend on
    # its batch-mates in fp32 (tested); in bf16 the batch shape changes the rounding, so 102 of the
    # 144 targets came out the same at 48 as at 16.
    gen_batch_size: int = 48
    # DDCD: windows of the document; the student sees the last `ddcd_student_frac` of each
    ddcd_window_tokens: int = 512
    ddcd_windows_per_chunk: int = 8
    ddcd_student_frac: float = 0.23
    lm_seq_tokens: int = 512
    # teacher cache
    teacher_cache: bool = True
    # Kept after its KM is written? A cache is ~4x its KM on the demo corpus (72-84 MB against
    # 19.5 MB per document on SmolLM2-135M), and 256 KiB per target token at Llama-3.1-8B shapes
    # (32 layers x 4096 x bf16): thousands of documents would fill a disk. Off, the disk holds one
    # wave's caches at most; on, a retrain with other training settings (steps, lr) reuses them.
    keep_teacher_cache: bool = False
    # Smaller caches, for disks that cannot hold one wave's: fp8 halves the bytes and every 4th layer
    # (cache_layers) cuts them 3.2x, 5.3x together (the L1 term then averages the layers kept). On the
    # demo corpus, KMs trained with them scored 32-36/64 against 36 with bf16 at seeds 3 and 4, where
    # rounding alone moves a total by ~2; fp8 35 and 35 (bench/results/ablations/sdcd_cache_fp8_layer_subset_cpu.md).
    # The KL is exact under all of them: its statistics are fp32 from the unrounded last layer. fp8
    # scales each example's layer on its own, as --no-teacher-cache rounds it: the same loss either way.
    cache_dtype: str = "bf16"  # bf16 | fp8 | fp32
    cache_layers: Optional[Tuple[int, ...]] = None  # None = every decoder layer; the last is always kept
    # Targets per teacher forward while a cache is built (each batch holds its own copy of the chunk's
    # keys and values: 8 x 268 MB for a 2048-token chunk at Llama-3.1-8B shapes in bf16). Lower it where
    # the cache build runs out of memory: the cache holds the same states (fp32: to ~1e-6; tested).
    cache_batch_size: int = 8
    # training (paper defaults but the lr: AdamW, warm-up + cosine, clip 1.0, r=16, alpha=16, every linear
    # layer but the output head)
    # None: DEFAULT_STEPS, or FP32_CPU_STEPS on a CPU without native bf16 matmuls (`default_steps`).
    # sdcd on the demo corpus at 1 example per step: 19/64 at 30 steps (fp32), 22-26/64 at 60 (bf16),
    # 24/64 at 90 (fp32), 21/64 at 120 (bf16, 6 summaries): more steps alone do not pay here.
    # The paper trains 250-1500 steps (preset "paper").
    steps: Optional[int] = None
    docs_per_step: int = 8
    # 2 examples of each document per step: sdcd 33 and 28 of 64 over two seeds, against 26 and 25
    # with 1 (same targets, 60 steps); the same compute as 4 x 30 steps gave 29, and a lower lr at 1
    # example per step did not help (26): each update averaging over more targets is what pays.
    # It doubles the training time (~200 s to ~400 s for the demo corpus on a 2-core CPU).
    examples_per_doc: int = 2
    # >0: a step's docs_per_step x examples_per_doc sequences run in passes of at most this many
    # padded tokens, gradients summed (train.step_backward): the same update to rounding, with one
    # pass's activations held at a time. 0: one pass. On the CPU defaults a step is 16 sequences of
    # ~80-170 tokens (~2.6k tokens). A training pass holds 1.36 MiB of activations a token for
    # SmolLM2-135M in bf16 on a CPU (measured: 5.2 GiB at 4,096 tokens against 1.1 GiB at 1,024); the
    # paper preset's 64 sequences of up to ~800 tokens make ~50k tokens a step.
    micro_batch_tokens: int = 0
    # The paper's 1e-3 is for 250-1500 steps; at CPU step counts (30-60) it leaves the KMs
    # under-trained. Measured on the demo corpus at 30 steps (bench/results/ablations/): sdcd 7/64
    # at 1e-3, 19/64 at 5e-3, 10/64 at 1e-2. The paper preset keeps 1e-3.
    lr: float = 5e-3
    # LoRA+ (Hayou et al., 2024): the B matrices learn at lr * lr_b_ratio, the A matrices at lr.
    # Not on the demo corpus at 60 steps (seed 1, same targets): 21/64 at ratio 4, 26/64 at ratio 8
    # with lr 2.5e-3, against 31/64 at 1 (bench/results/ablations/sdcd_loraplus_*).
    lr_b_ratio: float = 1.0
    warmup_frac: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    # The paper's model selection (SPEC.md section 2): this many synthetic targets of each chunk
    # (a chunk always keeps one for training) are left out of training, and the KM written is the
    # checkpoint with the lowest DCD loss on them, evaluated every `heldout_every` steps (0: every
    # steps // 10, and always at the last step); km.json records the curve. sdcd only: the other
    # objectives' examples are the document itself, which a KM must see whole. Off (0) at CPU step
    # counts: on the demo corpus at 60 steps the held-out loss still fell at the last evaluations
    # (best at step 60 for 6 KMs, 54 for 2), so selection kept ~the last step and the held-out
    # target was training data lost (30/64 against 33/64 on the same targets; ablations/). The
    # paper preset (1500 steps) holds one out, as the paper does.
    heldout_per_chunk: int = 0
    heldout_every: int = 0
    # A wave's training state (its slots' weights, AdamW moments, schedule, each document's data
    # order and losses) is saved under OUT/.work every this many seconds of training, and a killed
    # run resumes its wave from there, to the same KMs. 0: never. One save holds 3 fp32 copies of
    # each slot's LoRA (58 MB per document for SmolLM2-135M at r=16, ~0.5 GB at Llama-3.1-8B shapes).
    checkpoint_seconds: float = 300.0
    rank: int = 16
    alpha: float = 16.0
    target_modules: Tuple[str, ...] = TARGETS
    kl_weight: float = 1.0
    hidden_weight: float = 1.0
    backend: str = "auto"
    amp: str = "auto"  # auto: bf16 autocast where the device supports it; "off" to disable
    # Base weights in memory. auto: bf16 where training runs under bf16 autocast on a GPU (every
    # matmul runs in bf16 there anyway; fp32 weights would double the memory and add a cast per
    # matmul), else fp32. The KM's own weights are always fp32 (as PEFT keeps them).
    base_dtype: str = "auto"  # auto | fp32 | bf16
    device: str = "auto"
    seed: int = 0
    retrain: bool = False
    progress: bool = True
    # A model folder or Hub repository with its own Python code (config.json's auto_map) loads only
    # when this is set: transformers runs that code, with the user's permissions.
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        """Values as Python callers hand them, made what the fields hold: a pathlib.Path for ``out`` or
        ``model``, a torch.device, numpy numbers, a list of layers. Why: km.json and the keys of the
        teacher cache and training checkpoint are JSON, and IndexConfig(model=Path(...)) failed there
        with "PosixPath is not JSON serializable", after generation and the teacher cache had run. A
        value of another kind (steps="60") is a ValueError naming the field, not a TypeError in a check."""
        for name, kind in typing.get_type_hints(IndexConfig).items():
            setattr(self, name, _as_field_type(name, kind, getattr(self, name)))

    def validate(self) -> "IndexConfig":
        for name in ("out", "model"):  # `--out "$OUT"` with OUT unset wrote the KMs into the working directory
            if not getattr(self, name).strip():
                raise ValueError(f"{name} is empty (an unset shell variable?)")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("steps", "docs_per_step", "examples_per_doc", "rank", "max_new_tokens", "gen_batch_size",
                     "cache_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:  # steps None: the device's default
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # checked here, not where they are used, so that a bad value fails before the model loads
        if self.chunk_tokens < 8:
            raise ValueError(f"chunk_tokens must be >= 8, got {self.chunk_tokens}")
        if not 0 <= self.chunk_overlap < 1:
            raise ValueError(f"chunk_overlap must be in [0, 1), got {self.chunk_overlap}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("lr", "clip", "alpha"):  # alpha 0 would scale every KM to nothing
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        # inf passed the checks above; lr=inf trained NaN weights and wrote them as a finished KM
        for name in ("lr", "alpha", "lr_b_ratio", "temperature", "kl_weight", "hidden_weight", "weight_decay",
                     "checkpoint_seconds"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("kl_weight", "hidden_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.objective in ("sdcd", "ddcd") and self.kl_weight == 0 and self.hidden_weight == 0:
            raise ValueError("kl_weight and hidden_weight are both 0: the DCD loss would be 0 and train nothing")
        for name, least in (("lm_seq_tokens", 2), ("ddcd_window_tokens", 4), ("ddcd_windows_per_chunk", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if not 0 <= self.warmup_frac <= 1:
            raise ValueError(f"warmup_frac must be in [0, 1], got {self.warmup_frac}")
        for name in ("heldout_per_chunk", "heldout_every", "recite_tokens", "focus_parts", "checkpoint_seconds",
                     "micro_batch_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        counts = (self.summaries_per_chunk, self.qa_per_chunk, self.facts_per_chunk)
        if min(counts) < 0 or sum(counts) < 1:
            raise ValueError("need at least one synthetic target per chunk, none negative (summaries_per_chunk + "
                             f"qa_per_chunk + facts_per_chunk >= 1), got {counts}")
        if self.generator == "vllm" and importlib.util.find_spec("vllm") is None:  # now, not after loading
            raise ValueError("--generator vllm needs vllm installed (pip install 'kmkernels[vllm]')")
        if not self.lr_b_ratio > 0:
            raise ValueError(f"lr_b_ratio must be > 0, got {self.lr_b_ratio}")
        if not 0 < self.ddcd_student_frac < 1:
            raise ValueError(f"ddcd_student_frac must be in (0, 1), got {self.ddcd_student_frac}")
        # --backend triton where it cannot run (triton not installed, as on macOS and Windows, or a
        # CPU without TRITON_INTERPRET=1) failed only after the model had loaded and generated
        from kmkernels.utils import resolve_backend

        resolve_backend(self.backend, resolve_device(self.device))
        return self

    def replace(self, **kw) -> "IndexConfig":
        return dataclasses.replace(self, **kw)

    @staticmethod
    def parse_override(item: str) -> Tuple[str, object]:
        """``"FIELD=VALUE"`` (a ``--set`` argument) -> (field, value of the field's type): numbers and
        strings as such, booleans as true/false (also 1/0, yes/no, on/off), tuples as comma-separated
        items, ``none`` for an optional field left unset. ValueError naming the problem otherwise."""
        field, eq, text = item.partition("=")
        hints = typing.get_type_hints(IndexConfig)
        if not eq:
            raise ValueError(f"--set {item}: expected FIELD=VALUE, FIELD one of {', '.join(hints)}")
        if field not in hints:
            raise ValueError(f"--set {item}: IndexConfig has no field {field!r}")
        kind = hints[field]
        args = typing.get_args(kind)
        try:
            if type(None) in args:  # Optional[X]
                if text.lower() == "none":
                    return field, None
                kind = next(a for a in args if a is not type(None))
                args = typing.get_args(kind)
            if typing.get_origin(kind) is tuple:
                return field, tuple(args[0](x.strip()) for x in text.split(",") if x.strip())
            if kind is bool:
                flags = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
                if text.lower() not in flags:
                    raise ValueError("not a boolean: true or false")
                return field, flags[text.lower()]
            return field, kind(text)
        except ValueError as e:
            raise ValueError(f"--set {item}: {field} takes {getattr(kind, '__name__', kind)}, got {text!r} ({e})") from None


def resolve_device(device: str) -> torch.device:
    """The device a run uses: "auto" is a CUDA GPU when there is one, else the CPU. ValueError naming
    the problem for a device that torch does not know or that this machine lacks ("cuda" without a
    GPU ended in an AssertionError traceback from inside torch, after the model had loaded)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device torch knows (auto, cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is available here (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: Apple's MPS is not available here (use auto or cpu)")
    return dev


_KIND_NAME = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _as_field_type(name: str, kind, value):
    """``value`` as IndexConfig's field ``name`` of type ``kind`` holds it (``IndexConfig.__post_init__``)."""
    import numbers

    args = typing.get_args(kind)
    if type(None) in args and args[0] in _KIND_NAME:  # Optional[int] (steps): None or the type's value
        if value is None:
            return None
        try:
            return _as_field_type(name, args[0], value)
        except ValueError:
            raise ValueError(f"{name} must be {_KIND_NAME[args[0]]} or None, got {type(value).__name__} "
                             f"{value!r}") from None
    if kind in _KIND_NAME:
        if kind is str and isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif kind is str and name == "device" and type(value).__name__ == "device":  # a torch.device
            value = str(value)
        elif kind in (int, float) and not isinstance(value, bool) and isinstance(
                value, numbers.Integral if kind is int else numbers.Real):
            value = kind(value)  # numpy's numbers too
        if type(value) is not kind:
            raise ValueError(f"{name} must be {_KIND_NAME[kind]}, got {type(value).__name__} {value!r}")
        return value
    # Tuple[str, ...] (target_modules) or Optional[Tuple[int, ...]] (cache_layers)
    optional = type(None) in typing.get_args(kind)
    item = typing.get_args(typing.get_args(kind)[0] if optional else kind)[0]
    if value is None and optional:
        return None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a tuple of {'integers' if item is int else 'strings'}"
                         f"{' or None' if optional else ''}, got {type(value).__name__} {value!r}")
    return tuple(_as_field_type(name, item, v) for v in value)


PRESETS = {
    # The paper's recipe (SPEC.md section 2), for GPUs.
    "paper": dict(chunk_tokens=2048, chunk_overlap=0.1, summaries_per_chunk=8, qa_per_chunk=8, max_new_tokens=768,
                  steps=1500, examples_per_doc=8, docs_per_step=8, temperature=1.0, lr=1e-3, heldout_per_chunk=1,
                  recite_tokens=0,
                  # passes of about half the paper's own step (8 sequences of up to ~1k tokens): ~5 MB of
                  # activations a token at Llama-3.1-8B shapes by its layer sizes (estimated, no GPU run yet)
                  micro_batch_tokens=4096),
    "cpu": {},
}
