"""Bad inputs to data, criteria, correlation, pairs and COP (issue 9, section 4: this file holds those five families).

Every case asserts the exception type, that the message names the argument or layer at fault, that it says what to
do, and that the caller's model (or matrix) is exactly as it was. Data cases have no model; they assert that nothing
was written to the dataset folder instead.
"""
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from corrprune_edu.channels import analyze_channels
from corrprune_edu.cop import COP, COPCallback, cop_plan, cop_scores, customisation_table, normalize_correlation, plan_from_selection, redundancy
from corrprune_edu.core import check_finite, stable_argmin, stable_argsort
from corrprune_edu.correlation import (RunningCorrelation, activation_correlation, cop_matrix, cosine_matrix, filter_correlation,
                                       pearson_matrix)
from corrprune_edu.criteria import l1_plan, l1_scores, plan_from_scores, random_plan, random_scores, select_groups
from corrprune_edu.data import (embedded_mnist_dls, get_dls, load_split, mnist_dls, pad_crop_flip, split_train_valid,
                                stratified_indices)
from corrprune_edu.models import lenet5, resnet_cifar
from corrprune_edu.pairs import choose_drop, greedy_pairs, select_pairs
from corrprune_edu.train import make_learner

SHAPE = (1, 28, 28)
LIN = (nn.Conv2d, nn.Linear)
NAN, INF = float("nan"), float("inf")
# a message says what to do when it tells the user what an argument must be, or what to pass, use, add, ...
WHAT_TO_DO = re.compile(r"\b(must|pass|use|give|add|leave|extract|reload|retrain|compute|call|remove|choose|keep)\b", re.I)


def broken(layer="conv2", value=NAN):
    "LeNet-5 with one non-finite weight in `layer`"
    net = lenet5()
    with torch.no_grad(): net.get_submodule(layer).weight.view(-1)[7] = value
    return net


def analysed(net=None):
    net = net or lenet5()
    return net, analyze_channels(net, SHAPE)


def square(n=4):
    c = torch.eye(n, dtype=torch.float64) + 0.3
    c.fill_diagonal_(1.0)
    return c


def one_batch_dls():
    return mnist_dls(10, n_test_per_class=2, source="embedded", bs=32)


def fit_with(cb, net):
    "A real Learner around `net`; fit one epoch with `cb`"
    learn = make_learner(net, one_batch_dls())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=cb)


def empty_class_folder(tmp):
    for split in ("training", "testing"):
        for c in "01": (tmp/split/c).mkdir(parents=True)
        Image.new("L", (28, 28)).save(tmp/split/"0"/"a.png")
    return tmp


# (family, case id, what the call needs: 'net' | 'net+a' | 'corr' | 'tmp' | None, call, exception, names in the message)
CASES = [
    # ---- data ------------------------------------------------------------------------------------------------
    ("data", "n_per_class=1 leaves no training image", None, lambda _: embedded_mnist_dls(1), ValueError, ["n_per_class"]),
    ("data", "n_per_class=0", None, lambda _: embedded_mnist_dls(0), ValueError, ["n_per_class"]),
    ("data", "n_per_class=2.5", None, lambda _: embedded_mnist_dls(2.5), TypeError, ["n_per_class"]),
    ("data", "n_per_class='10'", None, lambda _: embedded_mnist_dls("10"), TypeError, ["n_per_class"]),
    ("data", "n_per_class above the class size", None, lambda _: embedded_mnist_dls(601), ValueError, ["n_per_class", "600"]),
    ("data", "n_test_per_class=1.5", None, lambda _: embedded_mnist_dls(10, n_test_per_class=1.5), TypeError, ["n_test_per_class"]),
    ("data", "n_test_per_class above the class size", None, lambda _: embedded_mnist_dls(10, n_test_per_class=101), ValueError, ["n_test_per_class"]),
    ("data", "bs=0", None, lambda _: embedded_mnist_dls(10, bs=0), ValueError, ["bs"]),
    ("data", "bs=-3", None, lambda _: mnist_dls(10, bs=-3), ValueError, ["bs"]),
    ("data", "bs=32.0", None, lambda _: mnist_dls(10, bs=32.0), TypeError, ["bs"]),
    ("data", "negative seed", None, lambda _: embedded_mnist_dls(10, seed=-1), ValueError, ["seed"]),
    ("data", "negative seed, folder", None, lambda _: mnist_dls(10, seed=-1), ValueError, ["seed"]),
    ("data", "valid_pct=1.0", None, lambda _: embedded_mnist_dls(10, valid_pct=1.0), ValueError, ["valid_pct"]),
    ("data", "valid_pct=NaN", None, lambda _: embedded_mnist_dls(10, valid_pct=NAN), ValueError, ["valid_pct"]),
    ("data", "valid_pct='0.1'", None, lambda _: embedded_mnist_dls(10, valid_pct="0.1"), TypeError, ["valid_pct"]),
    ("data", "unknown source", None, lambda _: mnist_dls(10, source="web"), ValueError, ["source"]),
    ("data", "unknown dataset name", None, lambda _: get_dls("svhn"), ValueError, ["dataset name", "choose"]),
    ("data", "unknown split", None, lambda _: load_split("mnist", "valid", 5), ValueError, ["split"]),
    ("data", "stratified_indices: fractional size", None, lambda _: stratified_indices(np.arange(10) % 2, 2.5), TypeError, ["n_per_class"]),
    ("data", "split leaves a class without training images", None, lambda _: split_train_valid(np.arange(10), 0.1), ValueError, ["n_per_class", "valid_pct"]),
    ("data", "pad_crop_flip: negative pad", None, lambda _: pad_crop_flip(torch.zeros(2, 1, 8, 8), pad=-1), ValueError, ["pad"]),
    ("data", "empty class folder", "tmp-empty", lambda tmp: mnist_dls(10, path=tmp), FileNotFoundError, ["training/1", "extract"]),
    ("data", "folder without the dataset", "tmp", lambda tmp: mnist_dls(10, path=tmp), FileNotFoundError, ["Looked for", "untar_data"]),
    # ---- criteria --------------------------------------------------------------------------------------------
    ("criteria", "amount=1.0", "net", lambda m: l1_plan(m, SHAPE, amount=1.0), ValueError, ["amount"]),
    ("criteria", "amount=-1", "net", lambda m: l1_plan(m, SHAPE, amount=-1), ValueError, ["amount"]),
    ("criteria", "amount='half'", "net", lambda m: l1_plan(m, SHAPE, amount="half"), TypeError, ["amount"]),
    ("criteria", "amount=NaN", "net", lambda m: random_plan(m, SHAPE, amount=NAN), ValueError, ["amount"]),
    ("criteria", "amount dict with a typo", "net", lambda m: l1_plan(m, SHAPE, amount={"conv9": 2}), ValueError, ["conv9"]),
    ("criteria", "amount dict with a bad value", "net", lambda m: l1_plan(m, SHAPE, amount={"conv1": 1.5}), ValueError, ["amount for 'conv1'"]),
    ("criteria", "min_channels=0 would empty a group", "net", lambda m: l1_plan(m, SHAPE, 0.5, min_channels=0), ValueError, ["min_channels"]),
    ("criteria", "min_channels=1.5", "net", lambda m: random_plan(m, SHAPE, 0.5, min_channels=1.5), TypeError, ["min_channels"]),
    ("criteria", "groups='untie' (typo)", "net", lambda m: l1_plan(m, SHAPE, groups="untie"), ValueError, ["groups"]),
    ("criteria", "groups names no group", "net", lambda m: l1_plan(m, SHAPE, groups=["conv9"]), ValueError, ["conv9"]),
    ("criteria", "groups names the classifier", "net", lambda m: l1_plan(m, SHAPE, groups=["fc3"]), ValueError, ["fc3"]),
    ("criteria", "groups names a linear layer without layer_types", "net", lambda m: l1_plan(m, SHAPE, groups=["fc1"]), ValueError, ["fc1", "layer_types"]),
    ("criteria", "groups=5", "net", lambda m: l1_plan(m, SHAPE, groups=5), TypeError, ["groups"]),
    ("criteria", "layer_types='conv'", "net", lambda m: l1_plan(m, SHAPE, layer_types="conv"), TypeError, ["layer_types"]),
    ("criteria", "random_plan: negative seed", "net", lambda m: random_plan(m, SHAPE, seed=-1), ValueError, ["seed"]),
    ("criteria", "random_scores: fractional seed", None, lambda _: random_scores([], seed=0.5), TypeError, ["seed"]),
    ("criteria", "l1_plan: NaN weight", "nan", lambda m: l1_plan(m, SHAPE), ValueError, ["conv2.weight", "NaN"]),
    ("criteria", "random_plan: infinite weight", "inf", lambda m: random_plan(m, SHAPE), ValueError, ["conv2.weight", "inf"]),
    ("criteria", "l1_scores: NaN weight", "nan+a", lambda m, a: l1_scores(m, a, a.groups[:2]), ValueError, ["conv2.weight"]),
    ("criteria", "plan_from_scores: NaN score", None, lambda _: plan_from_scores({"conv1": torch.tensor([1., NAN, 2.])}, 1), ValueError, ["'conv1'"]),
    ("criteria", "plan_from_scores: scores not a dict", None, lambda _: plan_from_scores(torch.ones(3), 1), TypeError, ["scores"]),
    ("criteria", "select_groups: unknown name", "net+a", lambda m, a: select_groups(a, ["conv7"], model=m), ValueError, ["conv7"]),
    ("criteria", "stable_argsort: 2-D scores", None, lambda _: stable_argsort(np.ones((2, 2))), ValueError, ["scores"]),
    ("criteria", "stable_argsort: negative rtol", None, lambda _: stable_argsort([1., 2.], rtol=-1e-9), ValueError, ["rtol"]),
    ("criteria", "stable_argmin: NaN", None, lambda _: stable_argmin([1., NAN]), ValueError, ["NaN"]),
    ("criteria", "check_finite names the tensor", "nan", lambda m: check_finite(m, "my_method"), ValueError, ["my_method", "conv2.weight"]),
    # ---- correlation -----------------------------------------------------------------------------------------
    ("correlation", "unknown measure", "net", lambda m: filter_correlation(m, "conv1", "spearman", example_input=SHAPE), ValueError, ["measure"]),
    ("correlation", "activation without data", "net", lambda m: filter_correlation(m, "conv1", "activation", example_input=SHAPE), ValueError, ["dl"]),
    ("correlation", "no analysis, no example_input", "net", lambda m: filter_correlation(m, "conv1"), ValueError, ["example_input"]),
    ("correlation", "NaN weight", "nan", lambda m: filter_correlation(m, "conv2", example_input=SHAPE), ValueError, ["conv2.weight"]),
    ("correlation", "cop measure: NaN in the reading layer", "nan", lambda m: filter_correlation(m, "conv1", "cop", example_input=SHAPE), ValueError, ["conv2.weight"]),
    ("correlation", "cop_matrix: NaN in the reading layer", "nan+a", lambda m, a: cop_matrix(m, a, "conv1"), ValueError, ["conv2.weight"]),
    ("correlation", "pearson_matrix: 3-D input", None, lambda _: pearson_matrix(torch.ones(2, 3, 4)), ValueError, ["x must be 2-D", "flatten"]),
    ("correlation", "pearson_matrix: negative eps", None, lambda _: pearson_matrix(torch.randn(3, 5), eps=-1e-8), ValueError, ["eps"]),
    ("correlation", "pearson_matrix: eps=NaN", None, lambda _: pearson_matrix(torch.randn(3, 5), eps=NAN), ValueError, ["eps"]),
    ("correlation", "cosine_matrix: eps='small'", None, lambda _: cosine_matrix(torch.randn(3, 5), eps="small"), TypeError, ["eps"]),
    ("correlation", "RunningCorrelation(0)", None, lambda _: RunningCorrelation(0), ValueError, ["n must be"]),
    ("correlation", "RunningCorrelation.update: wrong width", None, lambda _: RunningCorrelation(3).update(torch.ones(5, 4)), ValueError, ["(observations, 3)"]),
    ("correlation", "RunningCorrelation.matrix before any data", None, lambda _: RunningCorrelation(3).matrix(), ValueError, ["update"]),
    ("correlation", "activation_correlation: unknown layer", "net", lambda m: activation_correlation(m, "conv9", [torch.randn(2, *SHAPE)]), ValueError, ["conv9"]),
    ("correlation", "activation_correlation: n_batches=0", "net", lambda m: activation_correlation(m, "conv1", [torch.randn(2, *SHAPE)], n_batches=0), ValueError, ["n_batches"]),
    ("correlation", "activation_correlation: no batch", "net", lambda m: activation_correlation(m, "conv1", []), ValueError, ["dl"]),
    ("correlation", "activation_correlation: NaN weight", "nan", lambda m: activation_correlation(m, "conv1", [torch.randn(2, *SHAPE)]), ValueError, ["conv2.weight"]),
    # ---- pairs -----------------------------------------------------------------------------------------------
    ("pairs", "greedy_pairs: not square", "corr", lambda c: greedy_pairs(c[:3], 1), ValueError, ["corr"]),
    ("pairs", "greedy_pairs: n=-1", "corr", lambda c: greedy_pairs(c, -1), ValueError, ["n must be"]),
    ("pairs", "greedy_pairs: n=1.5", "corr", lambda c: greedy_pairs(c, 1.5), TypeError, ["n must be"]),
    ("pairs", "greedy_pairs: NaN correlation", None, lambda _: greedy_pairs(torch.tensor([[1., NAN], [NAN, 1.]]), 1), ValueError, ["correlations"]),
    ("pairs", "choose_drop: unknown rule", None, lambda _: choose_drop(0, 1, torch.ones(2, 3), "largest"), ValueError, ["rule"]),
    ("pairs", "choose_drop: i = j", None, lambda _: choose_drop(1, 1, torch.ones(2, 3)), ValueError, ["i = j"]),
    ("pairs", "select_pairs: min_channels=0", "net+a", lambda m, a: select_pairs(m, a, min_channels=0), ValueError, ["min_channels"]),
    ("pairs", "select_pairs: n_pairs=-1", "net+a", lambda m, a: select_pairs(m, a, n_pairs=-1), ValueError, ["n_pairs"]),
    ("pairs", "select_pairs: n_pairs=1.5", "net+a", lambda m, a: select_pairs(m, a, n_pairs=1.5), ValueError, ["n_pairs"]),
    ("pairs", "select_pairs: n_pairs='2'", "net+a", lambda m, a: select_pairs(m, a, n_pairs="2"), TypeError, ["n_pairs"]),
    ("pairs", "select_pairs: n_pairs dict with a typo", "net+a", lambda m, a: select_pairs(m, a, n_pairs={"conv9": 1}), ValueError, ["conv9"]),
    ("pairs", "select_pairs: n_pairs function returns -1", "net+a", lambda m, a: select_pairs(m, a, n_pairs=lambda c: -1), ValueError, ["n_pairs"]),
    ("pairs", "select_pairs: n_total=-1", "net+a", lambda m, a: select_pairs(m, a, n_total=-1), ValueError, ["n_total"]),
    ("pairs", "select_pairs: n_total=2.5", "net+a", lambda m, a: select_pairs(m, a, n_total=2.5), TypeError, ["n_total"]),
    ("pairs", "select_pairs: negative seed", "net+a", lambda m, a: select_pairs(m, a, seed=-1), ValueError, ["seed"]),
    ("pairs", "select_pairs: unknown drop_rule", "net+a", lambda m, a: select_pairs(m, a, drop_rule="big"), ValueError, ["drop_rule"]),
    ("pairs", "select_pairs: unknown measure", "net+a", lambda m, a: select_pairs(m, a, measure="spearman"), ValueError, ["measure"]),
    ("pairs", "select_pairs: the classifier's outputs", "net+a", lambda m, a: select_pairs(m, a, groups=["fc3"]), ValueError, ["fc3"]),
    ("pairs", "select_pairs: NaN weight", "nan+a", lambda m, a: select_pairs(m, a), ValueError, ["conv2.weight"]),
    # ---- COP: functions --------------------------------------------------------------------------------------
    ("cop", "no example_input", "net", lambda m: COP(m), ValueError, ["example_input"]),
    ("cop", "normalize='l3'", "net", lambda m: COP(m, SHAPE, normalize="l3"), ValueError, ["normalize"]),
    ("cop", "top_k=0", "net", lambda m: COP(m, SHAPE, top_k=0), ValueError, ["top_k"]),
    ("cop", "top_k=1.5", "net", lambda m: COP(m, SHAPE, top_k=1.5), TypeError, ["top_k"]),
    ("cop", "nothing of layer_types to score", "net", lambda m: COP(m, SHAPE, layer_types=(nn.BatchNorm2d,)), ValueError, ["layer_types"]),
    ("cop", "groups names no group", "net", lambda m: COP(m, SHAPE, groups=["conv9"]), ValueError, ["conv9"]),
    ("cop", "NaN weight", "nan", lambda m: COP(m, SHAPE), ValueError, ["conv2.weight", "NaN"]),
    ("cop", "infinite weight in the hidden linear layer", "inf-fc1", lambda m: cop_plan(m, 0.3, example_input=SHAPE, layer_types=LIN), ValueError, ["fc1.weight"]),
    ("cop", "cop_scores: NaN weight", "nan", lambda m: cop_scores(m, example_input=SHAPE), ValueError, ["conv2.weight"]),
    ("cop", "select: amount=1.0", "net", lambda m: COP(m, SHAPE).select(amount=1.0), ValueError, ["amount"]),
    ("cop", "select: amount=-1", "net", lambda m: COP(m, SHAPE).select(amount=-1), ValueError, ["amount"]),
    ("cop", "select: amount='0.3'", "net", lambda m: COP(m, SHAPE).select(amount="0.3"), TypeError, ["amount"]),
    ("cop", "select: macs_reduction=1.5", "net", lambda m: COP(m, SHAPE).select(macs_reduction=1.5), ValueError, ["macs_reduction"]),
    ("cop", "select: params_reduction=NaN", "net", lambda m: COP(m, SHAPE).select(params_reduction=NAN), ValueError, ["params_reduction"]),
    ("cop", "select: two targets", "net", lambda m: COP(m, SHAPE).select(amount=0.2, macs_reduction=0.5), ValueError, ["exactly one"]),
    ("cop", "select: no target", "net", lambda m: COP(m, SHAPE).select(), ValueError, ["exactly one"]),
    ("cop", "select: alpha=-1", "net", lambda m: COP(m, SHAPE).select(0.2, alpha=-1), ValueError, ["alpha"]),
    ("cop", "select: beta=inf", "net", lambda m: COP(m, SHAPE).select(0.2, beta=INF), ValueError, ["beta"]),
    ("cop", "select: gamma=True", "net", lambda m: COP(m, SHAPE).select(0.2, gamma=True), TypeError, ["gamma"]),
    ("cop", "select: all weights 0", "net", lambda m: COP(m, SHAPE).select(0.2, alpha=0), ValueError, ["alpha, beta and gamma"]),
    ("cop", "select: min_channels=0", "net", lambda m: COP(m, SHAPE).select(0.2, min_channels=0), ValueError, ["min_channels"]),
    ("cop", "scores: gamma=-3", "net", lambda m: COP(m, SHAPE).scores(gamma=-3), ValueError, ["gamma"]),
    ("cop", "plan_from_selection: n=-1", "net", lambda m: plan_from_selection(COP(m, SHAPE).select(0.1), n=-1), ValueError, ["n must be"]),
    ("cop", "plan_from_selection: not a selection", None, lambda _: plan_from_selection({"conv1": [1]}), TypeError, ["selection"]),
    ("cop", "customisation_table: amount=40", "net", lambda m: customisation_table(COP(m, SHAPE), 40), ValueError, ["amount"]),
    ("cop", "normalize_correlation: not square", None, lambda _: normalize_correlation(np.ones((2, 3))), ValueError, ["corr"]),
    ("cop", "normalize_correlation: NaN", None, lambda _: normalize_correlation(np.array([[1., NAN], [NAN, 1.]])), ValueError, ["correlations"]),
    ("cop", "normalize_correlation: unknown method", "corr", lambda c: normalize_correlation(c, "mean"), ValueError, ["method"]),
    ("cop", "redundancy: top_k=0", "corr", lambda c: redundancy(c, top_k=0), ValueError, ["top_k"]),
    # ---- COP: the callback -----------------------------------------------------------------------------------
    ("cop", "COPCallback: at=1.0", None, lambda _: COPCallback(0.3, at=1.0), ValueError, ["at"]),
    ("cop", "COPCallback: at=NaN", None, lambda _: COPCallback(0.3, at=NAN), ValueError, ["at"]),
    ("cop", "COPCallback: at='half'", None, lambda _: COPCallback(0.3, at="half"), TypeError, ["at"]),
    ("cop", "COPCallback: no target", None, lambda _: COPCallback(), ValueError, ["exactly one"]),
    ("cop", "COPCallback: alpha=-2", None, lambda _: COPCallback(0.3, alpha=-2), ValueError, ["alpha"]),
    ("cop", "COPCallback: min_channels=0", None, lambda _: COPCallback(0.3, min_channels=0), ValueError, ["min_channels"]),
    ("cop", "COPCallback: analysis passed", None, lambda _: COPCallback(0.3, analysis=object()), ValueError, ["analysis"]),
    ("cop", "COPCallback: top_k=0", None, lambda _: COPCallback(0.3, top_k=0), ValueError, ["top_k"]),
    ("cop", "COPCallback: normalize='l3'", None, lambda _: COPCallback(0.3, normalize="l3"), ValueError, ["normalize"]),
    ("cop", "COPCallback in fit: NaN weight", "nan", lambda m: fit_with(COPCallback(0.3), m), ValueError, ["conv2.weight", "reload"]),
]

IDS = [f"{family}: {name}" for family, name, *_ in CASES]
assert len(set(IDS)) == len(IDS), [i for i, n in Counter(IDS).items() if n > 1]


def snapshot(obj):
    "Everything about a model (or tensor) that a call must not change"
    if isinstance(obj, torch.Tensor): return obj.clone()
    return dict(state={k: v.clone() for k, v in obj.state_dict().items()}, training=[m.training for m in obj.modules()],
                grad=[(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in obj.parameters()],
                modules=[(n, type(m).__name__) for n, m in obj.named_modules()],
                hooks=sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in obj.modules()))


def same(a, b) -> bool:
    eq = lambda x, y: x.shape == y.shape and x.dtype == y.dtype and (torch.equal(x, y) if not x.is_floating_point()
                                                                       else torch.allclose(x, y, rtol=0, atol=0, equal_nan=True))
    if isinstance(a, torch.Tensor): return eq(a, b)
    return (a["state"].keys() == b["state"].keys() and all(eq(a["state"][k], b["state"][k]) for k in a["state"])
            and a["training"] == b["training"] and a["modules"] == b["modules"] and a["hooks"] == b["hooks"]
            and all(ra == rb and (ga is None) == (gb is None) and (ga is None or eq(ga, gb))
                    for (ra, ga), (rb, gb) in zip(a["grad"], b["grad"])))


def arguments(needs, tmp_path):
    "The arguments of a case's call, and the object whose state must survive it"
    if needs is None: return (None,), None
    if needs == "tmp": return (tmp_path,), None
    if needs == "tmp-empty": return (empty_class_folder(tmp_path),), None
    if needs == "corr": c = square(); return (c,), c
    net = {"net": lenet5, "nan": broken, "inf": lambda: broken(value=INF), "inf-fc1": lambda: broken("fc1", INF),
           "net+a": lenet5, "nan+a": broken}[needs]()
    if needs.endswith("+a"):
        a = analyze_channels(net, SHAPE)
        return (net, a), net
    return (net,), net


def files_under(path: Path) -> list:
    return sorted(str(p) for p in path.rglob("*"))


@pytest.mark.parametrize("family,name,needs,call,exc,names", CASES, ids=IDS)
def test_bad_input(family, name, needs, call, exc, names, tmp_path):
    args, watched = arguments(needs, tmp_path)
    before = None if watched is None else snapshot(watched)
    files = files_under(tmp_path)
    with pytest.raises(exc) as e: call(*args)
    msg = str(e.value)
    for n in names: assert n in msg, f"the message should name {n!r}: {msg}"
    assert WHAT_TO_DO.search(msg), f"the message should say what to do: {msg}"
    if watched is not None: assert same(before, snapshot(watched)), "the caller's model (or matrix) changed"
    if needs and needs.startswith("tmp"): assert files_under(tmp_path) == files, "a failed call wrote into the dataset folder"


def test_the_suite_covers_every_family_of_this_file():
    counts = Counter(family for family, *_ in CASES)
    assert set(counts) == {"data", "criteria", "correlation", "pairs", "cop"}
    assert sum(counts.values()) >= 60 and min(counts.values()) >= 10, counts


def test_the_unchanged_check_sees_every_kind_of_change():
    "The model check above would catch a call that mutates a weight, a buffer, a mode, a gradient flag or a hook"
    for change in (lambda m: m.conv1.weight.data.mul_(1.0001), lambda m: m.eval(), lambda m: m.fc1.bias.requires_grad_(False),
                   lambda m: m.conv2.register_forward_hook(lambda *a: None)):
        net = broken()                                            # NaN included: NaN counts as equal to itself
        before = snapshot(net)
        assert same(before, snapshot(net))
        change(net)
        assert not same(before, snapshot(net))
