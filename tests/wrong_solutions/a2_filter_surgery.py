"Wrong answers to assignment 2 (filter surgery by hand)."
import copy

import torch
from torch import nn

from . import wrong

A2 = "02_filter_surgery"


def _keep(n, drop): return torch.tensor([i for i in range(n) if i not in set(drop)])

def _cut(conv, bn, next_conv, keep, bias=True, stats=True, inputs=True):
    "Surgery with one step optionally left out"
    conv, bn, next_conv = copy.deepcopy(conv), copy.deepcopy(bn), copy.deepcopy(next_conv)
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight[keep])
        if bias and conv.bias is not None: conv.bias = nn.Parameter(conv.bias[keep])
        bn.weight, bn.bias = nn.Parameter(bn.weight[keep]), nn.Parameter(bn.bias[keep])
        if stats: bn.running_mean, bn.running_var = bn.running_mean[keep], bn.running_var[keep]
        if inputs: next_conv.weight = nn.Parameter(next_conv.weight[:, keep])
    return conv, bn, next_conv


# Task 2.1 -------------------------------------------------------------------------------------------------------
@wrong("2.1", "the next layer's input channels were not sliced: 'layer1.0.conv2' still reads 16 input channels, expected 11")
def prune_conv_bn_conv__next_not_sliced(conv, bn, next_conv, drop):
    return _cut(conv, bn, next_conv, _keep(conv.out_channels, drop), inputs=False)

@wrong("2.1", "BatchNorm running statistics were not sliced: layer1.0.bn1.running_mean has 16 entries, expected 11")
def prune_conv_bn_conv__stats_not_sliced(conv, bn, next_conv, drop):
    return _cut(conv, bn, next_conv, _keep(conv.out_channels, drop), stats=False)

@wrong("2.1", "kept the channels in `drop` and removed the others")
def prune_conv_bn_conv__kept_dropped(conv, bn, next_conv, drop):
    return _cut(conv, bn, next_conv, torch.tensor(sorted(drop)))

@wrong("2.1", "the bias of '0' was not sliced")
def prune_conv_bn_conv__bias_forgotten(conv, bn, next_conv, drop):
    return _cut(conv, bn, next_conv, _keep(conv.out_channels, drop), bias=False)

@wrong("2.1", "layer1.0.bn1.running_mean was reset, not sliced: copy the running statistics of the kept channels")
def prune_conv_bn_conv__fresh_batchnorm(conv, bn, next_conv, drop):
    keep = _keep(conv.out_channels, drop)
    conv, _, next_conv = _cut(conv, bn, next_conv, keep)
    new_bn = nn.BatchNorm2d(len(keep)).eval()
    with torch.no_grad(): new_bn.weight.copy_(bn.weight[keep]); new_bn.bias.copy_(bn.bias[keep])
    return conv, new_bn, next_conv


# Task 2.2 -------------------------------------------------------------------------------------------------------
@wrong("2.2", "masked the conv but not BatchNorm: after BatchNorm a zeroed channel still outputs β − γ·μ/√(σ²+ε)", e2e=A2)
def mask_conv_bn__conv_only(conv, bn, drop):
    conv, bn = copy.deepcopy(conv), copy.deepcopy(bn)
    with torch.no_grad():
        conv.weight[drop] = 0
        if conv.bias is not None: conv.bias[drop] = 0
    return conv, bn

@wrong("2.2", "masking keeps every shape and sets the dropped channels to zero; removing them is Task 2.1")
def mask_conv_bn__removes(conv, bn, drop):
    keep = _keep(conv.out_channels, drop)
    conv, bn = copy.deepcopy(conv), copy.deepcopy(bn)
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight[keep])
        if conv.bias is not None: conv.bias = nn.Parameter(conv.bias[keep])
        bn.weight, bn.bias = nn.Parameter(bn.weight[keep]), nn.Parameter(bn.bias[keep])
        bn.running_mean, bn.running_var = bn.running_mean[keep], bn.running_var[keep]
    return conv, bn

@wrong("2.2", "the dropped filters still produce output before BatchNorm")
def mask_conv_bn__batchnorm_only(conv, bn, drop):
    conv, bn = copy.deepcopy(conv), copy.deepcopy(bn)
    with torch.no_grad(): bn.weight[drop] = 0
    return conv, bn


# Task 2.3 -------------------------------------------------------------------------------------------------------
def _stream(model, drop, producers, norms, readers):
    new = copy.deepcopy(model)
    keep = _keep(new.conv1.out_channels, drop)
    with torch.no_grad():
        for p in producers: new.get_submodule(p).weight = nn.Parameter(new.get_submodule(p).weight[keep])
        for p in norms:
            bn = new.get_submodule(p)
            bn.weight, bn.bias = nn.Parameter(bn.weight[keep]), nn.Parameter(bn.bias[keep])
            bn.running_mean, bn.running_var = bn.running_mean[keep], bn.running_var[keep]
        for p in readers: new.get_submodule(p).weight = nn.Parameter(new.get_submodule(p).weight[:, keep])
    return new

@wrong("2.3", "the output channels of 'layer1.0.conv2' were not removed: it has 16, expected 11; slice its weight along dim 0 "
              "(its output is added to the stream by the residual connection")
def prune_stream__stem_only(model, drop):
    return _stream(model, drop, ["conv1"], ["bn1"], ["layer1.0.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"])

@wrong("2.3", "the next layer's input channels were not sliced: 'layer2.0.shortcut.0' still reads 16 input channels, expected 11; "
              "slice its weight along dim 1 (the next stage's shortcut reads the stream too)")
def prune_stream__shortcut_forgotten(model, drop):
    return _stream(model, drop, ["conv1", "layer1.0.conv2"], ["bn1", "layer1.0.bn2"], ["layer1.0.conv1", "layer2.0.conv1"])


# Task 2.4 -------------------------------------------------------------------------------------------------------
@wrong("2.4", "you counted FLOPs (2 per multiply-accumulate): count MACs", e2e=A2)
def layer_cost__flops(layer, out_shape):
    params = layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)
    if isinstance(layer, nn.Linear): return 2 * layer.in_features * layer.out_features, params
    c_out, h, w = out_shape
    return 2 * c_out * h * w * layer.weight[0].numel(), params

@wrong("2.4", "you left out the bias in the parameter count")
def layer_cost__no_bias(layer, out_shape):
    if isinstance(layer, nn.Linear): return layer.in_features * layer.out_features, layer.weight.numel()
    c_out, h, w = out_shape
    return c_out * h * w * layer.weight[0].numel(), layer.weight.numel()

@wrong("2.4", "you left out C_in")
def layer_cost__no_input_channels(layer, out_shape):
    params = layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)
    if isinstance(layer, nn.Linear): return layer.in_features * layer.out_features, params
    c_out, h, w = out_shape
    return c_out * h * w * layer.weight[0, 0].numel(), params
