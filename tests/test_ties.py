"""Ties are broken by one documented rule, not by floating-point rounding (issue 9, section 1).

The rule (`corrprune_edu.core.stable_argsort`): scores equal within a relative tolerance are tied, and the lowest
group position, then the lowest channel index, comes first. Each test builds deliberate exact ties and checks that
every method follows the rule, and that nudging the scores by rounding-sized amounts changes nothing.
"""
import numpy as np
import pytest
import torch
from torch import nn

from corrprune_edu.channels import analyze_channels
from corrprune_edu.cop import COP
from corrprune_edu.core import stable_argsort
from corrprune_edu.criteria import l1_plan, l1_scores, plan_from_scores, select_groups
from corrprune_edu.models import lenet5, resnet_cifar
from corrprune_edu.pairs import choose_drop, greedy_pairs, plan_from_pairs, select_pairs

SHAPE = (1, 28, 28)


def nudge(x: np.ndarray, seed: int) -> np.ndarray:
    "Multiply every entry by 1 + (-1, 0 or +1) x 1e-15: what a different summation order could do"
    return x * (1 + np.random.default_rng(seed).choice([-1, 0, 1], x.shape) * 1e-15)


def test_stable_argsort_ignores_rounding_and_keeps_index_order_within_ties():
    rng = np.random.default_rng(1)
    for trial in range(20):
        base = rng.integers(0, 4, 40) / 3.0                         # many exact ties
        expected = np.lexsort((np.arange(40), base))               # by value, then by index
        assert np.array_equal(stable_argsort(nudge(base, trial)), expected)
        assert np.array_equal(stable_argsort(nudge(base, trial), descending=True), np.lexsort((np.arange(40), -base)))
    assert list(stable_argsort(np.array([1.0, 1.0 + 1e-6]))) == [0, 1]      # a real difference is not a tie
    assert list(stable_argsort(np.array([1.0 + 1e-6, 1.0]))) == [1, 0]


def tied_lenet():
    "LeNet-5 whose conv1 filters 7, 2 and 11 have the same smallest L1 norm (the same weights in different orders)"
    net = lenet5()
    with torch.no_grad():
        w = net.conv1.weight
        w.mul_(10)
        v = torch.linspace(-0.01, 0.02, 25)
        for i, perm_seed in ((7, 0), (2, 1), (11, 2)):
            w[i, 0] = v[torch.randperm(25, generator=torch.Generator().manual_seed(perm_seed))].view(5, 5)
    return net


def test_l1_plan_breaks_exact_ties_by_lowest_index():
    net = tied_lenet()
    a = analyze_channels(net, SHAPE)
    s = l1_scores(net, a, select_groups(a, "all", (nn.Conv2d,), net))["conv1"]
    assert torch.allclose(s[[2, 7, 11]], s[2].expand(3), rtol=1e-12) and s[[2, 7, 11]].max() < s.min() * 1.01 + 1e-9
    assert l1_plan(net, SHAPE, {"conv1": 2})["conv1"] == [2, 7]
    for seed in range(5):                                            # whatever the rounding, the same plan
        nudged = {"conv1": torch.from_numpy(nudge(s.numpy(), seed))}
        assert plan_from_scores(nudged, {"conv1": 2})["conv1"] == [2, 7]


def test_greedy_pairs_take_tied_pairs_in_index_order():
    c = np.full((6, 6), 0.5)
    np.fill_diagonal(c, 1.0)
    c[0, 3] = c[3, 0] = -0.5                                         # |rho| ties with a negative correlation too
    for seed in range(5):
        corr = torch.from_numpy(nudge(c, seed))
        assert [p[:2] for p in greedy_pairs(corr, 3)] == [(0, 1), (2, 3), (4, 5)]


def twin_lenet():
    """LeNet-5 with an identical pair of filters in conv1 (4, 5) and in conv2 (8, 9), scaled so that both pairs have the
    same centred norm: Pearson (with its 1e-8 in the denominator) gives both pairs the same |rho|, up to rounding"""
    net = lenet5()
    with torch.no_grad():
        v, u = net.conv1.weight[4], net.conv2.weight[8]
        cn = lambda t: (t - t.mean()).norm()
        u.mul_(cn(v) / cn(u))
        net.conv1.weight[5] = v
        net.conv2.weight[9] = u
    return net


def test_select_pairs_ranks_tied_pairs_across_layers_by_group_position():
    net = twin_lenet()
    a = analyze_channels(net, SHAPE)
    per_layer = select_pairs(net, a, n_pairs=1)
    assert [(p.group, p.i, p.j) for p in per_layer] == [("conv1", 4, 5), ("conv2", 8, 9)]
    assert per_layer[0].rho == pytest.approx(per_layer[1].rho, rel=1e-12)
    top = select_pairs(net, a, n_total=1)                            # the same |rho| in both layers: the first group wins
    assert [(p.group, p.i, p.j) for p in top] == [("conv1", 4, 5)]


def test_drop_rule_with_equal_norms_drops_the_lower_index():
    f = torch.tensor([[1.0, -2.0, 0.5], [0.5, 1.0, -2.0], [3.0, 3.0, 3.0]])   # rows 0 and 1: the same norms
    for rule in ("l1", "l2"):
        assert choose_drop(1, 0, f, rule) == 0 and choose_drop(0, 1, f, rule) == 0
    net = twin_lenet()
    pairs = select_pairs(net, analyze_channels(net, SHAPE), groups=["conv1"], n_pairs=1)
    assert plan_from_pairs(pairs) == {"conv1": [4]}                  # identical filters: the lower index goes


def reader_twins(net):
    """conv2 reads conv1 channels 0 and 1 identically, and channels 2 and 3 identically with the same numbers as 0 and 1
    but over its filters in another order: four channels of equal, largest redundancy, computed with different rounding"""
    with torch.no_grad():
        w = net.conv2.weight
        w[:, 1] = w[:, 0]
        w[:, 2] = w[torch.randperm(len(w), generator=torch.Generator().manual_seed(0)), 0]
        w[:, 3] = w[:, 2]
    return net


def test_cop_cuts_tied_channels_lowest_index_first():
    cop = COP(reader_twins(lenet5()), SHAPE, top_k=1, groups=["conv1"])
    s = cop.scores()
    assert np.allclose(s.s[:4], 1.0, atol=1e-12)                     # four channels tie at the top redundancy
    sel = cop.select(amount=2)
    assert sel["index"].tolist() == [0, 2]                           # 0 first; its twin 1 has lost its partner; then 2


def test_cop_breaks_ties_across_groups_by_group_position():
    net = reader_twins(lenet5())
    with torch.no_grad():                                            # fc1 reads conv2 channels 6 and 7 alike
        w = net.fc1.weight.view(500, 50, 16)
        w[:, 7] = w[:, 6]
    cop = COP(net, SHAPE, top_k=1)
    assert cop.names == ["conv1", "conv2"]
    sel = cop.select(amount=3)
    assert list(zip(sel.layer, sel["index"])) == [("conv1", 0), ("conv1", 2), ("conv2", 6)]


def test_selections_do_not_depend_on_the_thread_count():
    net = reader_twins(twin_lenet())                                 # exact ties in every method's scores
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            a = analyze_channels(net, SHAPE)
            results.append((COP(net, SHAPE, analysis=a, layer_types=(nn.Conv2d, nn.Linear)).plan(0.3, 1, 1, 1),
                            l1_plan(net, SHAPE, 0.3), plan_from_pairs(select_pairs(net, a, n_total=10))))
    finally: torch.set_num_threads(threads)
    assert results[0] == results[1]
