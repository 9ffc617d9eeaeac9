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
    rows = {line.split("|")[1].strip(): line.split("|")[2:6] for line in text.splitlines() if line.startswith("| ")}
    assert [float(x) for x in rows["fp32"][1:]] == [0.0] * 3  # the reference
    bf16_kl = float(rows["bf16 (default)"][1])
    assert 0 < bf16_kl < 5e-2  # bf16-rounded teacher states: a KL off by rounding, not by a wrong model
    assert rows["fp32"][0].strip() == f"{2 * 32 * 4 / 1024:.1f} KiB"  # 2 layers x H=32 x 4 bytes

    with pytest.raises(SystemExit):
        cache_quality.main(["--run", str(tmp_path / "no-run")])
    assert "holds no KM" in capsys.readouterr().err
