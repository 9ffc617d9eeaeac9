"""bench.huge_document: the document it makes, and one small run of it end to end."""
import re

from bench.huge_document import long_text, main


def test_the_long_text_is_the_same_every_time_and_of_the_length_asked():
    text = long_text(50_000)
    assert len(text) == 50_000 and text == long_text(50_000) and text != long_text(50_000, seed=1)
    assert re.search(r"[\u4e00-\u9fff]{8,}。", text) and "def step_" in text and ". " in text  # the three kinds
    assert len(long_text(123_457)) == 123_457


def test_a_small_run_reports_both_runs_of_each_tree(tiny_model, tmp_path):
    """Two `kmtrain index` processes (a first run, then a re-run that reads chunks.json and
    synth.json back): each row has its seconds and peak memory, and both train the same KM."""
    out = tmp_path / "report.md"
    report = main(["--chars", "20000", "--tokenizer", str(tiny_model), "--work", str(tmp_path / "work"),
                   "--out", str(out)])
    assert out.read_text() == report and "- document: 20,000 characters" in report
    rows = re.findall(r"^\| (\S+(?: \+ changes)?) \| (first run|re-run[^|]*) \| (\d+) \| ([0-9.]+) \| `([^`]*)` \|$",
                      report, flags=re.M)
    assert [r[1] for r in rows] == ["first run", "re-run, stages read back (--retrain)"]
    for _, _, seconds, peak, summary in rows:
        assert int(seconds) >= 0 and 0.1 < float(peak) < 64
        assert re.match(r"huge: \d+ (of \d+ )?examples.* loss=[0-9.]+ ", summary), summary
    assert rows[0][4] == rows[1][4]  # the stages read back give the same training


def test_the_llama2_style_tokenizer_marks_every_start_and_gets_its_own_model(tmp_path):
    """--tokenizer llama2-style: a tokenizer built as Llama 2's (a "▁" prepended to every text, no
    pre-tokenizer) that gives the text back, and a random model folder of its own, named for the
    tokenizer (one folder for all was read with the first run's tokenizer)."""
    from transformers import AutoTokenizer

    from bench.huge_document import llama2_style_tokenizer

    text = long_text(60_000)
    tok = llama2_style_tokenizer(text, 2000)
    assert tok.backend_tokenizer.normalizer.normalize_str(" b") == "▁▁b" and tok.backend_tokenizer.pre_tokenizer is None
    sample = text[1000:6000]
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == sample
    assert len(ids) < len(sample) / 2  # merges learned: not one token a character
    report = main(["--chars", "20000", "--tokenizer", "llama2-style", "--work", str(tmp_path / "work")])
    model, = (tmp_path / "work").glob("random-tiny-llama2-style-20000-*")
    assert AutoTokenizer.from_pretrained(model).backend_tokenizer.normalizer.normalize_str(" b") == "▁▁b"
    summaries = re.findall(r"`(huge: [^`]*)`", report)
    assert len(summaries) == 2 and summaries[0] == summaries[1], report
