"""Surgery inside real fastai Learners, checkpoints and files: optimiser state and hypers, hooks, frozen learners, Checkpoint,
learn.save / learn.load, SaveModelCallback after a cut, save_pruned / load_pruned and their errors (issues 9 and 10)."""
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from fastai.callback.core import Callback
from fastai.callback.hook import ActivationStats
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
from fastai.learner import load_learner
from fastai.optimizer import OptimWrapper

from corrprune_edu.channels import PruningError
from corrprune_edu.checkpoint import (Checkpoint, load_pruned, move_hooks, prune_learner, save_pruned, swap_model,
                                      unpruned_model)
from corrprune_edu.core import filter_counts
from corrprune_edu.data import mnist_dls
from corrprune_edu.models import lenet5, resnet_cifar
from corrprune_edu.surgery import copy_model, prune_channels
from corrprune_edu.train import evaluate, fit, make_learner, quiet


def small_dls():
    return mnist_dls(20, n_test_per_class=10, source="embedded", bs=32)


def trained(model=None, epochs=1, **kwargs):
    learn = make_learner(model or lenet5(), small_dls(), **kwargs)
    return fit(learn, epochs)


def two_groups(m):
    "conv layers as one parameter group, the classifier as another (so `freeze` freezes the convs)"
    return [list(m.conv1.parameters()) + list(m.conv2.parameters()), list(m.fc1.parameters()) + list(m.fc2.parameters())]


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def opt_ids(learn): return {id(p) for pg in learn.opt.param_lists for p in pg}


# -- prune_learner -------------------------------------------------------------------------------------------------

def test_frozen_learner_is_pruned_stays_frozen_and_trains_after_unfreeze():
    learn = make_learner(lenet5(), small_dls(), splitter=two_groups)
    learn.freeze()
    fit(learn, 1)
    before = sum(p.numel() for p in learn.model.parameters())
    summary = prune_learner(learn, {"conv2": [0, 1, 2]})
    assert summary["params_after"] < before == summary["params_before"]
    assert learn.model.conv2.out_channels == 47 and learn.opt.frozen_idx == 1
    assert not learn.model.conv2.weight.requires_grad          # still frozen
    w = learn.model.conv2.weight.detach().clone()
    fit(learn, 1)
    assert torch.equal(w, learn.model.conv2.weight)            # frozen layers do not move
    learn.unfreeze()
    fit(learn, 1)
    assert not torch.equal(w, learn.model.conv2.weight)        # and train once unfrozen


def test_torch_optimiser_state_and_hypers_are_carried():
    learn = make_learner(lenet5(), small_dls(), opt_func=partial(OptimWrapper, opt=torch.optim.SGD, momentum=0.9))
    fit(learn, 1)
    learn.opt.set_hyper("lr", 0.0123)
    old = learn.opt.opt.state[learn.model.conv1.weight]["momentum_buffer"].clone()
    prune_learner(learn, {"conv1": [5]})
    new = learn.opt.opt.state[learn.model.conv1.weight]["momentum_buffer"]
    assert torch.equal(new, old[[i for i in range(20) if i != 5]])
    assert learn.opt.opt.param_groups[0]["lr"] == 0.0123     # fastai's hypers of a PyTorch optimiser, carried too
    fit(learn, 1)   # and training goes on
    assert learn.model.conv1.out_channels == 19


def test_a_failure_in_the_optimiser_rebuild_leaves_the_learner_as_it_was():
    learn = trained()
    model, opt = learn.model, learn.opt
    hook_calls = []
    learn.model.conv2.register_forward_hook(lambda m, i, o: hook_calls.append(1))
    def broken(): raise RuntimeError("injected failure")
    learn.create_opt = broken
    with pytest.raises(RuntimeError, match="injected"):
        prune_learner(learn, {"conv2": [0, 1]})
    del learn.create_opt
    assert learn.model is model and learn.opt is opt and model.conv2.out_channels == 50
    assert opt_ids(learn) == {id(p) for p in model.parameters()}
    model(torch.zeros(1, 1, 28, 28)); assert hook_calls       # the user's hook is still on the model


def test_hooks_follow_the_pruned_model_and_their_handles_keep_working():
    learn = trained()
    seen = []
    handle = learn.model.conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    old = learn.model
    prune_learner(learn, {"conv2": list(range(10))})
    x = torch.zeros(2, 1, 28, 28)
    old(x); assert seen == []                                 # the old model no longer calls it
    learn.model(x); assert seen == [40]                       # the pruned one does
    handle.remove(); learn.model(x); assert seen == [40]      # and the user's handle still removes it


class CutAt(Callback):
    "Prune `plan` at the end of epoch `epoch`"
    order = 60
    def __init__(self, plan, epoch=0): self.plan, self.at = plan, epoch
    def after_epoch(self):
        if self.epoch == self.at: prune_learner(self.learn, self.plan)


@pytest.mark.parametrize("every", [None, 1])                              # hooked once, or again every batch
def test_activation_stats_keep_recording_after_a_cut(every):
    learn = make_learner(lenet5(), small_dls(), cbs=ActivationStats(every=every))
    with quiet(learn): learn.fit(2, 1e-3, cbs=CutAt({"conv2": [0, 1, 2]}))
    stats = learn.activation_stats.stats
    assert len(stats) == 2 * len(learn.dls.train) and learn.model.conv2.out_channels == 47
    assert stats[-1][1] is not None and stats[-1][1]["mean"] != stats[0][1]["mean"]   # conv2's stats, recorded after the cut


def test_export_and_load_learner_round_trip(tmp_path):
    learn = trained()
    prune_learner(learn, {"conv1": [0, 1], "fc1": list(range(250))})
    acc = evaluate(learn, "test")
    learn.export(tmp_path/"pruned.pkl")
    loaded = load_learner(tmp_path/"pruned.pkl")
    assert filter_counts(loaded.model) == filter_counts(learn.model)
    assert loaded.model.pruning_history == learn.model.pruning_history
    x = learn.dls.test.one_batch()[0]
    learn.model.eval(); loaded.model.eval()
    assert torch.equal(loaded.model(x), learn.model(x))
    assert acc > 0.3


# -- Checkpoint ----------------------------------------------------------------------------------------------------

def test_checkpoint_restores_model_optimiser_state_hypers_frozen_state_and_extras():
    learn = make_learner(lenet5(), small_dls(), splitter=two_groups)
    fit(learn, 1)
    learn.freeze(); learn.model.fc2.bias.requires_grad_(False)
    learn.opt.set_hypers(lr=0.02, wd=0.3)
    cp = Checkpoint(learn, round=4, pairs=[1, 2])
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    state = {k: v.clone() for k, v in learn.opt.state[learn.model.fc1.weight].items() if isinstance(v, torch.Tensor)}
    learn.unfreeze(); learn.opt.set_hypers(lr=0.5, wd=0.0)
    prune_learner(learn, {"conv2": list(range(20))})
    fit(learn, 1)
    assert cp.restore(learn) == dict(round=4, pairs=[1, 2])
    assert all(torch.equal(v, weights[k]) for k, v in learn.model.state_dict().items())
    assert all(torch.equal(learn.opt.state[learn.model.fc1.weight][k], v) for k, v in state.items())
    assert [(h["lr"], h["wd"]) for h in learn.opt.hypers] == [(0.02, 0.3)] * 2
    assert learn.opt.frozen_idx == 1 and not learn.model.conv1.weight.requires_grad and not learn.model.fc2.bias.requires_grad
    assert learn.model.fc1.weight.requires_grad and opt_ids(learn) == {id(p) for p in learn.model.parameters()}
    first = learn.model
    cp.restore(learn)                                                     # restorable again, each time a fresh copy
    assert learn.model is not first and learn.model is not cp.model and same_weights(learn.model, first)


def test_a_failed_restore_leaves_the_learner_as_it_was():
    learn = trained()
    cp = Checkpoint(learn)
    prune_learner(learn, {"conv1": [3]})
    model, opt = learn.model, learn.opt
    def broken(): raise RuntimeError("injected failure")
    learn.create_opt = broken
    with pytest.raises(RuntimeError): cp.restore(learn)
    del learn.create_opt
    assert learn.model is model and learn.opt is opt and model.conv1.out_channels == 19


def test_move_hooks_moves_every_kind_of_hook():
    src, calls = lenet5(), []
    src.conv1.register_forward_pre_hook(lambda m, i: calls.append("pre"))
    src.conv1.register_forward_hook(lambda m, i, o: calls.append("fwd"))
    src.fc2.register_full_backward_hook(lambda m, gi, go: calls.append("bwd"))
    dst = copy_model(src)
    assert move_hooks(src, dst) == 3
    src(torch.zeros(1, 1, 28, 28)).sum().backward(); assert calls == []
    dst(torch.zeros(1, 1, 28, 28)).sum().backward(); assert sorted(calls) == ["bwd", "fwd", "pre"]


class ScaledConv(nn.Conv2d):
    "A conv whose own forward hook (part of the module's behaviour) scales its output"
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = 1.0
        self.register_forward_hook(self.apply_scale)
    def apply_scale(self, m, i, o): return o * self.scale


def test_a_modules_own_hooks_stay_with_it_while_the_users_hooks_move():
    src, calls = nn.Sequential(ScaledConv(1, 4, 3)), []
    src[0].register_forward_hook(lambda m, i, o: calls.append("user"))
    dst = copy_model(src)
    assert move_hooks(src, dst) == 1
    x = torch.randn(2, 1, 8, 8)
    src[0].scale = 2.0                                                    # each model keeps its own scaling hook
    torch.testing.assert_close(src(x), 2 * dst(x))
    calls.clear()
    src(x); assert calls == []
    dst(x); assert calls == ["user"]


# -- learn.save / learn.load -------------------------------------------------------------------------------------------

def test_learn_save_load_round_trips_a_pruned_model_into_a_fresh_learner(tmp_path):
    learn = trained()
    learn.path = tmp_path
    prune_learner(learn, {"conv1": [0, 1], "conv2": list(range(20))})
    fit(learn, 1)
    file = learn.save("pruned")
    saved = torch.load(file, weights_only=True)                             # plain tensors, lists and dicts
    assert set(saved) == {"model", "opt", "pruning"} and len(saved["pruning"]["history"]) == 1
    fresh = make_learner(lenet5(), small_dls()); fresh.path = tmp_path
    fresh.load("pruned")
    assert filter_counts(fresh.model) == filter_counts(learn.model) == {"conv1": 18, "conv2": 30, "fc1": 500, "fc2": 10}
    assert same_weights(fresh.model, learn.model)
    for p, q in zip(fresh.model.parameters(), learn.model.parameters()):
        for k, v in learn.opt.state[q].items():
            if isinstance(v, torch.Tensor): assert torch.equal(fresh.opt.state[p][k], v)
    assert opt_ids(fresh) == {id(p) for p in fresh.model.parameters()}
    fit(fresh, 1)                                                         # and it trains on
    back = load_pruned(file, lenet5())                                     # the same file, without a Learner
    assert same_weights(back, learn.model)


def test_an_unpruned_learner_still_uses_fastais_own_file(tmp_path):
    learn = trained(); learn.path = tmp_path
    saved = torch.load(learn.save("plain"), weights_only=False)
    assert set(saved) == {"model", "opt"}
    fresh = make_learner(lenet5(), small_dls()); fresh.path = tmp_path
    fresh.load("plain")
    assert same_weights(fresh.model, learn.model)


def test_a_checkpoint_from_before_a_cut_loads_back_into_the_same_learner(tmp_path):
    learn = trained(); learn.path = tmp_path
    learn.save("e0")
    before = copy_model(learn.model)
    prune_learner(learn, {"conv2": list(range(10))}); learn.save("e1")
    once = copy_model(learn.model)
    prune_learner(learn, {"conv1": [0, 1]})
    learn.load("e1"); assert same_weights(learn.model, once)
    learn.load("e0"); assert same_weights(learn.model, before) and filter_counts(learn.model)["conv2"] == 50
    assert unpruned_model(learn) is not None


def test_a_learner_pruned_outside_prune_learner_says_how_to_load_an_earlier_file(tmp_path):
    learn = trained(); learn.path = tmp_path
    learn.save("e0")
    pruned = prune_channels(learn.model, {"conv2": [1, 2]}, (1, 28, 28))
    swap_model(learn, pruned)                                             # no unpruned architecture remembered
    with pytest.raises(PruningError, match="fresh Learner"):
        learn.load("e0")
    assert learn.model is pruned


def test_loading_into_the_wrong_architecture_is_a_clear_error_that_changes_nothing(tmp_path):
    learn = trained(); learn.path = tmp_path
    prune_learner(learn, {"conv1": [0]}); learn.save("l")
    other = make_learner(resnet_cifar(20), small_dls()); other.path = tmp_path
    other.create_opt()
    model, opt = other.model, other.opt
    weights = copy_model(model)
    with pytest.raises(PruningError, match="architecture"):
        other.load("l")
    assert other.model is model and other.opt is opt and same_weights(model, weights)


def best_epoch_0(val, best): return best == -np.inf                    # only the first epoch counts as "better"


def test_save_model_callback_loads_its_best_epoch_after_a_later_cut(tmp_path):
    learn = make_learner(lenet5(), small_dls()); learn.path = tmp_path
    class Keep(Callback):
        order = SaveModelCallback.order + 1                               # the model SaveModelCallback just saved
        def after_epoch(self):
            if self.epoch == 0: self.first = copy_model(self.learn.model)
    class LateCut(CutAt): order = SaveModelCallback.order + 2            # a cut after the best epoch was saved
    keep = Keep()
    with quiet(learn):
        learn.fit(2, 1e-3, cbs=[LateCut({"conv2": list(range(25))}, epoch=0), keep, SaveModelCallback(comp=best_epoch_0)])
    assert filter_counts(learn.model)["conv2"] == 50 and same_weights(learn.model, keep.first)


def test_early_stopping_with_save_model_restores_across_cuts(tmp_path):
    learn = make_learner(lenet5(), small_dls()); learn.path = tmp_path
    cuts = [CutAt({"conv2": list(range(10))}, epoch=1), CutAt({"conv1": [0, 1]}, epoch=2)]
    with quiet(learn):
        learn.fit(5, 1e-3, cbs=[*cuts, SaveModelCallback(comp=best_epoch_0), EarlyStoppingCallback(comp=best_epoch_0, patience=2)])
    assert filter_counts(learn.model) == {"conv1": 20, "conv2": 50, "fc1": 500, "fc2": 10}
    assert len(learn.recorder.values) == 3                                # stopped after epoch 2


def test_lr_find_on_a_pruned_learner_puts_the_same_model_back(tmp_path):
    learn = trained(); learn.path = tmp_path
    prune_learner(learn, {"conv2": list(range(10))})
    before = copy_model(learn.model)
    with quiet(learn): learn.lr_find(num_it=10, show_plot=False)
    assert same_weights(learn.model, before)


# -- save_pruned / load_pruned (issue 9) ----------------------------------------------------------------------------

def test_save_and_load_pruned_resnet(tmp_path):
    model = resnet_cifar(20).eval()
    pruned = prune_channels(model, {"layer1.0.conv2": [1, 2], "layer3.1.conv1": list(range(30))}, (3, 32, 32))
    pruned = prune_channels(pruned, {"layer2.0.conv1": [0]}, (3, 32, 32))
    save_pruned(pruned, tmp_path/"r.pt")
    back = load_pruned(tmp_path/"r.pt", resnet_cifar(20)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), pruned(x))
    sd = torch.load(tmp_path/"r.pt", weights_only=True)   # plain tensors and lists: safe to load
    assert len(sd["pruning"]["history"]) == 2


def test_save_pruned_keeps_exclude_so_the_file_loads(tmp_path):
    model = resnet_cifar(20).eval()
    pruned = prune_channels(model, {"layer1.0.conv1": [0, 3]}, (3, 32, 32), exclude=["layer3"])
    save_pruned(pruned, tmp_path/"x.pt")
    assert torch.load(tmp_path/"x.pt", weights_only=True)["pruning"]["history"][0]["exclude"] == ["layer3"]
    back = load_pruned(tmp_path/"x.pt", resnet_cifar(20)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), pruned(x)) and back.pruning_history[0]["exclude"] == ["layer3"]


def lenet_file(tmp_path):
    pruned = prune_channels(lenet5(), {"conv1": [0], "conv2": [4, 5]}, (1, 28, 28))
    save_pruned(pruned, tmp_path/"l.pt")
    return pruned, tmp_path/"l.pt"


@pytest.mark.parametrize("model", [lambda: resnet_cifar(20), lambda: lenet5(num_classes=5)])
def test_load_pruned_into_the_wrong_model_is_a_clear_error_that_changes_nothing(tmp_path, model):
    _, f = lenet_file(tmp_path)
    target = model()
    weights = copy_model(target)
    with pytest.raises(PruningError, match="architecture the file was saved from"):
        load_pruned(f, target)
    assert same_weights(target, weights) and filter_counts(target) == filter_counts(weights)


def test_a_plain_state_dict_of_a_pruned_model_says_what_to_do(tmp_path):
    pruned, _ = lenet_file(tmp_path)
    torch.save(pruned.state_dict(), tmp_path/"plain.pt")
    with pytest.raises(PruningError, match="no pruning history.*save_pruned"):
        load_pruned(tmp_path/"plain.pt", lenet5())
    torch.save(lenet5().state_dict(), tmp_path/"unpruned.pt")            # an unpruned model's state_dict just loads
    assert filter_counts(load_pruned(tmp_path/"unpruned.pt", lenet5()))["conv1"] == 20


def test_a_truncated_file_or_a_non_checkpoint_says_so(tmp_path):
    _, f = lenet_file(tmp_path)
    (tmp_path/"cut.pt").write_bytes(f.read_bytes()[:300])
    with pytest.raises(PruningError, match="truncated or not a checkpoint.*save it again"):
        load_pruned(tmp_path/"cut.pt", lenet5())
    torch.save([1, 2, 3], tmp_path/"list.pt")
    with pytest.raises(PruningError, match="not a checkpoint"):
        load_pruned(tmp_path/"list.pt", lenet5())
    with pytest.raises(FileNotFoundError):
        load_pruned(tmp_path/"missing.pt", lenet5())
