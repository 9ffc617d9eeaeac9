"""What the teacher-cache options cost: bytes per target token, and how far the DCD loss (and its
gradient) computed from the cache moves from the loss computed from fp32 teacher states.

For each document of a finished sdcd run (its examples are rebuilt from OUT/.work), the student is
the base model with the document's KM; the teacher states are computed fresh in fp32 and then
stored as fp32, bf16, fp8 (a scale per example and layer, as the cache stores it), and bf16 and
fp8 with every 4th layer only. The loss is computed as training computes it: the KL from the fp32
statistics of the teacher's last layer as computed (teacher_cache.build_cache), the L1 term from
the stored states. The last two columns give what the KL and the gradient moved by when the
statistics came from the stored (rounded) last layer, as before d7cffcb.

    python -m bench.cache_quality --run runs/demo [--out bench/results/cache_quality_cpu.md]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.common import env_block, environment, km_records, markdown_table, write_report
from kmkernels import attach_grouped_lora, dcd_loss, load_peft, set_adapter_ids, teacher_kl_stats
from kmtrain.config import IndexConfig
from kmtrain.index import stored_chunk_ids
from kmtrain.models import decoder_hidden_states, load_model
from kmtrain.teacher_cache import DTYPE_BYTES, _pad, build_examples, teacher_hiddens
from kmtrain.train import round_like_cache


COLUMNS = ["cache", "bytes per target token", "KL rel. diff", "hidden rel. diff", "dLoss/dh_last rel. diff",
           "KL rel. diff, statistics from the stored layer (before d7cffcb)", "dLoss/dh_last rel. diff, the same"]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo", help="output folder of a finished sdcd index run")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    env = environment()
    run = Path(a.run)
    records = km_records(run)
    if not records:
        ap.error(f"--run {run} holds no KM (no <id>/km.json): give the output folder of a finished sdcd index run")
    doc_ids = list(records)[: a.docs]
    # the run's own base and LoRA shape (this loaded SmolLM2 at r=16 whatever the run trained)
    km = records[doc_ids[0]]
    model, tok, _, _ = load_model(km["base_model_path"])
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    attach_grouped_lora(model, 1, rank=km["rank"], alpha=km["alpha"])
    cfg = IndexConfig()
    every4 = sorted(set(range(3, L, 4)) | {L - 1})
    variants = {"fp32": ("fp32", list(range(L))), "bf16 (default)": ("bf16", list(range(L))),
                "fp8 e4m3": ("fp8", list(range(L))), "bf16, every 4th layer": ("bf16", every4),
                "fp8, every 4th layer": ("fp8", every4)}
    acc = {k: {"dkl": [], "dhid": [], "dgrad": [], "dkl_old": [], "dgrad_old": [], "bytes_per_tok": 0.0}
           for k in variants}
    lm_head = model.get_output_embeddings().weight
    for doc_id in doc_ids:
        load_peft(model, 0, run / doc_id)
        chunks = json.loads((run / ".work" / doc_id / "chunks.json").read_text())
        items = json.loads((run / ".work" / doc_id / "synth.json").read_text())["items"]
        examples = build_examples("sdcd", tok, chunks["texts"], stored_chunk_ids(chunks), items, cfg, 0)[:4]
        per_example = teacher_hiddens(model, examples, list(range(L)), tok.pad_token_id,
                                      lambda b: set_adapter_ids(model, torch.full((b,), -1)))
        ht32 = torch.cat(per_example, dim=1)
        ids, mask = _pad([e.student_ids for e in examples], tok.pad_token_id)
        set_adapter_ids(model, torch.zeros(len(examples), dtype=torch.long))
        hidden = decoder_hidden_states(model, ids, mask)
        T = ids.shape[1]
        pos = torch.cat([b * T + torch.arange(e.s_start, e.s_start + e.n) for b, e in enumerate(examples)])
        hs_all = [h.reshape(-1, h.shape[-1])[pos] for h in hidden]
        ref = {}
        exact_stats = teacher_kl_stats(ht32[-1], lm_head)  # what every cache now stores, whatever its dtype
        for name, (dt, layers) in variants.items():
            # rounded as the cache stores them: each example on its own (fp8: a scale per example and layer)
            ht = torch.cat([round_like_cache(h[layers], dt) for h in per_example], dim=1).float()
            got = {}
            for how, stats in (("now", exact_stats), ("old", teacher_kl_stats(ht[-1], lm_head))):
                hs = [hs_all[l].detach().requires_grad_() for l in layers]
                # the L1 term over the stored layers only; norms from the fp32 values, as the cache stores them
                loss, parts = dcd_loss(hs, ht, lm_head, teacher_norms=ht32[layers].abs().sum(dim=(1, 2)),
                                       teacher_kl_stats=stats)
                (g,) = torch.autograd.grad(loss, [hs[-1]])
                got[how] = {"kl": parts["kl"], "hidden": parts["hidden"], "g": g}
            if name == "fp32":
                ref = got["now"]
            acc[name]["dkl"].append(float((got["now"]["kl"] - ref["kl"]).abs() / ref["kl"]))
            acc[name]["dhid"].append(float((got["now"]["hidden"] - ref["hidden"]).abs() / ref["hidden"]))
            acc[name]["dgrad"].append(float((got["now"]["g"] - ref["g"]).norm() / ref["g"].norm()))
            acc[name]["dkl_old"].append(float((got["old"]["kl"] - ref["kl"]).abs() / ref["kl"]))
            acc[name]["dgrad_old"].append(float((got["old"]["g"] - ref["g"]).norm() / ref["g"].norm()))
            # the stored layers, the fp8 scales aside (one fp32 per example and layer), and the KL's statistics
            # (e_t [H] and negent_t, fp32) that every cache holds
            acc[name]["bytes_per_tok"] = len(layers) * ht32.shape[-1] * DTYPE_BYTES[dt] + (ht32.shape[-1] + 1) * 4
    rows = []
    for name, r in acc.items():
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        rows.append([name, f"{r['bytes_per_tok'] / 1024:.1f} KiB", f"{mean(r['dkl']):.2e}", f"{mean(r['dhid']):.2e}",
                     f"{mean(r['dgrad']):.2e}", f"{mean(r['dkl_old']):.2e}", f"{mean(r['dgrad_old']):.2e}"])
    text = (f"# Teacher cache options: size and loss fidelity ({km['base_model']}, {L} layers, H={H})\n\n"
            f"{env_block(env)}\n"
            f"- {len(doc_ids)} documents of `{a.run}`, 4 sdcd examples each; student = base + the document's KM\n"
            f"- relative differences against the loss computed from fp32 teacher states (mean over documents);\n"
            f"  the layer subset changes the hidden term's definition (an average over fewer layers), so its\n"
            f"  hidden-term difference measures that change, not rounding\n"
            f"- bytes per target token: the stored layers and the KL's fp32 statistics (H + 1 values)\n\n"
            f"{markdown_table(COLUMNS, rows)}\n")
    write_report(text, a.out)


if __name__ == "__main__":
    main()
