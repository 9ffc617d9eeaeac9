"""bench.lora_experts: the experts' grouped LoRA with W + delta made again in the backward, and kept."""
import re

from bench.lora_experts import main


def test_report_shows_recompute_keeping_less_for_the_backward(tmp_path, capsys):
    out = tmp_path / "experts.md"
    main(["--experts", "4", "--hidden", "32", "--intermediate", "48", "--docs", "3", "--tokens", "5", "--rank", "4",
          "--out", str(out)])
    text = out.read_text()
    assert "4 experts, hidden 32, intermediate 48, top-2; 3 documents (slots) x 5 tokens; r=4" in text
    rows = re.finditer(r"^\| (made again|kept)[^|]* \| ([\d.]+) \|", text, re.M)
    kept = {m.group(1): float(m.group(2)) for m in rows}
    assert set(kept) == {"made again", "kept"} and kept["made again"] < kept["kept"] / 4, kept
