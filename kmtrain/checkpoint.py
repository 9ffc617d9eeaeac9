"""A wave's training state on disk, so that a run killed during training resumes where it was.

One safetensors file per wave: the wave's slots of every LoRA weight and AdamW moment, each selecting
slot's best held-out weights, and in the header the rest as JSON (the optimizer's groups, the
schedule, each document's data order, losses and held-out record) with a sha256 over tensors and
JSON, checked before a resume (torch.load of a pickle with one changed byte inside a tensor loads it
without a word, and a resume would train on other weights). Restored, training goes on to the
weights of a run that was never stopped, bit for bit (tests/test_train.py).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
from safetensors import safe_open

from .data import atomic_save_tensors
from .teacher_cache import tensors_sha256

if TYPE_CHECKING:
    from .train import DocState


@dataclass
class TrainingCheckpoint:
    """Where a wave's training state is saved, every ``every_s`` seconds of training (0: never), and
    resumed from. ``key`` stands for everything the training's numbers depend on (the caller hashes
    the model, the settings and each document's examples); a file of another key is never resumed."""
    path: Path
    key: str
    every_s: float


def _checkpoint_sha256(tensors: Dict[str, torch.Tensor], state_json: str) -> str:
    return hashlib.sha256((tensors_sha256(tensors) + state_json).encode()).hexdigest()


def save_checkpoint(ck: TrainingCheckpoint, step: int, wave: List[DocState], params: List[torch.Tensor], opt, sched,
                    best: Dict[int, Tuple[float, List[torch.Tensor]]]) -> None:
    """The state after ``step`` steps, written atomically (a kill mid-write leaves the checkpoint
    before). Only the wave's slots are kept: a resumed run whose earlier waves are done may attach
    fewer slots."""
    n = len(wave)
    on_cpu = lambda t: (t[:n] if t.dim() else t).detach().to("cpu", copy=True).contiguous()  # noqa: E731
    opt_state = opt.state_dict()
    tensors = {f"param.{k}": on_cpu(p) for k, p in enumerate(params)}
    for i, st in opt_state["state"].items():  # AdamW's: step, exp_avg, exp_avg_sq
        tensors.update({f"optimizer.{i}.{name}": on_cpu(v) for name, v in st.items()})
    for slot, (_, weights) in best.items():
        tensors.update({f"best.{slot}.{k}": w.contiguous() for k, w in enumerate(weights)})
    state = json.dumps({"key": ck.key, "step": step, "ids": [d.id for d in wave],
                        "param_groups": opt_state["param_groups"], "schedule": sched.state_dict(),
                        "docs": [{"rng": d._rng.getstate(), "order": d._order, "losses": d.losses,
                                  "heldout_curve": d.heldout_curve, "best_step": d.best_step} for d in wave],
                        "best_loss": {str(slot): loss for slot, (loss, _) in best.items()}})
    meta = {"state": state, "sha256": _checkpoint_sha256(tensors, state)}
    atomic_save_tensors(ck.path, tensors, meta)


def _read_checkpoint(ck: TrainingCheckpoint, wave: List[DocState], params: List[torch.Tensor], steps: int
                     ) -> Tuple[Optional[dict], Dict[str, torch.Tensor], Optional[str]]:
    """(state, tensors, None), or (None, {}, why the file at ck.path cannot be resumed from)."""
    try:
        with safe_open(str(ck.path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a truncated or damaged file
        return None, {}, f"unreadable ({type(e).__name__}: {e})"
    text = meta.get("state", "")
    if meta.get("sha256") != _checkpoint_sha256(tensors, text):
        return None, {}, "its content does not match the sha256 recorded when it was saved (the file changed)"
    state = json.loads(text)
    if state.get("key") != ck.key:
        return None, {}, "not this wave's checkpoint (other documents or settings)"
    if state.get("ids") != [d.id for d in wave]:
        return None, {}, f"holds documents {state.get('ids')}, not this wave's {[d.id for d in wave]}"
    if not 0 < state.get("step", 0) <= steps:  # at ``steps``: saved by a stop in the last step
        return None, {}, f"its step {state.get('step')!r} is not between 1 and {steps}"
    if [tuple(tensors[f"param.{k}"].shape) if f"param.{k}" in tensors else None for k in range(len(params))] != [
            (len(wave), *p.shape[1:]) for p in params]:
        return None, {}, "its LoRA weights do not have this model's shapes"
    return state, tensors, None


def load_checkpoint(ck: TrainingCheckpoint, wave: List[DocState], params: List[torch.Tensor], opt, sched,
                    best: Dict[int, Tuple[float, List[torch.Tensor]]], steps: int) -> int:
    """Restores the state saved at ``ck.path`` and returns its step; 0 (nothing restored) when there is
    no checkpoint, or when it is damaged or not this wave's, which is then said and deleted."""
    if not ck.path.is_file():
        return 0
    state, tensors, problem = _read_checkpoint(ck, wave, params, steps)
    if problem is not None:
        print(f"{ck.path}: {problem}; training this wave from step 0", flush=True)
        ck.path.unlink(missing_ok=True)
        return 0
    n = len(wave)

    def full(saved: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """[n, ...] saved slots in a tensor of ``like``'s shape; the slots beyond the wave are 0, as a
        run that trained only the wave's slots leaves their AdamW moments."""
        out = torch.zeros_like(like)
        out[:n].copy_(saved)
        return out

    with torch.no_grad():
        for k, p in enumerate(params):
            p[:n].copy_(tensors[f"param.{k}"])
    opt_params = [p for group in opt.param_groups for p in group["params"]]  # the state_dict's indices
    opt_state: Dict[int, Dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("optimizer."):
            _, i, what = name.split(".")
            opt_state.setdefault(int(i), {})[what] = full(t, opt_params[int(i)]) if t.dim() else t
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["param_groups"]]
    opt.load_state_dict({"state": opt_state, "param_groups": groups})
    sched.load_state_dict(state["schedule"])
    for doc, saved in zip(wave, state["docs"]):
        version, internal, gauss = saved["rng"]
        doc._rng = random.Random()
        doc._rng.setstate((version, tuple(internal), gauss))
        doc._order, doc.losses = saved["order"], saved["losses"]
        doc.heldout_curve, doc.best_step = saved["heldout_curve"], saved["best_step"]
    for slot, loss in state["best_loss"].items():
        best[int(slot)] = (loss, [tensors[f"best.{slot}.{k}"] for k in range(len(params))])
    return state["step"]
