"""Sparse masks: accounting against independent counts, masks kept dead through real fastai training with SGD
momentum / Adam / PyTorch optimisers and weight decay, errors before any work, and masks that follow surgery."""
import copy
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from fastai.callback.core import Callback
from fastai.optimizer import Adam, SGD, OptimWrapper

from corrprune_edu.core import set_seed
from corrprune_edu.data import embedded_mnist_dls
from corrprune_edu.models import lenet5, resnet_cifar
from corrprune_edu.sparse import (KeepMaskedCallback, GradualMagnitudeCallback, apply_masks, check_masks, compression_rate,
                                  keep_counts, magnitude_masks, mask_gradients_, maskable_weights, masks_equal,
                                  masks_from_scores, masks_from_zeros, masks_to_plan, one_shot_magnitude,
                                  optimizer_state, prune_masked, quantize_nonzeros, sparse_macs, sparse_storage,
                                  sparsity_report, topk_mask)
from corrprune_edu.checkpoint import prune_learner
from corrprune_edu.train import make_learner, quiet


@pytest.fixture(scope="module")
def dls():
    return embedded_mnist_dls(n_per_class=60, bs=32)


def random_sparse(model, seed=0, keep=0.2):
    "Zero a random (1 - keep) of every weight tensor"
    g = torch.Generator().manual_seed(seed)
    masks = {k: torch.rand(p.shape, generator=g) < keep for k, p in maskable_weights(model).items()}
    return apply_masks(model, masks), masks


# -- accounting against independent counts ---------------------------------------------------------------------

@pytest.mark.parametrize("make", [lenet5, partial(resnet_cifar, 20)])
def test_report_matches_numpy(make):
    set_seed(0)
    net, masks = random_sparse(make())
    rep = sparsity_report(net).set_index("param")
    arrays = {k: p.detach().numpy() for k, p in maskable_weights(net).items()}
    for k, a in arrays.items():
        assert rep.loc[k, "nonzero"] == np.count_nonzero(a)
        assert rep.loc[k, "weights"] == a.size
    total, nnz = sum(a.size for a in arrays.values()), sum(np.count_nonzero(a) for a in arrays.values())
    assert rep.loc["total", "nonzero"] == nnz
    assert compression_rate(net) == pytest.approx(total / nnz)
    assert sum(int(m.sum()) for m in masks.values()) == nnz


def test_sparse_macs_from_output_shapes():
    "MACs of the non-zeros: each conv weight runs once per output position, each linear weight once"
    set_seed(0)
    net, _ = random_sparse(lenet5(), seed=1, keep=0.3)
    sm = sparse_macs(net, (1, 28, 28)).set_index("layer")
    positions = {"conv1": 24 * 24, "conv2": 8 * 8, "fc1": 1, "fc2": 1}
    for layer, pos in positions.items():
        w = getattr(net, layer).weight.detach().numpy()
        assert sm.loc[layer, "nonzero_macs"] == np.count_nonzero(w) * pos
    assert sm.loc["total", "macs"] == 2_293_000


def brute_force_relative(flat, bits):
    "Entries of the relative-index format, one position at a time (zeros after the last non-zero are not stored)"
    entries, run, fillers = 0, 0, 0
    for v in flat:
        if v != 0:
            entries += 1 + fillers; run = fillers = 0
        else:
            run += 1
            if run == 2 ** bits:           # the longest gap one entry can express: a filler zero takes this slot
                fillers += 1; run = 0
    return entries


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_relative_storage_matches_brute_force(bits):
    set_seed(0)
    net, _ = random_sparse(lenet5(), seed=bits, keep=0.05)
    st = sparse_storage(net, "relative", index_bits=bits).set_index("param")
    for k, p in maskable_weights(net).items():
        e = brute_force_relative(p.detach().flatten().tolist(), bits)
        assert st.loc[k, "entries"] == e
        assert st.loc[k, "index_bytes"] == e * bits / 8
        assert st.loc[k, "value_bytes"] == e * 4


def test_csr_storage_matches_its_definition():
    set_seed(0)
    net, _ = random_sparse(lenet5(), seed=3, keep=0.1)
    st = sparse_storage(net, "csr", index_bits=32, value_bits={"fc1": 2}).set_index("param")
    w = net.fc1.weight.detach().numpy()
    nnz = np.count_nonzero(w)
    assert st.loc["fc1.weight", "index_bytes"] == (nnz * 32 + (w.shape[0] + 1) * 32) / 8
    assert st.loc["fc1.weight", "value_bytes"] == nnz * 2 / 8
    assert st.loc["fc1.weight", "codebook_bytes"] == 4 * 4
    assert st.loc["conv1.weight", "value_bytes"] == np.count_nonzero(net.conv1.weight.detach().numpy()) * 4
    assert st.loc["total", "dense_bytes"] == 430_500 * 4


def test_quantize_keeps_zeros_and_levels():
    set_seed(0)
    net, masks = random_sparse(lenet5(), keep=0.3)
    q = quantize_nonzeros(net, {"conv2": 3, "fc1": 2})
    assert masks_equal(masks_from_zeros(q), masks)
    assert len(torch.unique(q.fc1.weight[q.fc1.weight != 0])) <= 4
    assert len(torch.unique(q.conv2.weight[q.conv2.weight != 0])) <= 8
    err_q = (q.fc1.weight - net.fc1.weight).abs().max()
    assert 0 < err_q < net.fc1.weight.abs().max()                       # values moved, but to nearby levels
    assert torch.equal(q.fc2.weight, net.fc2.weight)


# -- masks ----------------------------------------------------------------------------------------------------

def test_topk_is_tie_safe_and_exact():
    s = torch.tensor([2., 5., 5., 1., 5.])
    assert topk_mask(s, 2).tolist() == [False, True, True, False, False]
    for n in range(6): assert int(topk_mask(torch.randn(7, 3), n).sum()) == n


def test_layer_and_global_scopes():
    set_seed(0)
    net = lenet5()
    m = magnitude_masks(net, 0.9)
    assert {k: int(v.sum()) for k, v in m.items()} == keep_counts(maskable_weights(net), 0.9)
    g = magnitude_masks(net, 0.9, scope="global")
    kept = torch.cat([p.detach().abs()[g[k]] for k, p in maskable_weights(net).items()])
    gone = torch.cat([p.detach().abs()[~g[k]] for k, p in maskable_weights(net).items()])
    assert kept.min() >= gone.max()
    assert sum(int(v.sum()) for v in g.values()) == 430_500 - round(0.9 * 430_500)


@pytest.mark.parametrize("bad, err", [(1.5, ValueError), (-0.1, ValueError), ("0.5", ValueError), ({"fc3": 0.5}, ValueError)])
def test_bad_rates(bad, err):
    with pytest.raises(err, match="sparsity|fc3"):
        magnitude_masks(lenet5(), bad)


def test_errors_before_any_work():
    set_seed(0)
    net = lenet5()
    before = copy.deepcopy(net.state_dict())
    with torch.no_grad(): net.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="fc1.weight.*NaN"): magnitude_masks(net, 0.5)
    net = lenet5(); net.load_state_dict(before)
    bad = {"conv1.weight": torch.ones(20, 1, 5, 5, dtype=torch.bool), "fc1.weight": torch.ones(10, 10, dtype=torch.bool)}
    with pytest.raises(ValueError, match="fc1.weight.*follow surgery"): apply_masks(net, bad, inplace=True)
    with pytest.raises(ValueError, match="conv9"): check_masks(net, {"conv9.weight": bad["conv1.weight"]})
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_bad_masks_fail_before_training(dls):
    set_seed(0)
    learn = make_learner(lenet5(), dls)
    before = copy.deepcopy(learn.model.state_dict())
    bad = {"fc1.weight": torch.ones(500, 799, dtype=torch.bool)}
    with pytest.raises(ValueError, match="fc1.weight"):
        with quiet(learn): learn.fit(1, cbs=KeepMaskedCallback(bad))
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())


# -- masked weights stay dead through real training -----------------------------------------------------------

class GradOnly(Callback):
    "The naive guard, for the control: mask gradients only"
    def __init__(self, masks): self.masks = masks
    def after_backward(self): mask_gradients_(dict(self.learn.model.named_parameters()), self.masks)


OPTS = {
    "sgd_momentum_wd": dict(opt_func=partial(SGD, mom=0.9), lr=0.05, wd=1e-2),
    "sgd_momentum_l2": dict(opt_func=partial(SGD, mom=0.9, decouple_wd=False), lr=0.05, wd=1e-2),
    "adam_wd": dict(opt_func=Adam, lr=3e-3, wd=1e-2),
    "adam_l2": dict(opt_func=partial(Adam, decouple_wd=False), lr=3e-3, wd=1e-2),
    "torch_sgd_momentum": dict(opt_func=partial(OptimWrapper, opt=torch.optim.SGD, momentum=0.9), lr=0.05, wd=1e-3),
    "torch_adamw": dict(opt_func=partial(OptimWrapper, opt=torch.optim.AdamW), lr=3e-3, wd=1e-2),
}


def train_then_mask(dls, opt, cb_cls, fit="fit_one_cycle"):
    "Dense epoch (fills the optimiser state), mask 90%, train on with the same optimiser: masked non-zeros left"
    set_seed(0)
    o = OPTS[opt]
    learn = make_learner(lenet5(), dls, opt_func=o["opt_func"], lr=o["lr"], wd=o["wd"])
    with quiet(learn): learn.fit(1)
    masks = magnitude_masks(learn.model, 0.9)
    apply_masks(learn.model, masks, inplace=True)
    start = {k: p.detach().clone() for k, p in maskable_weights(learn.model).items()}
    with quiet(learn): getattr(learn, fit)(1, o["lr"], wd=o["wd"], cbs=cb_cls(masks))
    weights = maskable_weights(learn.model)
    dead = sum(int(torch.count_nonzero(p[~masks[k]])) for k, p in weights.items())
    moved = min(float((p.detach()[masks[k]] - start[k][masks[k]]).abs().max()) for k, p in weights.items())
    return dead, moved, learn, masks


@pytest.mark.parametrize("opt", list(OPTS))
def test_masked_weights_stay_exactly_zero(dls, opt):
    dead, moved, learn, masks = train_then_mask(dls, opt, KeepMaskedCallback)
    assert dead == 0
    assert moved > 0                                                # the kept weights did train, in every layer
    state = optimizer_state(learn.opt)
    for k, p in maskable_weights(learn.model).items():
        tensors = [v for v in state[p].values() if isinstance(v, torch.Tensor) and v.shape == p.shape]
        assert tensors, f"{opt}: no per-weight state found for {k}"
        for v in tensors: assert int(torch.count_nonzero(v[~masks[k]])) == 0
    assert learn.opt.hypers[0]["wd"] == OPTS[opt]["wd"]              # the user's weight decay was used


@pytest.mark.parametrize("opt", ["sgd_momentum_wd", "adam_wd", "torch_sgd_momentum"])
def test_gradient_masking_alone_is_not_enough(dls, opt):
    "The control: the same run with only gradients masked revives masked weights through the optimiser state"
    dead, *_ = train_then_mask(dls, opt, GradOnly)
    assert dead > 0


def test_masks_follow_surgery_inside_fit(dls):
    "A filter method prunes mid-fit: the callback re-derives its masks, and masked weights stay zero"
    class PruneOnce(Callback):
        order = 70
        def after_batch(self):
            if self.iter == 2 and self.training and not hasattr(self, "done"):
                prune_learner(self.learn, {"conv2": [0, 1, 2, 3, 4]}); self.done = True
    set_seed(0)
    learn = make_learner(lenet5(), dls)
    with quiet(learn): learn.fit(1)
    masks = magnitude_masks(learn.model, 0.8)
    cb = KeepMaskedCallback(masks)
    with quiet(learn): learn.fit(1, cbs=[cb, PruneOnce()])
    assert learn.model.conv2.weight.shape[0] == 45 and learn.model.fc1.weight.shape[1] == 45 * 16
    assert set(cb.rederived) >= {"conv2.weight", "fc1.weight"}
    assert masks_equal(cb.masks, masks_from_zeros(learn.model))
    assert int(cb.masks["fc1.weight"].sum()) == int(masks["fc1.weight"][:, 80:].sum())   # conv2 channels 0-4 fed columns 0-79


# -- baselines ------------------------------------------------------------------------------------------------

def test_one_shot_and_gradual_reach_exact_counts(dls):
    set_seed(0)
    learn = make_learner(lenet5(), dls)
    with quiet(learn): learn.fit(1)
    n_keep = {"conv1": 100, "conv2": 2000, "fc1": 3600, "fc2": 350}
    with quiet(learn): masks = one_shot_magnitude(learn, 1, n_keep=n_keep)
    assert sparsity_report(learn.model).nonzero.tolist() == [100, 2000, 3600, 350, 6050]
    assert masks_equal(masks, masks_from_zeros(learn.model))
    set_seed(0)
    learn = make_learner(lenet5(), dls)
    cb = GradualMagnitudeCallback(n_keep=n_keep, end=0.5, n_steps=5)
    with quiet(learn): learn.fit_one_cycle(2, 3e-3, cbs=cb)
    assert sparsity_report(learn.model).nonzero.tolist() == [100, 2000, 3600, 350, 6050]
    nz = [r["nonzero"] for r in cb.log]
    assert len(nz) == 5 and nz == sorted(nz, reverse=True) and nz[-1] == 6050
    with quiet(learn): learn.fit(1, cbs=cb)                         # reused: stays at its final masks
    assert sparsity_report(learn.model).nonzero.iloc[-1] == 6050


def test_gradual_schedule_arguments():
    with pytest.raises(ValueError, match="start"): GradualMagnitudeCallback(0.9, start=0.8, end=0.5)
    with pytest.raises(ValueError, match="exactly one"): GradualMagnitudeCallback()


# -- masks and surgery -----------------------------------------------------------------------------------------

def test_unread_channels_are_removed_exactly_on_a_resnet():
    set_seed(0)
    net = resnet_cifar(20).eval()
    for m in net.modules():                                          # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1); m.running_var.uniform_(0.5, 1.5)
    masks = {k: torch.ones_like(p, dtype=torch.bool) for k, p in maskable_weights(net).items()}
    masks["layer1.0.conv2.weight"][:, [3, 9]] = False                # nothing reads these two block-internal channels
    net = apply_masks(net, masks)
    plan = masks_to_plan(net, masks, (3, 32, 32))
    assert plan == {"layer1.0.conv1": [3, 9]}
    small, small_masks = prune_masked(net, masks, plan, (3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-4)
    assert small.layer1[0].conv1.weight.shape[0] == 14
    assert all(small_masks[k].shape == p.shape for k, p in small.named_parameters() if k in small_masks)


def test_prune_masked_slices_masks_like_weights():
    set_seed(0)
    net, masks = random_sparse(resnet_cifar(20), keep=0.5)
    plan = {"layer2.0.conv1": [0, 5, 7], "conv1": [1, 2]}
    small, small_masks = prune_masked(net, masks, plan, (3, 32, 32))
    assert masks_equal(small_masks, masks_from_zeros(small))
    assert small_masks["layer2.0.conv2.weight"].shape == small.layer2[0].conv2.weight.shape
    assert masks_equal(masks, masks_from_zeros(net))                 # the caller's model is untouched


def test_hidden_units_with_all_inputs_masked():
    set_seed(0)
    net = lenet5()
    masks = magnitude_masks(net, {"fc1": 0.5})
    masks["fc1.weight"][[4, 10, 11]] = False
    plan = masks_to_plan(apply_masks(net, masks), masks, (1, 28, 28), layer_types=(nn.Conv2d, nn.Linear))
    assert plan == {"fc1": [4, 10, 11]}
    assert masks_to_plan(apply_masks(net, masks), masks, (1, 28, 28)) == {}     # conv only by default
