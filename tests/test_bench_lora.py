"""bench.lora --training-layer: the layer before and after the fused adds, timed and compared."""
import re

import torch

import kmkernels.lora as lora_mod
from bench.lora import main, training_layer_fns


def test_training_layer_variants_take_their_paths_and_agree(monkeypatch):
    calls, real_check = [], lora_mod.fuses_into_linear
    real_apply = lora_mod.SequenceLoRALinearFunction.apply
    monkeypatch.setattr(lora_mod.SequenceLoRALinearFunction, "apply", lambda *a: calls.append(1) or real_apply(*a))
    base_only, separate, fused, both = training_layer_fns(24, 40, seqs=6, tokens=5, slots=3, r=4)
    assert len(base_only()) == 1 and calls == []
    separate()
    assert calls == []
    fused()
    assert calls == [1]
    a, b = both()
    assert len(a) == len(b) == 4  # y, dx, dA, dB
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=1e-5, atol=1e-6)
    assert calls == [1, 1] and lora_mod.fuses_into_linear is real_check  # put back after each `separate`


def test_report_names_the_layout_and_each_projection(tmp_path):
    out = tmp_path / "lora.md"
    text = main(["--training-layer", "--quick", "--out", str(out)])
    assert out.read_text() == text
    row = re.search(r"^\| q 576->576 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (-?[\d.]+)% "
                    r"\| (yes|no \(max diff .*\)) \|$", text, re.M)
    assert row and all(float(row.group(i)) > 0 for i in (1, 2, 3))
    assert "layout: x [4, 16, in], 2 slots" in text and f"torch: {torch.__version__}" in text
