"""kmtrain.train: per-document independence inside a batch, cache against no cache, the LM baselines' loss."""
import pytest
import torch

from conftest import DOCS, tiny_cfg
from kmtrain import index


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_km_does_not_depend_on_batch_mates(tiny_model, tmp_path, amp):
    """Same seeds and data order whoever shares the batch. In fp32 the KMs agree to float rounding
    of the batched matmuls. Under bf16 a batch mate changes the padded width and so the rounding of
    bf16 activations, which AdamW carries into the weights; there the check is that this noise
    stays far below what a real dependency (another seed) does to the same KM."""
    from safetensors.torch import load_file

    def train(ids, out, seed=0):
        docs = tmp_path / f"docs_{out}"
        docs.mkdir()
        for k in ids:
            (docs / f"{k}.txt").write_text(DOCS[k])
        # with model selection on: each slot's held-out curve and best weights must be its own too
        index(str(docs), tiny_cfg(tiny_model, tmp_path / out, docs_per_step=2, steps=4, amp=amp, seed=seed,
                                  heldout_per_chunk=1, heldout_every=1))
        return load_file(str(tmp_path / out / "alpha" / "adapter_model.safetensors"))

    def worst_delta_diff(x, y):
        """Largest relative difference, over modules, of what the KM adds to a layer (B @ A)."""
        worst = 0.0
        for k in x:
            if "lora_A" in k:
                kb = k.replace("lora_A", "lora_B")
                dx, dy = x[kb] @ x[k], y[kb] @ y[k]
                worst = max(worst, float((dx - dy).norm() / dx.norm().clamp_min(1e-12)))
        return worst

    with_beta = train(["alpha", "beta"], "ab")
    with_gamma = train(["alpha", "gamma"], "ag")
    assert with_beta.keys() == with_gamma.keys()
    mates = worst_delta_diff(with_beta, with_gamma)
    if amp == "off":
        assert mates < 1e-4, mates
    else:
        # measured: batch-mate noise 4e-2 at worst (median 2e-2) against O(1) for another seed
        other_seed = worst_delta_diff(with_beta, train(["alpha", "beta"], "ab_seed1", seed=1))
        assert mates < 0.1 and other_seed > 10 * mates, (mates, other_seed)


def test_a_base_with_dropout_trains_its_kms_without_it(tiny_model, tmp_path):
    """A config with dropout (Seed-OSS ships 0.1 on attention and residuals): in train mode the base's
    dropout drew from the global RNG, so a document's KM depended on its batch-mates' draws and a cached
    run differed from an uncached one. The frozen base now trains its KMs in eval mode: alpha's KM is
    the same beside beta as beside gamma, and the cached run's losses are the uncached run's."""
    import json
    import shutil

    from safetensors.torch import load_file

    dropout = tmp_path / "dropout"
    shutil.copytree(tiny_model, dropout)
    conf = dropout / "config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "attention_dropout": 0.5}))

    def train(ids, out, **kw):
        docs = tmp_path / f"docs_{out}"
        docs.mkdir()
        for k in ids:
            (docs / f"{k}.txt").write_text(DOCS[k])
        got = index(str(docs), tiny_cfg(str(dropout), tmp_path / out, docs_per_step=2, steps=3, amp="off",
                                        cache_dtype="fp32", **kw))
        return load_file(str(tmp_path / out / "alpha" / "adapter_model.safetensors")), got[0]["final_loss"]

    (with_beta, loss), (with_gamma, _) = train(["alpha", "beta"], "ab"), train(["alpha", "gamma"], "ag")
    for k in with_beta:
        assert torch.allclose(with_beta[k], with_gamma[k], rtol=1e-4, atol=1e-6), k
    _, uncached = train(["alpha", "beta"], "ab_fresh", teacher_cache=False)
    assert all(abs(loss[part] - uncached[part]) <= 1e-5 * abs(uncached[part]) + 1e-6 for part in loss), (loss, uncached)


@pytest.mark.parametrize("precision", ["default", "fp32", "fp8"])
def test_loss_with_cache_equals_loss_without(tiny_model, docs_dir, tmp_path, monkeypatch, precision):
    """Same losses whether the teacher is cached (KL from its cached statistics) or re-run on every
    step (KL from its logits, recomputed): in fp32 to float rounding, under the default bf16 within
    bf16 noise, and with an fp8 cache (fp32 training), whose rounding the re-run teacher's states
    get too. The spies check that each run took its own KL path."""
    import kmkernels.dcd as dcd

    calls = {"stats": 0, "logits": 0}
    for name, key in (("fused_linear_kl_from_stats", "stats"), ("fused_linear_kl", "logits")):
        real = getattr(dcd, name)
        monkeypatch.setattr(dcd, name, lambda *a, _real=real, _key=key, **k: calls.__setitem__(_key, calls[_key] + 1) or _real(*a, **k))
    kw = dict(amp="off", cache_dtype=precision) if precision != "default" else {}
    a = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "cached", steps=3, **kw))
    assert calls["stats"] > 0 and calls["logits"] == 0, calls
    b = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "fresh", steps=3, teacher_cache=False, **kw))
    assert calls["logits"] > 0, calls
    la = {s["id"]: s["final_loss"] for s in a}
    lb = {s["id"]: s["final_loss"] for s in b}
    tol = 1e-3 if precision == "default" else 1e-5
    for k in la:
        for part in ("loss", "kl", "hidden"):
            assert abs(la[k][part] - lb[k][part]) <= tol * abs(lb[k][part]) + 1e-6, (k, part, la[k], lb[k])


@pytest.mark.parametrize("n,biased", [(0, False), (5, False), (37, False), (37, True)])
def test_chunked_lm_loss_matches_float64_cross_entropy(n, biased):
    """The LM/PIT loss without a [N, V] tensor: values and dh against a float64 reference, with
    chunks that do not divide N; with a biased head (Phi-2), its bias in the logits."""
    from kmtrain.train import chunked_lm_loss

    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, 24, generator=g, requires_grad=True)
    w = torch.randn(101, 24, generator=g)
    b = torch.randn(101, generator=g) * 3 if biased else None
    t = torch.randint(0, 101, (n,), generator=g)
    got = chunked_lm_loss(h, w, t, chunk=8, bias=b)
    h64 = h.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h64 @ w.double().t() + (0 if b is None else b.double()), t,
                                            reduction="none")
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    if n:
        weights = torch.rand(n, generator=g)
        (got * weights).sum().backward()
        (ref * weights.double()).sum().backward()
        torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)


def test_model_selection_keeps_each_documents_best_heldout_checkpoint(tiny_model):
    """Held-out examples are never trained on, every evaluation is recorded, and each slot ends at
    the weights of its lowest held-out loss. The targets are random tokens, so training on some
    makes the loss on the others worse: the best checkpoint comes early and the restore is exercised."""
    from kmkernels import attach_grouped_lora
    from kmtrain import IndexConfig
    from kmtrain.models import load_model
    from kmtrain.teacher_cache import Example
    from kmtrain.train import DocState, heldout_losses, train_wave

    model, tok, _, _ = load_model(tiny_model)
    g = torch.Generator().manual_seed(0)

    def example():
        ctx, tgt = torch.randint(3, len(tok), (12,), generator=g).tolist(), torch.randint(3, len(tok), (6,), generator=g).tolist()
        prompt = tok("Summarize", add_special_tokens=False)["input_ids"]
        return Example(prompt + tgt, len(prompt) - 1, len(tgt), ctx + prompt + tgt, len(ctx) + len(prompt) - 1)

    wave = [DocState(f"d{k}", [example() for _ in range(5)], seed=k, heldout=[1, 3]) for k in range(2)]
    drawn = {d.id: {d.next_example() for _ in range(30)} for d in wave}
    assert all(ids == {0, 2, 4} for ids in drawn.values()), drawn
    for d in wave:
        d._order, d._rng = [], None  # start the run from a fresh data order
    cfg = IndexConfig(model=tiny_model, steps=8, lr=0.05, heldout_every=1, docs_per_step=2, examples_per_doc=1,
                      amp="off", backend="torch", cache_dtype="fp32")
    attach_grouped_lora(model, 2, rank=4, alpha=8, backend="torch")
    train_wave(model, tok, wave, cfg, torch.device("cpu"), None)
    again = heldout_losses(model, wave, cfg, torch.device("cpu"), None, [0, 1], tok.pad_token_id)
    for slot, d in enumerate(wave):
        assert [c["step"] for c in d.heldout_curve] == list(range(9))
        trained = {c["step"]: c["loss"] for c in d.heldout_curve[1:]}
        assert d.best_step == min(trained, key=trained.get) and d.best_step < cfg.steps, d.heldout_curve
        assert abs(again[slot]["loss"] - trained[d.best_step]) <= 1e-5 * trained[d.best_step], (again[slot], trained)


def test_heldout_needs_a_training_example(tiny_model):
    from kmkernels import attach_grouped_lora
    from kmtrain import IndexConfig
    from kmtrain.models import load_model
    from kmtrain.teacher_cache import Example
    from kmtrain.train import DocState, train_wave

    model, tok, _, _ = load_model(tiny_model)
    attach_grouped_lora(model, 1, rank=4, alpha=8, backend="torch")
    wave = [DocState("only", [Example([5, 6, 7], 0, 2, [4, 5, 6, 7], 1)], seed=0, heldout=[0])]
    with pytest.raises(ValueError, match="only: every example is held out"):
        train_wave(model, tok, wave, IndexConfig(model=tiny_model, steps=1, amp="off"), torch.device("cpu"), None)


def test_lr_b_ratio_scales_only_the_b_updates(tiny_model):
    """LoRA+: B learns at lr * lr_b_ratio, A at lr. From a fresh slot B = 0, so the first step moves
    only B, by AdamW's first update lr * g / (|g| + eps); a ratio of 3 must give exactly 3x that B
    and leave A at its initialisation in both runs."""
    from kmkernels import attach_grouped_lora, reset_slot
    from kmkernels.lora import grouped_lora_modules
    from kmtrain import IndexConfig
    from kmtrain.models import load_model
    from kmtrain.teacher_cache import Example
    from kmtrain.train import DocState, train_wave

    model, tok, _, _ = load_model(tiny_model)
    attach_grouped_lora(model, 1, rank=4, alpha=8, backend="torch")
    g = torch.Generator().manual_seed(1)
    ctx, tgt = torch.randint(3, len(tok), (10,), generator=g).tolist(), torch.randint(3, len(tok), (6,), generator=g).tolist()
    example = Example([2] + tgt, 0, len(tgt), ctx + [2] + tgt, len(ctx))

    def one_step(ratio):
        cfg = IndexConfig(model=tiny_model, steps=1, lr=1e-2, lr_b_ratio=ratio, docs_per_step=1, examples_per_doc=1,
                          amp="off", backend="torch", cache_dtype="fp32")
        train_wave(model, tok, [DocState("d", [example], seed=7)], cfg, torch.device("cpu"), None)
        mods = grouped_lora_modules(model).values()
        return [m.lora_A[0].detach().clone() for m in mods], [m.lora_B[0].detach().clone() for m in mods]

    a1, b1 = one_step(1.0)
    a3, b3 = one_step(3.0)
    reset_slot(model, 0, 7)
    init = [m.lora_A[0].detach().clone() for m in grouped_lora_modules(model).values()]
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a1, a3, init))
    assert sum(int((b != 0).sum()) for b in b1) > 0
    for x, y in zip(b1, b3):
        torch.testing.assert_close(y, 3 * x, rtol=1e-5, atol=1e-9)


def test_length_groups_split_only_when_it_saves_padding():
    from kmtrain.train import SPLIT_MIN_SAVING, length_groups

    assert length_groups([100, 12, 100, 15, 100]) == [[1, 3], [0, 2, 4]]  # 500 padded tokens -> 30 + 300
    assert length_groups([100, 98, 100]) == [[0, 1, 2]]  # 2 of 300 tokens: not worth a second forward
    assert length_groups([7]) == [[0]] and length_groups([]) == [[]]
    # the threshold itself: a split saving exactly SPLIT_MIN_SAVING is taken, one saving less is not
    n = 10
    short = int(round(100 * (1 - SPLIT_MIN_SAVING * n)))  # one sequence of `short` among 9 of 100
    assert len(length_groups([short] + [100] * (n - 1))) == 2
    assert len(length_groups([short + 1] + [100] * (n - 1))) == 1


def random_example(tok, g: torch.Generator, objective: str, n_target: int):
    """A training example of random tokens: ``n_target`` distilled positions after a 9-token context
    (the teacher's) and a 1-token prompt, or for lm a sequence of ``n_target`` tokens."""
    from kmtrain.teacher_cache import Example

    ctx = torch.randint(3, len(tok), (9,), generator=g).tolist()
    tgt = torch.randint(3, len(tok), (n_target,), generator=g).tolist()
    if objective == "lm":
        return Example(tgt, 0, n_target - 1)
    return Example([1] + tgt, 0, n_target, ctx + [1] + tgt, len(ctx))


@pytest.mark.parametrize("objective", ["sdcd", "lm"])
def test_a_batch_split_by_length_has_the_losses_and_gradients_of_one_forward(tiny_model, monkeypatch, objective):
    """Short and long examples in two decoder forwards give each document the loss and the LoRA
    gradients of one padded forward (fp32: to rounding), the rows put back in the examples' order."""
    import kmtrain.train as train
    from kmkernels import attach_grouped_lora, slot_parameters
    from kmtrain import IndexConfig
    from kmtrain.models import load_model

    model, tok, _, _ = load_model(tiny_model)
    g = torch.Generator().manual_seed(0)

    def example(n_target):
        return random_example(tok, g, objective, n_target)

    # per document one long and one short example, interleaved so that the groups cut across documents
    wave = [train.DocState(f"d{k}", [example(30), example(3 + k)], seed=k) for k in range(2)]
    picks = [(0, 0), (0, 1), (1, 1), (1, 0)]
    cfg = IndexConfig(model=tiny_model, objective=objective, amp="off", backend="torch", cache_dtype="fp32")
    attach_grouped_lora(model, 2, rank=4, alpha=8, backend="torch")
    with torch.no_grad():
        for p in slot_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    calls = []
    real = train.decoder_hidden_states
    monkeypatch.setattr(train, "decoder_hidden_states", lambda m, ids, mask: calls.append(ids.shape) or real(m, ids, mask))

    def run(min_saving):
        monkeypatch.setattr(train, "SPLIT_MIN_SAVING", min_saving)
        calls.clear()
        out = train._batch_losses(model, wave, picks, [0, 0, 1, 1], cfg, torch.device("cpu"), None,
                                  list(range(model.config.num_hidden_layers)), tok.pad_token_id)
        model.zero_grad(set_to_none=True)
        sum(loss for loss, _ in out).backward()
        return [float(loss.detach()) for loss, _ in out], [p.grad.clone() for p in slot_parameters(model)], list(calls)

    one_losses, one_grads, one_calls = run(1.0)
    two_losses, two_grads, two_calls = run(0.0)
    widths = [31, 31] if objective == "sdcd" else [30, 30]
    assert [s[1] for s in one_calls] == widths[:1] and sorted(s[0] for s in two_calls) == [2, 2], (one_calls, two_calls)
    assert max(s[1] for s in two_calls) == widths[1] and min(s[1] for s in two_calls) < 10
    for a, b in zip(one_losses, two_losses):
        assert abs(a - b) <= 1e-5 * abs(a), (one_losses, two_losses)
    for a, b in zip(one_grads, two_grads):
        assert (a - b).norm() <= 1e-5 * a.norm(), float((a - b).norm() / a.norm())


def test_micro_batches_hold_a_budget_and_cover_every_pick_once():
    from kmtrain.train import micro_batches

    lengths = [30, 5, 12, 30, 7, 100, 12]
    assert micro_batches(lengths, 0) == [list(range(7))]
    passes = micro_batches(lengths, 40)
    assert sorted(k for p in passes for k in p) == list(range(7))
    assert all(len(p) * max(lengths[k] for k in p) <= 40 or len(p) == 1 for p in passes)
    assert [5] in passes  # longer than the budget: alone
    assert micro_batches(lengths, 10**6) == [sorted(range(7), key=lambda k: lengths[k])]


@pytest.mark.parametrize("objective, cached", [("sdcd", True), ("sdcd", False), ("lm", False)])
def test_a_step_in_micro_batches_has_the_losses_and_gradients_of_one_pass(tiny_model, tmp_path, objective, cached):
    """--micro-batch-tokens: a step's picks in several passes, a document's examples split between
    them, each pass with its own backward, give every document the loss parts and the LoRA
    gradients of one pass (fp32: to rounding), with the teacher cached or re-run, and for lm."""
    import kmtrain.train as train
    from kmkernels import attach_grouped_lora, slot_parameters
    from kmtrain import IndexConfig
    from kmtrain.models import load_model
    from kmtrain.teacher_cache import TeacherCache, build_cache

    model, tok, _, _ = load_model(tiny_model)
    g = torch.Generator().manual_seed(0)
    layers = list(range(model.config.num_hidden_layers))

    def example(n_target):
        return random_example(tok, g, objective, n_target)

    wave = [train.DocState(f"d{k}", [example(n) for n in (20, 6 + k, 13, 9)], seed=k) for k in range(3)]
    cfg = IndexConfig(model=tiny_model, objective=objective, amp="off", backend="torch", cache_dtype="fp32",
                      examples_per_doc=4)
    if cached:
        for doc in wave:
            path = tmp_path / f"{doc.id}.safetensors"
            build_cache(model, doc.examples, path, model.config.num_hidden_layers, cfg, tok.pad_token_id)
            doc.cache = TeacherCache(path, examples=len(doc.examples))
    attach_grouped_lora(model, 3, rank=4, alpha=8, backend="torch")
    with torch.no_grad():
        for p in slot_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    picks = [(slot, i) for slot in range(3) for i in range(4)]
    calls = []
    real = train._batch_losses

    def run(budget):
        calls.clear()
        model.zero_grad(set_to_none=True)
        parts, total = train.step_backward(model, wave, picks, cfg.replace(micro_batch_tokens=budget),
                                           torch.device("cpu"), None, layers, tok.pad_token_id)
        return parts, total, [p.grad.clone() for p in slot_parameters(model)], list(calls)

    train._batch_losses = lambda *a, **k: calls.append(len(a[2])) or real(*a, **k)
    try:
        one = run(0)
        many = run(40)
    finally:
        train._batch_losses = real
    assert one[3] == [12] and len(many[3]) >= 4 and sum(many[3]) == 12, many[3]
    passes = train.micro_batches([len(wave[s].examples[i].student_ids) for s, i in picks], 40)
    assert any(len({picks[k][0] for k in p}) > 1 for p in passes)  # passes mix documents
    assert any(len({k for k in p if picks[k][0] == 0}) not in (0, 4) for p in passes)  # and split one's examples
    assert abs(one[1] - many[1]) <= 1e-5 * abs(one[1])
    for a, b in zip(one[0], many[0]):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 * abs(a[k]) + 1e-7 for k in a), (a, b)
    for a, b in zip(one[2], many[2]):
        assert (a - b).norm() <= 1e-5 * a.norm(), float((a - b).norm() / a.norm())

    # the held-out evaluation (forward only) in passes too: each example its own group, the same losses
    for doc in wave:
        doc.heldout = [1, 2]
    with torch.no_grad():
        whole = train.heldout_losses(model, wave, cfg, torch.device("cpu"), None, layers, tok.pad_token_id)
        calls.clear()
        train._batch_losses = lambda *a, **k: calls.append(len(a[2])) or real(*a, **k)
        try:
            parts = train.heldout_losses(model, wave, cfg.replace(micro_batch_tokens=20), torch.device("cpu"), None,
                                         layers, tok.pad_token_id)
        finally:
            train._batch_losses = real
    assert len(calls) >= 3 and sum(calls) == 6, calls
    assert whole.keys() == parts.keys() == {0, 1, 2}
    for slot in whole:
        assert all(abs(whole[slot][k] - parts[slot][k]) <= 1e-5 * abs(whole[slot][k]) + 1e-7 for k in whole[slot])


def test_a_wave_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(tiny_model, tmp_path, capsys, monkeypatch):
    """Killed after step 5 of 8 (here: its progress bar raises), a wave resumes from the checkpoint
    saved then and ends with the weights, losses, held-out curve and best step of a run that was never
    stopped, bit for bit; also when the resumed run attaches fewer slots (its other waves were done).
    A damaged checkpoint, or one of another wave, is said, deleted, and training starts from step 0.
    A save that fails (out of disk) is said, and training goes on to the same weights."""
    from kmkernels import attach_grouped_lora, slot_parameters
    from kmtrain import IndexConfig
    from kmtrain.models import load_model
    from kmtrain.teacher_cache import Example
    from kmtrain.checkpoint import TrainingCheckpoint
    from kmtrain.train import DocState, train_wave

    tok = load_model(tiny_model)[1]
    g = torch.Generator().manual_seed(1)

    def example():
        ctx = torch.randint(3, len(tok), (12,), generator=g).tolist()
        tgt = torch.randint(3, len(tok), (6,), generator=g).tolist()
        prompt = tok("Summarize", add_special_tokens=False)["input_ids"]
        return Example(prompt + tgt, len(prompt) - 1, len(tgt), ctx + prompt + tgt, len(ctx) + len(prompt) - 1)

    examples = [[example() for _ in range(5)] for _ in range(2)]
    cfg = IndexConfig(model=tiny_model, steps=8, lr=0.05, heldout_every=2, examples_per_doc=2, amp="off",
                      backend="torch", cache_dtype="fp32")

    class Killed(Exception):
        pass

    class Bar:  # what train_wave updates after each step; raises Killed when it reaches ``kill_at``
        def __init__(self, kill_at=None):
            self.n, self.kill_at = 0, kill_at

        def update(self, k):
            self.n += k
            if self.n == self.kill_at:
                raise Killed

        def set_postfix(self, **kw):
            pass

    def run(slots, docs, checkpoint=None, kill_at=None):
        """The wave of the first ``docs`` documents in a model with ``slots`` slots: (weights, per
        document (losses, held-out curve, best step), steps the bar saw, step resumed from), or None
        when killed."""
        model = load_model(tiny_model)[0]
        attach_grouped_lora(model, slots, rank=4, alpha=8, backend="torch")
        wave = [DocState(f"d{k}", list(examples[k]), seed=k, heldout=[1]) for k in range(docs)]
        bar = Bar(kill_at)
        try:
            start = train_wave(model, tok, wave, cfg, torch.device("cpu"), None, progress=bar, checkpoint=checkpoint)
        except Killed:
            return None
        weights = [p.detach()[:docs].clone() for p in slot_parameters(model)]
        return weights, [(d.losses, d.heldout_curve, d.best_step) for d in wave], bar.n, start

    def same(a, b):
        return a[1] == b[1] and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))

    def saved_step(path):
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["state"])["step"]

    path = tmp_path / "training_k.safetensors"
    every_step = TrainingCheckpoint(path, "k", 1e-9)
    for slots, docs, resume_slots in ((2, 2, 2), (2, 1, 1)):
        whole = run(slots, docs)
        assert any(d[2] < cfg.steps for d in whole[1]), "no slot went back to an earlier best: the test needs one"
        assert run(slots, docs, every_step, kill_at=5) is None
        assert saved_step(path) == 5
        capsys.readouterr()
        resumed = run(resume_slots, docs, TrainingCheckpoint(path, "k", 0.0))
        assert "resumed from its checkpoint at step 5 of 8" in capsys.readouterr().out
        assert resumed[2:] == (8, 5) and whole[3] == 0 and same(resumed, whole)

    # unusable checkpoints: said, deleted, and the wave trained from step 0 as if there were none
    path.write_bytes(b"not a checkpoint")
    assert same(run(2, 1, TrainingCheckpoint(path, "k", 0.0)), whole)
    assert "unreadable" in capsys.readouterr().out and not path.exists()
    for damage, message in (("byte", "does not match the sha256"), ("key", "not this wave's checkpoint")):
        assert run(2, 1, every_step, kill_at=3) is None
        if damage == "byte":  # one changed byte in the last tensor's data: it would load as other weights
            data = bytearray(path.read_bytes())
            data[-3] ^= 0x40
            path.write_bytes(bytes(data))
        assert same(run(2, 1, TrainingCheckpoint(path, "k" if damage == "byte" else "other", 0.0)), whole)
        assert message in capsys.readouterr().out and not path.exists()

    import safetensors.torch
    from safetensors import SafetensorError

    def no_room(tensors, filename, metadata=None):  # a full disk, as safetensors reports it: no OSError
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", no_room)
    assert same(run(2, 1, every_step), whole)
    said = capsys.readouterr().out
    assert "checkpoint of step 7 not saved ([Errno 28] No space left on device); training goes on" in said
    assert list(tmp_path.iterdir()) == []  # the partial write was removed
    monkeypatch.undo()

    # SIGTERM or a first Ctrl-C mid-step: the step ends, its state is saved, the run stops; resumed,
    # it ends as the uninterrupted one (also from the last step). A second Ctrl-C stops at once.
    import os
    import signal
    import sys

    class Busy:  # stderr in the middle of a progress bar's write: io refuses a reentrant one this way
        def write(self, s):
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")

        def flush(self):
            pass

    class Signalled(Bar):  # sends ``signals`` to this process while step ``at`` is being finished
        def __init__(self, at, signals, busy):
            super().__init__()
            self.at, self.signals, self.busy = at, signals, busy

        def update(self, k):
            self.n += k
            if self.n == self.at:
                stderr, sys.stderr = sys.stderr, (Busy() if self.busy else sys.stderr)
                try:
                    for s in self.signals:
                        os.kill(os.getpid(), s)
                finally:
                    sys.stderr = stderr

    def signalled(at, *signals, busy=False):
        model = load_model(tiny_model)[0]
        attach_grouped_lora(model, 2, rank=4, alpha=8, backend="torch")
        wave = [DocState(f"d{k}", list(examples[k]), seed=k, heldout=[1]) for k in range(1)]
        with pytest.raises(KeyboardInterrupt):  # what `kmtrain index` reports as an interrupt (exit 130)
            train_wave(model, tok, wave, cfg, torch.device("cpu"), None, progress=Signalled(at, signals, busy),
                       checkpoint=TrainingCheckpoint(path, "k", 1e6))  # no periodic save in 8 steps
        return capsys.readouterr().err

    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    for at, sig in ((3, signal.SIGTERM), (8, signal.SIGINT)):
        err = signalled(at, sig)
        assert f"kmtrain: {sig.name}: the training state is saved at the end of this step" in err
        assert f"training state saved at step {at} of 8" in err and saved_step(path) == at
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
        resumed = run(2, 1, TrainingCheckpoint(path, "k", 0.0))
        assert f"resumed from its checkpoint at step {at} of 8" in capsys.readouterr().out
        assert resumed[2:] == (8, at) and same(resumed, whole)
        path.unlink()
    err = signalled(4, signal.SIGTERM, busy=True)  # the handler's line is lost, never the save
    assert "the training state is saved" not in err and "training state saved at step 4 of 8" in err
    assert saved_step(path) == 4
    path.unlink()
    err = signalled(5, signal.SIGINT, signal.SIGINT)
    assert "SIGINT: the training state is saved" in err and "saved at step" not in err and not path.exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


@pytest.mark.parametrize("dtype", ["bf16", "fp8", "fp32"])
def test_round_like_cache_is_what_the_cache_returns(tiny_model, tmp_path, dtype):
    """--no-teacher-cache rounds each re-run example's states as the cache stores and reads them
    back: the same numbers, bit for bit, in a cache of several examples whose magnitudes differ
    (under fp8, one scale per document and layer would round the smaller example otherwise)."""
    from kmtrain import IndexConfig
    from kmtrain.models import load_model
    from kmtrain.teacher_cache import Example, TeacherCache, build_cache, teacher_hiddens
    from kmtrain.train import round_like_cache

    model, _, _, _ = load_model(tiny_model)
    examples = [Example([1, 2, 3], 0, 5, list(range(3, 12)), 4), Example([1, 2], 0, 3, list(range(40, 47)), 4)]
    path = tmp_path / "c.safetensors"
    build_cache(model, examples, path, 2, IndexConfig(cache_dtype=dtype), pad_id=0)
    cache = TeacherCache(path)
    # one batch, as the cache build runs these two (their prefixes differ), so the states match bit for bit
    fresh = teacher_hiddens(model, examples, [0, 1], pad_id=0)
    amax = [h.abs().amax(dim=(1, 2)) for h in fresh]
    assert ((amax[0] / amax[1] - 1).abs() > 0.05).any(), amax  # their scales differ in a layer
    for i, h in enumerate(fresh):
        cached, _ = cache.get(i)
        rounded = round_like_cache(h, dtype)
        assert rounded.dtype == cached.dtype
        assert torch.equal(rounded, cached), i
        if dtype != "fp32":
            assert not torch.equal(rounded.float(), h)  # it did round


def test_micro_batch_tokens_trains_the_kms_of_one_pass(tiny_model, docs_dir, tmp_path):
    """End to end, --micro-batch-tokens reaches training and changes nothing but rounding: the same
    final losses as one pass per step (fp32) after several steps of AdamW, and close KM weights.
    (Not as close as the gradients of one step: AdamW's first updates are about lr * sign(grad), so an
    entry whose gradient is rounding noise moves by a whole lr either way; 1.3e-3 relative was seen.)"""
    from safetensors.torch import load_file

    kw = dict(amp="off", cache_dtype="fp32", examples_per_doc=3, docs_per_step=3, steps=4)
    one = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "one", **kw))
    many = index(str(docs_dir), tiny_cfg(tiny_model, tmp_path / "many", micro_batch_tokens=48, **kw))
    for a, b in zip(sorted(one, key=lambda s: s["id"]), sorted(many, key=lambda s: s["id"])):
        assert a["id"] == b["id"] and a["adapter_sha256"] != b["adapter_sha256"]  # other passes: other rounding
        for part in ("loss", "kl", "hidden"):
            assert abs(a["final_loss"][part] - b["final_loss"][part]) <= 1e-5 * abs(a["final_loss"][part]) + 1e-7
        wa = load_file(str(tmp_path / "one" / a["id"] / "adapter_model.safetensors"))
        wb = load_file(str(tmp_path / "many" / a["id"] / "adapter_model.safetensors"))
        for k in wa:
            assert (wa[k] - wb[k]).norm() <= 1e-2 * wa[k].norm(), (k, float((wa[k] - wb[k]).norm() / wa[k].norm()))
