"""Filter surgery, piece by piece: modes, dtypes, gradients, frozen parameters, tracing rules and their refusals.
(The property tests that the pruned model computes what the masked one does are in test_exactness_properties.py.)"""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from corrprune_edu.models import lenet5, resnet_cifar
from corrprune_edu.channels import PruningError, analyze_channels
from corrprune_edu.surgery import mask_channels, prune_channels


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
    ({"conv9": [0]}, r"'conv9' matches no module of this model; did you mean \['conv2', 'conv1'\]"),
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


# -- all or nothing ----------------------------------------------------------------------------------------------
def snapshot(model):
    return repr(model), {k: (id(v), v.clone()) for k, v in model.state_dict(keep_vars=True).items()}

def unchanged(model, snap):
    r, tensors = snapshot(model)
    return r == snap[0] and tensors.keys() == snap[1].keys() and all(
        tensors[k][0] == snap[1][k][0] and torch.equal(tensors[k][1], snap[1][k][1]) for k in tensors)

def fail_on_call(n, real):
    "A stand-in for `real` that raises on its n-th call"
    calls = []
    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n: raise RuntimeError("injected failure")
        return real(*args, **kwargs)
    return wrapped

@pytest.mark.parametrize("where, n", [("_slice", 1), ("_slice", 4), ("_sync_attributes", 2)])
def test_inplace_prune_that_fails_midway_leaves_the_model_as_it_was(where, n, monkeypatch):
    import corrprune_edu.surgery as surgery
    model = resnet_cifar(20).eval()
    model(torch.randn(2, 3, 32, 32)).sum().backward()                 # gradients too
    a, snap, x = analyze_channels(model, (3, 32, 32)), snapshot(model), torch.randn(2, 3, 32, 32)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    out = model(x).detach()
    monkeypatch.setattr(surgery, where, fail_on_call(n, getattr(surgery, where)))
    with pytest.raises(RuntimeError, match="injected"):
        prune_channels(model, {"conv1": [0, 1], "layer2.0.conv1": [3]}, analysis=a, inplace=True)
    assert unchanged(model, snap) and model.layer1[0].conv1.in_channels == 16 and model.fc.in_features == 64
    assert all(torch.equal(p.grad, grads[k]) for k, p in model.named_parameters())
    assert torch.equal(model(x).detach(), out)
    monkeypatch.undo()
    prune_channels(model, {"conv1": [0, 1]}, analysis=a, inplace=True)  # and the same call then completes
    assert model.conv1.out_channels == 14


def test_inplace_mask_that_fails_midway_puts_the_values_back(monkeypatch):
    import corrprune_edu.surgery as surgery
    model = lenet5()
    a, snap = analyze_channels(model, (1, 28, 28)), snapshot(model)
    monkeypatch.setattr(surgery, "_zero_", fail_on_call(3, surgery._zero_))
    with pytest.raises(RuntimeError, match="injected"):
        mask_channels(model, {"conv1": [0], "conv2": [1, 2]}, analysis=a, inplace=True)
    assert unchanged(model, snap)


# -- the copy surgery makes --------------------------------------------------------------------------------------
def test_copy_model_keeps_gradients_and_leaves_hooks_behind():
    from fastai.callback.hook import hook_outputs
    from corrprune_edu.surgery import copy_model
    model = lenet5()
    seen = []
    user = model.conv2.register_forward_hook(lambda m, i, o: seen.append(1))
    fastai_hooks = hook_outputs([model.conv1, model.fc1], detach=False)   # holds a graph: copy.deepcopy would fail
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    twin = copy_model(model)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters()))
    assert sum(len(m._forward_hooks) for m in twin.modules()) == 0
    assert sum(len(m._forward_hooks) for m in model.modules()) == 3      # the caller's hooks are all still there
    seen.clear(); twin(torch.randn(1, 1, 28, 28)); assert seen == []
    pruned = prune_channels(model, {"conv1": [0]}, (1, 28, 28))          # traces and prunes with the hooks attached
    assert pruned.conv1.out_channels == 19 and not pruned.conv2._forward_hooks
    user.remove(); fastai_hooks.remove()                                  # their handles still work on the original
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_copy_model_keeps_hooks_that_are_part_of_a_module():
    "Lazy initialisation works through a hook of the module's own: the copy keeps it, and it acts on the copy"
    from corrprune_edu.surgery import copy_model
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    twin = copy_model(model)
    assert len(twin[2]._forward_pre_hooks) == 1
    assert twin(torch.randn(1, 3, 8, 8)).shape == (1, 2) and twin[2].weight.shape == (2, 144)
    assert model[2].has_uninitialized_params()                          # the original is still lazy
