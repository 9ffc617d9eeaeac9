"""bench.lora_experts: the experts' grouped LoRA in activation space, and in weight space with W + delta
made again in the backward or kept."""
import re

from bench.lora_experts import main


def test_report_shows_what_each_way_keeps_for_the_backward(tmp_path, capsys):
    out = tmp_path / "experts.md"
    main(["--experts", "4", "--hidden", "32", "--intermediate", "48", "--docs", "3", "--tokens", "5", "--rank", "4",
          "--out", str(out)])
    text = out.read_text()
    assert "4 experts, hidden 32, intermediate 48, top-2; 3 documents (slots) x 5 tokens; r=4" in text
    rows = re.finditer(r"^\| (activation space|weight space, W \+ delta (?:made again|kept))[^|]* \| ([\d.]+) \|",
                       text, re.M)
    kept = {m.group(1): float(m.group(2)) for m in rows}
    assert len(kept) == 3, text
    most = kept["weight space, W + delta kept"]
    # the activation-space path keeps activations, which grow with the tokens (test_lora checks it keeps
    # no weight-sized tensor); the weight-space one made again keeps its inputs alone
    assert kept["activation space"] > 0 and kept["weight space, W + delta made again"] < most / 4, kept
