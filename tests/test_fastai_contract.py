"""fastai's contract, tested once for every pruning method (issue 10, section 2).

A table of method x scenario: each test below is one scenario, run for every method in `METHODS`, on a small real Learner
(LeNet-5 on the MNIST subset shipped with the package; a real `vision_learner` for the frozen body). What every row asserts:
the learning rate, weight decay and schedule the user asked for are the ones the optimiser uses at every step; the fit runs
the epochs it was asked for; nothing is pruned inside `lr_find`; fastai's own callbacks work beside the method's; a pruned
model goes through `learn.save` / `learn.load`. Method-specific knobs live in `METHODS` only.

Weight-level methods (issue 12) keep every shape, so "pruned" is measured by each row's `size`: parameters for filter
surgery, non-zero parameters for masks, and for ADMM (which zeroes nothing until its hard pruning, after the fit) how
far the weights lie from the sparse target set, ||W - P(W)|| / ||W||.
"""
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.hook import ActivationStats
from fastai.callback.progress import CSVLogger, ShowGraphCallback
from fastai.callback.schedule import ParamScheduler, SchedLin
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
from fastai.callback.training import GradientAccumulation
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.vision.learner import vision_learner

from corrprune_edu.admm import ADMMCallback, project_topk
from corrprune_edu.cop import COPCallback
from corrprune_edu.core import filter_counts, set_seed
from corrprune_edu.data import mnist_dls
from corrprune_edu.fcp import FCPCallback
from corrprune_edu.models import lenet5
from corrprune_edu.play_and_prune import AFP, FixedController, PlayAndPruneCallback
from corrprune_edu.sparse import GradualMagnitudeCallback, keep_counts, maskable_weights, masks_equal, masks_from_zeros
from corrprune_edu.surgery import copy_model
from corrprune_edu.train import fit, make_learner, quiet

def n_params(model): return sum(p.numel() for p in model.parameters())
def n_nonzero(model): return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())

ADMM_SPARSITY = 0.9
def admm_target_keep(model): return keep_counts(maskable_weights(model), ADMM_SPARSITY)

def off_target(model):
    "||W - P(W)|| / ||W|| over the conv and fc weights, P keeping the 10% largest of each: ADMM pulls it down"
    keep, ws = admm_target_keep(model), maskable_weights(model)
    far = sum(float((w.detach() - project_topk(w.detach(), keep[k])).pow(2).sum()) for k, w in ws.items())
    return (far / sum(float(w.detach().pow(2).sum()) for w in ws.values())) ** 0.5


# Each method, set to prune within the first epoch of a 16-batch epoch. `penalty`: it adds a loss term.
# `size`: what pruning shrinks (default: the number of parameters); `shrink`: "pruned" means size < shrink * size at the
# start. ADMM's 0.92: training without its penalty also concentrates the weights a little (off_target fell to 0.93-0.995
# of its start across these scenarios), with the penalty to 0.47-0.90 (measured when the rows were added).
METHODS = {
    "FCP": dict(cb=lambda: FCPCallback(macs_reduction=0.3, n_pairs=0.2, correlate_iters=3, finetune_iters=3), penalty=True),
    "COP": dict(cb=lambda: COPCallback(amount=0.3, at=0.3), penalty=False),
    "PlayAndPrune": dict(cb=lambda: PlayAndPruneCallback(tolerance=0.05, phase_batches=4, max_iters=6, afp=AFP(max_frac=0.3, negligible=1.0),
                                                         controller=FixedController(lam=0.05, W=0.95)), penalty=True),
    "GradualMagnitude": dict(cb=lambda: GradualMagnitudeCallback(sparsity=0.9, end=0.5, n_steps=4), penalty=False, size=n_nonzero),
    "ADMM": dict(cb=lambda: ADMMCallback(ADMM_SPARSITY, rho=0.2, rho_growth=1.5, update_every=4), penalty=True, size=off_target, shrink=0.92),
}
def size_of(method): return METHODS[method].get("size", n_params)
def shrunk(method, after, before) -> bool: return after < METHODS.get(method, {}).get("shrink", 1.0) * before


# -- a small real learner -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dls():
    return mnist_dls(60, n_test_per_class=10, source="embedded", bs=32)


@pytest.fixture(scope="module")
def trained_weights(dls):
    set_seed(0)
    return fit(make_learner(lenet5(), dls), 1).model.state_dict()


@pytest.fixture(autouse=True)
def _autocast_off_afterwards():
    "A row that leaves autocast on (the bug `test_mixed_precision` catches) must not change the rows after it"
    yield
    if torch.is_autocast_enabled("cpu"): torch.set_autocast_enabled("cpu", False)


def two_groups(m):
    "conv layers as one parameter group, the classifier as another (so `freeze` freezes the convs)"
    return [list(m.conv1.parameters()) + list(m.conv2.parameters()), list(m.fc1.parameters()) + list(m.fc2.parameters())]


@pytest.fixture
def learner(dls, trained_weights, tmp_path):
    "A fresh learner around a briefly trained LeNet-5 (same weights every time), saving under tmp_path"
    def make(**kwargs):
        model = lenet5(); model.load_state_dict(trained_weights)
        learn = make_learner(model, dls, **kwargs)
        learn.path = tmp_path
        return learn
    return make


class Spy(Callback):
    "Per optimiser step: the lr and wd the optimiser holds, the lr fastai's scheduler set (or `want_lr`), the model's `size`"
    order = 95                                            # after every other callback's before_step (and GradientAccumulation's skips)
    def __init__(self, want_lr=None, method=None):
        self.want_lr, self.method, self.size, self.steps, self.epochs = want_lr, method, size_of(method) if method else n_params, [], []
    def before_fit(self): self.epochs.append(0)
    def after_epoch(self): self.epochs[-1] += 1
    def before_step(self):
        hypers = self.learn.opt.hypers
        ps = getattr(self.learn, "param_scheduler", None)
        want = self.want_lr if self.want_lr is not None else ps.scheds["lr"](self.pct_train)
        self.steps.append(dict(lr=[h["lr"] for h in hypers], want=np.broadcast_to(want, len(hypers)).tolist(),
                               wd=[h["wd"] for h in hypers], size=self.size(self.learn.model)))

    def check(self, wd):
        "Every step used the scheduled (or asked) lr and the asked wd"
        assert self.steps, "no optimiser step was recorded"
        for k, s in enumerate(self.steps):
            np.testing.assert_allclose(s["lr"], s["want"], rtol=1e-6, err_msg=f"lr at step {k}")
            assert s["wd"] == [wd] * len(s["wd"]), f"wd at step {k}: {s['wd']}"

    @property
    def pruned(self) -> bool: return shrunk(self.method, self.steps[-1]["size"], self.steps[0]["size"])


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def opt_holds_model(learn):
    return {id(p) for pg in learn.opt.param_lists for p in pg} == {id(p) for p in learn.model.parameters()}


# -- the schedule the user asked for ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_fit(method, learner):
    learn, spy = learner(), Spy(want_lr=5e-3, method=method)
    with quiet(learn): learn.fit(2, 5e-3, wd=0.123, cbs=[METHODS[method]["cb"](), spy])
    spy.check(wd=0.123)
    assert spy.pruned and spy.epochs == [2] and opt_holds_model(learn)


@pytest.mark.parametrize("method", METHODS)
def test_fit_one_cycle(method, learner):
    learn, spy = learner(), Spy(method=method)
    with quiet(learn): learn.fit_one_cycle(2, 4e-3, wd=0.0777, cbs=[METHODS[method]["cb"](), spy])
    spy.check(wd=0.0777)
    assert spy.pruned and spy.epochs == [2]


@pytest.mark.parametrize("method", METHODS)
def test_fine_tune(method, learner):
    "Both stages keep fine_tune's schedules and the wd asked for, run their epochs, and prune once in total"
    learn, spy = learner(splitter=two_groups), Spy(method=method)
    cb, size = METHODS[method]["cb"](), size_of(method)
    before = size(learn.model)
    with quiet(learn), warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # FCP says it leaves the frozen stage's convs alone
        learn.fine_tune(2, 2e-3, freeze_epochs=1, wd=0.05, cbs=[cb, spy])
    spy.check(wd=0.05)
    assert spy.epochs == [1, 2] and shrunk(method, size(learn.model), before)
    once = {"FCP": lambda: cb.fcp.done and 0.3 <= cb.fcp.macs_removed(learn.model) < 0.4,
            "COP": lambda: cb.done and filter_counts(learn.model) != filter_counts(lenet5()) and sum(filter_counts(learn.model)[k] for k in ("conv1", "conv2")) == 70 - 21,
            "PlayAndPrune": lambda: [h["outcome"] for h in cb.loop.history].count("start") == 1
                                    and [h["outcome"] for h in cb.loop.history].count("final") == 1
                                    and "paused" in [h["outcome"] for h in cb.loop.history]
                                    and [h["t"] for h in cb.loop.history] == sorted(h["t"] for h in cb.loop.history),
            "GradualMagnitude": lambda: masks_equal(masks_from_zeros(learn.model), cb.masks)       # the masks hold after the last step
                                        and sum(int(m.sum()) for m in cb.masks.values()) == sum(admm_target_keep(learn.model).values()),
            "ADMM": lambda: cb.iteration == 3 * len(learn.dls.train) // 4                            # one ADMM run across both stages
                            and cb.history.iteration.unique().tolist() == list(range(1, cb.iteration + 1))}
    assert once[method]()


@pytest.mark.parametrize("method", METHODS)
def test_param_scheduler(method, learner):
    learn, spy = learner(), Spy(method=method)
    with quiet(learn): learn.fit(2, cbs=[METHODS[method]["cb"](), ParamScheduler({"lr": SchedLin(2e-3, 2e-4)}), spy])
    spy.check(wd=learn.wd)
    assert spy.pruned and spy.epochs == [2]


@pytest.mark.parametrize("method", METHODS)
def test_lr_find(method, learner):
    "The sweep prunes nothing and leaves the method's state untouched: the next fit starts from the whole model and prunes"
    learn, size = learner(), size_of(method)
    learn.add_cb(METHODS[method]["cb"]())
    before = copy_model(learn.model)
    with quiet(learn): learn.lr_find(num_it=20, show_plot=False)
    assert same_weights(learn.model, before)
    spy = Spy(want_lr=1e-3, method=method)
    with quiet(learn): learn.fit(2, 1e-3, cbs=spy)
    assert spy.steps[0]["size"] == size(before) and spy.pruned        # (masks made during the sweep would apply at once)


# -- fastai's own callbacks beside the method -----------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_recorder(method, learner):
    learn = learner()
    with quiet(learn): learn.fit(2, 1e-3, cbs=METHODS[method]["cb"]())
    r = learn.recorder
    assert len(r.values) == 2 and len(r.lrs) == len(r.losses) == 2 * len(learn.dls.train)
    assert all(np.isfinite(v).all() for v in r.values)
    r.plot_loss()


class KeepEpoch0(Callback):
    "A copy of the model SaveModelCallback saved at the end of epoch 0"
    order = SaveModelCallback.order + 1
    def after_epoch(self):
        if self.epoch == 0: self.model0 = copy_model(self.learn.model)


def first_epoch_is_best(val, best): return best == -np.inf           # SaveModelCallback keeps epoch 0, deterministically


@pytest.mark.parametrize("method", METHODS)
def test_save_model_callback(method, learner):
    "Loads its best epoch back after later cuts (it crashed in after_fit with a size mismatch)"
    learn, keep = learner(), KeepEpoch0()
    with quiet(learn): learn.fit(3, 1e-3, cbs=[METHODS[method]["cb"](), SaveModelCallback(comp=first_epoch_is_best), keep])
    assert same_weights(learn.model, keep.model0) and opt_holds_model(learn)


@pytest.mark.parametrize("method", METHODS)
def test_early_stopping_with_restore(method, learner):
    learn, keep = learner(), KeepEpoch0()
    cbs = [METHODS[method]["cb"](), SaveModelCallback(comp=first_epoch_is_best),
           EarlyStoppingCallback(comp=first_epoch_is_best, patience=1), keep]
    with quiet(learn): learn.fit(5, 1e-3, cbs=cbs)
    assert len(learn.recorder.values) == 2 and same_weights(learn.model, keep.model0)


@pytest.mark.parametrize("method", METHODS)
def test_csv_logger(method, learner, tmp_path):
    learn = learner()
    with quiet(learn): learn.fit(2, 1e-3, cbs=[METHODS[method]["cb"](), CSVLogger(fname=tmp_path/"history.csv")])
    lines = (tmp_path/"history.csv").read_text().strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch")


@pytest.mark.parametrize("method", METHODS)
def test_show_graph_callback(method, learner):
    learn = learner()
    with learn.no_logging(): learn.fit(2, 1e-3, cbs=[METHODS[method]["cb"](), ShowGraphCallback()])
    assert len(learn.recorder.values) == 2


@pytest.mark.parametrize("method", METHODS)
def test_gradient_accumulation(method, learner):
    learn, spy = learner(), Spy(want_lr=1e-3, method=method)
    with quiet(learn): learn.fit(2, 1e-3, cbs=[METHODS[method]["cb"](), GradientAccumulation(n_acc=3 * learn.dls.train.bs), spy])
    spy.check(wd=learn.wd)
    assert spy.pruned and spy.epochs == [2]


class FirstStepGrad(Callback):
    "Every parameter's gradient at the first optimiser step (after GradientAccumulation let one through)"
    order = GradientAccumulation.order + 1
    def before_step(self):
        if not hasattr(self, "grads"): self.grads = {n: p.grad.clone() for n, p in self.learn.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m]["penalty"]])
def test_gradient_accumulation_scales_the_penalty_with_the_loss(method, learner):
    "With the task loss switched off, the first step's gradient is the penalty's, with or without accumulation"
    def grads(n_acc_batches):
        learn, spy = learner(), FirstStepGrad()
        learn.loss_func = lambda pred, *y: pred.sum() * 0.0
        cbs = [METHODS[method]["cb"](), spy] + ([GradientAccumulation(n_acc=n_acc_batches * learn.dls.train.bs)] if n_acc_batches else [])
        with quiet(learn): learn.fit(1, 1e-3, cbs=cbs)
        return spy.grads
    g0, g3 = grads(0), grads(3)
    assert any(g.abs().sum() > 0 for g in g0.values()), "the penalty has no gradient at the first step"
    assert g0.keys() == g3.keys()
    for n in g0: torch.testing.assert_close(g3[n], g0[n], rtol=1e-4, atol=1e-7, msg=n)


class CPUMixedPrecision(MixedPrecision):
    "fastai's MixedPrecision with bfloat16 autocast on the CPU (fastai's own enters CUDA autocast only)"
    def __init__(self): super().__init__(amp_mode="bf16")
    def before_fit(self):
        super().before_fit()
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_precision(method, learner):
    learn, spy = learner(), Spy(want_lr=1e-3, method=method)
    with quiet(learn): learn.fit(2, 1e-3, cbs=[METHODS[method]["cb"](), CPUMixedPrecision(), spy])
    assert spy.pruned and spy.epochs == [2]
    assert not torch.is_autocast_enabled("cpu")                          # autocast is off after the fit
    assert learn.model(learn.dls.valid.one_batch()[0]).dtype == torch.float32


@pytest.mark.parametrize("method", METHODS)
def test_activation_stats_and_hooks(method, learner):
    learn, seen, act = learner(), [], ActivationStats()
    handle = learn.model.conv1.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with quiet(learn): learn.fit(2, 1e-3, cbs=[METHODS[method]["cb"](), act])
    stats = act.stats
    assert len(stats) == 2 * len(learn.dls.train) and all(s is not None for s in stats[-1])
    seen.clear()
    learn.model(learn.dls.valid.one_batch()[0])
    assert seen == [learn.model.conv1.out_channels]                       # the user's hook is on the current model ...
    handle.remove(); seen.clear(); learn.model(learn.dls.valid.one_batch()[0])
    assert seen == []                                                    # ... and its handle still removes it


@pytest.mark.parametrize("method", METHODS)
def test_save_load_into_a_fresh_learner(method, learner):
    learn, cb, size = learner(), METHODS[method]["cb"](), size_of(method)
    with quiet(learn): learn.fit(2, 1e-3, cbs=cb)
    assert shrunk(method, size(learn.model), size(learner().model))
    learn.save("pruned")
    fresh = learner()
    fresh.load("pruned")
    assert filter_counts(fresh.model) == filter_counts(learn.model) and same_weights(fresh.model, learn.model)
    if getattr(cb, "masks", None): assert masks_equal(masks_from_zeros(fresh.model), cb.masks)    # the masks come back from the zeros
    x = learn.dls.valid.one_batch()[0]
    learn.model.eval(); fresh.model.eval()
    assert torch.equal(fresh.model(x), learn.model(x))


def tiny_arch(pretrained=False):
    "A small torchvision-style classifier for `vision_learner` (cut at the pooling layer, like resnet18)"
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.mark.parametrize("method", METHODS)
def test_frozen_vision_learner_body(method, dls):
    "vision_learner's frozen body stays frozen through any cut (or the method says why it leaves it alone); it trains once unfrozen"
    set_seed(0)
    learn = vision_learner(dls, tiny_arch, pretrained=False, n_in=1, n_out=10, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    learn.freeze()                                                       # what vision_learner does for pretrained bodies
    size = size_of(method)
    before = size(learn.model)
    with quiet(learn), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        learn.fit(2, 1e-3, cbs=METHODS[method]["cb"]())
    said = any("frozen" in str(x.message) for x in w)
    assert shrunk(method, size(learn.model), before) or said
    assert learn.opt.frozen_idx == 1 and opt_holds_model(learn)
    body = learn.model[0]
    assert not any(m.weight.requires_grad for m in body.modules() if isinstance(m, nn.Conv2d))
    frozen = {n: p.detach().clone() for n, p in body.named_parameters() if not p.requires_grad}
    with quiet(learn): learn.fit(1, 1e-3)
    assert all(torch.equal(p, frozen[n]) for n, p in learn.model[0].named_parameters() if n in frozen)
    learn.unfreeze()
    with quiet(learn): learn.fit(1, 1e-3)
    assert any(not torch.equal(p, frozen[n]) for n, p in learn.model[0].named_parameters() if n in frozen)
