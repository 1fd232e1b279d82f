"""Filter surgery is exact: for any plan, the pruned model computes what the masked model computes, on every
architecture the package claims to handle (including shared and reused modules and single-channel tensors), and the
cost accounting agrees with PyTorch's own FLOP counter on all of them.

Plans are drawn by hypothesis (derandomised, so CI is repeatable): a random subset of the prunable channel groups,
and in each a random non-empty, non-full subset of channels, named by any producer of the group (or a second name of
one), residual-stage (tied) groups included.
"""
import functools

import pytest
import torch
import torchvision
from fastai.vision.models.xresnet import xresnet18
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from corrprune_edu.channels import analyze_channels
from corrprune_edu.flops import CostModel, count_macs, count_params, torch_flops
from corrprune_edu.models import lenet5, resnet_cifar, vgg16_cifar
from corrprune_edu.surgery import mask_channels, prune_channels
from structure_models import STRUCTURE_MODELS

MODELS = {  # name: (constructor, input shape, examples to draw)
    "lenet5": (lenet5, (1, 28, 28), 20),
    "vgg16_cifar": (vgg16_cifar, (3, 32, 32), 6),
    "resnet20": (functools.partial(resnet_cifar, 20), (3, 32, 32), 12),
    "resnet56": (functools.partial(resnet_cifar, 56), (3, 32, 32), 4),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 64, 64), 5),
    "tv_resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (3, 64, 64), 3),
    "tv_vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=10), (3, 32, 32), 2),
    "tv_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 64, 64), 5),
    "tv_densenet121": (lambda: torchvision.models.densenet121(num_classes=10), (3, 64, 64), 3),
    "tv_efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), (3, 64, 64), 3),
    "fastai_xresnet18": (lambda: xresnet18(n_out=10), (3, 64, 64), 4),
    **{name: (ctor, shape, 15) for name, (ctor, shape) in STRUCTURE_MODELS.items() if name != "grouped_conv"},
}
STRUCTURE = [n for n in STRUCTURE_MODELS if n in MODELS]


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


def names_of(group, analysis):
    "Every name a plan may use for `group`: its producers and the second names (aliases) of them"
    return [*group.producers, *sorted(k for k, v in analysis.alias.items() if v in group.producers)]


def draw_plan(data, analysis):
    groups = [g for g in analysis.groups if g.prunable and g.n_channels > 1]
    chosen = data.draw(st.lists(st.sampled_from(groups), min_size=1, max_size=min(6, len(groups)), unique_by=lambda g: g.name))
    plan = {}
    for g in chosen:
        layer = data.draw(st.sampled_from(names_of(g, analysis)))  # any name of any producer names the group
        k = data.draw(st.integers(1, g.n_channels - 1))
        plan[layer] = data.draw(st.lists(st.integers(0, g.n_channels - 1), min_size=k, max_size=k, unique=True))
    return plan


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def example(name):
    "What the cost functions take for this model: an image shape, or an example batch for other inputs"
    shape = MODELS[name][1]
    return shape if len(shape) == 3 else torch.zeros(1, *shape)


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_equals_masked(name):
    model, analysis, x = prepared(name)
    base_params, base_state = count_params(model), {k: v.clone() for k, v in model.state_dict().items()}

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

    check()
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())  # the caller's model is untouched


@pytest.mark.parametrize("name", ["resnet20", *STRUCTURE])
def test_masking_matters(name):
    "Removing a channel of the first prunable group changes a random network's output: the equality above is not trivial"
    model, analysis, x = prepared(name)
    g = next(g for g in analysis.groups if g.prunable and g.n_channels > 1)
    with torch.no_grad():
        assert relative_error(mask_channels(model, {g.name: [0]}, analysis=analysis)(x), model(x)) > 1e-4


def test_pruned_model_is_smaller_and_faster_in_macs():
    model, analysis, _ = prepared("resnet56")
    plan = {g.producers[0]: list(range(g.n_channels // 2)) for g in analysis.groups if g.prunable}
    pruned = prune_channels(model, plan, analysis=analysis)
    assert count_macs(pruned, (3, 32, 32)) < 0.3 * count_macs(model, (3, 32, 32))


@pytest.mark.parametrize("name", list(MODELS))
def test_macs_agree_with_flop_counter_mode(name):
    "2 x the counted MACs is what torch.utils.flop_counter counts, on every architecture surgery is tested on"
    model = prepared(name)[0]
    assert torch_flops(model, example(name)) == 2 * count_macs(model, example(name))


COST_MODELS = ["lenet5", "vgg16_cifar", "resnet20", "tv_mobilenet_v2", "tv_efficientnet_b0", "tv_densenet121", *STRUCTURE]

@pytest.mark.parametrize("name", COST_MODELS)
def test_cost_model_predicts_the_pruned_model_exactly(name):
    "CostModel's parameters and MACs after a plan are what counting the pruned model gives (residual, depthwise, SE, concat, shared)"
    model, analysis, _ = prepared(name)
    cm = CostModel(model, analysis, [g for g in analysis.groups if g.prunable])
    assert cm.totals() == (count_params(model), count_macs(model, example(name)))

    @settings(max_examples=3, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        plan = draw_plan(data, analysis)
        pruned = prune_channels(model, plan, analysis=analysis)
        assert cm.costs_after(plan) == (count_params(pruned), count_macs(pruned, example(name))), f"{name}: plan {plan}"

    check()


@pytest.mark.parametrize("name", list(MODELS))
def test_cost_table_adds_up_to_count_params(name):
    "Every parameter is in the table once: a layer called twice or a shared weight once, an unused layer with 0 MACs"
    from corrprune_edu.flops import layer_costs
    model = prepared(name)[0]
    costs = layer_costs(model, example(name))
    assert costs.params.sum() + costs.attrs["other_params"] == count_params(model)
    assert costs.macs.sum() == count_macs(model, example(name)) and costs.layer.is_unique


def test_calls_and_unused_layers_are_rows():
    from corrprune_edu.flops import layer_costs
    calls = lambda name: layer_costs(prepared(name)[0], example(name)).set_index("layer").calls.to_dict()
    assert calls("reused_conv")["block"] == 2 and "again" not in calls("reused_conv")
    assert calls("tied_weights")["a"] == 2 and "b" not in calls("tied_weights")    # one row per weight
    assert calls("unused_layer")["spare"] == 0
    assert calls("functional_conv")["w"] == 1                                     # F.conv2d with the root's parameter


@pytest.mark.parametrize("layer", [nn.ConvTranspose2d(4, 2, 3, stride=2), nn.ConvTranspose2d(4, 4, 3, groups=2),
                                   nn.Conv3d(4, 2, (1, 3, 3))], ids=["transposed", "transposed grouped", "conv3d"])
def test_other_convolutions_match_flop_counter_mode(layer):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layer) if not isinstance(layer, nn.Conv3d) else \
            nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), layer)
    x = torch.zeros(2, 3, 8, 8) if not isinstance(layer, nn.Conv3d) else torch.zeros(2, 3, 4, 8, 8)
    assert torch_flops(model, x) == 2 * count_macs(model, x) * 2                  # per input: half of a batch of 2
