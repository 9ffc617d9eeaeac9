"""bench.step_profile: sorting profiled ops into kinds, and the profiler advanced once per step."""
import importlib
import random

from bench.step_profile import KINDS, _ProfiledBar, breakdown, op_kind, profiled_training

# SmolLM2-135M: hidden 576, MLP 1536, k/v 192, vocab 49152, head dim 64; LoRA rank 16
FEATURES = [192, 576, 1536]


def test_op_kinds_of_a_smollm2_step():
    kind = lambda name, *shapes: op_kind(name, [list(s) for s in shapes], 49152, 16, FEATURES)  # noqa: E731
    assert kind("aten::mm", (1660, 576), (576, 1536)) == "decoder projections (mm)"
    assert kind("aten::mm", (258, 49152), (49152, 576)) == "LM head, the fused KL's (mm)"
    assert kind("aten::mm", (258, 576), (576, 49152), (258, 49152)) == "LM head, the fused KL's (mm)"
    assert kind("aten::bmm", (13, 166, 16), (13, 16, 1536)) == "LoRA (bmm, rank r)"  # B
    assert kind("aten::bmm", (13, 166, 576), (13, 576, 16)) == "LoRA (bmm, rank r)"  # A
    assert kind("aten::bmm", (13, 16, 166), (13, 166, 1536)) == "LoRA (bmm, rank r)"  # B's gradient
    assert kind("aten::bmm", (39, 498, 64), (39, 64, 166)) == "attention"
    # 16 query rows of a sequence against its keys: the rank's size, but no projection's
    assert kind("aten::bmm", (30, 16, 64), (30, 64, 16)) == "attention"
    assert kind("aten::baddbmm", (39, 498, 166), (39, 498, 64), (39, 64, 166)) == "attention"
    assert kind("aten::_softmax", (39, 498, 166)) == "attention"
    # an fp32 step's attention: PyTorch's fused CPU kernels, forward and backward
    q = (10, 9, 166, 64)
    assert kind("aten::_scaled_dot_product_flash_attention_for_cpu", q, q, q) == "attention"
    assert kind("aten::_scaled_dot_product_flash_attention_for_cpu_backward", q, q, q, q, q) == "attention"
    assert kind("aten::add", (13, 166, 1536), (13, 166, 1536)) == "other ops"
    assert kind("ProfilerStep#7") == "Python and dispatch between ops"


class _Event:
    def __init__(self, key, shapes, us, count):
        self.key, self.input_shapes, self.self_cpu_time_total, self.count = key, shapes, us, count


def test_breakdown_sums_each_kind_and_rates_the_projection_gemms():
    rng = random.Random()
    m, us, n = rng.randint(100, 3000), rng.randint(1000, 9000), rng.randint(1, 60)
    events = [_Event("aten::mm", [[m, 576], [576, 1536]], us, n),
              _Event("aten::mm", [[m, 1536], [1536, 576]], us, n),
              _Event("aten::bmm", [[4, 30, 16], [4, 16, 576]], 250.0, 3),
              _Event("aten::mul", [[4, 30, 576], [4, 30, 576]], 125.0, 9),
              _Event("aten::mm", [[64, 576], [576, 49152]], 4000.0, 1)]
    per_kind, rate = breakdown(events, 49152, 16, FEATURES)
    assert per_kind[KINDS[0]] == 2 * us / 1e6
    assert per_kind[KINDS[1]] == 4000.0 / 1e6 and per_kind[KINDS[2]] == 250.0 / 1e6
    assert per_kind[KINDS[4]] == 125.0 / 1e6 and KINDS[3] not in per_kind
    assert abs(rate - 2 * (2.0 * m * 576 * 1536 * n) / (2 * us / 1e6)) <= 1e-9 * rate


def test_the_profiler_steps_with_each_finished_training_step():
    class Bar:
        def __init__(self):
            self.n, self.postfix = 0, None

        def update(self, n):
            self.n += n

        def set_postfix(self, **kw):
            self.postfix = kw

    class Prof:
        steps = 0

        def step(self):
            self.steps += 1

    bar, prof = Bar(), Prof()
    proxy = _ProfiledBar(bar, prof)
    proxy.update(0)  # no step finished: the profiler must not advance
    for _ in range(4):
        proxy.update(1)
        proxy.set_postfix(loss="0.5")
    assert (bar.n, prof.steps, len(proxy.ends), bar.postfix) == (4, 4, 4, {"loss": "0.5"})
    assert proxy.ends == sorted(proxy.ends)


def test_profiled_training_wraps_the_bar_and_drops_the_checkpoint(monkeypatch):
    index_mod = importlib.import_module("kmtrain.index")
    calls = []

    def fake_train_wave(*args, progress=None, checkpoint=None, **kwargs):
        calls.append((args, progress, checkpoint, kwargs))
        return 0

    monkeypatch.setattr(index_mod, "train_wave", fake_train_wave)
    seen, prof, bar = [], object(), object()
    with profiled_training(prof, seen) as mod:
        assert mod is index_mod and index_mod.train_wave is not fake_train_wave
        index_mod.train_wave("model", "tok", progress=bar, checkpoint="a checkpoint", steps=3)
    assert index_mod.train_wave is fake_train_wave  # restored on leaving
    assert len(seen) == 1 and seen[0].bar is bar and seen[0].prof is prof
    # a checkpoint would resume past the profiled steps or save inside them: profiled runs have none
    assert calls == [(("model", "tok"), seen[0], None, {"steps": 3})]
