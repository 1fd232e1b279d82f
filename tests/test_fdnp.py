"FDNP: exactness of the frequency layer, the DNS rule inside fastai's loop, the training contract, the key claim."
import copy

import pytest
import torch
from torch import nn
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.training import GradientAccumulation

from corrprune_edu.core import set_seed
from corrprune_edu.fdnp import (DCTConv2d, DynamicPruner, FDNPCallback, fdnp, fdnp_costs, frequency_inference,
                                frequency_layers, relative_error, to_frequency, to_spatial)
from corrprune_edu.models import resnet_cifar
from corrprune_edu.sparse import sparsity_report
from corrprune_edu.train import cached_baseline, evaluate

DATA = dict(n_per_class=1000, n_test_per_class=200, epochs=3)   # the tutorials' LeNet-5 (cached once)


def baseline():
    set_seed(0)
    return cached_baseline("lenet5", "mnist", **DATA)


class Probe(Callback):
    "Records, after every training batch, the optimiser's hyper-parameters and whether the model is pruned"
    order = 90
    def __init__(self): self.lrs, self.wds, self.pruned, self.same_params = [], [], [], []
    def after_batch(self):
        if not self.training: return
        h = self.learn.opt.hypers[0]
        self.lrs.append(h["lr"]); self.wds.append(h["wd"])
        cb = self.learn.fdnp
        self.pruned.append(all((self.learn.model.get_parameter(n)[~m] == 0).all().item() for n, m in cb.masks.items()))
        held = {id(p) for pg in self.learn.opt.param_lists for p in pg}
        self.same_params.append(held == {id(p) for p in self.learn.model.parameters()})


def test_frequency_layers_compute_the_trained_convolutions():
    "Trained LeNet-5 and a ResNet-20: every conv converted, output within float32 rounding; back to spatial: identical"
    for net, shape in [(baseline().model, (1, 28, 28)), (resnet_cifar(20), (3, 32, 32))]:
        net.eval(); x = torch.randn(8, *shape)
        freq = to_frequency(net)
        with torch.no_grad():
            assert relative_error(freq(x), net(x)) < 1e-6
            assert torch.equal(to_spatial(freq)(x), freq(x))
        assert not frequency_layers(net)                      # the caller's model is untouched
    conv = nn.Conv2d(4, 6, (3, 5), stride=2, padding=(1, 2), groups=2).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    assert relative_error(DCTConv2d.from_conv(conv)(x), conv(x)) < 1e-12


def test_frequency_model_state_dict_round_trip():
    freq = to_frequency(baseline().model)
    sd = freq.state_dict()
    assert "conv1.coef" in sd and "conv1.weight" not in sd and not any("dct_" in k for k in sd)
    other = to_frequency(copy.deepcopy(baseline().model))
    with torch.no_grad():
        for p in other.parameters(): p.zero_()
    other.load_state_dict(sd)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad(): assert torch.equal(other.eval()(x), freq.eval()(x))


def test_callback_keeps_the_users_lr_wd_and_optimiser_over_the_converted_model():
    learn = baseline(); probe = Probe()
    learn.fit(1, lr=2e-3, wd=0.05, cbs=[FDNPCallback(sparsity=0.9), probe])
    assert set(probe.lrs) == {2e-3} and set(probe.wds) == {0.05}
    assert all(probe.same_params) and all(probe.pruned)
    assert frequency_layers(learn.model) and not frequency_layers(learn.fdnp_original)


def test_callback_follows_the_one_cycle_schedule():
    learn = baseline(); probe = Probe()
    learn.fit_one_cycle(1, lr_max=3e-3, cbs=[FDNPCallback(sparsity=0.8, domain="spatial"), probe])
    assert max(probe.lrs) == pytest.approx(3e-3, rel=0.02) and probe.lrs[0] < 3e-3 / 5 and probe.lrs[-1] < 3e-3 / 100


def test_nothing_happens_during_lr_find():
    learn = baseline(); cb = FDNPCallback(sparsity=0.9)
    learn.add_cb(cb)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.lr_find(num_it=8, show_plot=False)
    assert cb.pruner is None and not frequency_layers(learn.model)
    assert all(torch.equal(v, before[k]) for k, v in learn.model.state_dict().items())
    learn.fit(1, lr=1e-3)
    assert cb.pruner is not None and frequency_layers(learn.model)


def test_reused_callback_continues():
    learn = baseline(); cb = FDNPCallback(sparsity=0.9, iter_stop=None)
    learn.fit(1, lr=1e-3, cbs=cb)
    model, theta, n = learn.model, {k: v.clone() for k, v in cb.pruner.theta.items()}, len(learn.dls.train)
    assert cb.pruner.iteration == n
    learn.fit(1, lr=1e-3, cbs=cb)
    assert learn.model is model and cb.pruner.iteration == 2 * n            # not converted again, counting on
    assert all(torch.equal(theta[k], v) for k, v in cb.pruner.theta.items())  # thresholds fixed once, as in DNS
    assert len(cb.log) == 2


def test_pruned_coefficients_are_spliced_back_during_training():
    "Gradients reach pruned coefficients: some of them grow past 1.1 theta and return; kept ones get pruned"
    learn = baseline(); cb = FDNPCallback(sparsity=0.9, iter_stop=None)
    class Watch(Callback):
        order = 90
        def __init__(self): self.spliced = self.pruned = 0; self.last = None
        def after_batch(self):
            if not self.training: return
            m = torch.cat([v.flatten() for v in cb.masks.values()])
            if self.last is not None:
                self.spliced += int((m & ~self.last).sum()); self.pruned += int((~m & self.last).sum())
            self.last = m.clone()
    w = Watch()
    learn.fit(1, lr=3e-3, cbs=[cb, w])
    assert w.spliced > 0 and w.pruned > 0


def test_gradient_accumulation_and_interruption_leave_a_pruned_model():
    learn = baseline(); probe = Probe()
    learn.fit(1, lr=1e-3, cbs=[FDNPCallback(sparsity=0.9), GradientAccumulation(n_acc=512), probe])
    assert all(probe.pruned)
    learn = baseline(); cb = FDNPCallback(sparsity=0.9)
    class Stop(Callback):
        order = 70
        def before_step(self):
            if self.iter == 5: raise CancelFitException()
    learn.fit(1, lr=1e-3, cbs=[cb, Stop()])
    for n, m in cb.masks.items(): assert (learn.model.get_parameter(n)[~m] == 0).all()
    assert cb.pruner.iteration == 6


def test_bad_input_is_refused_before_any_work():
    learn = baseline(); model = learn.model
    for kwargs in [dict(sparsity=1.2), dict(sparsity=0.5, c_rate=1.0), dict(), dict(sparsity=0.5, domain="time"),
                   dict(sparsity=0.5, domain="spatial", band_rule="linear"), dict(sparsity=0.5, band_rule="zigzag"),
                   dict(sparsity=0.5, iter_stop=1.5)]:
        with pytest.raises(ValueError): FDNPCallback(**kwargs)
    with pytest.raises(ValueError, match="conv9"):
        learn.fit(1, cbs=FDNPCallback(sparsity={"conv9": 0.5}))
    assert learn.model is model and not frequency_layers(model)


def test_accounting_matches_masks_and_the_sparse_module():
    learn = baseline()
    fdnp(learn, 1, lr=1e-3, sparsity=0.9, layer_types=(nn.Conv2d, nn.Linear))
    costs = fdnp_costs(learn.model, (1, 28, 28)).set_index("layer")
    masks = learn.fdnp_cb.masks
    assert costs.loc["total", "nonzero"] == sum(int(m.sum()) for m in masks.values())
    assert costs.loc["total", "weights"] == 430_500
    assert costs.loc["conv2", "nonzero_macs"] == 64 * int(masks["conv2.coef"].sum())
    spatial = baseline()
    fdnp(spatial, 1, lr=1e-3, sparsity=0.9, domain="spatial", layer_types=(nn.Conv2d, nn.Linear))
    assert fdnp_costs(spatial.model, (1, 28, 28)).nonzero.iloc[-1] == sparsity_report(spatial.model).nonzero.iloc[-1]


def test_frequency_inference_path_gives_the_pruned_models_output():
    learn = baseline()
    fdnp(learn, 1, lr=1e-3, sparsity=0.9)
    x = learn.dls.valid.one_batch()[0].as_subclass(torch.Tensor)
    with torch.no_grad():
        assert relative_error(frequency_inference(learn.model)(x), learn.model.eval()(x)) < 1e-5


def test_fdnp_beats_its_spatial_counterpart_at_equal_sparsity():
    "The paper's key comparison, on the tutorials' LeNet-5: same rule, same sparsity, same budget; frequency wins"
    accs, density = {}, {}
    for domain in ("frequency", "spatial"):
        learn = baseline(); set_seed(1)
        fdnp(learn, 2, lr=1e-3, sparsity=0.97, domain=domain)
        accs[domain] = evaluate(learn, "test")
        m = learn.fdnp_cb.masks
        density[domain] = sum(int(v.sum()) for v in m.values()) / sum(v.numel() for v in m.values())
    assert density["frequency"] <= density["spatial"] * 1.05, density      # not by keeping more coefficients
    assert accs["frequency"] > accs["spatial"], accs
