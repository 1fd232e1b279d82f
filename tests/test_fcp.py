"FCP: the paper's key claim on a small seeded configuration, stop rules, safety of the loop."
import copy
import types

import pytest
import torch
from fastai.callback.core import Callback, CancelFitException

from corrprune_edu.core import filter_counts, set_seed
from corrprune_edu.fcp import FCPCallback, fcp, pair_correlations, correlation_penalty
from corrprune_edu.flops import count_macs
from corrprune_edu.models import lenet5, resnet_cifar
from corrprune_edu.pairs import plan_from_pairs, select_pairs
from corrprune_edu.surgery import prune_channels
from corrprune_edu.channels import analyze_channels
from corrprune_edu.train import cached_baseline, evaluate

DATA = dict(n_per_class=1000, n_test_per_class=200, epochs=3)   # the FCP tutorial's test configuration


def baseline():
    set_seed(0)
    return cached_baseline("lenet5", "mnist", **DATA)


def test_correlating_first_makes_the_drop_cheaper_than_dropping_naively():
    "Same episodes: FCP's accuracy right after each drop beats naive dropping (no regulariser, no fold)"
    fcp_learn = baseline(); set_seed(1)
    log = fcp(fcp_learn, macs_reduction=0.85, n_pairs=0.4, correlate_iters=50, finetune_iters=50)
    naive = baseline(); set_seed(1)
    naive_log = fcp(naive, episodes=fcp_learn.fcp_cb.recorded, lam=0.0, fold=False, correlate_iters=50, finetune_iters=50)
    assert len(log) == len(naive_log) >= 2
    assert list(log.filters) == list(naive_log.filters)                       # the same episodes were dropped
    assert (log.rho_after > naive_log.rho_after + 0.3).all()                 # the regulariser did correlate the pairs
    assert log.acc_after_drop.mean() > naive_log.acc_after_drop.mean() + 0.005, (log.acc_after_drop.tolist(), naive_log.acc_after_drop.tolist())


def test_accuracy_budget_rolls_back_to_the_last_good_round():
    learn = baseline()
    counts = filter_counts(learn.model)
    log = fcp(learn, tolerance=0.0, n_pairs=0.45, correlate_iters=1, finetune_iters=1, fold=False, lam=0.0)
    assert log.status.iloc[-1] == "rolled back"
    good = log[log.status == "accepted"]
    expected = counts if good.empty else dict(zip(counts, map(int, good.filters.iloc[-1].split("-"))))
    assert filter_counts(learn.model) == expected


def test_fcp_never_reads_the_test_set():
    learn = baseline()
    class Forbidden:
        def __iter__(self): raise AssertionError("FCP read the test set")
        def __len__(self): return 1
    learn.dls.loaders[2] = Forbidden()
    fcp(learn, macs_reduction=0.3, n_pairs=0.2, correlate_iters=5, finetune_iters=5)


def test_interrupted_fit_leaves_a_usable_smaller_model():
    learn = baseline()
    class StopMidRound(Callback):
        order = 60
        def after_batch(self):
            if len(self.learn.fcp_probe.recorded) == 1 and self.learn.fcp_probe.phase == "finetune": raise CancelFitException()
    cb = FCPCallback(macs_reduction=0.9, n_pairs=0.3, correlate_iters=5, finetune_iters=50)
    learn.fcp_probe = cb
    learn.fit(3, 1e-3, cbs=[cb, StopMidRound()])
    assert learn.model.conv1.out_channels < 20
    assert evaluate(learn, "valid") > 0.5
    assert {id(p) for pg in learn.opt.param_lists for p in pg} == {id(p) for p in learn.model.parameters()}


def test_regulariser_forms_and_gradients():
    learn = baseline()
    a = analyze_channels(learn.model, (1, 28, 28))
    pairs = select_pairs(learn.model, a, n_pairs=2)
    rho = pair_correlations(learn.model, a, pairs)
    for form in ("exp", "linear"):
        learn.model.zero_grad()
        correlation_penalty(rho, [p.group for p in pairs], form).backward(retain_graph=True)
        g = learn.model.conv2.weight.grad
        assert g is not None and g.abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    ({}, "stop rule"), (dict(macs_reduction=90), "fraction"), (dict(tolerance=1.5), "fraction"),
    (dict(macs_reduction=0.5, form="square"), "form"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FCPCallback(**kwargs)


def test_the_callers_model_is_never_changed():
    learn = baseline()
    original = learn.model
    state = {k: v.clone() for k, v in original.state_dict().items()}
    fcp(learn, macs_reduction=0.5, n_pairs=0.3, correlate_iters=10, finetune_iters=10)
    assert learn.model is not original and learn.model.conv1.out_channels < 20
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
        cb = FCPCallback(macs_reduction=target)
        cb.learn = types.SimpleNamespace(model=model)
        cb.analysis, cb.base_macs = a, base
        assert cb.trim_to_target(pairs) == pairs[:want], (name, target)
