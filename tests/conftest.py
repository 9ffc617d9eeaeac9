"""Test setup: without a GPU, Triton kernels run on CPU tensors through the interpreter.

The variable must be set before any @triton.jit function is defined, i.e. before kmkernels is
imported, so it is done here at collection time.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
# Interpreter-safe dtypes: bf16 loads are broken under TRITON_INTERPRET, so bf16 runs only on GPU.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none present)")


@pytest.fixture
def device():
    return DEVICE


# kmtrain tests: three tiny documents and a random 2-layer Llama with an offline tokenizer.
DOCS = {
    "alpha": "The harbour town of Lissen keeps a bronze bell named Moro that rings at every high tide.",
    "beta": "Farmers of the Quell valley grow violet barley and sell it at the market of Dunmere each spring.",
    "gamma": "The clock tower of Avrin has seven faces, and its keeper Ida Solm winds it every Tuesday morning.",
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama and a byte-level BPE tokenizer with a chat template, saved to disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(DOCS.values()) * 3 + ["Question: Answer: Summarize the preceding passage."], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return str(folder)


def write_docs(folder):
    """DOCS as one .txt file each in ``folder`` (made here); returns it."""
    folder.mkdir()
    for k, v in DOCS.items():
        (folder / f"{k}.txt").write_text(v)
    return folder


@pytest.fixture
def docs_dir(tmp_path):
    return write_docs(tmp_path / "docs")


def tiny_cfg(model, out, **kw):
    """A few-second IndexConfig for the tiny model: 3 steps, 3 targets per chunk, rank 4."""
    from kmtrain import IndexConfig

    base = dict(out=str(out), model=model, steps=3, docs_per_step=2, examples_per_doc=1, summaries_per_chunk=2,
                qa_per_chunk=1, max_new_tokens=10, chunk_tokens=64, gen_batch_size=8, progress=False, rank=4, alpha=8)
    base.update(kw)
    return IndexConfig(**base)


# Python code that makes `import triton` fail as it does where Triton is not installed (macOS,
# Windows: Triton ships Linux wheels only). A child process runs it first, before torch.
WITHOUT_TRITON = """
import importlib.abc, sys
class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTriton())
"""


def run_without_triton(code: str, timeout: float = 300):
    """Runs WITHOUT_TRITON + ``code`` in a fresh Python, with TRITON_INTERPRET unset as on a laptop."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", WITHOUT_TRITON + code], capture_output=True, text=True,
                          timeout=timeout, env=env)


def on_day(monkeypatch, day: int):
    """transformers' chat templates (strftime_now) see 2026-12-``day`` as today from here on."""
    import datetime

    from transformers.utils import chat_template_utils

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 12, day, 23, 59)

    monkeypatch.setattr(chat_template_utils, "datetime", Clock)
    return Clock


DATED_TEMPLATE = "{{ 'Today Date: ' + strftime_now('%d %b %Y') + '\\n' }}"
