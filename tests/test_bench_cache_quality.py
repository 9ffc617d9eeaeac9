"""bench.cache_quality: it measures the run it is given, on that run's base model and LoRA shape."""
import pytest

from conftest import tiny_cfg
from kmtrain import index


def test_measures_a_run_on_its_own_base_and_rank(tiny_model, docs_dir, tmp_path, capsys):
    """An sdcd run on the tiny Llama at rank 4: the bench loads that model and rank from the run's
    km.json (it loaded SmolLM2 at r=16 whatever the run was, and the KMs did not fit); its rows
    compare bf16 teacher states with the fp32 ones of the same model."""
    import bench.cache_quality as cache_quality

    out = tmp_path / "kms"
    index(str(docs_dir), tiny_cfg(tiny_model, out))
    report = tmp_path / "report.md"
    cache_quality.main(["--run", str(out), "--docs", "1", "--out", str(report)])
    text = report.read_text()
    head = text.splitlines()[0]
    assert "SmolLM2" not in head and ", 2 layers, H=" in head  # the tiny model's depth
    rows = {line.split("|")[1].strip(): line.split("|")[2:8] for line in text.splitlines() if line.startswith("| ")}
    assert [float(x) for x in rows["fp32"][1:]] == [0.0] * 5  # the reference
    kl, hidden, grad, kl_old, grad_old = (float(x) for x in rows["bf16 (default)"][1:])
    assert kl == 0.0  # the KL's statistics come from the unrounded layer: the cache dtype does not touch it
    assert 0 < hidden < 5e-2 and 0 < grad  # the L1 term sees the rounding
    assert 0 < kl_old < 5e-2 and grad_old > 0  # from the rounded layer, a KL off by rounding, not by a wrong model
    # 2 layers x H=32 x 4 bytes, and the KL statistics e_t [32] and negent_t in fp32
    assert rows["fp32"][0].strip() == f"{(2 * 32 * 4 + 33 * 4) / 1024:.1f} KiB"

    with pytest.raises(SystemExit):
        cache_quality.main(["--run", str(tmp_path / "no-run")])
    assert "holds no KM" in capsys.readouterr().err
