"""Deep Context Distillation loss: fused KL on the last hidden state plus layer-normalised L1.

    loss = kl_weight * KL(p_t || p_s) + hidden_weight * hidden_l1

with KL averaged over kept positions (summed over the vocabulary, no T^2 factor) and the L1 term
averaged over layers (see ``hidden_l1``). See SPEC.md section 1 for the exact semantics.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .fused_linear_kl import check_softcap, fused_linear_kl
from .hidden_l1 import _as_layer_list, hidden_l1
from .kl_from_stats import fused_linear_kl_from_stats


def dcd_loss(
    student_hiddens: Sequence[torch.Tensor],
    teacher_hiddens: Union[Sequence[torch.Tensor], torch.Tensor],
    lm_head_weight: torch.Tensor,
    *,
    kl_weight: float = 1.0,
    hidden_weight: float = 1.0,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    teacher_norms: Optional[torch.Tensor] = None,
    teacher_kl_stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    kl_teacher_hidden: Optional[torch.Tensor] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    softcap: Optional[float] = None,
    lm_head_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """DCD loss on the distillation positions.

    Args:
        student_hiddens: L tensors [..., H], the decoder layers' outputs of the student
            (Hugging Face ``output_hidden_states[1:]``); the last is post-norm and feeds the lm_head.
        teacher_hiddens: the teacher's, same shapes, as a sequence or one [L, ..., H] tensor.
        lm_head_weight: [V, H], shared by teacher and student (the KM case).
        kl_weight, hidden_weight: weights of the two terms (1.0 each by default).
        temperature: softmax temperature of the KL term.
        mask: bool, leading shape; False positions are ignored by both terms.
        teacher_norms: optional [L] precomputed per-layer sum|h_t| for the L1 term.
        teacher_kl_stats: optional (e_t fp32 [..., H], negent_t fp32 [...]) from ``teacher_kl_stats``
            on the teacher's last hidden state with this lm_head and temperature: the KL is then
            computed from them (``fused_linear_kl_from_stats``, no teacher logits; the lm_head must
            be frozen) and the teacher's last layer serves the L1 term only. Same loss.
        kl_teacher_hidden: optional [..., H], the teacher's last hidden state for the KL term where
            it differs from ``teacher_hiddens[-1]``: the states as computed, when ``teacher_hiddens``
            hold a cache's rounding of them (the L1 term then sees the rounding, the KL does not).
        backend: 'auto' | 'triton' | 'torch'.
        softcap: the model's soft cap c on its logits (c * tanh(z / c), Gemma 2's
            ``final_logit_softcapping``), applied to both logit sets before the temperature; None
            (default) for none. Not with ``teacher_kl_stats``: they stand for the teacher only where
            the logits are linear in the hidden state.
        lm_head_bias: [V], the lm_head's bias where it has one (Phi-1/1.5/2), shared like the weight;
            None (default) for none. With ``teacher_kl_stats`` they must be computed with it too.
    Returns:
        (loss, {"kl": kl, "hidden": hidden}), all fp32 scalars; the dict entries are detached.
    """
    hs = _as_layer_list(student_hiddens, "student_hiddens")
    ht = _as_layer_list(teacher_hiddens, "teacher_hiddens")
    if len(hs) != len(ht):
        raise ValueError(f"layer counts differ: {len(hs)} student_hiddens vs {len(ht)} teacher_hiddens")
    if len(hs) == 0:
        raise ValueError("student_hiddens is empty: need at least one layer")
    if teacher_kl_stats is not None and kl_teacher_hidden is not None:
        raise ValueError("teacher_kl_stats and kl_teacher_hidden both give the KL's teacher: pass one")
    softcap = check_softcap(softcap)
    if softcap is not None and teacher_kl_stats is not None and kl_weight != 0:
        raise ValueError("softcap with teacher_kl_stats: the statistics stand for the teacher's distribution only "
                         "where the logits are linear in the hidden state, and a soft cap is not; pass the "
                         "teacher's last hidden state (kl_teacher_hidden, or teacher_hiddens[-1]) instead")
    zero = hs[-1].new_zeros((), dtype=torch.float32)
    kl = zero
    if kl_weight != 0 and teacher_kl_stats is not None:
        kl = fused_linear_kl_from_stats(hs[-1], lm_head_weight, *teacher_kl_stats, temperature=temperature, mask=mask,
                                        reduction="mean", backend=backend, chunk_size=chunk_size, bias=lm_head_bias)
    elif kl_weight != 0:
        teacher_last = ht[-1] if kl_teacher_hidden is None else kl_teacher_hidden
        kl = fused_linear_kl(hs[-1], lm_head_weight, teacher_last, None, temperature=temperature, mask=mask,
                             reduction="mean", backend=backend, chunk_size=chunk_size, softcap=softcap,
                             student_bias=lm_head_bias)
    hid = zero
    if hidden_weight != 0:
        hid = hidden_l1(hs, ht, mask=mask, teacher_norms=teacher_norms, backend=backend)
    loss = kl_weight * kl + hidden_weight * hid
    return loss, {"kl": kl.detach(), "hidden": hid.detach()}


class DCDLoss(nn.Module):
    """Module form of :func:`dcd_loss`.

    ``forward(student_hiddens, teacher_hiddens, lm_head_weight, mask=None, teacher_norms=None,
    teacher_kl_stats=None, kl_teacher_hidden=None, lm_head_bias=None)``
    returns ``(loss, {"kl", "hidden"})``.
    """

    def __init__(self, kl_weight: float = 1.0, hidden_weight: float = 1.0, temperature: float = 1.0,
                 backend: str = "auto", chunk_size: Optional[int] = None, softcap: Optional[float] = None):
        super().__init__()
        self.kl_weight, self.hidden_weight, self.temperature = kl_weight, hidden_weight, temperature
        self.backend, self.chunk_size, self.softcap = backend, chunk_size, check_softcap(softcap)

    def forward(self, student_hiddens, teacher_hiddens, lm_head_weight, mask=None, teacher_norms=None,
                teacher_kl_stats=None, kl_teacher_hidden=None, lm_head_bias=None):
        return dcd_loss(student_hiddens, teacher_hiddens, lm_head_weight, kl_weight=self.kl_weight,
                        hidden_weight=self.hidden_weight, temperature=self.temperature, mask=mask,
                        teacher_norms=teacher_norms, teacher_kl_stats=teacher_kl_stats,
                        kl_teacher_hidden=kl_teacher_hidden, backend=self.backend, chunk_size=self.chunk_size,
                        softcap=self.softcap, lm_head_bias=lm_head_bias)
