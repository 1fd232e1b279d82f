"""Progressive ADMM: the projection and the W/Z/U algebra, the training contract of ADMMCallback (lr and wd used,
no optimiser rebuild, nothing during lr_find, penalty scaled under GradientAccumulation), masked ADMM, errors before
any work, and the progressive pool."""
import copy, itertools, re
from functools import partial

import pytest
import torch
from torch import nn
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.training import GradientAccumulation
from fastai.optimizer import SGD, momentum_step, adam_step

from corrprune_edu.admm import (LENET5_KEEP, ADMMCallback, admm_channel_plan, admm_init, admm_penalty, admm_prune, admm_update,
                                optimizer_for, progressive_admm, project_filters, project_topk)
from corrprune_edu.core import set_seed
from corrprune_edu.data import embedded_mnist_dls
from corrprune_edu.models import lenet5
from corrprune_edu.sparse import apply_masks, magnitude_masks, masks_equal, masks_from_zeros, sparsity_report
from corrprune_edu.checkpoint import prune_learner
from corrprune_edu.core import filter_counts
from corrprune_edu.train import make_learner, quiet


@pytest.fixture(scope="module")
def dls():
    return embedded_mnist_dls(n_per_class=60, bs=32)


def trained(dls, opt="adam", epochs=1, **kw):
    set_seed(0)
    learn = make_learner(lenet5(), dls, opt=opt, **kw)
    with quiet(learn): learn.fit_one_cycle(epochs)
    return learn


# -- the algebra ----------------------------------------------------------------------------------------------

def test_projection_is_the_nearest_sparse_tensor():
    "Brute force over every support of size k: no other k-sparse tensor is closer"
    g = torch.Generator().manual_seed(0)
    for k in range(0, 6):
        w = torch.randn(6, generator=g)
        best = min(torch.dist(w, w * torch.tensor([i in s for i in range(6)], dtype=w.dtype))
                   for s in itertools.combinations(range(6), k))
        p = project_topk(w, k)
        assert int(torch.count_nonzero(p)) == k
        assert torch.dist(w, p) == pytest.approx(float(best))


def test_update_algebra_and_rho_rescaling():
    set_seed(0)
    net = nn.Linear(8, 4)
    layers = admm_init(net, {"weight": 5}, rho=0.1)
    assert torch.equal(layers["weight"].Z, project_topk(net.weight.detach(), 5))
    assert int(torch.count_nonzero(layers["weight"].U)) == 0
    with torch.no_grad(): net.weight.add_(torch.randn(4, 8) * 0.1)
    layers["weight"].U = torch.randn(4, 8) * 0.01
    w, u = net.weight.detach().clone(), layers["weight"].U.clone()
    admm_update(net, layers, rho_growth=2.0)
    z = project_topk(w + u, 5)
    assert torch.equal(layers["weight"].Z, z)
    torch.testing.assert_close(layers["weight"].U, (u + w - z) / 2)       # scaled dual rescaled: rho doubled
    assert layers["weight"].rho == pytest.approx(0.2)


def test_penalty_gradient():
    set_seed(0)
    net = nn.Linear(5, 3)
    layers = admm_init(net, {"weight": 4}, rho=0.7)
    layers["weight"].U = torch.randn(3, 5)
    admm_penalty(net, layers).backward()
    l = layers["weight"]
    torch.testing.assert_close(net.weight.grad, 0.7 * (net.weight.detach() - l.Z + l.U))
    assert net.bias.grad is None


# -- the training contract -------------------------------------------------------------------------------------

def test_lr_wd_and_optimiser_are_the_users(dls):
    learn = trained(dls)
    opt = learn.opt
    cb = ADMMCallback(0.8, rho=0.01)
    with quiet(learn): learn.fit_one_cycle(1, lr_max=2e-3, wd=0.05, cbs=cb)
    assert learn.opt is opt                                           # no optimiser rebuild
    assert learn.opt.hypers[0]["wd"] == 0.05
    assert max(learn.recorder.lrs) == pytest.approx(2e-3, rel=0.05)
    assert cb.iteration == 1 and len(cb.history) == 4


def test_nothing_happens_during_lr_find(dls, tmp_path):
    learn = trained(dls)
    learn.path = tmp_path                                             # lr_find saves and restores the model there
    cb = ADMMCallback(0.8, rho=0.01)
    with quiet(learn): learn.fit(1, 1e-3, cbs=cb)
    learn.add_cb(cb)                                                  # a callback left on the learner
    state = {k: (l.Z.clone(), l.U.clone(), l.rho) for k, l in cb.layers.items()}
    weights = copy.deepcopy(learn.model.state_dict())
    with quiet(learn): learn.lr_find(num_it=8, show_plot=False, suggest_funcs=())
    learn.remove_cb(cb)
    assert cb.iteration == 1 and len(cb.records) == 4
    assert all(torch.equal(cb.layers[k].Z, z) and torch.equal(cb.layers[k].U, u) and cb.layers[k].rho == r
               for k, (z, u, r) in state.items())
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in weights.items())


class GradsAtStep(Callback):
    "Record the gradients the optimiser is about to use, then stop"
    order = 99
    def before_step(self):
        self.grads = {k: p.grad.detach().clone() for k, p in self.learn.model.named_parameters()}
        raise CancelFitException()


def first_step_grads(dls, bs, cbs):
    set_seed(0)
    model = lenet5()
    d = embedded_mnist_dls(n_per_class=60, bs=bs)
    d.train = d.train.new(shuffle=False, drop_last=False)
    learn = make_learner(model, d, opt="sgd", lr=0.01)
    rec = GradsAtStep()
    with quiet(learn): learn.fit(1, cbs=[ADMMCallback(0.9, rho=1.0), *cbs, rec])
    return rec.grads


def test_penalty_scaled_like_the_loss_under_gradient_accumulation(dls):
    "Two accumulated batches of 32 give the gradient of one batch of 64, penalty included (rho large enough to matter)"
    full = first_step_grads(dls, 64, [])
    accumulated = first_step_grads(dls, 32, [GradientAccumulation(n_acc=64)])
    for k in full: torch.testing.assert_close(accumulated[k], full[k], rtol=1e-4, atol=1e-6)


# -- masked ADMM, results, errors -------------------------------------------------------------------------------

def test_masked_admm_keeps_pruned_weights_dead(dls):
    learn = trained(dls, opt="sgd")
    masks = magnitude_masks(learn.model, {"conv1": 0.5, "fc1": 0.9})
    apply_masks(learn.model, masks, inplace=True)
    cb = ADMMCallback(n_keep={"conv1": 300, "fc1": 20_000, "conv2": 5_000}, rho=0.05, masks=masks)
    with quiet(learn): learn.fit(1, 0.01, cbs=cb)
    for k, m in masks.items():
        assert int(torch.count_nonzero(learn.model.get_parameter(k).detach()[~m])) == 0
    assert cb.layers["conv1.weight"].rho == 0.0                     # 250 live <= 300: done
    assert cb.layers["fc1.weight"].rho > 0 and cb.layers["conv2.weight"].rho > 0
    hard = cb.hard_masks()
    assert int(hard["conv1.weight"].sum()) == 250 and int(hard["fc1.weight"].sum()) == 20_000
    assert all(not (hard[k] & ~m).any() for k, m in masks.items())   # nothing pruned comes back


def test_admm_prune_reaches_exact_counts(dls):
    learn = trained(dls)
    n_keep = {"conv1": 100, "conv2": 2000, "fc1": 3600, "fc2": 350}
    with quiet(learn): res = admm_prune(learn, n_keep=n_keep, admm_epochs=1, retrain_epochs=1, lr=1e-3, rho=0.05, update_every=3)
    assert sparsity_report(learn.model).nonzero.tolist() == [100, 2000, 3600, 350, 6050]
    assert masks_equal(res.masks, masks_from_zeros(learn.model))
    assert res.epochs == 2 and res.history.iteration.max() == len(learn.dls.train) // 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.5), "sparsity"), (dict(n_keep={"fc9": 10}), "fc9"), (dict(n_keep={"fc1": 500_000}), "fc1"),
    (dict(sparsity=0.9, n_keep={"fc1": 10}), "exactly one")])
def test_bad_targets_fail_before_training(dls, kwargs, match):
    learn = trained(dls)
    before = copy.deepcopy(learn.model.state_dict())
    with pytest.raises(ValueError, match=match):
        with quiet(learn): admm_prune(learn, admm_epochs=1, retrain_epochs=0, **kwargs)
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())


def test_nan_weights_and_wrong_masks_fail_before_training(dls):
    learn = trained(dls)
    with torch.no_grad(): learn.model.fc1.weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match="fc1.weight.*NaN"):
        with quiet(learn): admm_prune(learn, 0.9, admm_epochs=1, retrain_epochs=0)
    learn = trained(dls)
    with pytest.raises(ValueError, match="conv2.weight"):
        admm_prune(learn, 0.9, masks={"conv2.weight": torch.ones(3, 3, dtype=torch.bool)})


def test_surgery_during_admm_is_a_clear_error(dls):
    class PruneOnce(Callback):
        order = 70
        def after_batch(self):
            if self.training and self.iter == 1: prune_learner(self.learn, {"conv2": [0, 1]})
    learn = trained(dls)
    with pytest.raises(ValueError, match="surgery during ADMM"):
        with quiet(learn): learn.fit(1, 1e-3, cbs=[ADMMCallback(0.8, update_every=2), PruneOnce()])


def test_reused_callback_continues(dls):
    learn = trained(dls)
    cb = ADMMCallback(0.9, rho=0.01, rho_growth=1.2, update_every=4)
    with quiet(learn): learn.fit(1, 1e-3, cbs=cb)
    n1, rho1 = cb.iteration, cb.layers["fc1.weight"].rho
    with quiet(learn): learn.fit(1, 1e-3, cbs=cb)
    assert cb.iteration == 2 * n1 and cb.history.iteration.tolist()[-1] == 2 * n1
    assert cb.layers["fc1.weight"].rho == pytest.approx(rho1 * 1.2 ** n1)


# -- progressive ------------------------------------------------------------------------------------------------

def test_progressive_pool(dls):
    learn = trained(dls)
    stages = [{"fc1": 40_000}, {"fc1": 30_000}, {"fc1": 20_000}, {"fc1": 10_000}]
    with quiet(learn): log = progressive_admm(learn, stages, admm_epochs=1, retrain_epochs=1, keep_best=2, lr=1e-3, rho=0.01)
    assert log.started_from[:2].tolist() == ["dense", "dense"]
    pool = {"stage 1": log.valid_acc[0], "stage 2": log.valid_acc[1]}
    best = max(pool, key=pool.get)
    assert log.started_from[2] == best                               # the most accurate partial model ...
    pool[f"stage 3"] = log.valid_acc[2]; del pool[best]              # ... is replaced by the new one
    assert log.started_from[3] == max(pool, key=pool.get)
    assert log.nonzero.tolist() == [30_500 + n for n in (40_000, 30_000, 20_000, 10_000)]   # other layers stay dense
    assert int(torch.count_nonzero(learn.model.fc1.weight)) == 10_000
    with quiet(learn := trained(dls)): chain = progressive_admm(learn, stages[:3], admm_epochs=1, retrain_epochs=0, keep_best=1, lr=1e-3)
    assert chain.started_from.tolist() == ["dense", "stage 1", "stage 2"]
    with pytest.raises(ValueError, match=r"stages\[1\]"): progressive_admm(learn, [{"fc1": 100}, {"fc1": 200}])


# -- structured ADMM --------------------------------------------------------------------------------------------

def test_filter_projection_is_the_nearest_filter_sparse_tensor():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 3, 2, generator=g)
    for k in range(0, 6):
        best = min(torch.dist(w, w * torch.tensor([i in s for i in range(5)], dtype=w.dtype).view(-1, 1, 1))
                   for s in itertools.combinations(range(5), k))
        p = project_filters(w, k)
        assert int(p.flatten(1).abs().sum(1).gt(0).sum()) == k
        assert torch.dist(w, p) == pytest.approx(float(best))


def test_channel_plan_from_filter_admm(dls):
    learn = trained(dls)
    with quiet(learn):
        plan, cb = admm_channel_plan(learn, {"conv1": 12, "conv2": 30}, admm_epochs=2, lr=0.02, rho=1.0,
                                     update_every=4, admm_opt_func=partial(SGD, mom=0.9))
    assert {k: len(v) for k, v in plan.items()} == {"conv1": 8, "conv2": 20}
    hard = cb.hard_masks()
    assert sorted(plan["conv2"]) == torch.nonzero(~hard["conv2.weight"].flatten(1).any(1)).flatten().tolist()
    gaps = cb.history.pivot(index="iteration", columns="param", values="rel_gap")
    assert (gaps.iloc[-1] < gaps.iloc[0]).all()
    prune_learner(learn, plan)
    assert list(filter_counts(learn.model).values()) == [12, 30, 500, 10]
    with pytest.raises(ValueError, match="structure"): ADMMCallback(0.5, structure="rows")


def test_optimizer_for_the_admm_phase_only(dls):
    learn = trained(dls)
    adam = learn.opt_func
    with quiet(learn), optimizer_for(learn, partial(SGD, mom=0.9)):
        learn.fit(1, 0.01, cbs=ADMMCallback(0.8, rho=0.05), reset_opt=True)
        assert momentum_step in learn.opt.cbs and adam_step not in learn.opt.cbs
    assert learn.opt_func is adam
    with pytest.raises(RuntimeError):
        with optimizer_for(learn, partial(SGD, mom=0.9)): raise RuntimeError("a failed fit")
    assert learn.opt_func is adam                                  # restored after a failure too
    with quiet(learn): res = admm_prune(learn, 0.8, admm_epochs=1, retrain_epochs=1, lr=0.01, retrain_lr=1e-3,
                                        admm_opt_func=partial(SGD, mom=0.9), rho=0.05)
    assert adam_step in learn.opt.cbs                                # retraining ran with the learner's Adam
    assert learn.opt_func is adam and res.epochs == 2


def test_interrupted_progressive_leaves_the_last_finished_stage(dls):
    class Interrupt(Callback):
        "Ctrl-C in the middle of the second stage"
        def __init__(self): self.n = 0
        def after_batch(self):
            self.n += self.training
            if self.n == len(self.dls.train) * 2: self.stage1 = copy.deepcopy(self.learn.model.state_dict())
            if self.n == len(self.dls.train) * 2 + 5: raise KeyboardInterrupt()   # stage 1 is 2 epochs
    learn = trained(dls)
    learn.add_cb(interrupt := Interrupt())
    with pytest.raises(KeyboardInterrupt):
        with quiet(learn): progressive_admm(learn, [{"fc1": 40_000}, {"fc1": 20_000}], admm_epochs=1, retrain_epochs=1,
                                            keep_best=1, lr=1e-3, rho=0.01)
    assert len(learn.progressive_pool) == 1 and learn.progressive_pool[0]["name"] == "stage 1"
    assert int(torch.count_nonzero(learn.model.fc1.weight)) == 40_000         # stage 1's model, not a half-done stage 2
    assert torch.equal(learn.model.fc1.weight != 0, learn.progressive_pool[0]["masks"]["fc1.weight"])
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in interrupt.stage1.items())


# -- the demo ---------------------------------------------------------------------------------------------------

def test_demo_admm_prints_nonzeros_compression_and_accuracy(capsys):
    "`corrprune-demo --method admm` (small): every layer ends at its target non-zeros, and the output says so and by how much"
    from corrprune_edu.demo import ADMM_RATE, main
    assert main(["--method", "admm", "--epochs", "2", "--finetune-epochs", "1", "--n-per-class", "200"]) == 0
    out = capsys.readouterr().out
    rows = {l.split()[0]: l.split()[1:] for l in out.splitlines() if l.split() and l.split()[-1].endswith("x")
            and l.split()[0] in ("conv1", "conv2", "fc1", "fc2", "total")}
    dense = {k.rsplit(".", 1)[0]: p.numel() for k, p in lenet5().named_parameters() if k.endswith("weight")}
    keep = dict(LENET5_KEEP[ADMM_RATE], total=sum(LENET5_KEEP[ADMM_RATE].values())); dense["total"] = sum(dense.values())
    assert rows == {k: [f"{dense[k]:,}", f"{dense[k]:,}", f"{keep[k]:,}", f"{dense[k] / keep[k]:.1f}x"] for k in keep}
    base, pruned = map(float, re.search(r"baseline ([\d.]+)%, pruned ([\d.]+)%", out).groups())
    hard, retrained = map(float, re.search(r"right after hard pruning ([\d.]+)%, after masked retraining ([\d.]+)%", out).groups())
    assert base > 80 and pruned > 30 and retrained > hard                # far above chance (10%); retraining recovers
