"COP: an independent plain-loop computation, the customisation effect on real CIFAR-10 models, the greedy selection, bad inputs and the callback."
import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from fastai.callback.core import Callback

from corrprune_edu.core import set_seed
from corrprune_edu.cop import COP, COPCallback, cop_plan, cop_scores, customisation_table, normalize_correlation, plan_from_selection, redundancy
from corrprune_edu.data import mnist_dls
from corrprune_edu.flops import count_macs, count_params
from corrprune_edu.models import VGG, lenet5, resnet_cifar
from corrprune_edu.surgery import prune_channels
from corrprune_edu.train import cached_baseline, evaluate, fit, make_learner

LIN = (nn.Conv2d, nn.Linear)


def small_vgg():
    "VGG's layout (conv-BN-ReLU blocks, five poolings, a hidden linear layer after a 1x1 map), narrow enough for CI"
    return VGG([[8, 8], [16, 16], [16], [24], [24]], hidden=32)


# ---------------------------------------------------------------------------------------------------------------
# A tiny hand-made network, and COP computed for it with plain Python loops (no matrix algebra, no package code)
# ---------------------------------------------------------------------------------------------------------------
def tiny_net():
    "conv1 (1->4, 3x3) on 8x8, conv2 (4->5, 2x2), flatten 5x5x5, fc1 (125->6), fc2 (6->3); hand-set weights"
    net = nn.Sequential(OrderedDict([("conv1", nn.Conv2d(1, 4, 3)), ("relu1", nn.ReLU()), ("conv2", nn.Conv2d(4, 5, 2)),
                                     ("relu2", nn.ReLU()), ("flatten", nn.Flatten()), ("fc1", nn.Linear(125, 6)),
                                     ("relu3", nn.ReLU()), ("fc2", nn.Linear(6, 3))]))
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, LIN):
                w = m.weight
                idx = torch.arange(w.numel(), dtype=torch.float64).view(w.shape)
                w.copy_(((idx * 7 + 3) % 11 - 5) / 5 + 0.1 * torch.sin(idx * 1.3))      # a fixed, hand-made pattern
                m.bias.fill_(0.1)
    return net


def loop_pearson(u, v):
    n = len(u)
    mu, mv = sum(u) / n, sum(v) / n
    cov = sum((a - mu) * (b - mv) for a, b in zip(u, v)) / n
    su = math.sqrt(sum((a - mu) ** 2 for a in u) / n)
    sv = math.sqrt(sum((b - mv) ** 2 for b in v) / n)
    return cov / (su * sv + 1e-8)


def reader_taps(net, group):
    "For each tap: for each channel of `group`, the list of next-layer weights reading it (plain Python lists)"
    if group == "conv1":
        w = net.conv2.weight.detach().double().tolist()                  # (5, 4, 2, 2)
        return [[[w[o][i][a][b] for o in range(5)] for i in range(4)] for a in range(2) for b in range(2)]
    if group == "conv2":
        w = net.fc1.weight.detach().double().tolist()                    # (6, 125): column i*25 + q
        return [[[w[o][i * 25 + q] for o in range(6)] for i in range(5)] for q in range(25)]
    w = net.fc2.weight.detach().double().tolist()                        # (3, 6)
    return [[[w[o][i] for o in range(3)] for i in range(6)]]


def loop_R(net, group, alive=None):
    taps = reader_taps(net, group)
    n = len(taps[0])
    R = [[sum(abs(loop_pearson(t[i], t[j])) for t in taps) / len(taps) for j in range(n)] for i in range(n)]
    return R


def loop_normalise(R, method):
    n = len(R)
    off = [abs(R[i][j]) for i in range(n) for j in range(n) if i != j]
    d = max(off) if method == "max" else sum(off) / 2 if method == "l1" else math.sqrt(sum(x * x for x in off))
    return [[x / d for x in row] for row in R]


def loop_s(Rn, k=3):
    n = len(Rn)
    out = []
    for i in range(n):
        others = sorted((Rn[j][i] for j in range(n) if j != i), reverse=True)
        out.append(sum(others[:k]) / min(k, len(others)))
    return out


def loop_costs(counts):
    "params and MACs of every layer of the tiny net from its channel counts (conv1, conv2, fc1 outputs)"
    a, b, c = counts
    p = {"conv1": a * 1 * 9 + a, "conv2": b * a * 4 + b, "fc1": c * b * 25 + c, "fc2": 3 * c + 3}
    m = {"conv1": 36 * a * 9, "conv2": 25 * b * a * 4, "fc1": c * b * 25, "fc2": 3 * c}
    return p, m


READS = {"conv1": ("conv1", "conv2"), "conv2": ("conv2", "fc1"), "fc1": ("fc1", "fc2")}


def loop_terms(counts):
    p, m = loop_costs(counts)
    P = {g: sum(p[l] for l in ls) for g, ls in READS.items()}
    F = {g: 2 * sum(m[l] for l in ls) for g, ls in READS.items()}
    mp, mf = max(math.log2(x) for x in P.values()), max(math.log2(x) for x in F.values())
    return {g: math.log2(P[g]) / mp for g in P}, {g: math.log2(F[g]) / mf for g in F}


@pytest.mark.parametrize("normalize", ["max", "l1", "l2"])
def test_normalised_correlation_and_importance_match_plain_loops(normalize):
    net = tiny_net()
    alpha, beta, gamma = 1.0, 0.7, 2.0
    got = cop_scores(net, alpha, beta, gamma, example_input=(1, 8, 8), layer_types=LIN, normalize=normalize)
    p_hat, f_hat = loop_terms((4, 5, 6))
    for g in ("conv1", "conv2", "fc1"):
        Rn = loop_normalise(loop_R(net, g), normalize)
        s = loop_s(Rn)
        rows = got[got.layer == g]
        np.testing.assert_allclose(rows.s.values, s, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(rows.p.values, p_hat[g], rtol=1e-12)
        np.testing.assert_allclose(rows.f.values, f_hat[g], rtol=1e-12)
        imp = [alpha * (1 - si) + beta * (1 - f_hat[g]) + gamma * (1 - p_hat[g]) for si in s]
        np.testing.assert_allclose(rows.importance.values, imp, rtol=1e-6, atol=1e-9)
        # and the package's normalised matrix itself
        cop = COP(net, (1, 8, 8), layer_types=LIN, normalize=normalize)
        np.testing.assert_allclose(cop.corr[cop.names.index(g)], Rn, rtol=1e-6, atol=1e-9)


def loop_greedy(net, n_steps, alpha, beta, gamma, k=3):
    "COP's selection redone naively: every step recomputes redundancy and costs from scratch"
    groups = ["conv1", "conv2", "fc1"]
    Rn = {g: loop_normalise(loop_R(net, g), "max") for g in groups}
    alive = {g: [True] * len(Rn[g]) for g in groups}
    cuts = []
    for _ in range(n_steps):
        counts = tuple(sum(alive[g]) for g in groups)
        p_hat, f_hat = loop_terms(counts)
        cands = []                                                       # (importance, group position, channel, group)
        for pos, g in enumerate(groups):
            if sum(alive[g]) <= 1: continue
            s = loop_s(Rn[g], k)
            cands += [(alpha * (1 - s[i]) + beta * (1 - f_hat[g]) + gamma * (1 - p_hat[g]), pos, i, g)
                      for i in range(len(s)) if alive[g][i]]
        # the package's tie rule, written out: importances within 1e-9 x the largest of the minimum are tied,
        # and the lowest group position, then the lowest channel index, is cut
        low, tol = min(c[0] for c in cands), 1e-9 * max(abs(c[0]) for c in cands)
        _, _, i, g = min((c for c in cands if c[0] <= low + tol), key=lambda c: (c[1], c[2]))
        cuts.append((g, i))
        alive[g][i] = False
        for j in range(len(Rn[g])): Rn[g][i][j] = Rn[g][j][i] = 0.0      # zero the row and the column
    return cuts


@pytest.mark.parametrize("abg", [(1, 0, 0), (1, 3, 0), (1, 0, 3), (1, 1, 1)])
def test_greedy_selection_matches_a_naive_loop(abg):
    "The same cuts as a loop that recomputes everything at every step and breaks ties by the documented rule"
    net = tiny_net()
    sel = COP(net, (1, 8, 8), layer_types=LIN).select(amount=10, alpha=abg[0], beta=abg[1], gamma=abg[2])
    assert list(zip(sel.layer, sel["index"])) == loop_greedy(net, 10, *abg)
    # the costs after every cut are those of the really pruned network
    for n in (1, 5, 10):
        small = prune_channels(net, plan_from_selection(sel, n), (1, 8, 8))
        assert (count_macs(small, (1, 8, 8)), count_params(small)) == tuple(sel[["macs", "params"]].iloc[n - 1])


# ---------------------------------------------------------------------------------------------------------------
# The customisation effect ([COP] Table 4) on VGG-16 and ResNet-32 briefly trained on a CIFAR-10 subset
# ---------------------------------------------------------------------------------------------------------------
BRIEF = dict(n_per_class=50, n_test_per_class=10, epochs=1)     # the same baselines as the API notebook (cached)


@pytest.mark.parametrize("name,rate,layer_types", [("vgg16_cifar", 0.4, LIN), ("resnet32", 0.3, (nn.Conv2d,))])
def test_beta_gives_the_largest_flops_and_gamma_the_largest_params_reduction(name, rate, layer_types):
    model = cached_baseline(name, "cifar10", **BRIEF).model
    t = customisation_table(COP(model, (3, 32, 32), layer_types=layer_types), rate)
    assert list(zip(t.beta, t.gamma)) == [(0, 0), (3, 0), (0, 3), (1, 1)]
    assert t.Frr.idxmax() == 1, f"beta=3 should cut the most FLOPs:\n{t}"
    assert t.Prr.idxmax() == 2, f"gamma=3 should cut the most parameters:\n{t}"
    assert (t.Frr > 0).all() and (t.Prr > 0).all()


# ---------------------------------------------------------------------------------------------------------------
# The greedy selection
# ---------------------------------------------------------------------------------------------------------------
def test_self_entry_is_excluded_from_top_k():
    r = np.array([[9.0, 0.2, 0.4], [0.2, 9.0, 0.6], [0.4, 0.6, 9.0]])
    np.testing.assert_allclose(redundancy(r, top_k=1), [0.4, 0.6, 0.6])
    np.testing.assert_allclose(redundancy(r, top_k=2), [0.3, 0.4, 0.5])
    # after normalisation the diagonal is 1/max >= 1, the largest entry of every column: it must still not count
    n = normalize_correlation(np.array([[1.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 1.0]]))
    np.testing.assert_allclose(redundancy(n, top_k=1), [1.0, 1.0, 0.4])


def test_row_and_column_zeroing_spreads_the_cuts_over_redundant_pairs():
    net = lenet5()
    with torch.no_grad():
        for a, b in [(0, 1), (2, 3), (4, 5)]: net.conv2.weight[:, b] = net.conv2.weight[:, a]
    cop = COP(net, (1, 28, 28), top_k=1, groups=["conv1"])
    sel = cop.select(amount=3)
    assert sorted(i // 2 for i in sel["index"]) == [0, 1, 2]          # one channel of each identical pair
    # the partner of the first cut was as redundant as it gets, and lost that redundancy with the zeroed row and column
    c = int(sel["index"].iloc[0]); partner = c ^ 1
    assert cop.scores().s[partner] == pytest.approx(1.0)
    R = cop.corr[0].copy(); R[c, :] = 0; R[:, c] = 0
    assert redundancy(R, 1)[partner] < 0.9


def test_never_empties_a_group_and_warns_when_the_budget_cannot_be_met():
    for model, shape in [(lenet5(), (1, 28, 28)), (resnet_cifar(20), (3, 32, 32))]:
        cop = COP(model, shape)
        for mc in (1, 3):
            with pytest.warns(UserWarning, match="min_channels"):
                sel = cop.select(amount=0.99, min_channels=mc)
            plan = plan_from_selection(sel)
            for g in cop.groups: assert g.n_channels - len(plan.get(g.name, [])) == mc
            prune_channels(model, plan, shape)                            # surgery accepts it


def test_budget_counts_filters_and_tied_channels_once_per_producer():
    cop = COP(resnet_cifar(20), (3, 32, 32))
    assert cop.filters == 16 * 4 + 32 * 4 + 64 * 4 + 3 * 16 + 3 * 32 + 3 * 64
    sel = cop.select(amount=0.3, beta=3)
    width = {g.name: len(g.producers) for g in cop.groups}
    assert sel.filters_removed.tolist() == np.cumsum([width[l] for l in sel.layer]).tolist()
    assert sel.filters_removed.iloc[-2] < math.floor(0.3 * cop.filters) <= sel.filters_removed.iloc[-1]
    assert len(COP(lenet5(), (1, 28, 28), layer_types=LIN).select(amount=0.5)) == math.floor(0.5 * 570)


def test_costs_after_every_cut_are_exact_and_targets_stop_at_the_first_cut_reaching_them():
    for model, shape, lt in [(lenet5(), (1, 28, 28), LIN), (resnet_cifar(20), (3, 32, 32), (nn.Conv2d,)),
                             (small_vgg(), (3, 32, 32), LIN)]:
        cop = COP(model, shape, layer_types=lt)
        assert (cop.macs, cop.params) == (count_macs(model, shape), count_params(model))
        sel = cop.select(macs_reduction=0.6, alpha=1, beta=1, gamma=1)
        assert sel.macs_reduction.iloc[-1] >= 0.6 > sel.macs_reduction.iloc[-2]
        for n in (1, len(sel) // 2, len(sel)):
            small = prune_channels(model, plan_from_selection(sel, n), shape)
            assert (count_macs(small, shape), count_params(small)) == tuple(sel[["macs", "params"]].iloc[n - 1])
        sel = cop.select(params_reduction=0.5, gamma=2)
        assert sel.params_reduction.iloc[-1] >= 0.5 > sel.params_reduction.iloc[-2]


def test_a_smaller_budget_gives_a_prefix_and_rate_zero_gives_nothing():
    cop = COP(resnet_cifar(20), (3, 32, 32))
    big, small = cop.select(amount=0.5, beta=1, gamma=1), cop.select(amount=0.2, beta=1, gamma=1)
    assert big[["layer", "index"]].iloc[:len(small)].equals(small[["layer", "index"]])
    assert len(cop.select(amount=0.0)) == 0 and cop.plan(amount=0.0) == {}


def test_tied_groups_are_scored_together_and_hidden_linear_layers_only_when_asked():
    r20 = resnet_cifar(20)
    scores = cop_scores(r20, example_input=(3, 32, 32))
    assert (scores.groupby("layer").size()["conv1"], scores.groupby("layer").size()["layer3.0.conv2"]) == (16, 64)
    assert "layer1.0.conv2" not in set(scores.layer)                # a producer of the first stream, not its own group
    assert "fc1" not in set(cop_scores(lenet5(), example_input=(1, 28, 28)).layer)
    assert "fc1" in set(cop_scores(lenet5(), example_input=(1, 28, 28), layer_types=LIN).layer)


def test_the_callers_model_is_never_modified():
    net = small_vgg()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plan = cop_plan(net, 0.3, 1, 1, 1, example_input=(3, 32, 32), layer_types=LIN)
    assert plan and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("kwargs,arg", [
    (dict(amount=1.0), "amount"), (dict(amount=-0.1), "amount"), (dict(macs_reduction=1.5), "macs_reduction"),
    (dict(amount=0.2, macs_reduction=0.5), "exactly one"), (dict(), "exactly one"), (dict(amount=-1), "amount"),
    (dict(amount=0.2, alpha=-1), "alpha"), (dict(amount=0.2, beta=float("nan")), "beta"),
    (dict(amount=0.2, alpha=0), "all 0"), (dict(amount=0.2, min_channels=0), "min_channels")])
def test_bad_selection_arguments_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg): COP(lenet5(), (1, 28, 28)).select(**kwargs)


@pytest.mark.parametrize("kwargs,arg", [(dict(amount="0.3"), "amount"), (dict(amount=0.2, gamma=True), "gamma"),
                                        (dict(amount=0.2, min_channels=1.5), "min_channels")])
def test_arguments_of_the_wrong_type_are_type_errors(kwargs, arg):
    with pytest.raises(TypeError, match=arg): COP(lenet5(), (1, 28, 28)).select(**kwargs)


def test_bad_setup_arguments_name_the_argument():
    with pytest.raises(ValueError, match="example_input"): COP(lenet5())
    with pytest.raises(ValueError, match="normalize"): COP(lenet5(), (1, 28, 28), normalize="l3")
    with pytest.raises(ValueError, match="top_k"): COP(lenet5(), (1, 28, 28), top_k=0)
    with pytest.raises(ValueError, match="layer_types"): COP(resnet_cifar(20), (3, 32, 32), layer_types=(nn.Linear,))
    with pytest.raises(ValueError, match="no channel group named"): COP(lenet5(), (1, 28, 28), groups=["conv9"])
    with pytest.raises(ValueError): COP(lenet5(), (3, 32, 32))           # an input the model cannot take
    with pytest.raises(ValueError, match="square"): normalize_correlation(np.ones((2, 3)))
    with pytest.raises(ValueError, match="at"): COPCallback(amount=0.2, at=1.0)
    with pytest.raises(ValueError, match="exactly one"): COPCallback()
    with pytest.raises(ValueError, match="alpha"): COPCallback(amount=0.2, alpha=-2)


# ---------------------------------------------------------------------------------------------------------------
# The callback, in a real fastai Learner on real MNIST images
# ---------------------------------------------------------------------------------------------------------------
def small_dls():
    return mnist_dls(50, n_test_per_class=20, source="embedded", bs=32)


def test_callback_prunes_once_mid_fit_and_training_goes_on():
    learn = make_learner(lenet5(), small_dls())
    seen = []

    class Watch(Callback):
        order = 70
        def before_batch(self): seen.append((self.pct_train, self.model.conv2.out_channels, self.model.conv2.weight.detach().clone()))

    cb = COPCallback(macs_reduction=0.7, beta=1, at=0.5)
    fit(learn, 2, cbs=[cb, Watch()])
    widths = [w for _, w, _ in seen]
    first_pruned = next(i for i, w in enumerate(widths) if w < 50)
    assert seen[first_pruned][0] >= 0.5 > seen[first_pruned - 1][0]                # pruned where asked
    assert len(set(widths[first_pruned:])) == 1                                     # and only once
    assert not torch.equal(seen[first_pruned][2], learn.model.conv2.weight)        # the pruned layer kept training
    assert {id(p) for pg in learn.opt.param_lists for p in pg} == {id(p) for p in learn.model.parameters()}
    assert 1 - count_macs(learn.model, (1, 28, 28)) / 2_293_000 >= 0.7
    assert cb.summary["macs_after"] == count_macs(learn.model, (1, 28, 28)) and cb.summary["epoch"] == 1
    fit(learn, 1, cbs=cb)                                                           # a spent callback does nothing
    assert learn.model.conv2.out_channels == widths[-1]


def test_callback_at_zero_prunes_before_the_first_step_of_a_trained_learner():
    learn = make_learner(lenet5(), small_dls())
    fit(learn, 1)
    expected = cop_plan(learn.model, 0.3, 1, 0, 3, example_input=learn.dls.train.one_batch()[0][:2])
    cb = COPCallback(0.3, 1, 0, 3)
    fit(learn, 1, cbs=cb)
    assert cb.plan == expected and cb.summary["pct_train"] == 0
    assert evaluate(learn, "test") > 0.3


# ---------------------------------------------------------------------------------------------------------------
# The callback keeps fastai's contract: when it prunes, lr_find, the user's hyper-parameters, reuse, hooks
# ---------------------------------------------------------------------------------------------------------------
class Trace(Callback):
    "Per training batch: how many batches were done, conv2's width, and the optimiser's lr and wd (after every other callback)"
    order = 99
    def before_fit(self): self.rows = []
    def before_batch(self):
        if self.training: self.rows.append((self.train_iter, self.model.conv2.out_channels, self.opt.hypers[-1]["lr"], self.opt.hypers[-1]["wd"]))


def twelve_batch_dls():
    return mnist_dls(43, n_test_per_class=10, source="embedded", bs=32)     # 390 training images: 12 batches of 32


def test_at_counts_batches_not_floating_point_progress():
    learn = make_learner(lenet5(), twelve_batch_dls())
    assert len(learn.dls.train) == 12
    cb, trace = COPCallback(0.3, at=0.5), Trace()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[cb, trace])
    widths = [w for _, w, _, _ in trace.rows]
    assert widths[:6] == [50] * 6 and widths[6] < 50                  # pruned after 6 of the 12 batches, not 7 (pct_train 0.4999...)
    assert (cb.summary["step"], cb.summary["pct_train"]) == (6, 0.5)


@pytest.mark.parametrize("how", ["fit", "fit_one_cycle"])
def test_the_users_learning_rate_and_weight_decay_hold_before_and_after_the_cut(how):
    "Batch by batch, the optimiser's lr and wd are those of the same fit without the callback"
    def run(cbs):
        set_seed(0)
        learn, trace = make_learner(lenet5(), twelve_batch_dls()), Trace()
        with learn.no_bar(), learn.no_logging():
            if how == "fit": learn.fit(2, 5e-3, wd=0.123, cbs=[*cbs, trace])
            else: learn.fit_one_cycle(2, 4e-3, wd=0.0456, cbs=[*cbs, trace])
        return trace.rows
    pruned, plain = run([COPCallback(0.3, at=0.25)]), run([])
    assert [w for _, w, _, _ in pruned][5:7] == [50, pruned[6][1]] and pruned[6][1] < 50    # the cut happened after 6 of 24 batches
    assert [(lr, wd) for _, _, lr, wd in pruned] == [(lr, wd) for _, _, lr, wd in plain]
    if how == "fit": assert {(lr, wd) for _, _, lr, wd in pruned} == {(5e-3, 0.123)}


def test_lr_find_neither_prunes_nor_uses_up_the_cut():
    learn = make_learner(lenet5(), small_dls())
    cb = COPCallback(0.3)
    learn.add_cb(cb)
    with learn.no_bar(), learn.no_logging(): learn.lr_find(num_it=8, show_plot=False)
    assert learn.model.conv2.out_channels == 50 and not cb.done
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert cb.done and learn.model.conv2.out_channels < 50


def test_a_spent_callback_prunes_once_across_fits_and_fine_tune():
    learn = make_learner(lenet5(), small_dls())
    cb = COPCallback(0.3, at=0.5)
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, cbs=cb, freeze_epochs=1)   # two fits: frozen, then unfrozen
    after = learn.model.conv2.out_channels
    assert cb.done and after < 50 and cb.summary["epoch"] == 0        # in the first stage only
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=cb)
    assert learn.model.conv2.out_channels == after                   # a spent callback does nothing


def test_activation_stats_hooks_do_not_disturb_the_trace():
    from fastai.callback.hook import ActivationStats
    learn = make_learner(lenet5(), small_dls())
    stats, cb = ActivationStats(every=1), COPCallback(0.3, at=0.5)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[cb, stats])
    assert cb.done and learn.model.conv2.out_channels < 50
    assert len(stats.stats) == len(learn.dls.train)                   # ActivationStats saw every training batch and nothing else
