"""Synthetic targets: the base model writes summaries and Q/A pairs about each chunk."""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import traceback
from array import array
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .data import FACTS_PROMPT, QA_PROMPT, SENTENCE_END, SUMMARY_PROMPT, chat_prompt_ids, parse_qa, qa_target
from .models import cache_kwarg, kv_reuse_limit, left_padding_ok, prompt_cache, row_batches


# The generator's instruction for each kind of synthetic target, after the chunk.
PROMPT_OF = {"summary": SUMMARY_PROMPT, "qa": QA_PROMPT, "facts": FACTS_PROMPT}


def requested_kinds(cfg) -> List[Tuple[str, int]]:
    """(kind, requests per chunk) for each kind of synthetic target asked for at least once."""
    counts = (("summary", cfg.summaries_per_chunk), ("qa", cfg.qa_per_chunk), ("facts", cfg.facts_per_chunk))
    return [(kind, n) for kind, n in counts if n > 0]


def request_seed(seed: int, doc_id: str, chunk: int, kind: str, i: int) -> int:
    """The sampling seed of one generation request: from the run's seed and the request's own
    identity only, so a document's targets do not depend on the documents generated beside it."""
    return int(hashlib.sha256(f"{seed}:{doc_id}:{chunk}:{kind}:{i}".encode()).hexdigest()[:15], 16)


# A document whose targets' sources outnumber what its training draws has only about this many
# times its draws of sources made, and never fewer than MIN_SOURCES (a few outputs dropped, or a
# tiny --steps, must not leave it without examples): see requests_to_make.
GENERATION_MARGIN = 1.5
MIN_SOURCES = 32


def sources_to_keep(draws: int) -> int:
    """How many sources of training examples (`requests_to_make`) a document with ``draws`` draws keeps."""
    return max(math.ceil(GENERATION_MARGIN * draws), MIN_SOURCES)


def requests_to_make(n_requests: int, n_recitation: int, draws: int) -> int:
    """How many of a document's ``n_requests`` generation requests to make when its training draws
    ``draws`` examples (--steps x --examples-per-doc) and it has ``n_recitation`` recitation pieces.

    Each training example comes from one source: a generation request (a summary, a fact list, a
    Q/A generation's pairs) or a recitation piece, and training draws a uniform random ``draws`` of
    them. A long document's sources outnumber its draws many times over (a 94 KB text, 15 chunks:
    516 at the CPU defaults, against 120 draws), and generating every request spent the generator's
    time, the slowest stage on a CPU, on targets never trained on. Keeping a uniform random fraction
    of the sources of both kinds (the same fraction of the recitation pieces: ``document_items``),
    then drawing as before, leaves every example's chance of being drawn, and so the mix of kinds
    and chunks trained on, as it was in expectation. The fraction keeps `sources_to_keep` sources
    (rounded up): a source gives at least one example unless its output is dropped.
    """
    keep = sources_to_keep(draws)
    if n_requests + n_recitation <= keep:
        return n_requests
    return min(n_requests, math.ceil(n_requests * keep / (n_requests + n_recitation)))


def made_positions(n_requests: int, made: int, seed: int, doc_id: str) -> List[int]:
    """Which ``made`` of a document's ``n_requests`` requests (positions in its request order) are
    made: a prefix of a permutation drawn from the run's seed and the document, so that fewer
    requests are a subset of more, in request order."""
    order = list(range(n_requests))
    if made < n_requests:
        random.Random(f"requests:{seed}:{doc_id}").shuffle(order)
    return sorted(order[:made])


class RowSampler:
    """A logits processor that turns greedy decoding into top-p sampling at a temperature, each
    row from its own random stream.

    Gumbel-max: argmax_v (s_v + g_v), with g_v i.i.d. Gumbel(0, 1), is a draw from softmax(s). The
    scores are divided by the temperature and cut to the top-p nucleus (the smallest set of most
    likely tokens holding at least top_p of the mass, as Hugging Face's TopPLogitsWarper keeps),
    then each row adds noise from its own generator. A request's sample therefore depends on its
    seed, not on which requests share its batch or on the batch size. Rows keep their place for a
    whole `generate` call, which is what lets row i own generator i.
    """

    def __init__(self, seeds: List[int], temperature: float, top_p: float, candidates: int = 256):
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        # The nucleus is looked for among the most likely `candidates` tokens (a partial sort: on a
        # CPU, sorting all 49k scores of every row at every step was a visible part of generation);
        # a row whose candidates hold less than top_p of the mass falls back to the full sort.
        self.candidates = candidates
        self._uniform: Optional[torch.Tensor] = None  # [B, V] float64, refilled at every step

    def _nucleus(self, scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """(each row's k largest scores [B, k], descending, and their token ids [B, k]; which of them
        lie outside the row's nucleus [B, k]; whether the k hold top_p of every row's mass, i.e. the
        nucleus of each row is among them)."""
        top, order = scores.topk(k, dim=-1)  # descending
        p = (top - scores.logsumexp(dim=-1, keepdim=True)).exp()
        before = p.cumsum(dim=-1) - p  # the mass of the more likely tokens
        return top, order, before >= self.top_p, bool(((before[:, -1] + p[:, -1]) >= self.top_p).all())

    def _uniforms(self, vocab: int) -> torch.Tensor:
        """[B, V] float64: each row's next V uniforms from its own generator. The whole row is drawn
        even where only the nucleus is used: the streams must advance by V per step, as they did
        when the noise of every token was used, so that each request's sample stays what it was."""
        if self._uniform is None or self._uniform.shape[1] != vocab:
            self._uniform = torch.empty(len(self.gens), vocab, dtype=torch.float64)
        for row, g in zip(self._uniform, self.gens):
            torch.rand(vocab, generator=g, dtype=torch.float64, out=row)
        return self._uniform

    @staticmethod
    def _gumbel(u: torch.Tensor) -> torch.Tensor:
        return -torch.log(-torch.log(u.clamp(1e-300, 1 - 1e-16)))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        u = self._uniforms(scores.shape[-1])
        if self.top_p < 1.0:
            top, order, outside, covered = self._nucleus(scores, min(self.candidates, scores.shape[-1]))
            if not covered:
                top, order, outside, _ = self._nucleus(scores, scores.shape[-1])
            # The noise is needed inside the nucleus only (k tokens a row, not V: at B=48 rows of
            # SmolLM2's 49k, the full rows were most of a step's sampling time). Each kept token
            # gets scores[v] + float32(gumbel(u[v])), as when every token had noise; the rest -inf.
            noise = self._gumbel(u.gather(-1, order.cpu())).to(device=scores.device, dtype=scores.dtype)
            kept = (top + noise).masked_fill(outside, float("-inf"))
            return torch.full_like(scores, float("-inf")).scatter_(-1, order, kept)
        return scores + self._gumbel(u).to(device=scores.device, dtype=scores.dtype)


def _generate_hf(model, tokenizer, prompts: Sequence[Sequence[int]], cfg, seeds: List[int], progress=None,
                 share_prompts: bool = True) -> Iterator[str]:
    """Batched top-p sampling with Hugging Face generate (left padding), request i drawn from seeds[i].
    Yields the outputs in request order, each batch's as soon as it is generated.

    share_prompts: each distinct prompt's keys and values are computed once and reused by every
    request of it (see models.prompt_cache); False runs every row's prompt in the batched prefill (the
    oracle of the tests). On the demo corpus the prefill of 144 prompts of ~300 tokens was ~50 s
    of a 2-core CPU's ~160 s of generation."""
    from transformers import LogitsProcessorList

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = next(model.parameters()).device
    kv: Dict[Tuple[int, ...], list] = {}
    reusable = kv_reuse_limit(model)  # the most prompt tokens whose keys may be reused (a sliding window's)
    # a model that lets left padding in (RWKV ignores the mask) would write each row's text after its
    # batch-mates': it batches prompts of one length only
    for i, end in row_batches([len(p) for p in prompts], cfg.gen_batch_size, left_padding_ok(model)):
        batch = prompts[i:end]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, p in enumerate(batch):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        sampler = RowSampler(seeds[i:end], cfg.temperature, cfg.top_p)
        cached = {}
        if share_prompts and min(len(p) for p in batch) > 1 and width - 1 <= reusable:
            cached[cache_kwarg(model)] = prompt_cache(model, batch, width, kv, cfg.max_new_tokens)
            kv = {p: kv[p] for p in map(tuple, batch)}  # a prompt may go on into the next batch; older ones go
        with torch.no_grad():
            # greedy over the sampler's perturbed scores is sampling (see RowSampler)
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                 logits_processor=LogitsProcessorList([sampler]), max_new_tokens=cfg.max_new_tokens,
                                 pad_token_id=pad, **cached)
        if progress is not None:
            progress.update(len(batch))
        for j in range(len(batch)):
            yield tokenizer.decode(out[j, width:], skip_special_tokens=True).strip()


# Requests per llm.generate call in the vLLM process. Its texts come back, and each document whose
# requests are all answered is saved, call by call: a run stopped during generation keeps those
# documents, as with the HF generator. vLLM schedules at most 256 sequences at once by default, so
# calls this size cost it no throughput.
VLLM_REQUESTS_PER_CALL = 2048

# What the vLLM process runs (`python -c`; argv: the job's pipe, the texts' pipe, the parent's pid).
# Not multiprocessing's spawn, which imports the caller's main script again in the child: a script
# calling kmtrain.index without `if __name__ == "__main__":` would start a second index there.
_VLLM_CHILD = """\
import os, pickle, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the parent decides
if sys.platform == "linux":  # the parent's death, even by SIGKILL, ends this process: it holds the GPU
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[3]):  # the parent died before that
        sys.exit(1)
with os.fdopen(int(sys.argv[1]), "rb") as job_pipe:
    path, job = pickle.load(job_pipe)
sys.path[:] = path  # the parent's: vllm and kmtrain import from where they do there
from kmtrain.synth import _vllm_process
with os.fdopen(int(sys.argv[2]), "wb") as texts_pipe:
    _vllm_process(texts_pipe, **job)
"""


class GeneratorError(RuntimeError):
    """The vLLM generator's process failed, or ended before its work was done. ``str()`` is one line
    (the CLI prints it with how to resume); ``traceback`` is the process's own ("" where it died
    without one, its output then being above)."""

    def __init__(self, message: str, traceback: str = ""):
        super().__init__(message)
        self.traceback = traceback


def _generate_vllm(model_path: str, prompts: Sequence[Sequence[int]], cfg, seeds: List[int],
                   progress=None) -> Iterator[str]:
    """vLLM's texts for ``prompts`` (token ids), in order, as they come.

    ``model_path``: a local folder or Hub name vLLM can load (not an alias: index resolves those).
    vLLM runs in a child process of its own, which ends when generation does: its weights and KV
    cache are then gone for sure before the teacher cache and training need the memory (``del llm``
    in this process is reported to leave them held: vLLM issues #3281, #16543, #21073). The child is
    stopped when this generator is closed early (a stop, a failure while saving) or this process dies.
    """
    job = {"model_path": model_path, "seed": cfg.seed, "prompts": list(prompts), "seeds": list(seeds),
           "sampling": {"top_p": cfg.top_p, "temperature": cfg.temperature, "max_tokens": cfg.max_new_tokens},
           "per_call": VLLM_REQUESTS_PER_CALL, "trust_remote_code": cfg.trust_remote_code}
    job_read, job_write = os.pipe()
    texts_read, texts_write = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", _VLLM_CHILD, str(job_read), str(texts_write), str(os.getpid())],
                             pass_fds=(job_read, texts_write))
    os.close(job_read)
    os.close(texts_write)  # the child holds the only write end now: its exit ends our reads
    reader = os.fdopen(texts_read, "rb")
    done = 0
    try:
        try:
            with os.fdopen(job_write, "wb") as job_pipe:  # it reads the whole job before it starts
                pickle.dump((sys.path, job), job_pipe, protocol=pickle.HIGHEST_PROTOCOL)
        except BrokenPipeError:
            pass  # it ended before reading it: reported below, with its exit code
        while done < len(prompts):
            try:
                kind, payload = pickle.load(reader)
            except (EOFError, pickle.UnpicklingError):
                try:
                    code = child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    code = None
                raise GeneratorError(f"the vLLM generator's process ended (exit code {code}) after {done} of "
                                     f"{len(prompts)} requests; its output is above") from None
            if kind == "error":
                _end_process(child, grace=60)  # it ends after sending this
                last = payload.strip().splitlines()[-1]
                # vLLM's own advice would be gpu_memory_utilization or max_model_len, which kmtrain sets: from
                # the GPU memory left beside the trainer's model, and from the longest request
                short = any(s in last for s in ("OutOfMemoryError", "out of memory", "KV cache"))
                raise GeneratorError(f"vLLM generation failed after {done} of {len(prompts)} requests: {last}"
                                     + ("; lower --max-new-tokens or --chunk-tokens, or use --generator hf"
                                        if short else ""), traceback=payload)
            done += len(payload)
            if done == len(prompts):
                # Its work is done: it ends on its own before the last texts are handed on (a caller
                # that zips them with its requests never asks past the last one, so code after the
                # loop would not run, and `finally` would stop the process while it exits).
                _end_process(child, grace=120)
            if progress is not None:
                progress.update(len(payload))
            yield from payload
    finally:
        reader.close()
        _end_process(child, grace=0)


def _end_process(child: subprocess.Popen, grace: float) -> None:
    """Waits ``grace`` seconds for ``child`` to end, then stops it: SIGTERM, which the vLLM process
    unwinds from so that vLLM's exit handlers end its engine processes, and SIGKILL 30 s later."""
    try:
        child.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        child.terminate()
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _vllm_process(texts_pipe, model_path: str, seed: int, prompts: List[Sequence[int]], seeds: List[int],
                  sampling: dict, per_call: int, trust_remote_code: bool = False) -> None:
    """The vLLM process's work: load the model, answer ``prompts`` ``per_call`` at a time, and pickle
    each call's texts ("texts", [str]) or the traceback of what failed ("error", str) to ``texts_pipe``."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwind: see _end_process
    try:
        from vllm import LLM, SamplingParams

        # Positions the run needs, not the model's whole context: vLLM refuses to start when its KV cache
        # cannot hold one request of max_model_len, which defaults to the model's context (131072 at
        # Llama-3.1-8B: 16 GiB of KV), while beside the trainer's copy of the model it gets what is left.
        kw = {"max_model_len": max(len(p) for p in prompts) + sampling["max_tokens"]}
        if torch.cuda.is_available():
            # The trainer's copy of the model already sits on this GPU; vLLM's default claims 90% of
            # the whole GPU and refuses to start when that much is not free.
            free, total = torch.cuda.mem_get_info()
            kw["gpu_memory_utilization"] = round(0.9 * free / total, 3)
        llm = LLM(model=model_path, seed=seed, trust_remote_code=trust_remote_code, **kw)
        for start in range(0, len(prompts), per_call):
            part = range(start, min(start + per_call, len(prompts)))
            params = [SamplingParams(**sampling, seed=seeds[i]) for i in part]  # one seed per request
            res = llm.generate([{"prompt_token_ids": list(prompts[i])} for i in part], params)
            pickle.dump(("texts", [r.outputs[0].text.strip() for r in res]), texts_pipe)
            texts_pipe.flush()
    except Exception:
        pickle.dump(("error", traceback.format_exc()), texts_pipe)


def focus_sources(chunk: str, parts: int) -> List[str]:
    """What the generator reads for one chunk: the whole chunk, then up to `parts` runs of its paragraphs.

    Each run is a contiguous group of paragraphs (split at blank lines, balanced by length). A run
    that does not open the chunk is led by the chunk's first sentence, which names what the chunk
    is about, so a summary of "It was built in 1843" still says what "it" is. With parts=0, or a
    chunk of one paragraph, only the whole chunk.
    """
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", chunk) if p.strip()]
    parts = min(parts, len(paragraphs))
    if parts < 2:
        return [chunk]
    # a paragraph goes to the run its middle falls in: contiguous runs of about equal length
    total = sum(len(p) for p in paragraphs)
    runs: List[List[str]] = [[] for _ in range(parts)]
    done = 0
    for p in paragraphs:
        runs[min(parts - 1, int((done + len(p) / 2) * parts / total))].append(p)
        done += len(p)
    runs = [r for r in runs if r]
    lead = SENTENCE_END.split(paragraphs[0], maxsplit=1)[0]
    sources = [chunk]
    for r, run in enumerate(runs):
        text = "\n\n".join(run)
        sources.append(text if r == 0 else lead + "\n\n" + text)
    return sources


def synthesize(model, tokenizer, chunks_by_doc: Dict[str, List[str]], cfg, model_path: str = "",
               progress_factory=None, on_document: Optional[Callable[[str, dict], None]] = None,
               requests: Optional[Dict[str, int]] = None) -> Dict[str, dict]:
    """For each document: {"items": [{"chunk", "prompt", "target"}], "dropped", "requested", "qa_pairs",
    "of_requests"}: "requested" of its "of_requests" requests were made.

    ``on_document(doc_id, record)`` is called as soon as a document's last request is generated
    (the requests go in document order), so a caller can save it: a run killed during generation
    keeps every document finished before (index writes its synth.json there).

    Requests for all documents go through the generator together (one batch stream), each sampled
    from its own seed (`request_seed`), so a document's targets do not depend on its batch mates.
    Q/A outputs that do not parse are dropped and counted, never fatal. With cfg.focus_parts > 0
    the requests of each kind cycle over the whole chunk and its parts (`focus_sources`); the
    teacher still reads the whole chunk, so only what the targets talk about changes.
    ``requests``: how many of a document's requests to make (`requests_to_make`; default all), the
    ones `made_positions` names. A request made is sampled from its own seed as when all are made
    (the same text up to the rounding of its batch in bf16: 5 of 63 targets differed on one long text).
    """
    jobs: List[Tuple[str, int, str, Sequence[int], int]] = []
    of_requests: Dict[str, int] = {}
    for doc_id, chunks in chunks_by_doc.items():
        doc_jobs = []  # (chunk, kind, source, seed) of every request; prompts only for those made, below
        sources = [focus_sources(chunk, cfg.focus_parts) for chunk in chunks]
        for c in range(len(chunks)):
            for kind, n in requested_kinds(cfg):  # fact lists are off by default: no request is made for them
                doc_jobs += [(c, kind, i % len(sources[c]), request_seed(cfg.seed, doc_id, c, kind, i))
                             for i in range(n)]
        of_requests[doc_id] = len(doc_jobs)
        made = len(doc_jobs) if requests is None else requests.get(doc_id, len(doc_jobs))
        # A long document makes a few of its requests (requests_to_make): tokenizing every prompt took a
        # 48 MB text 122 s for the 29 it made. A prompt is tokenized once, for all requests that share it,
        # into an int32 array: every document's prompts exist at once, a chunk's worth of tokens per
        # prompt, which as lists of Python ints cost ~43 bytes a token (SmolLM2 tokenizer), 4 here.
        prompt_ids: Dict[Tuple[int, str, int], Sequence[int]] = {}
        for pos in made_positions(len(doc_jobs), made, cfg.seed, doc_id):
            c, kind, source, seed = doc_jobs[pos]
            if (c, kind, source) not in prompt_ids:
                prompt_ids[c, kind, source] = array("i", chat_prompt_ids(
                    tokenizer, sources[c][source] + "\n\n" + PROMPT_OF[kind]))
            jobs.append((doc_id, c, kind, prompt_ids[c, kind, source], seed))
    if not jobs:
        return {}
    bar = progress_factory(total=len(jobs), desc="synthetic targets") if progress_factory else None
    prompts, seeds = [j[3] for j in jobs], [j[4] for j in jobs]
    if cfg.generator == "vllm":
        texts = _generate_vllm(model_path, prompts, cfg, seeds, bar)
    else:
        texts = _generate_hf(model, tokenizer, prompts, cfg, seeds, bar)
    result = {d: {"items": [], "dropped": 0, "requested": 0, "qa_pairs": 0, "of_requests": of_requests[d]}
              for d in chunks_by_doc}
    left = Counter(j[0] for j in jobs)  # requests not yet generated, per document
    for (doc_id, c, kind, _, _), text in zip(jobs, texts):  # texts arrive batch by batch
        # A generation stopped by --max-new-tokens inside a character (several byte-level tokens
        # spell a rare one) decodes its last bytes as U+FFFD: not text to distil.
        text = text.rstrip("\ufffd").rstrip()
        r = result[doc_id]
        r["requested"] += 1
        if kind != "qa":  # a summary or a fact list is distilled as written
            if text:
                r["items"].append({"chunk": c, "prompt": PROMPT_OF[kind], "target": text})
            else:
                r["dropped"] += 1
        else:
            pairs = parse_qa(text)
            if pairs:  # every parsed pair becomes its own target, as in the reference
                r["items"] += [{"chunk": c, "prompt": QA_PROMPT, "target": qa_target(q, a), "question": q, "answer": a}
                               for q, a in pairs]
                r["qa_pairs"] += len(pairs)
            else:
                r["dropped"] += 1
        left[doc_id] -= 1
        if left[doc_id] == 0 and on_document is not None:
            on_document(doc_id, r)
    if bar is not None:
        bar.close()
    return result


def split_heldout(items: List[dict], per_chunk: int, seed: int) -> Tuple[List[dict], List[dict]]:
    """(training items, held-out items): ``per_chunk`` items of each chunk, drawn with ``seed``, are
    held out, but never a chunk's last one (every chunk keeps a training target). Item order is kept."""
    if per_chunk <= 0:
        return list(items), []
    rng = random.Random(seed)
    by_chunk: Dict[int, List[int]] = {}
    for i, it in enumerate(items):
        by_chunk.setdefault(it["chunk"], []).append(i)
    held = set()
    for c in sorted(by_chunk):
        idx = by_chunk[c]
        held.update(rng.sample(idx, min(per_chunk, len(idx) - 1)))
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]
