"""Float64 references that materialise everything. The oracle for every loss test."""
from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; exact-zero reference demands an exact-zero result."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all(), "result has NaN/inf"
    nb = b.norm()
    if nb == 0:
        return float(a.norm())
    return float((a - b).norm() / nb)


def random_mask(kind: str, lead_shape) -> "torch.Tensor | None":
    """A test's row mask: None for "none", a random one with its first row kept for "partial",
    all rows dropped for "all_false"."""
    if kind == "none":
        return None
    if kind == "partial":
        mask = torch.rand(lead_shape) > 0.4
        mask.view(-1)[0] = True
        return mask
    if kind == "all_false":
        return torch.zeros(lead_shape, dtype=torch.bool)
    raise ValueError(f"unknown mask kind {kind!r}")


def kl_ref(s_logits, t_logits, temperature=1.0, mask=None, reduction="mean"):
    """KL(softmax(t/T) || softmax(s/T)) per position, float64."""
    s = s_logits.double() / temperature
    t = t_logits.double() / temperature
    lps, lpt = s.log_softmax(-1), t.log_softmax(-1)
    pt = lpt.exp()
    per = torch.where(pt > 0, pt * (lpt - lps), torch.zeros((), dtype=torch.float64)).sum(-1)  # 0 log 0 = 0
    if mask is not None:
        per = per * mask.double()
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    n = int(mask.sum()) if mask is not None else per.numel()
    return per.sum() / max(n, 1)


def softcap_ref(z, softcap=None):
    """c * tanh(z / c) (Gemma 2's cap on its logits), or z without a cap."""
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def linear_kl_ref(hs, ws, ht, wt=None, temperature=1.0, mask=None, reduction="mean", softcap=None, bs=None, bt=None):
    """KL of the logits cap(h W^T + b) / T; ``wt`` None shares the student's head and bias (the
    teacher's side gets no gradient)."""
    if wt is None:
        wt, bt = ws.detach(), None if bs is None else bs.detach()
    zs, zt = hs.double() @ ws.double().T, ht.double() @ wt.double().T
    zs = zs if bs is None else zs + bs.double()
    zt = zt if bt is None else zt + bt.double()
    return kl_ref(softcap_ref(zs, softcap), softcap_ref(zt, softcap), temperature, mask, reduction)


def hidden_l1_ref(hs_list, ht_list, mask=None):
    terms = []
    for s, t in zip(hs_list, ht_list):
        s, t = s.double(), t.double()
        d, z = (s - t).abs(), t.abs()
        if mask is not None:
            m = mask.double()[..., None]
            d, z = d * m, z * m
        z = z.sum()
        terms.append(d.sum() / z if z > 0 else d.sum() * 0)
    return torch.stack(terms).mean()


def dcd_ref(hs_list, ht_list, w, kl_weight=1.0, hidden_weight=1.0, temperature=1.0, mask=None, softcap=None,
            bias=None):
    kl = linear_kl_ref(hs_list[-1], w, ht_list[-1], None, temperature, mask, "mean", softcap, bias)
    hid = hidden_l1_ref(hs_list, ht_list, mask)
    return kl_weight * kl + hidden_weight * hid
