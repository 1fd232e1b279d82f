"""Play and Prune: the promise (within tolerance on validation), the controller rule, candidate caps and ties, recovery
and rollback, callback event timing, fastai's contract (schedules, fits, lr_find, accumulation, mixed precision, hooks,
interrupts) and dead models. Bad arguments are in test_bad_inputs_play_and_prune.py."""
import copy

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.hook import ActivationStats
from fastai.callback.training import GradientAccumulation
from hypothesis import given, settings, strategies as st

import corrprune_edu.play_and_prune as pap
from corrprune_edu.play_and_prune import (AFP, FixedController, GapController, PRC, PlayAndPruneCallback,
                                          l1_penalty, penalty_terms, play_and_prune, replay, select_candidates)
from corrprune_edu.core import describe_counts, filter_counts
from corrprune_edu.data import mnist_dls
from corrprune_edu.models import lenet5
from corrprune_edu.channels import analyze_channels
from corrprune_edu.train import cached_baseline, evaluate, fit, make_learner, quiet
from test_fastai_contract import CPUMixedPrecision          # fastai's MixedPrecision with CPU autocast (bf16)


# ---------------------------------------------------------------------------------------------------------------
# the promise
@pytest.fixture(scope="module")
def subset_baseline():
    "LeNet-5 trained on 1,000 real MNIST images per class (900 train, 100 validation), cached"
    return cached_baseline("lenet5", "mnist", n_per_class=1000, n_test_per_class=300, epochs=4, seed=0)


def _copy_learner(base):
    return make_learner(copy.deepcopy(base.model), base.dls)


@pytest.mark.slow
def test_promise_lenet5_mnist_subset_tolerance_1pct(subset_baseline, capsys):
    base = subset_baseline
    base_valid, base_test = base.baseline["valid_acc"], base.baseline["test_acc"]
    learn = _copy_learner(base)
    run = play_and_prune(learn, 0.01, phase_batches=30, max_iters=15, lr=2e-3)   # default controller and AFP
    valid, test = evaluate(learn, "valid"), evaluate(learn, "test")
    h = run.frame()
    with capsys.disabled():
        print(f"\nPlay and Prune, tolerance 1%: {describe_counts(filter_counts(learn.model))}, "
              f"MACs -{1 - h.macs.iloc[-1] / h.macs.iloc[0]:.1%}, valid {valid:.4f} (baseline {base_valid:.4f}), "
              f"test {test:.4f} (baseline {base_test:.4f}); stop: {run.stop_reason}")
    assert run.baseline_acc == pytest.approx(base_valid)
    assert valid >= base_valid - 0.01 - 1e-9                 # the promise, on the validation split
    assert h.macs.iloc[-1] <= 0.5 * h.macs.iloc[0]            # ... and it did prune
    assert valid == pytest.approx(h.acc.iloc[-1])             # the record describes the model left in `learn`
    assert filter_counts(base.model)["conv1"] == 20           # the cached baseline is untouched


# ---------------------------------------------------------------------------------------------------------------
# the controller rule
def test_gap_controller_moves_with_the_gap():
    c = GapController(lam=1e-2, W=0.5)
    c.update(0.5, "accepted")
    assert c.lam > 1e-2 and c.W > 0.5
    lam, W = c.lam, c.W
    c.update(-0.5, "recovering")
    assert c.lam < lam and c.W < W
    lam, W = c.lam, c.W
    c.update(-0.5, "rolled back")
    assert c.lam < lam and c.W == pytest.approx(W * 0.75 ** 2)    # a rollback backs off twice as hard


def test_gap_controller_respects_its_bounds():
    c = GapController(lam=1e-2, W=0.5, lam_max=0.05, w_max=0.8, lam_min=1e-3, w_min=0.1)
    for _ in range(50): c.update(10, "accepted")
    assert (c.lam, c.W) == (0.05, 0.8) and c.saturated
    for _ in range(50): c.update(-10, "rolled back")
    assert (c.lam, c.W) == (1e-3, 0.1) and not c.saturated


def test_the_gap_is_clipped():
    a, b = GapController(), GapController()
    a.update(1.0, "accepted"); b.update(25.0, "accepted")
    assert a.state() == b.state()


def test_fixed_controller_never_moves_and_subclassing_is_enough():
    f = FixedController(0.02, 0.4)
    for g in (-3, 0, 3): f.update(g, "accepted")
    assert f.state() == dict(lam=0.02, W=0.4)

    class Halving(PRC):
        def update(self, gap, outcome): self.W = self.W / 2 if gap < 0 else self.W
    h = Halving(0.01, 0.8); h.update(-1, "recovering")
    assert h.state() == dict(lam=0.01, W=0.4)
    with pytest.raises(NotImplementedError): PRC(0.01, 0.5).update(0, "accepted")


# ---------------------------------------------------------------------------------------------------------------
# candidate caps
@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(0, 1), min_size=1, max_size=40), min_size=1, max_size=4),
       st.floats(0, 1), st.floats(0.01, 1), st.integers(1, 5), st.one_of(st.none(), st.integers(1, 10)))
def test_candidate_caps(layers, W, max_frac, min_channels, limit):
    scores = {f"l{i}": torch.tensor(s, dtype=torch.float64) for i, s in enumerate(layers)}
    cand = select_candidates(scores, W, max_frac, min_channels, limit)
    total = 0
    for name, idx in cand.items():
        s, n = scores[name], len(scores[name])
        assert idx == sorted(set(idx)) and len(idx) >= 1
        assert all(s[i] < W for i in idx)                                 # only filters below W
        assert len(idx) <= max(1, int(max_frac * n))                       # at most max_frac of the layer (>= 1)
        assert n - len(idx) >= min_channels                                 # never below min_channels
        rest = [s[i] for i in range(n) if i not in idx and s[i] < W]
        if rest: assert max(s[i] for i in idx) <= min(rest) + 1e-9         # lowest first (scores within 1e-9 are tied)
        total += len(idx)
    if limit is not None: assert total <= limit


def test_exact_ties_go_to_the_lowest_group_position_then_the_lowest_index():
    "Issue 9: equal scores are ranked by position, never by rounding; shuffling the equal scores' values cannot matter"
    tied = {"a": torch.tensor([.3, .1, .1, .9, .1], dtype=torch.float64), "b": torch.tensor([.1, .1, .8, .9, .7], dtype=torch.float64)}
    assert select_candidates(tied, 0.5, max_frac=0.4, limit=3) == {"a": [1, 2], "b": [0]}
    assert select_candidates({"b": tied["b"], "a": tied["a"]}, 0.5, max_frac=0.4, limit=3) == {"b": [0, 1], "a": [1]}
    rng = np.random.default_rng(0)
    for _ in range(20):                    # the same tied value written with rounding noise far below the tolerance
        noisy = {k: v + torch.from_numpy(rng.uniform(-1e-13, 1e-13, len(v))) * (v == 0.1) for k, v in tied.items()}
        assert select_candidates(noisy, 0.5, max_frac=0.4, limit=3) == {"a": [1, 2], "b": [0]}


def test_penalty_covers_exactly_the_candidate_filters():
    net = lenet5()
    terms = penalty_terms(net, analyze_channels(net, (1, 28, 28)), {"conv2": [1, 5]})
    l1_penalty(net, terms).backward()
    g = net.conv2.weight.grad.flatten(1).abs().sum(1)
    assert g[[1, 5]].gt(0).all() and g.sum() == g[[1, 5]].sum()
    assert net.conv2.bias.grad[[1, 5]].abs().sum() > 0 and net.conv1.weight.grad is None


# ---------------------------------------------------------------------------------------------------------------
# recovery and rollback, with scripted accuracies so the state machine is tested exactly
@pytest.fixture
def tiny():
    "LeNet-5 on 30 embedded MNIST images per class: fast, for event and state-machine tests"
    dls = mnist_dls(30, n_test_per_class=10, source="embedded", bs=16)
    learn = make_learner(lenet5(), dls)
    fit(learn, 1)
    return learn


def _script(monkeypatch, accs):
    "Make the controller measure these accuracies, in order (the last one repeats)"
    seq = list(accs)
    monkeypatch.setattr(pap, "_acc", lambda learn: seq.pop(0) if len(seq) > 1 else seq[0])


def _aggressive():
    return dict(controller=FixedController(0.1, 0.95), afp=AFP(max_frac=0.5, negligible=1.0))


def test_recovery_then_acceptance(tiny, monkeypatch):
    _script(monkeypatch, [0.90, 0.80, 0.82, 0.95, 0.95])         # base, drop, still low, back, ...
    cb = PlayAndPruneCallback(stop_fit=True, tolerance=0.05, phase_batches=2, recovery_phases=2, max_iters=4, **_aggressive())
    with quiet(tiny): tiny.fit(10, 1e-3, cbs=cb)
    h = cb.loop.frame()
    assert list(h.outcome[:4]) == ["start", "recovering", "recovering", "recovered"]
    assert list(h.phase[1:4]) == ["prune", "recover", "recover"]
    assert h.removed.iloc[1] > 0 and h.removed.iloc[2:4].sum() == 0      # recovery phases never prune
    assert h["filters.conv1"].iloc[3] < 20                                # the pruned model was kept


def test_failed_recovery_rolls_back_to_the_checkpoint(tiny, monkeypatch):
    _script(monkeypatch, [0.90, 0.80, 0.80, 0.80, 0.80])
    before = copy.deepcopy(tiny.model.state_dict())
    cb = PlayAndPruneCallback(stop_fit=True, tolerance=0.05, phase_batches=2, recovery_phases=2, max_iters=4, **_aggressive())
    with quiet(tiny): tiny.fit(10, 1e-3, cbs=cb)
    h = cb.loop.frame()
    assert list(h.outcome[:4]) == ["start", "recovering", "recovering", "rolled back"]
    assert h["filters.conv1"].iloc[1] < 20 and h["filters.conv1"].iloc[3] == 20
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)          # weights exactly as accepted
    assert {id(p) for pg in tiny.opt.param_lists for p in pg} == {id(p) for p in tiny.model.parameters()}


def test_one_filter_that_cannot_go_closes_its_layer(tiny, monkeypatch):
    _script(monkeypatch, [0.90, 0.80])                                   # every removal breaks the floor
    cb = PlayAndPruneCallback(stop_fit=True, tolerance=0.05, phase_batches=1, recovery_phases=0, max_iters=40, **_aggressive())
    with quiet(tiny): tiny.fit(40, 1e-3, cbs=cb)
    h, loop = cb.loop.frame(), cb.loop
    assert set(h.outcome[1:-1]) == {"rolled back"}
    assert loop.closed == {"conv1", "conv2"} and loop.stop_reason.startswith("no filter can go")
    assert h.tried.iloc[1:-1].tolist()[-1] == 1                            # it ended with one-filter attempts
    assert filter_counts(tiny.model)["conv1"] == 20 and filter_counts(tiny.model)["conv2"] == 50


# ---------------------------------------------------------------------------------------------------------------
# callback event timing
class Spy(Callback):
    "Records, at every training step, the model's filter counts, whether the optimiser holds its parameters, lr and wd"
    order = 90
    def before_fit(self): self.steps, self.extra, self.hypers = [], [], []
    def after_step(self):
        held = {id(p) for pg in self.learn.opt.param_lists for p in pg}
        self.steps.append((describe_counts(filter_counts(self.learn.model)), held == {id(p) for p in self.learn.model.parameters()}))
        self.hypers.append((self.opt.hypers[-1]["lr"], self.opt.hypers[-1]["wd"]))
    def after_loss(self):
        if self.training: self.extra.append((self.learn.loss_grad - self.learn.loss).item())


def test_callback_events(tiny):
    spy = Spy()
    cb = PlayAndPruneCallback(stop_fit=True, tolerance=0.5, phase_batches=3, max_iters=6,
                              controller=FixedController(0.1, 0.95), afp=AFP(max_frac=0.2, negligible=1.0))
    with quiet(tiny): tiny.fit(50, 1e-3, cbs=[cb, spy])
    h = cb.loop.frame()
    body = h[h.phase.isin(["prune", "recover"])]
    assert (body.batches == 3 * body.t).all()                              # a phase is exactly phase_batches steps
    assert len(spy.steps) == 3 * 6                                         # fit was stopped after max_iters phases
    assert all(ok for _, ok in spy.steps)                                  # every step trained the current model
    counts = [c for c, _ in spy.steps]
    changes = [i for i in range(1, len(counts)) if counts[i] != counts[i - 1]]
    assert changes and all(i % 3 == 0 for i in changes)                    # surgery only between phases
    assert max(spy.extra) > 0                                              # the regulariser reached the loss
    assert h.outcome.iloc[-1] == "final" and cb.loop.done


def test_without_candidates_the_loss_is_plain_cross_entropy(tiny):
    spy = Spy()
    cb = PlayAndPruneCallback(stop_fit=True, tolerance=0.5, phase_batches=2, max_iters=2, controller=FixedController(0.1, 0.0))
    with quiet(tiny): tiny.fit(5, 1e-3, cbs=[cb, spy])
    assert spy.extra and max(abs(e) for e in spy.extra) == 0 and cb.loop.history[-1]["filters"] == {"conv1": 20, "conv2": 50}


def test_the_penalty_looks_nothing_up_per_batch(tiny):
    "The candidates' parameters and indices are bound once per phase: penalty and sign clipping never search the model"
    cb = PlayAndPruneCallback(stop_fit=True, tolerance=0.5, phase_batches=2, max_iters=1, controller=FixedController(0.1, 0.95))
    with quiet(tiny): tiny.fit(1, 1e-3, cbs=cb)                            # stops after one phase, candidates of the next...
    loop = cb.loop
    loop.mode = "prune"; loop._set_candidates(tiny, {"conv2": [0, 3]})
    params = {id(p) for p in tiny.model.parameters()}
    assert loop.bound and all(id(p) in params and i.device == p.device for p, _, i in loop.bound)
    tiny.model.named_parameters = tiny.model.parameters = None             # any per-batch lookup would now fail
    want = 0.1 * (tiny.model.conv2.weight[[0, 3]].abs().sum() + tiny.model.conv2.bias[[0, 3]].abs().sum())
    assert loop.penalty().item() == pytest.approx(want.item(), rel=1e-5)
    loop.remember_signs(); loop.stop_at_zero()


# ---------------------------------------------------------------------------------------------------------------
# fastai's contract: schedules, fits, lr_find, accumulation, mixed precision, hooks
def test_the_users_learning_rate_and_weight_decay_are_the_ones_used(tiny):
    "Issue 10: the callback sets no learning rate; under fit the user's lr and wd hold across every cut"
    spy = Spy()
    cb = PlayAndPruneCallback(0.5, phase_batches=3, max_iters=4, **_aggressive())
    with quiet(tiny): tiny.fit(5, 2.5e-3, wd=0.0123, cbs=[cb, spy])
    assert cb.loop.frame().removed.sum() > 0
    assert set(spy.hypers) == {(2.5e-3, 0.0123)}


def test_fit_one_cycle_keeps_its_schedule(tiny):
    "Under fit_one_cycle the lr of every step is fastai's one-cycle value, with or without the callback (and its cuts)"
    twin = make_learner(copy.deepcopy(tiny.model), tiny.dls)
    with_cb, without = Spy(), Spy()
    cb = PlayAndPruneCallback(0.5, phase_batches=3, max_iters=4, **_aggressive())
    with quiet(tiny): tiny.fit_one_cycle(2, 3e-3, cbs=[cb, with_cb])
    with quiet(twin): twin.fit_one_cycle(2, 3e-3, cbs=[without])
    assert cb.loop.frame().removed.sum() > 0 and cb.loop.done
    assert with_cb.hypers == without.hypers and len(with_cb.hypers) == 2 * len(tiny.dls.train)    # every step, the whole fit


def test_play_and_prune_anneals_within_every_phase(tiny):
    "The function API's schedule is fastai's ParamScheduler with `phase_cosine`: a cosine restarting with every phase"
    spy = Spy()
    play_and_prune(tiny, 0.5, lr=2e-3, phase_batches=4, max_iters=3, cbs=[spy], **_aggressive())
    assert len(spy.hypers) == 4 * 3
    assert [lr for lr, _ in spy.hypers] == pytest.approx([2e-3 * (0.01 + 0.99 * (1 + np.cos(np.pi * (k % 4) / 4)) / 2) for k in range(12)])


def test_fine_tune_prunes_in_one_run_across_its_two_stages(tiny):
    "Issue 10: the frozen stage pauses the run, the unfrozen stage continues it (one baseline, one iteration count)"
    n = len(tiny.dls.train)
    cb = PlayAndPruneCallback(0.5, phase_batches=5, max_iters=5, **_aggressive())
    base_acc = evaluate(tiny, "valid")
    with quiet(tiny): tiny.fine_tune(1, 1e-3, cbs=cb)
    h = cb.loop.frame()
    assert list(h.outcome).count("start") == 1 and cb.loop.baseline_acc == pytest.approx(base_acc)
    paused = h.index[h.outcome == "paused"].tolist()
    assert len(paused) == 1 and h.t[paused[0]] == n // 5                    # the frozen stage ended inside a phase
    final = h[h.outcome == "final"]
    assert len(final) == 1 and final.t.iloc[0] == 5                         # the unfrozen stage went on to max_iters
    assert final.batches.iloc[0] == n + (5 - n // 5) * 5                    # the stage-1 partial phase was trained, then restarted
    assert h.outcome.iloc[-1] in ("fine-tuned", "fine-tune discarded")     # the rest of the stage fine-tuned the final model
    assert h.batches.iloc[-1] == 2 * n and list(h.t) == sorted(h.t)


def test_a_reused_callback_continues_its_run_then_fine_tunes(tiny):
    "Issue 10: a fit that ends first pauses the run, the next fit continues it; once done, fits fine-tune within the tolerance"
    cb = PlayAndPruneCallback(0.5, phase_batches=4, max_iters=6, **_aggressive())
    n = len(tiny.dls.train)
    with quiet(tiny): tiny.fit(1, 1e-3, cbs=cb)
    assert not cb.loop.done and cb.loop.history[-1]["outcome"] == "paused" and cb.loop.iter == n // 4
    spy = Spy()
    with quiet(tiny): tiny.fit(3, 1e-3, cbs=[cb, spy])
    h = cb.loop.frame()
    assert cb.loop.done and list(h.outcome).count("start") == 1 and h[h.outcome == "final"].t.tolist() == [6]
    assert len(spy.steps) == 3 * n                                          # the fit ran every epoch it was asked for ...
    counts = [c for c, _ in spy.steps]
    assert len(set(counts[(6 - n // 4) * 4:])) == 1                         # ... pruning nothing after the loop stopped
    assert h.outcome.iloc[-1] in ("fine-tuned", "fine-tune discarded") and h.batches.iloc[-1] == 4 * n
    spy, rows = Spy(), len(h)
    with quiet(tiny): tiny.fit(1, 1e-3, cbs=[cb, spy])                     # done: a full epoch of fine-tuning, checked
    assert len(spy.steps) == n and len(set(c for c, _ in spy.steps)) == 1 and len(cb.loop.history) == rows + 1
    assert cb.loop.history[-1]["outcome"] in ("fine-tuned", "fine-tune discarded")
    assert evaluate(tiny, "valid") >= cb.loop.floor - 1e-9


def test_stop_fit_cancels_the_rest_of_the_fit(tiny):
    spy = Spy()
    cb = PlayAndPruneCallback(0.5, phase_batches=3, max_iters=2, stop_fit=True, **_aggressive())
    with quiet(tiny): tiny.fit(5, 1e-3, cbs=[cb, spy])
    assert len(spy.steps) == 6 and cb.loop.history[-1]["outcome"] == "final"
    spy = Spy()
    with quiet(tiny): tiny.fit(5, 1e-3, cbs=[cb, spy])                     # a done run with stop_fit: nothing to train
    assert not hasattr(spy, "steps")


def test_a_fine_tuned_model_below_the_floor_is_discarded(tiny, monkeypatch):
    "Training after the loop (the rest of the fit) keeps its model only within the tolerance"
    _script(monkeypatch, [0.90, 0.95, 0.95, 0.80])                         # accepted twice (then done), then fine-tuned too low
    cb = PlayAndPruneCallback(0.05, phase_batches=2, max_iters=2, **_aggressive())
    with quiet(tiny): tiny.fit(1, 1e-3, cbs=cb)
    h = cb.loop.frame()
    assert list(h.outcome) == ["start", "accepted", "accepted", "final", "fine-tune discarded"]
    assert _is_best(tiny, cb.loop) and h.acc.iloc[-1] == pytest.approx(0.95)


def test_nothing_is_pruned_during_lr_find(tiny):
    cb = PlayAndPruneCallback(0.5, phase_batches=2, max_iters=3, **_aggressive())
    tiny.add_cb(cb)
    try:
        before = copy.deepcopy(tiny.model.state_dict())
        with quiet(tiny): tiny.lr_find(num_it=12, show_plot=False)
        assert not cb.loop.started and all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in before.items())
        with quiet(tiny): tiny.fit(1, 1e-3)
        assert cb.loop.started and filter_counts(tiny.model)["conv1"] < 20
    finally: tiny.remove_cb(cb)


class Probe(Callback):
    "After every loss: the loss the optimiser will see, the unscaled loss, the batch size and the penalty"
    order = 20
    def __init__(self, loop): self.loop, self.rows = loop, []
    def after_loss(self):
        pen = self.loop.penalty()
        if self.training and pen is not None:
            self.rows.append((self.learn.loss_grad.item(), self.learn.loss.item(), len(self.learn.yb[0]), pen.item()))


@pytest.mark.parametrize("n_acc", [32, 64])
def test_the_penalty_is_scaled_with_gradient_accumulation(tiny, n_acc):
    "Issue 10: GradientAccumulation divides the loss by n_acc/bs; the penalty joins the loss first, so it is divided too"
    cb = PlayAndPruneCallback(0.5, phase_batches=4, max_iters=2, controller=FixedController(0.1, 0.95))
    probe = Probe(cb.loop)
    with quiet(tiny): tiny.fit(1, 1e-3, cbs=[cb, GradientAccumulation(n_acc), probe])
    assert probe.rows
    for loss_grad, loss, bs, pen in probe.rows:
        assert pen > 0 and loss_grad * n_acc / bs == pytest.approx(loss + pen, rel=1e-5)


def test_a_stopped_fit_leaves_no_autocast_behind(tiny):
    "Issue 10: the callback stops the fit after the step, once MixedPrecision has left autocast"
    cb = PlayAndPruneCallback(0.5, phase_batches=3, max_iters=2, stop_fit=True, **_aggressive())
    with quiet(tiny): tiny.fit(5, 1e-3, cbs=[cb, CPUMixedPrecision()])
    assert cb.loop.done and cb.loop.iter == 2                                 # the loop stopped the fit
    assert not torch.is_autocast_enabled("cpu")
    assert tiny.model(tiny.dls.valid.one_batch()[0]).dtype == torch.float32


def test_activation_stats_and_other_hooks_follow_the_pruned_model(tiny):
    "Issue 10: a fastai hook on the model neither breaks the checkpoints nor the tracing; it keeps recording after cuts"
    cb = PlayAndPruneCallback(0.5, phase_batches=3, max_iters=4, **_aggressive())
    stats = ActivationStats(with_hist=False)
    with quiet(tiny): tiny.fit(2, 1e-3, cbs=[cb, stats])
    assert filter_counts(tiny.model)["conv1"] < 20
    assert len(stats.stats) == 2 * len(tiny.dls.train)                       # one record per training batch, cuts or not
    assert not any(m._forward_hooks for m in tiny.model.modules())           # and fastai removed its hooks at the end


def test_groups_that_do_not_train_get_no_candidates(tiny):
    "A frozen producer cannot be pushed to zero: AFP leaves its group alone and prunes the others"
    tiny.model.conv1.weight.requires_grad_(False)
    cb = PlayAndPruneCallback(0.5, phase_batches=2, max_iters=3, **_aggressive())
    with quiet(tiny): tiny.fit(2, 1e-3, cbs=cb)
    counts = filter_counts(tiny.model)
    assert counts["conv1"] == 20 and counts["conv2"] < 50 and not tiny.model.conv1.weight.requires_grad


def test_a_dead_model_is_never_accepted(tiny):
    "Issue 9: weights that turn NaN mid-run are rolled back at once, even under a tolerance the dead model's accuracy meets"
    class Poison(Callback):
        order = 1
        def after_batch(self):
            if self.training and self.train_iter == 3:
                with torch.no_grad(): self.learn.model.conv2.weight[0, 0, 0, 0] = float("nan")
    cb = PlayAndPruneCallback(0.9, phase_batches=2, max_iters=3, controller=FixedController(0.1, 0.95))
    with quiet(tiny): tiny.fit(3, 1e-3, cbs=[cb, Poison()])
    h = cb.loop.frame()
    assert h.outcome[h.t == 2].tolist()[0] == "rolled back"
    assert all(torch.isfinite(p).all() for p in tiny.model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# interrupted training: the best accepted model stays in the learner
class InterruptAt(Callback):
    order = 95
    def __init__(self, n, exc=KeyboardInterrupt): self.n, self.i, self.exc = n, 0, exc
    def after_batch(self):
        if self.training:
            self.i += 1
            if self.i == self.n: raise self.exc("stopped by the test")


def _usable(learn):
    xb = learn.dls.valid.one_batch()[0]
    assert learn.model(xb).shape == (len(xb), 10)
    assert {id(p) for pg in learn.opt.param_lists for p in pg} == {id(p) for p in learn.model.parameters()}
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    shapes = filter_counts(learn.model)
    with quiet(learn): learn.fit(1, 1e-3)
    assert filter_counts(learn.model) == shapes
    assert all(not torch.equal(before[n], p) for n, p in learn.model.named_parameters()), "some layer no longer trains"


def _is_best(learn, loop):
    best = loop.best.model.state_dict()
    return all(torch.equal(v, best[k]) for k, v in learn.model.state_dict().items())


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_callback_run_leaves_the_best_accepted_model(tiny, monkeypatch, exc):
    "Issue 10: Ctrl-C (or a crash) inside a recovery phase: the callback alone puts the last accepted model back"
    _script(monkeypatch, [0.90, 0.95, 0.80])                                # accepted, then below the floor: recovering
    cb = PlayAndPruneCallback(0.05, phase_batches=2, max_iters=20, **_aggressive())
    with pytest.raises(exc), quiet(tiny): tiny.fit(50, 1e-3, cbs=[cb, InterruptAt(5, exc)])
    h = cb.loop.frame()
    assert list(h.outcome) == ["start", "accepted", "recovering", "interrupted"]
    assert h["filters.conv1"].iloc[-1] == h["filters.conv1"].iloc[1] < 20 and _is_best(tiny, cb.loop)
    assert "one_batch" not in tiny.__dict__                                  # the guard is gone with the fit
    _usable(tiny)


def test_a_fit_cancelled_inside_a_phase_keeps_only_a_model_within_the_tolerance(tiny, monkeypatch):
    "Another callback cancels the fit in a recovery phase: the model below the floor is replaced by the best one"
    _script(monkeypatch, [0.90, 0.95, 0.80, 0.80])
    cb = PlayAndPruneCallback(0.05, phase_batches=2, max_iters=20, **_aggressive())
    with quiet(tiny): tiny.fit(50, 1e-3, cbs=[cb, InterruptAt(5, CancelFitException)])
    h = cb.loop.frame()
    assert list(h.outcome) == ["start", "accepted", "recovering", "paused"] and not cb.loop.done
    assert h.acc.iloc[-1] == pytest.approx(0.95) and _is_best(tiny, cb.loop)


def test_interrupted_function_api_puts_the_last_accepted_model_back(tiny, monkeypatch):
    _script(monkeypatch, [0.90, 0.95, 0.95, 0.80])                         # accepted, accepted, then a bad phase
    with pytest.raises(KeyboardInterrupt):
        play_and_prune(tiny, 0.05, phase_batches=2, max_iters=20, cbs=[InterruptAt(7)], **_aggressive())
    # phases end after batches 2, 4, 6: the third (scripted 0.80) started recovery; the model of phase 2 comes back
    assert filter_counts(tiny.model)["conv1"] < 20
    _usable(tiny)


# ---------------------------------------------------------------------------------------------------------------
# the caller's model
def test_function_api_leaves_the_callers_network_alone(tiny):
    net = tiny.model
    before = copy.deepcopy(net.state_dict())
    play_and_prune(tiny, 0.5, phase_batches=2, max_iters=3, **_aggressive())
    assert tiny.model is not net and filter_counts(net) == filter_counts(lenet5())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())     # not even trained
    assert filter_counts(tiny.model)["conv1"] < 20


def test_replay(tiny, monkeypatch):
    _script(monkeypatch, [0.90, 0.89, 0.87, 0.86, 0.86])
    cb = PlayAndPruneCallback(stop_fit=True, tolerance=0.05, phase_batches=2, max_iters=4, **_aggressive())
    with quiet(tiny): tiny.fit(10, 1e-3, cbs=cb)
    h = cb.loop.frame()
    assert replay(h, 0.05)["macs"] == h.macs.iloc[-1]
    tight = replay(h, 0.02)                                                 # floor 0.88: stops before the 0.87 model
    assert tight["acc"] == pytest.approx(0.89) and tight["t"] == 1 and tight["macs"] > h.macs.iloc[-1]
    with pytest.raises(ValueError, match="tolerance"): replay(h, 5)


def test_a_resnet_with_tied_groups_and_batch_norm():
    "Residual streams are tied groups written through batch norms: the loop prunes them and the network still trains"
    from corrprune_edu.data import cifar10_dls
    from corrprune_edu.models import resnet_cifar
    learn = make_learner(resnet_cifar(20), cifar10_dls(10, n_test_per_class=5, bs=16))
    cb = PlayAndPruneCallback(0.9, phase_batches=2, max_iters=2, controller=FixedController(0.1, 0.95),
                              afp=AFP(max_frac=0.25, negligible=1.0))
    with quiet(learn): learn.fit(5, 1e-3, cbs=cb)
    counts = filter_counts(learn.model)
    assert counts["conv1"] < 16 and counts["layer1.0.conv2"] == counts["conv1"]          # a residual stream went
    assert counts["layer3.0.conv1"] < 64
    _usable(learn)
