"FCP: the paper's key claim on a small seeded configuration, stop rules, fastai's contract (issue 10) and bad input (issue 9)."
import math
import warnings

import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.training import GradientAccumulation

from corrprune_edu.channels import analyze_channels
from corrprune_edu.core import filter_counts, set_seed
from corrprune_edu.data import mnist_dls
from corrprune_edu.fcp import FCP, FCPCallback, correlation_penalty, fcp, pair_correlations
from corrprune_edu.flops import count_macs
from corrprune_edu.models import lenet5, resnet_cifar
from corrprune_edu.pairs import plan_from_pairs, select_pairs
from corrprune_edu.surgery import prune_channels
from corrprune_edu.train import cached_baseline, evaluate, fit, make_learner, quiet

DATA = dict(n_per_class=1000, n_test_per_class=200, epochs=3)   # the FCP tutorial's test configuration


def baseline():
    set_seed(0)
    return cached_baseline("lenet5", "mnist", **DATA)


def small_learner(n=30, epochs=1, **kwargs):
    "LeNet-5 trained briefly on the MNIST subset shipped with the package (seconds)"
    set_seed(0)
    learn = make_learner(lenet5(), mnist_dls(n, n_test_per_class=10, source="embedded", bs=32), **kwargs)
    return fit(learn, epochs) if epochs else learn


class Hypers(Callback):
    "Record the optimiser's lr and wd at every step, and the learner's model size"
    order = 90
    def before_fit(self): self.seen = []
    def after_step(self): self.seen.append((self.opt.hypers[-1]["lr"], self.opt.hypers[-1]["wd"], self.learn.model.conv2.out_channels))


# -- the method ------------------------------------------------------------------------------------------------

def test_correlating_first_makes_the_drop_cheaper_than_dropping_naively():
    "Same episodes: FCP's accuracy right after each drop beats naive dropping (no regulariser, no fold)"
    fcp_learn = baseline(); set_seed(1)
    log = fcp(fcp_learn, macs_reduction=0.85, n_pairs=0.4, correlate_iters=50, finetune_iters=50)
    naive = baseline(); set_seed(1)
    naive_log = fcp(naive, episodes=fcp_learn.fcp_cb.fcp.recorded, lam=0.0, fold=False, correlate_iters=50, finetune_iters=50)
    assert len(log) == len(naive_log) >= 2
    assert list(log.filters) == list(naive_log.filters)                       # the same episodes were dropped
    assert (log.rho_after > naive_log.rho_after + 0.3).all()                 # the regulariser did correlate the pairs
    assert log.acc_after_drop.mean() > naive_log.acc_after_drop.mean() + 0.005, (log.acc_after_drop.tolist(), naive_log.acc_after_drop.tolist())


def test_accuracy_budget_rolls_back_to_the_last_good_round():
    learn = baseline()
    counts = filter_counts(learn.model)
    log = fcp(learn, tolerance=0.0, n_pairs=0.45, correlate_iters=1, finetune_iters=1, fold=False, lam=0.0)
    run = learn.fcp_cb.fcp
    assert log.status.iloc[-1] == "rolled back" and run.done and "tolerance" in run.stop_reason
    good = log[log.status == "accepted"]
    expected = counts if good.empty else dict(zip(counts, map(int, good.filters.iloc[-1].split("-"))))
    assert filter_counts(learn.model) == expected


def test_a_rollback_restores_the_checkpoint_with_its_optimiser_state():
    "A round below the floor goes back to the best checkpoint: its weights, its optimiser state, the fit's hyper-parameters"
    learn = small_learner()                                          # trained: the optimiser has state to keep
    run = FCP(tolerance=0.01, n_pairs=0.3, fold=False)
    learn.opt.set_hypers(lr=3e-4, wd=0.02)
    run.start(learn)
    best = run.best
    assert best.opt_state["conv2.weight"]
    run.drop(learn, learn.dls.train.one_batch()[0])
    run.base_acc = 2.0                                               # no model can reach this: the round must roll back
    assert not run.end_round(learn) and run.done and run.log[-1]["status"] == "rolled back"
    assert filter_counts(learn.model) == filter_counts(best.model)
    for k, v in best.model.state_dict().items(): assert torch.equal(learn.model.state_dict()[k], v), k
    for name, p in learn.model.named_parameters():
        for k, v in best.opt_state[name].items():
            if isinstance(v, torch.Tensor): assert torch.equal(learn.opt.state[p][k], v), (name, k)
    assert (learn.opt.hypers[0]["lr"], learn.opt.hypers[0]["wd"]) == (3e-4, 0.02)


def test_fcp_never_reads_the_test_set():
    learn = small_learner()
    class Forbidden:
        def __iter__(self): raise AssertionError("FCP read the test set")
        def __len__(self): return 1
    learn.dls.loaders[2] = Forbidden()
    fcp(learn, macs_reduction=0.3, n_pairs=0.2, correlate_iters=3, finetune_iters=3)


def test_regulariser_forms_and_gradients():
    model = lenet5()
    a = analyze_channels(model, (1, 28, 28))
    pairs = select_pairs(model, a, n_pairs=2)
    rho = pair_correlations(model, a, pairs)
    for form in ("exp", "linear"):
        model.zero_grad()
        correlation_penalty(rho, [p.group for p in pairs], form).backward(retain_graph=True)
        g = model.conv2.weight.grad
        assert g is not None and g.abs().sum() > 0


def test_the_callers_model_is_never_changed():
    learn = small_learner()
    original = learn.model
    state = {k: v.clone() for k, v in original.state_dict().items()}
    fcp(learn, macs_reduction=0.5, n_pairs=0.3, correlate_iters=5, finetune_iters=5)
    assert learn.model is not original and learn.model.conv1.out_channels < 20
    assert learn.fcp_cb.fcp.original is original
    for k, v in original.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_macs_search_through_the_cost_model_picks_what_pruning_copies_picks(name):
    "The fewest most-correlated pairs whose pruned copy reaches the target (counted on real copies), else all of them"
    model, shape = (lenet5(), (1, 28, 28)) if name == "lenet5" else (resnet_cifar(20), (3, 32, 32))
    a = analyze_channels(model, shape)
    pairs = sorted(select_pairs(model, a, n_pairs=0.3), key=lambda p: -abs(p.rho))
    base = count_macs(model, shape)
    macs = [count_macs(prune_channels(model, plan_from_pairs(pairs[:k]), analysis=a), shape) for k in range(len(pairs) + 1)]
    for target in (0.02, 0.1, 0.25, 0.5, 0.95):
        want = next((k for k in range(1, len(pairs) + 1) if macs[k] <= (1 - target) * base), len(pairs))
        run = FCP(macs_reduction=target)
        run.base_macs = base
        assert run.trim_to_target(pairs, model, a) == pairs[:want], (name, target)


# -- fastai's contract (issue 10, section 1) -----------------------------------------------------------------------

def test_fit_keeps_the_users_learning_rate_and_weight_decay_through_every_drop():
    "fit(n, 5e-3, wd=0.123) trains at 5e-3 / 0.123 before and after every surgery (it ran at 1e-3 / 1e-2)"
    learn = small_learner()
    spy = Hypers()
    learn.fit(2, 5e-3, wd=0.123, cbs=[FCPCallback(macs_reduction=0.5, n_pairs=0.2, correlate_iters=3, finetune_iters=3), spy])
    assert {(lr, wd) for lr, wd, _ in spy.seen} == {(5e-3, 0.123)}
    assert len({c for *_, c in spy.seen}) >= 2                                 # and the model was cut in between


def test_fit_one_cycle_keeps_the_schedule_and_the_weight_decay():
    learn = small_learner()
    spy = Hypers()
    with quiet(learn):
        learn.fit_one_cycle(2, 4e-3, wd=0.0777, cbs=[FCPCallback(macs_reduction=0.5, n_pairs=0.2, correlate_iters=3, finetune_iters=3), spy])
    lrs = [lr for lr, *_ in spy.seen]
    assert {wd for _, wd, _ in spy.seen} == {0.0777}
    peak = lrs.index(max(lrs))
    assert math.isclose(max(lrs), 4e-3, rel_tol=1e-3) and 0 < peak < len(lrs) - 1   # one cycle: up, then down
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert len({c for *_, c in spy.seen}) >= 2


def test_the_function_trains_at_the_learning_rate_it_states():
    learn = small_learner()
    spy = Hypers()
    learn.add_cb(spy)
    fcp(learn, macs_reduction=0.3, lr=2e-3, wd=0.05, n_pairs=0.2, correlate_iters=3, finetune_iters=3)
    assert {(lr, wd) for lr, wd, _ in spy.seen} == {(2e-3, 0.05)}
    spy.seen.clear()
    learn.fcp_cb = None
    fcp(learn, macs_reduction=0.5, n_pairs=0.2, correlate_iters=3, finetune_iters=3)   # default lr, the learner's wd
    assert {(lr, wd) for lr, wd, _ in spy.seen} == {(1e-3, learn.wd)}


def test_lr_find_neither_prunes_nor_starts_the_run():
    learn = small_learner()
    cb = FCPCallback(macs_reduction=0.3, n_pairs=0.2, correlate_iters=2, finetune_iters=2)
    learn.add_cb(cb)
    counts = filter_counts(learn.model)
    with quiet(learn): learn.lr_find(num_it=10, show_plot=False)
    assert filter_counts(learn.model) == counts and cb.fcp.best is None and cb.fcp.round == 0
    with quiet(learn): learn.fit(1, 1e-3)
    assert filter_counts(learn.model) != counts                     # the fit after it does prune


def test_a_reused_callback_continues_toward_its_target():
    "Two fits with one callback: one baseline, round numbers go on, the target is not overshot (22.6% for 12% before)"
    learn = small_learner(n=60)
    cb = FCPCallback(macs_reduction=0.5, n_pairs=0.1, correlate_iters=4, finetune_iters=4)
    base = count_macs(learn.model, (1, 28, 28))
    with quiet(learn): learn.fit(1, 1e-3, cbs=cb)                   # 16 batches: two rounds, a third begun
    first = len(cb.fcp.log)
    base_acc = cb.fcp.base_acc
    assert 1 <= first and not cb.fcp.done
    with quiet(learn): learn.fit(3, 1e-3, cbs=cb)
    log = cb.fcp.frame()
    assert cb.fcp.done and len(log) > first and list(log["round"]) == list(range(1, len(log) + 1))
    assert cb.fcp.base_macs == base and cb.fcp.base_acc == base_acc
    removed = 1 - count_macs(learn.model, (1, 28, 28)) / base
    assert 0.5 <= removed < 0.5 + 0.05, removed
    counts = filter_counts(learn.model)
    with quiet(learn): learn.fit(1, 1e-3, cbs=cb)                   # a done run prunes no more
    assert filter_counts(learn.model) == counts


def two_groups(m):
    "conv layers as one parameter group, the classifier as another (so `freeze` freezes the convs)"
    return [list(m.conv1.parameters()) + list(m.conv2.parameters()), list(m.fc1.parameters()) + list(m.fc2.parameters())]


def test_fine_tune_prunes_to_the_target_once_in_its_unfrozen_stage():
    "Frozen filters cannot be correlated: the frozen stage prunes nothing (and says so), the unfrozen one reaches the target"
    learn = small_learner(n=60, splitter=two_groups)
    base = count_macs(learn.model, (1, 28, 28))
    cb = FCPCallback(macs_reduction=0.3, n_pairs=0.2, correlate_iters=3, finetune_iters=3)
    with quiet(learn), pytest.warns(UserWarning, match="frozen"):
        learn.fine_tune(2, 1e-3, freeze_epochs=1, cbs=cb)
    removed = 1 - count_macs(learn.model, (1, 28, 28)) / base
    assert cb.fcp.done and 0.3 <= removed < 0.4
    assert cb.fcp.base_macs == base


def test_frozen_groups_are_never_pruned():
    learn = small_learner(n=60)
    learn.model.conv1.weight.requires_grad_(False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fcp(learn, macs_reduction=0.3, n_pairs=0.3, correlate_iters=3, finetune_iters=3)
    assert any("frozen" in str(x.message) and "conv1" in str(x.message) for x in w)
    assert learn.model.conv1.out_channels == 20 and learn.model.conv2.out_channels < 50
    assert all(p.group != "conv1" for e in learn.fcp_cb.fcp.recorded for p in e)


class PenaltyGrad(Callback):
    "The gradient of conv2's weight at the first optimiser step (after GradientAccumulation let one through)"
    order = GradientAccumulation.order + 1
    def before_step(self):
        if not hasattr(self, "grad"): self.grad = self.learn.model.conv2.weight.grad.clone()


@pytest.mark.parametrize("n_acc_batches", [1, 3])
def test_the_penalty_weighs_the_same_under_gradient_accumulation(n_acc_batches):
    "With the task loss switched off, the step's gradient is the penalty's, whatever the accumulation count"
    def grad(use_ga):
        learn = small_learner(epochs=0)
        learn.loss_func = lambda pred, *y: pred.sum() * 0.0
        spy = PenaltyGrad()
        cbs = [FCPCallback(macs_reduction=0.5, n_pairs=0.2, correlate_iters=50, finetune_iters=1, fold=False), spy]
        if use_ga: cbs.append(GradientAccumulation(n_acc=n_acc_batches * learn.dls.train.bs))
        with quiet(learn): learn.fit(1, 1e-3, cbs=cbs)
        return spy.grad
    assert FCPCallback.order < GradientAccumulation.order
    g0, g1 = grad(False), grad(True)
    assert g0.abs().sum() > 0
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)


class StopAfterDrop(Callback):
    "Cancel the fit on the batch where FCP's first drop happened (so the new model was never fine-tuned or checked)"
    order = 90
    def after_batch(self):
        if self.learn.fcp_probe.recorded and not hasattr(self, "done"): self.done = True; raise CancelFitException()


def test_stopped_right_after_a_drop_leaves_a_model_checked_against_the_tolerance():
    learn = small_learner(n=60)
    base_counts = filter_counts(learn.model)
    cb = FCPCallback(tolerance=0.0, n_pairs=0.45, correlate_iters=3, finetune_iters=50, lam=0.0, fold=False)
    learn.fcp_probe = cb.fcp
    with quiet(learn): learn.fit(2, 1e-3, cbs=[cb, StopAfterDrop()])
    last = cb.fcp.log[-1]
    assert last["status"].endswith("(fit ended)") and len(cb.fcp.log) == 1
    ok = last["acc_after_finetune"] >= cb.fcp.base_acc
    assert filter_counts(learn.model) == (dict(zip(base_counts, map(int, last["filters"].split("-")))) if ok else base_counts)
    assert filter_counts(learn.model) == filter_counts(cb.fcp.best.model)
    assert {id(p) for pg in learn.opt.param_lists for p in pg} == {id(p) for p in learn.model.parameters()}


def test_interrupted_in_the_correlate_phase_leaves_the_accepted_model():
    learn = small_learner()
    class Stop(Callback):
        order = 90
        def after_batch(self):
            if self.learn.fcp_probe.phase == "correlate" and self.learn.fcp_probe.iters == 2: raise CancelFitException()
    cb = FCPCallback(macs_reduction=0.3, n_pairs=0.2, correlate_iters=5, finetune_iters=5)
    learn.fcp_probe = cb.fcp
    with quiet(learn): learn.fit(1, 1e-2, cbs=[cb, Stop()])
    best = cb.fcp.best.model.state_dict()
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, best[k]), k
    assert cb.fcp.phase == "idle" and not cb.fcp.log


def test_a_keyboard_interrupt_inside_fcp_leaves_the_best_accepted_model():
    "fastai runs no after_fit after a KeyboardInterrupt: the function closes the round itself"
    learn = small_learner()
    class Interrupt(Callback):
        order = 90
        def after_batch(self):
            self.fcp_run = next(cb.fcp for cb in self.learn.cbs if isinstance(cb, FCPCallback))
            if self.fcp_run.recorded: raise KeyboardInterrupt()      # right after the first drop
    stop = Interrupt()
    learn.add_cb(stop)
    with pytest.raises(KeyboardInterrupt):
        fcp(learn, macs_reduction=0.5, n_pairs=0.2, correlate_iters=3, finetune_iters=30)
    run = stop.fcp_run
    assert run.phase == "idle" and len(run.log) == 1 and run.log[-1]["status"].endswith("(fit ended)")
    assert filter_counts(learn.model) == filter_counts(run.best.model)
    for k, v in run.best.model.state_dict().items(): assert torch.equal(learn.model.state_dict()[k], v), k


# -- bad input (issue 9) ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, err, name", [
    ({}, ValueError, "stop rule"), (dict(macs_reduction=90), ValueError, "macs_reduction"),
    (dict(macs_reduction=float("nan")), ValueError, "macs_reduction"), (dict(macs_reduction=0), ValueError, "macs_reduction"),
    (dict(tolerance=1.5), ValueError, "tolerance"), (dict(tolerance=-0.01), ValueError, "tolerance"),
    (dict(tolerance=float("inf")), ValueError, "tolerance"), (dict(macs_reduction=0.5, form="square"), ValueError, "form"),
    (dict(macs_reduction=0.5, lam=float("nan")), ValueError, "lam"), (dict(macs_reduction=0.5, lam=float("inf")), ValueError, "lam"),
    (dict(macs_reduction=0.5, lam=-1.0), ValueError, "lam"), (dict(macs_reduction=0.5, correlate_iters=0), ValueError, "correlate_iters"),
    (dict(macs_reduction=0.5, finetune_iters=-3), ValueError, "finetune_iters"), (dict(macs_reduction=0.5, correlate_iters=2.5), TypeError, "correlate_iters"),
    (dict(macs_reduction=0.5, max_rounds=0), ValueError, "max_rounds"), (dict(macs_reduction=0.5, min_channels=0), ValueError, "min_channels"),
    (dict(macs_reduction=0.5, n_total=0), ValueError, "n_total"), (dict(macs_reduction=0.5, drop_rule="biggest"), ValueError, "drop_rule"),
    (dict(episodes=[[(0, 1)]]), TypeError, "episodes"),
])
def test_bad_arguments_are_refused_by_name(kwargs, err, name):
    with pytest.raises(err, match=name):
        FCPCallback(**kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_before_any_work(value):
    learn = small_learner(epochs=0)
    with torch.no_grad(): learn.model.conv2.weight[3, 0, 0, 0] = value
    model = learn.model
    with pytest.raises(ValueError, match="conv2.weight"):
        fcp(learn, macs_reduction=0.3)
    assert learn.model is model and model.conv2.out_channels == 50 and not hasattr(learn, "fcp_cb")


@pytest.mark.parametrize("kwargs, name", [(dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(wd=-1e-4), "wd")])
def test_the_function_checks_its_own_arguments(kwargs, name):
    learn = small_learner(epochs=0)
    with pytest.raises(ValueError, match=name):
        fcp(learn, macs_reduction=0.3, **kwargs)
