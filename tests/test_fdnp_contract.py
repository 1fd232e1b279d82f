"""fastai's contract for FDNPCallback, a table parallel to `test_fastai_contract.py` (issue 10 section 2, issue 13).

The weight-level methods keep every parameter's shape, so "pruned" here means: the masked entries of every pruned
parameter are zero and the masks keep at most half of them (the target is 80%). The frequency variants also replace
the conv parameters (`weight` becomes `coef`) at the first fit, which is where a careless implementation loses the
user's lr, wd, frozen groups or optimiser. Rows: fit, fit_one_cycle, fine_tune with a frozen stage, ParamScheduler,
lr_find, SaveModelCallback, GradientAccumulation, learn.save / learn.load into a fresh learner.
"""
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler, SchedLin
from fastai.callback.tracker import SaveModelCallback
from fastai.callback.training import GradientAccumulation

from corrprune_edu.fdnp import FDNPCallback, frequency_layers, to_frequency, to_spatial
from corrprune_edu.models import lenet5
from corrprune_edu.surgery import copy_model
from corrprune_edu.train import quiet
# the shared small learner, the step spy and the helpers of the structured methods' table
from test_fastai_contract import (KeepEpoch0, Spy, dls, first_epoch_is_best, learner, opt_holds_model, same_weights,
                                  trained_weights, two_groups)

VARIANTS = {"FDNP": dict(), "BA-FDNP": dict(band_rule="linear", spread=1.0), "spatial": dict(domain="spatial")}


def make_cb(variant, **kwargs): return FDNPCallback(sparsity=0.8, **VARIANTS[variant], **kwargs)


def pruned(learn, cb) -> bool:
    "Masked entries are zero in the learner's model, and the masks keep at most half of the pruned entries"
    params = dict(learn.model.named_parameters())
    if not cb.masks: return False
    zero = all((params[n].detach()[~m] == 0).all() for n, m in cb.masks.items())
    kept = sum(int(m.sum()) for m in cb.masks.values()) / sum(m.numel() for m in cb.masks.values())
    return zero and kept <= 0.5


def right_domain(learn, variant) -> bool:
    return bool(frequency_layers(learn.model)) == (VARIANTS[variant].get("domain", "frequency") == "frequency")


@pytest.mark.parametrize("variant", VARIANTS)
def test_fit(variant, learner):
    learn, spy, cb = learner(), Spy(want_lr=5e-3), make_cb(variant)
    with quiet(learn): learn.fit(2, 5e-3, wd=0.123, cbs=[cb, spy])
    spy.check(wd=0.123)
    assert pruned(learn, cb) and spy.epochs == [2] and opt_holds_model(learn) and right_domain(learn, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fit_one_cycle(variant, learner):
    learn, spy, cb = learner(), Spy(), make_cb(variant)
    with quiet(learn): learn.fit_one_cycle(2, 4e-3, wd=0.0777, cbs=[cb, spy])
    spy.check(wd=0.0777)
    assert pruned(learn, cb) and spy.epochs == [2]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fine_tune_keeps_the_frozen_stage_frozen(variant, learner):
    "Both stages keep fine_tune's schedules and wd; the model is converted once; frozen conv entries do not train"
    learn, spy, cb = learner(splitter=two_groups), Spy(), make_cb(variant)
    class Frozen(Callback):
        "The conv parameters and masks at the end of the frozen stage (the first fit)"
        order = 90
        def after_fit(self):
            if hasattr(self, "convs"): return
            self.convs = {n: p.detach().clone() for n, p in self.learn.model.named_parameters() if n.startswith("conv")}
            self.masks = {n: m.clone() for n, m in cb.masks.items()}
    frozen = Frozen()
    with quiet(learn): learn.fine_tune(2, 2e-3, freeze_epochs=1, wd=0.05, cbs=[cb, spy, frozen])
    spy.check(wd=0.05)
    assert spy.epochs == [1, 2] and pruned(learn, cb) and opt_holds_model(learn) and right_domain(learn, variant)
    assert cb.pruner.iteration == 3 * len(learn.dls.train) and learn.opt.frozen_idx == 0   # one pruner over both stages
    start = dict((learner().model if variant == "spatial" else to_frequency(learn.fdnp_original)).named_parameters())
    assert frozen.masks and any(not m.all() for m in frozen.masks.values())              # the frozen stage pruned ...
    for n, p in frozen.convs.items():                                     # ... but trained no kept conv entry
        kept = frozen.masks.get(n, torch.ones_like(p, dtype=torch.bool))
        torch.testing.assert_close(p[kept], start[n].detach()[kept], msg=n)


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_scheduler(variant, learner):
    learn, spy, cb = learner(), Spy(), make_cb(variant)
    with quiet(learn): learn.fit(2, cbs=[cb, ParamScheduler({"lr": SchedLin(2e-3, 2e-4)}), spy])
    spy.check(wd=learn.wd)
    assert pruned(learn, cb) and spy.epochs == [2]


@pytest.mark.parametrize("variant", VARIANTS)
def test_lr_find(variant, learner):
    "The sweep prunes and converts nothing; the next fit does"
    learn, cb = learner(), make_cb(variant)
    learn.add_cb(cb)
    before = copy_model(learn.model)
    with quiet(learn): learn.lr_find(num_it=20, show_plot=False)
    assert same_weights(learn.model, before) and cb.pruner is None and not frequency_layers(learn.model)
    spy = Spy(want_lr=1e-3)
    with quiet(learn): learn.fit(2, 1e-3, cbs=spy)
    assert pruned(learn, cb) and right_domain(learn, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_model_callback(variant, learner):
    "The best epoch (the first) comes back at the end, into the model the optimiser holds, with its pruned entries zero"
    learn, keep, cb = learner(), KeepEpoch0(), make_cb(variant, iter_stop=None)
    with quiet(learn): learn.fit(3, 1e-3, cbs=[cb, SaveModelCallback(comp=first_epoch_is_best), keep])
    assert same_weights(learn.model, keep.model0) and opt_holds_model(learn)
    assert any((p == 0).float().mean() > 0.5 for n, p in learn.model.named_parameters() if n in cb.masks)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_accumulation(variant, learner):
    learn, spy, cb = learner(), Spy(want_lr=1e-3), make_cb(variant)
    with quiet(learn): learn.fit(2, 1e-3, cbs=[cb, GradientAccumulation(n_acc=3 * learn.dls.train.bs), spy])
    spy.check(wd=learn.wd)
    n = len(learn.dls.train)
    assert pruned(learn, cb) and spy.epochs == [2] and len(spy.steps) == 2 * n // 3   # steps only every 3rd batch
    assert cb.pruner.iteration == 2 * n                                                 # masks still follow every batch


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_into_a_fresh_learner(variant, learner):
    "learn.save, then learn.load into a fresh learner of the same architecture (converted like the saved one): same model"
    learn, cb = learner(), make_cb(variant)
    with quiet(learn): learn.fit(2, 1e-3, cbs=cb)
    learn.save("pruned")
    fresh = learner()
    if not right_domain(fresh, variant): fresh.model = to_frequency(fresh.model)   # the frequency variants' architecture
    fresh.load("pruned")
    assert same_weights(fresh.model, learn.model)
    x = learn.dls.valid.one_batch()[0]
    learn.model.eval(); fresh.model.eval()
    with torch.no_grad():
        assert torch.equal(fresh.model(x), learn.model(x))
        deployed = to_spatial(fresh.model).eval()                              # and a plain nn.Conv2d model computes it
        assert not frequency_layers(deployed)
        torch.testing.assert_close(deployed(x), learn.model(x), rtol=1e-5, atol=1e-5)
