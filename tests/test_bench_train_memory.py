"""bench.train_memory: a training step of kmtrain's own, at the asked shape, per --micro-batch-tokens
(the step's arithmetic is tested in test_train)."""
import pytest

from bench.train_memory import measure


@pytest.mark.parametrize("micro, passes", [(0, 1), (40, 2), (20, 6)])
def test_measure_runs_the_step_in_the_asked_passes(tiny_model, micro, passes):
    """2 documents x 3 examples of 12 distilled tokens (13 with the prompt token): one pass; passes of
    at most 40 tokens, 3 sequences each; of 20, one each."""
    r = measure(tiny_model, docs=2, examples=3, tokens=12, micro=micro, steps=1)
    assert r["passes"] == passes and r["step_s"] > 0, r
