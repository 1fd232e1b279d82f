"""Filter surgery is exact: for any plan, the pruned model computes what the masked model computes.

Plans are drawn by hypothesis (derandomised, so CI is repeatable): a random subset of the prunable channel groups,
and in each a random non-empty, non-full subset of channels, residual-stage (tied) groups included.
"""
import copy
import functools

import pytest
import torch
import torchvision
from fastai.vision.models.xresnet import xresnet18
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from corrprune_edu.flops import CostModel, count_macs, count_params
from corrprune_edu.models import lenet5, resnet_cifar, vgg16_cifar
from corrprune_edu.channels import PruningError, analyze_channels
from corrprune_edu.surgery import mask_channels, prune_channels

MODELS = {  # name: (constructor, input shape, examples to draw)
    "lenet5": (lenet5, (1, 28, 28), 25),
    "vgg16_cifar": (vgg16_cifar, (3, 32, 32), 10),
    "resnet20": (functools.partial(resnet_cifar, 20), (3, 32, 32), 15),
    "resnet56": (functools.partial(resnet_cifar, 56), (3, 32, 32), 6),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 64, 64), 6),
    "tv_resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (3, 64, 64), 4),
    "tv_vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=10), (3, 32, 32), 3),
    "tv_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 64, 64), 6),
    "tv_densenet121": (lambda: torchvision.models.densenet121(num_classes=10), (3, 64, 64), 3),
    "tv_efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), (3, 64, 64), 4),
    "fastai_xresnet18": (lambda: xresnet18(n_out=10), (3, 64, 64), 6),
}


def randomise_norms(model: nn.Module) -> nn.Module:
    "Non-trivial BatchNorm statistics and affine parameters, so that a wrong BN slice changes the output"
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


@functools.cache
def prepared(name):
    ctor, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = randomise_norms(ctor())
    analysis = analyze_channels(model, shape)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    return model, analysis, x


def draw_plan(data, analysis):
    groups = [g for g in analysis.groups if g.prunable]
    chosen = data.draw(st.lists(st.sampled_from(groups), min_size=1, max_size=min(6, len(groups)), unique_by=lambda g: g.name))
    plan = {}
    for g in chosen:
        layer = data.draw(st.sampled_from(g.producers))  # any producer names the group
        k = data.draw(st.integers(1, g.n_channels - 1))
        plan[layer] = data.draw(st.lists(st.integers(0, g.n_channels - 1), min_size=k, max_size=k, unique=True))
    return plan


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_equals_masked(name):
    model, analysis, x = prepared(name)
    base_params = count_params(model)

    @settings(max_examples=MODELS[name][2], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        plan = draw_plan(data, analysis)
        pruned = prune_channels(model, plan, analysis=analysis)
        masked = mask_channels(model, plan, analysis=analysis)
        with torch.no_grad():
            err = relative_error(pruned(x), masked(x))
        assert err <= 1e-5, f"{name}: plan {plan} gives relative error {err:.2e}"
        assert count_params(pruned) < base_params
        assert count_params(model) == base_params  # the caller's model is untouched

    check()



COST_MODELS = ["lenet5", "vgg16_cifar", "resnet20", "tv_mobilenet_v2", "tv_efficientnet_b0", "tv_densenet121"]

@pytest.mark.parametrize("name", COST_MODELS)
def test_cost_model_predicts_the_pruned_model_exactly(name):
    "CostModel's parameters and MACs after a plan are what counting the pruned model gives (residual, depthwise, SE, concat)"
    model, analysis, _ = prepared(name)
    shape = MODELS[name][1]
    cm = CostModel(model, analysis, [g for g in analysis.groups if g.prunable])
    assert cm.totals() == (count_params(model), count_macs(model, shape))

    @settings(max_examples=3, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        plan = draw_plan(data, analysis)
        pruned = prune_channels(model, plan, analysis=analysis)
        assert cm.costs_after(plan) == (count_params(pruned), count_macs(pruned, shape)), f"{name}: plan {plan}"

    check()

def test_masking_matters():
    "A plan that removes channels changes the output of a random network: the equality above is not trivial"
    model, analysis, x = prepared("resnet20")
    plan = {"layer1.0.conv1": [0, 1, 2]}
    with torch.no_grad():
        assert relative_error(mask_channels(model, plan, analysis=analysis)(x), model(x)) > 1e-3


def test_pruned_model_is_smaller_and_faster_in_macs():
    model, analysis, _ = prepared("resnet56")
    plan = {g.producers[0]: list(range(g.n_channels // 2)) for g in analysis.groups if g.prunable}
    pruned = prune_channels(model, plan, analysis=analysis)
    assert count_macs(pruned, (3, 32, 32)) < 0.3 * count_macs(model, (3, 32, 32))


def test_keeps_mode_dtype_and_device():
    model = resnet_cifar(20).train().double()
    pruned = prune_channels(model, {"layer1.0.conv1": [0]}, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert pruned.training and pruned.layer1[0].training
    assert all(p.dtype == torch.float64 for p in pruned.parameters())


def test_gradients_are_sliced():
    model = lenet5()
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    g = model.conv2.weight.grad.clone()
    pruned = prune_channels(model, {"conv1": [0], "conv2": [4]}, (1, 28, 28))
    keep_out = [i for i in range(50) if i != 4]
    assert torch.equal(pruned.conv2.weight.grad, g[keep_out][:, 1:])


def test_frozen_parameters_stay_frozen_and_are_pruned():
    model = resnet_cifar(20)
    for p in model.layer1.parameters(): p.requires_grad_(False)
    pruned = prune_channels(model, {"layer1.0.conv1": [0, 1]}, (3, 32, 32))
    assert pruned.layer1[0].conv1.out_channels == 14 and not pruned.layer1[0].conv1.weight.requires_grad


def test_tensor_image_input_traces():
    from fastai.torch_core import TensorImage
    x = TensorImage(torch.randn(2, 1, 28, 28))
    pruned = prune_channels(lenet5(), {"conv2": [0, 1]}, x)
    assert pruned.conv2.out_channels == 48


@pytest.mark.parametrize("plan, match", [
    ({"conv9": [0]}, "not a conv or linear layer"),
    ({"fc2": [0]}, "cannot be pruned"),
    ({"conv1": [-1]}, "out of range"),
    ({"conv1": [3, 3]}, "repeats"),
    ({"conv2": list(range(50))}, "removes all 50 channels"),
])
def test_bad_plans(plan, match):
    with pytest.raises(PruningError, match=match):
        prune_channels(lenet5(), plan, (1, 28, 28))


class ChannelShuffle(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class Unknown(nn.Module):
    "A custom module whose forward gates on a sum over all channels (so pruning would change its behaviour)"
    def __init__(self): super().__init__(); self.conv = nn.Conv2d(8, 8, 1)
    def forward(self, x): return self.conv(x) if x.sum() > 0 else x


def test_channel_shuffle_is_refused_with_node_and_module():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), ChannelShuffle(), nn.Conv2d(8, 4, 3))
    with pytest.raises(PruningError, match=r"'view' in module '1'.*mixes channels.*exclude=\['1'\]"):
        analyze_channels(model, (3, 8, 8))


def test_unknown_module_is_named_and_can_be_excluded():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Unknown(), nn.Conv2d(8, 6, 3), nn.Conv2d(6, 4, 1))
    with pytest.raises(PruningError, match=r"'sum' in module '1'.*exclude=\['1'\]"):
        analyze_channels(model, (3, 8, 8))
    groups = analyze_channels(model, (3, 8, 8), exclude=["1"]).groups
    assert [g.name for g in groups if g.prunable] == ["2"]


def test_channel_slicing_and_reductions_over_channels_are_refused():
    class Slice(nn.Module):
        def forward(self, x): return x[:, :4]
    class MeanOverChannels(nn.Module):
        def forward(self, x): return x * x.mean(1, keepdim=True)
    for bad in (Slice(), MeanOverChannels()):
        with pytest.raises(PruningError):
            analyze_channels(nn.Sequential(nn.Conv2d(3, 8, 3), bad, nn.Conv2d(8 if not isinstance(bad, Slice) else 4, 2, 1)), (3, 8, 8))


def test_data_dependent_python_is_no_obstacle():
    "The model runs for real, so Python control flow that does not read channels is fine"
    class Gate(nn.Module):
        def __init__(self): super().__init__(); self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)
        def forward(self, x):
            y = self.a(x)
            for _ in range(x.shape[0]): y = torch.relu(y)
            return self.b(y) if x.shape[-1] > 4 else y
    model = Gate().eval()
    pruned = prune_channels(model, {"a": [0, 1]}, (3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(pruned(x), mask_channels(model, {"a": [0, 1]}, (3, 8, 8))(x), atol=1e-6)


def test_weights_computed_on_the_fly_are_refused():
    class StandardisedConv(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True))
            return nn.functional.conv2d(x, w, self.bias)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), StandardisedConv(8, 6, 3), nn.Conv2d(6, 2, 1))
    with pytest.raises(PruningError, match="computed on the fly"):
        analyze_channels(model, (3, 8, 8))


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.integers(2, 40).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=12), max_size=6))))
def test_union_find_matches_a_naive_reference(case):
    "The vectorised union-find ties exactly what a plain one would, whatever the pairs (chains, cycles, repeats)"
    import numpy as np
    from corrprune_edu.channels import _Atoms
    n, batches = case
    u, ref = _Atoms(), list(range(n))
    u.new(n)
    def find(a):
        while ref[a] != a: a = ref[a]
        return a
    for pairs in batches:
        if not pairs: continue
        xs, ys = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        u.union(xs, ys)
        for x, y in pairs: ref[find(y)] = find(x)
    roots = u.roots()
    for a in range(n):
        for b in range(n):
            assert (roots[a] == roots[b]) == (find(a) == find(b))


def test_group_lookup_by_name_or_member_and_a_clear_error():
    a = analyze_channels(resnet_cifar(20), (3, 32, 32))
    stage = a.group("conv1")                                   # the stem names the first stage's residual stream
    assert a.group(stage) is stage
    assert a.group("layer1.0.conv2") is stage                 # any producer of a tied group finds the group
    with pytest.raises(PruningError, match="no channel group named 'conv9'"): a.group("conv9")
