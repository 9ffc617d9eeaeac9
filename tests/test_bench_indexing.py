"""The throughput benchmark's work model counts what the decoder really multiplies."""
import torch

from bench.indexing import decoder_flops_per_token


def test_decoder_flops_are_two_per_linear_weight():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2)  # grouped-query attention: k, v narrower
    model = LlamaForCausalLM(cfg)
    weights = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert decoder_flops_per_token(cfg) == 2 * weights


def test_side_by_side_run_writes_its_report(tiny_model, docs_dir, tmp_path):
    """bench.indexing end to end as bench/gpu_session.sh runs it on a lent GPU: random weights at a
    named shape with a local tokenizer, both recipes in fresh processes, the report written. Its
    import of a renamed kmtrain helper once failed after both recipes had run, losing the timings.
    The tokenizer is a folder of a tokenizer alone, as `make gpu-carry` carries: the model folder
    check (887cbdd) refused it for want of a config.json, which would have failed the GPU stage."""
    import re

    from transformers import AutoTokenizer

    from bench.indexing import main

    carried = tmp_path / "carry" / "tokenizer"
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(carried)
    assert not (carried / "config.json").exists()
    out = tmp_path / "indexing.md"
    main(["--random-shape", "tiny", "--tokenizer", str(carried), "--corpus", str(docs_dir), "--steps", "2",
          "--work", str(tmp_path / "work" / "run"), "--out", str(out)])
    text = out.read_text()
    assert "random weights at tiny shapes" in text
    assert (tmp_path / "work" / "random-tiny" / "config.json").is_file()  # written once, beside the work folder
    speedup, loaded = map(float, re.search(r"Speed-up of the full recipe: ([0-9.]+)x\*\*; ([0-9.]+)x with the model "
                                           r"loaded", text).groups())
    assert speedup > 0 and loaded > 0
    # each run: its seconds, the load among them, documents/hour with and without the load
    runs = re.findall(r"^\| (full recipe|reference)[^|]*\| 3 \| 2 \| (\d+) \| (\d+) \| ([0-9.]+) \| ([0-9.]+) \|$",
                      text, flags=re.M)
    assert [r[0] for r in runs] == ["full recipe", "reference"]
    for _, secs, load, per_hour, per_hour_loaded in runs:
        # the load was timed (a rate without it is higher) and is part of the run's seconds
        assert int(load) <= int(secs) and 0 < float(per_hour) < float(per_hour_loaded)
    # one loss row per document, with and without the cache
    rows = re.findall(r"^\| (alpha|beta|gamma) \| ([0-9.]+) \| ([0-9.]+) \| ", text, flags=re.M)
    assert sorted(r[0] for r in rows) == ["alpha", "beta", "gamma"]
    for _, with_cache, without in rows:
        assert float(with_cache) > 0 and float(without) > 0
