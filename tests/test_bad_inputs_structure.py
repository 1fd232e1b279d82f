"""Bad inputs to the structure modules (models, cost accounting, channel analysis, surgery, the baseline cache).

Every case asserts the exception type, that the message names the argument or layer at fault, that it says what to do
(a verb such as "pass", "use" or "remove"), and that the caller's model is exactly as it was (state, structure, modes,
hooks). The cache cases assert that an unreadable cache file is named in a warning and retrained over.
"""
import math, re, warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from corrprune_edu.channels import PruningError, analyze_channels
from corrprune_edu.flops import CostModel, compare_latency, count_macs, count_params, layer_costs, measure_latency, torch_flops
from corrprune_edu.models import BasicBlock, ResNetCifar, VGG, get_model, lenet5, resnet_cifar, vgg16_cifar
from corrprune_edu.surgery import apply_plan, copy_model, mask_channels, merge_channels, prune_channels
from structure_models import GroupedConv, SharedBatchNorm, TiedWeights, UnusedLayer

DO = re.compile(r"\b(pass|use|remove|choose|name|give|keep|analyse|add|build|move|delete|list|round|convert)\b", re.I)


@dataclass
class Case:
    id: str
    call: Callable            # called with the caller's model (or with nothing when `model` is None)
    error: type               # the exception type expected
    names: str                # a regex the message must contain: the argument or layer at fault
    model: Callable = None    # builds the caller's model, which must come back unchanged


def state(model: nn.Module) -> tuple:
    "Everything a call could change: tensors (values and identity), structure, train/eval flags, hooks, attributes"
    return (repr(model), {k: (id(v), v.clone()) for k, v in model.state_dict(keep_vars=True).items()},
            [m.training for m in model.modules()], [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
            [p.requires_grad for p in model.parameters()], getattr(model, "pruning_history", None))


def same(a: tuple, b: tuple) -> bool:
    return (a[0], a[2], a[3], a[4], a[5]) == (b[0], b[2], b[3], b[4], b[5]) and a[1].keys() == b[1].keys() and all(
        a[1][k][0] == b[1][k][0] and torch.equal(a[1][k][1], b[1][k][1]) for k in a[1])


def check(case: Case):
    torch.manual_seed(0)
    model = case.model() if case.model else None
    before = state(model) if model is not None else None
    with pytest.raises(case.error) as e:
        case.call(model) if model is not None else case.call()
    msg = str(e.value)
    assert re.search(case.names, msg), f"{case.id}: the message does not name {case.names!r}: {msg}"
    assert DO.search(msg), f"{case.id}: the message does not say what to do: {msg}"
    if model is not None: assert same(state(model), before), f"{case.id}: the caller's model changed"


# -- models -----------------------------------------------------------------------------------------------------
MODELS = [
    Case("lenet5 num_classes=0", lambda: lenet5(num_classes=0), ValueError, "num_classes"),
    Case("lenet5 num_classes float", lambda: lenet5(num_classes=10.0), TypeError, "num_classes"),
    Case("lenet5 in_channels=0", lambda: lenet5(in_channels=0), ValueError, "in_channels"),
    Case("lenet5 input_size too small", lambda: lenet5(input_size=8), ValueError, "input_size"),
    Case("lenet5 input_size str", lambda: lenet5(input_size="28"), TypeError, "input_size"),
    Case("lenet5 two widths", lambda: lenet5(widths=(20, 50)), ValueError, "widths"),
    Case("lenet5 zero width", lambda: lenet5(widths=(20, 0, 500)), ValueError, r"widths\[1\]"),
    Case("lenet5 float width", lambda: lenet5(widths=(20, 50.5, 500)), TypeError, r"widths\[1\]"),
    Case("vgg16 input_size too small", lambda: vgg16_cifar(input_size=16), ValueError, "input_size"),
    Case("vgg16 num_classes<0", lambda: vgg16_cifar(num_classes=-1), ValueError, "num_classes"),
    Case("vgg16 dropout=1", lambda: vgg16_cifar(dropout=1.0), ValueError, "dropout"),
    Case("vgg16 dropout<0", lambda: vgg16_cifar(dropout=-0.1), ValueError, "dropout"),
    Case("VGG empty cfg", lambda: VGG(cfg=[]), ValueError, "cfg"),
    Case("VGG zero width", lambda: VGG(cfg=[[64, 0]]), ValueError, r"cfg\[0\]\[1\]"),
    Case("resnet depth 21", lambda: resnet_cifar(21), ValueError, "depth"),
    Case("resnet depth 2", lambda: resnet_cifar(2), ValueError, "depth"),
    Case("resnet depth float", lambda: resnet_cifar(20.0), TypeError, "depth"),
    Case("resnet num_classes=0", lambda: resnet_cifar(20, num_classes=0), ValueError, "num_classes"),
    Case("ResNetCifar two widths", lambda: ResNetCifar(widths=(16, 32)), ValueError, "widths"),
    Case("BasicBlock stride 0", lambda: BasicBlock(16, 16, stride=0), ValueError, "stride"),
    Case("get_model unknown", lambda: get_model("resnet18"), ValueError, "resnet18"),
    Case("get_model None", lambda: get_model(None), ValueError, "None"),
    Case("get_model resnet input_size", lambda: get_model("resnet20", input_size=32), TypeError, "input_size"),
    Case("get_model lenet depth", lambda: get_model("lenet5", depth=20), TypeError, "depth"),
]


# -- cost accounting --------------------------------------------------------------------------------------------
class Mixer(nn.Module):
    "Channel mixing written with einsum, which the cost count cannot attribute to a layer"
    def __init__(self): super().__init__(); self.conv, self.mix = nn.Conv2d(3, 4, 3), nn.Parameter(torch.randn(4, 4))
    def forward(self, x): return torch.einsum("nchw,cd->ndhw", self.conv(x), self.mix)

class Attention(nn.Module):
    def __init__(self): super().__init__(); self.conv, self.attn = nn.Conv2d(3, 8, 3), nn.MultiheadAttention(8, 2, batch_first=True)
    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        return self.attn(t, t, t)[0]

class Recurrent(nn.Module):
    def __init__(self): super().__init__(); self.conv, self.rnn = nn.Conv2d(3, 4, 3), nn.LSTM(4, 4, batch_first=True)
    def forward(self, x): return self.rnn(self.conv(x).flatten(2).transpose(1, 2))[0]

def lenet_analysis():
    net = lenet5()
    return net, analyze_channels(net, (1, 28, 28))

def cost_model(m):
    a = analyze_channels(m, (1, 28, 28))
    return CostModel(m, a, [g for g in a.groups if g.prunable])

FLOPS = [
    Case("count_macs channels do not fit", lambda m: count_macs(m, (3, 28, 28)), ValueError, "conv1", lenet5),
    Case("count_macs two dims", lambda m: count_macs(m, (28, 28)), ValueError, "input_shape", lenet5),
    Case("count_macs five dims", lambda m: count_macs(m, (1, 1, 1, 28, 28)), ValueError, "input_shape", lenet5),
    Case("count_macs float size", lambda m: count_macs(m, (1, 28.0, 28)), ValueError, "input_shape", lenet5),
    Case("count_macs zero size", lambda m: count_macs(m, (1, 0, 28)), ValueError, "input_shape", lenet5),
    Case("count_macs str shape", lambda m: count_macs(m, "1x28x28"), ValueError, "input_shape", lenet5),
    Case("count_macs 1-D tensor", lambda m: count_macs(m, torch.zeros(28)), ValueError, "input_shape", lenet5),
    Case("count_macs state_dict", lambda m: count_macs(m.state_dict(), (1, 28, 28)), TypeError, "model", lenet5),
    Case("count_macs no layer", lambda m: count_macs(m, (1, 4, 4)), ValueError, "Sequential", lambda: nn.Sequential(nn.ReLU())),
    Case("count_macs einsum", lambda m: count_macs(m, (3, 8, 8)), ValueError, "einsum", Mixer),
    Case("count_macs attention", lambda m: count_macs(m, (3, 8, 8)), ValueError, "'attn'", Attention),
    Case("count_macs lstm", lambda m: count_macs(m, (3, 8, 8)), ValueError, "'rnn'.*lstm", Recurrent),
    Case("count_macs resnet 1 channel", lambda m: count_macs(m, (1, 32, 32)), ValueError, "conv1", lambda: resnet_cifar(20)),
    Case("torch_flops two dims", lambda m: torch_flops(m, (28, 28)), ValueError, "input_shape", lenet5),
    Case("layer_costs cifar shape", lambda m: layer_costs(m, (3, 32, 32)), ValueError, "conv1", lenet5),
    Case("count_params learner-like", lambda m: count_params({"model": m}), TypeError, "model", lenet5),
    Case("measure_latency batch 0", lambda m: measure_latency(m, (1, 28, 28), batch_size=0), ValueError, "batch_size", lenet5),
    Case("measure_latency repeats 0", lambda m: measure_latency(m, (1, 28, 28), repeats=0), ValueError, "repeats", lenet5),
    Case("measure_latency warmup<0", lambda m: measure_latency(m, (1, 28, 28), warmup=-1), ValueError, "warmup", lenet5),
    Case("measure_latency threads 0", lambda m: measure_latency(m, (1, 28, 28), threads=0), ValueError, "threads", lenet5),
    Case("compare_latency empty", lambda m: compare_latency({}, (1, 28, 28)), ValueError, "models", lenet5),
    Case("compare_latency rounds 0", lambda m: compare_latency({"a": m}, (1, 28, 28), rounds=0), ValueError, "rounds", lenet5),
    Case("CostModel unknown group", lambda m: CostModel(m, analyze_channels(m, (1, 28, 28)), ["conv9"]), PruningError, "conv9", lenet5),
    Case("CostModel not an analysis", lambda m: CostModel(m, "conv1", []), TypeError, "analysis", lenet5),
    Case("CostModel frozen layer", lambda m: cost_model(m).costs_after({"fc2": [0]}), ValueError, "fc2", lenet5),
    Case("CostModel float indices", lambda m: cost_model(m).costs_after({"conv1": [1.5]}), PruningError, "conv1", lenet5),
    Case("CostModel bool mask", lambda m: cost_model(m).costs_after({"conv1": torch.arange(20) < 2}), PruningError, "nonzero", lenet5),
    Case("CostModel plan list", lambda m: cost_model(m).costs_after(["conv1"]), TypeError, "plan", lenet5),
]


# -- channel analysis -------------------------------------------------------------------------------------------
def module(forward, **layers):
    "A module with the given layers and forward"
    m = nn.Module()
    for k, v in layers.items(): setattr(m, k, v)
    m.forward = forward.__get__(m)
    return m

def wrap(inner_forward, **layers):
    "A Sequential: conv (3 -> 8), then a submodule '1' with the given forward, then a conv reading 8 or 4 channels"
    out_channels = layers.pop("reads", 8)
    return nn.Sequential(nn.Conv2d(3, 8, 3), module(inner_forward, **layers), nn.Conv2d(out_channels, 2, 1))

def scripted_inside():
    return nn.Sequential(nn.Conv2d(3, 4, 3), torch.jit.script(nn.Conv2d(4, 4, 1)), nn.Conv2d(4, 2, 1))

class TwoWeights(nn.Module):
    "One module running two convolutions with two different weights of its own"
    def __init__(self): super().__init__(); self.w1, self.w2 = nn.Parameter(torch.randn(4, 3, 3, 3)), nn.Parameter(torch.randn(4, 3, 3, 3))
    def forward(self, x): return F.conv2d(x, self.w1) + F.conv2d(x, self.w2)

class ConstantPerChannel(nn.Module):
    def __init__(self): super().__init__(); self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
    def forward(self, x): return self.b(self.a(x) * torch.arange(4.).view(1, 4, 1, 1))

CHANNELS = [
    Case("example_input str", lambda m: analyze_channels(m, "1x28x28"), PruningError, "example_input", lenet5),
    Case("example_input None", lambda m: analyze_channels(m, None), PruningError, "example_input", lenet5),
    Case("example_input floats", lambda m: analyze_channels(m, [1.0, 28.0, 28.0]), PruningError, "example_input", lenet5),
    Case("example_input negative", lambda m: analyze_channels(m, (1, -28, 28)), PruningError, "example_input", lenet5),
    Case("example_input wrong channels", lambda m: analyze_channels(m, (3, 28, 28)), PruningError, "example_input", lenet5),
    Case("example_input 2-D tensor", lambda m: analyze_channels(m, torch.zeros(28, 28)), PruningError, "example_input", lenet5),
    Case("exclude typo", lambda m: analyze_channels(m, (3, 32, 32), exclude=["layer1.0.conv"]), PruningError,
         r"layer1\.0\.conv'.*did you mean", lambda: resnet_cifar(20)),
    Case("exclude str", lambda m: analyze_channels(m, (1, 28, 28), exclude="conv1"), TypeError, "exclude", lenet5),
    Case("exclude int", lambda m: analyze_channels(m, (1, 28, 28), exclude=[0]), TypeError, "exclude", lenet5),
    Case("exclude None", lambda m: analyze_channels(m, (1, 28, 28), exclude=None), TypeError, "exclude", lenet5),
    Case("scripted model", lambda m: analyze_channels(torch.jit.script(m), (1, 28, 28)), PruningError, "TorchScript", lenet5),
    Case("scripted submodule", lambda m: analyze_channels(m, (3, 8, 8)), PruningError, "module '1'.*exclude", scripted_inside),
    Case("not a module", lambda m: analyze_channels({"model": m}, (1, 28, 28)), TypeError, "model", lenet5),
    Case("channel shuffle", lambda m: analyze_channels(m, (3, 8, 8)), PruningError, "'view' in module '1'",
         lambda: wrap(lambda self, x: x.view(x.shape[0], 2, 4, *x.shape[2:]).transpose(1, 2).reshape(x.shape))),
    Case("chunk", lambda m: analyze_channels(m, (3, 8, 8)), PruningError, "module '1'",
         lambda: wrap(lambda self, x: x.chunk(2, 1)[0], reads=4)),
    Case("channel slice", lambda m: analyze_channels(m, (3, 8, 8)), PruningError, "module '1'",
         lambda: wrap(lambda self, x: x[:, :4], reads=4)),
    Case("mean over channels", lambda m: analyze_channels(m, (3, 8, 8)), PruningError, "'mean' in module '1'",
         lambda: wrap(lambda self, x: x * x.mean(1, keepdim=True))),
    Case("per-channel constant", lambda m: analyze_channels(m, (3, 8, 8)), PruningError, "'mul'.*ConstantPerChannel", ConstantPerChannel),
    Case("weight computed on the fly", lambda m: analyze_channels(m, (3, 8, 8)), PruningError, "module '1'.*computed on the fly",
         lambda: wrap(lambda self, x: F.conv2d(x, self.w - self.w.mean()), w=nn.Parameter(torch.randn(8, 8, 1, 1)))),
    Case("linear per position", lambda m: analyze_channels(m, (3, 8, 8)), PruningError, "'linear' in module '1.fc'",
         lambda: wrap(lambda self, x: self.fc(x.flatten(2)).view(x.shape), fc=nn.Linear(36, 36))),
    Case("pad channels", lambda m: analyze_channels(m, (3, 8, 8)), PruningError, "'pad' in module '1'",
         lambda: wrap(lambda self, x: F.pad(x, (0, 0, 0, 0, 0, 2)), reads=10)),
    Case("cat along batch", lambda m: analyze_channels(m, (3, 8, 8)), PruningError, "'cat' in module '1'",
         lambda: wrap(lambda self, x: torch.cat([x, x], 0))),
    Case("two weights in one module", lambda m: analyze_channels(m, (3, 8, 8)), PruningError, "module ''.*two different weights", TwoWeights),
    Case("transposed conv", lambda m: analyze_channels(m, (3, 8, 8)), PruningError, "'conv_transpose2d' in module '1'",
         lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 3), nn.Conv2d(4, 2, 1))),
    Case("group unknown", lambda m: analyze_channels(m, (1, 28, 28)).group("conv9"), PruningError, "conv9", lenet5),
    Case("producer not a str", lambda m: analyze_channels(m, (3, 8, 8)).producer(0), PruningError, "int 0",
         lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1))),
]


# -- surgery: plans, analyses, merges, copies ---------------------------------------------------------------------
def stale_inplace(m):
    a = analyze_channels(m, (1, 28, 28))
    prune_channels(m, {"conv1": [0]}, analysis=analyze_channels(copy_model(m), (1, 28, 28)), inplace=False)
    with torch.no_grad(): m.conv2.weight = nn.Parameter(m.conv2.weight[:40].clone())    # the model changes after `a`
    m.conv2.bias = nn.Parameter(m.conv2.bias[:40].clone()); m.conv2.out_channels = 40
    m.fc1.weight = nn.Parameter(m.fc1.weight[:, :640].clone()); m.fc1.in_features = 640
    return prune_channels(m, {"conv1": [1, 2]}, analysis=a, inplace=True)

def narrowed():
    "A LeNet-5 whose conv2 was narrowed after it was analysed (the test below analyses the original)"
    return lenet5(widths=(20, 40, 500))

def prune(plan, shape=(1, 28, 28), **kw): return lambda m: prune_channels(m, plan, shape, **kw)

SURGERY = [
    Case("plan is a list", prune(["conv1"]), PruningError, "plan", lenet5),
    Case("plan key int", lambda m: prune_channels(m, {0: [0]}, (3, 8, 8)), PruningError, "int 0",
         lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1))),
    Case("plan typo", prune({"conv": [0]}), PruningError, r"'conv'.*did you mean", lenet5),
    Case("plan unused layer", prune({"spare": [0]}, (3, 8, 8)), PruningError, "'spare'.*never runs", UnusedLayer),
    Case("plan grouped conv", prune({"g": [0]}, (3, 8, 8)), PruningError, "'g'.*grouped convolution", GroupedConv),
    Case("plan batchnorm", prune({"bn": [0]}, (3, 10, 10)), PruningError, "'bn'.*BatchNorm2d.*group 'a'", SharedBatchNorm),
    Case("plan excluded layer", prune({"layer1.0.conv1": [0]}, (3, 32, 32), exclude=["layer1"]), PruningError,
         "'layer1.0.conv1'.*excluded", lambda: resnet_cifar(20)),
    Case("plan classifier", prune({"fc2": [0]}), PruningError, "'fc2'.*model output", lenet5),
    Case("floats", prune({"conv1": [1.5, 2.7]}), PruningError, r"plan\['conv1'\].*1\.5", lenet5),
    Case("integral floats", prune({"conv1": [1.0, 2.0]}), PruningError, r"plan\['conv1'\].*not integers", lenet5),
    Case("bool list", prune({"conv1": [True, False, True]}), PruningError, r"plan\['conv1'\].*booleans", lenet5),
    Case("bool tensor", prune({"conv1": torch.arange(20) < 3}), PruningError, r"plan\['conv1'\].*nonzero", lenet5),
    Case("bool array", prune({"conv1": np.arange(20) < 3}), PruningError, r"plan\['conv1'\].*flatnonzero", lenet5),
    Case("float tensor", prune({"conv1": torch.tensor([1.0, 2.0])}), PruningError, r"plan\['conv1'\].*float", lenet5),
    Case("float array", prune({"conv1": np.array([1.0, 2.0])}), PruningError, r"plan\['conv1'\].*float", lenet5),
    Case("2-D tensor", prune({"conv1": torch.tensor([[0, 1]])}), PruningError, r"plan\['conv1'\].*shape", lenet5),
    Case("0-D tensor", prune({"conv1": torch.tensor(3)}), PruningError, r"plan\['conv1'\].*shape", lenet5),
    Case("single int", prune({"conv1": 3}), PruningError, r"plan\['conv1'\].*\[3\]", lenet5),
    Case("None", prune({"conv1": None}), PruningError, r"plan\['conv1'\].*NoneType", lenet5),
    Case("string", prune({"conv1": "0,1"}), PruningError, r"plan\['conv1'\].*str", lenet5),
    Case("nested list", prune({"conv1": [[0, 1]]}), PruningError, r"plan\['conv1'\].*not integers", lenet5),
    Case("negative", prune({"conv1": [-1]}), PruningError, r"plan\['conv1'\].*out of range", lenet5),
    Case("too large", prune({"conv1": [20]}), PruningError, r"plan\['conv1'\].*0\.\.19", lenet5),
    Case("repeats", prune({"conv1": [1, 1]}), PruningError, r"plan\['conv1'\] repeats", lenet5),
    Case("whole group", prune({"conv2": list(range(50))}), PruningError, "group 'conv2'", lenet5),
    Case("whole tied group by two names", prune({"a": [0, 1, 2], "b": [3, 4, 5]}, (3, 8, 8)), PruningError, "group 'a'", TiedWeights),
    Case("mask floats", lambda m: mask_channels(m, {"conv1": [0.5]}, (1, 28, 28)), PruningError, r"plan\['conv1'\]", lenet5),
    Case("inplace bad plan", prune({"conv1": [0], "conv2": [99]}, inplace=True), PruningError, r"plan\['conv2'\]", lenet5),
    Case("inplace stale analysis", lambda m: prune_channels(m, {"conv1": [0]}, analysis=analyze_channels(lenet5(), (1, 28, 28)), inplace=True),
         PruningError, "conv2.weight.*analyse the model again", narrowed),
    Case("analysis of another model", lambda m: prune_channels(m, {"conv1": [0]}, analysis=analyze_channels(resnet_cifar(20), (3, 32, 32))),
         PruningError, "conv1", lenet5),
    Case("analysis not an analysis", lambda m: prune_channels(m, {"conv1": [0]}, analysis="conv1"), TypeError, "analysis", lenet5),
    Case("no example_input", lambda m: prune_channels(m, {"conv1": [0]}), PruningError, "example_input", lenet5),
    Case("apply_plan mode", lambda m: apply_plan(m, analyze_channels(m, (1, 28, 28)), {"conv1": [0]}, mode="cut"), ValueError, "mode", lenet5),
    Case("merge unknown group", lambda m: merge_channels(m, analyze_channels(m, (1, 28, 28)), "conv9", []), PruningError, "conv9", lenet5),
    Case("merge out of range", lambda m: merge_channels(m, analyze_channels(m, (1, 28, 28)), "conv1", [(3, 99, 1.0)]),
         PruningError, "merges.*99", lenet5),
    Case("merge keep == drop", lambda m: merge_channels(m, analyze_channels(m, (1, 28, 28)), "conv1", [(3, 3, 1.0)]),
         PruningError, "merges", lenet5),
    Case("merge nan scale", lambda m: merge_channels(m, analyze_channels(m, (1, 28, 28)), "conv1", [(3, 4, math.nan)]),
         PruningError, "merges", lenet5),
    Case("merge unknown reader", lambda m: merge_channels(m, analyze_channels(m, (1, 28, 28)), "conv1", {"fc1": [(3, 4, 1.0)]}),
         PruningError, "'fc1'", lenet5),
    Case("copy_model not a module", lambda m: copy_model(m.state_dict()), TypeError, "model", lenet5),
]


@pytest.mark.parametrize("case", MODELS, ids=lambda c: c.id)
def test_models(case): check(case)

@pytest.mark.parametrize("case", FLOPS, ids=lambda c: c.id)
def test_flops(case): check(case)

@pytest.mark.parametrize("case", CHANNELS, ids=lambda c: c.id)
def test_channels(case): check(case)

@pytest.mark.parametrize("case", SURGERY, ids=lambda c: c.id)
def test_surgery(case): check(case)


# -- the baseline cache -----------------------------------------------------------------------------------------
from corrprune_edu.train import cached_baseline, load_baseline

RECIPE = dict(model="lenet5", dataset="mnist_embedded", n_per_class=10, n_test_per_class=5, epochs=1, bs=32)

CACHE_ARGUMENTS = [
    Case("cache unknown model", lambda: cached_baseline(**{**RECIPE, "model": "resnet18"}), ValueError, "resnet18"),
    Case("cache epochs=0", lambda: cached_baseline(**{**RECIPE, "epochs": 0}), ValueError, "epochs"),
    Case("cache epochs float", lambda: cached_baseline(**{**RECIPE, "epochs": 1.5}), TypeError, "epochs"),
    Case("cache unknown optimiser", lambda: cached_baseline(**RECIPE, opt="rmsprop"), ValueError, "rmsprop"),
    Case("cache negative lr", lambda: cached_baseline(**RECIPE, lr=-1e-3), ValueError, "lr"),
    Case("cache nan lr", lambda: cached_baseline(**RECIPE, lr=math.nan), ValueError, "lr"),
]

@pytest.mark.parametrize("case", CACHE_ARGUMENTS, ids=lambda c: c.id)
def test_cache_arguments(case): check(case)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    "A cache written once: its file's bytes, its name and the weights training gives"
    import os
    folder, old = tmp_path_factory.mktemp("cache"), os.environ.get("CORRPRUNE_CACHE")
    os.environ["CORRPRUNE_CACHE"] = str(folder)
    try: learn = cached_baseline(**RECIPE)
    finally:
        if old is None: del os.environ["CORRPRUNE_CACHE"]
        else: os.environ["CORRPRUNE_CACHE"] = old
    path = learn.baseline["path"]
    return open(path, "rb").read(), os.path.relpath(path, folder), {k: v.clone() for k, v in learn.model.state_dict().items()}

def truncated(good): return good[: len(good) // 2]
def garbage(good): return b"this is not a checkpoint" * 10
def empty(good): return b""
def plain_state_dict(good):
    import io; buf = io.BytesIO(); torch.save(lenet5().state_dict(), buf); return buf.getvalue()
def other_architecture(good):
    import io; buf = io.BytesIO(); torch.save(dict(state_dict=lenet5(widths=(10, 20, 500)).state_dict(), meta={}), buf); return buf.getvalue()

@pytest.mark.parametrize("corrupt", [truncated, garbage, empty, plain_state_dict, other_architecture], ids=lambda f: f.__name__)
def test_unreadable_cache_file_is_named_and_retrained(corrupt, baseline, tmp_path, monkeypatch):
    good, name, weights = baseline
    monkeypatch.setenv("CORRPRUNE_CACHE", str(tmp_path))
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(corrupt(good))
    with pytest.warns(UserWarning) as caught:
        learn = cached_baseline(**RECIPE)
    msg = " ".join(str(w.message) for w in caught)
    assert str(path) in msg and "retraining" in msg, msg                       # names the file, says what happens
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, weights[k]), k   # the baseline training gives
    assert load_baseline(path, lenet5()) is not None                          # and the file is whole again


def test_missing_cache_file_is_named(tmp_path):
    with pytest.warns(UserWarning, match="missing.pt"):
        assert load_baseline(tmp_path / "missing.pt", lenet5()) is None
