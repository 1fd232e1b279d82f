"""Play and Prune: the promise (within tolerance on validation), the controller rule, candidate caps, recovery and
rollback, callback event timing, interrupted runs and bad input."""
import copy

import pytest
import torch
from fastai.callback.core import Callback
from hypothesis import given, settings, strategies as st

import corrprune_edu.play_and_prune as pap
from corrprune_edu.play_and_prune import (AFP, FixedController, GapController, PRC, PlayAndPrune, PlayAndPruneCallback,
                                      l1_penalty, penalty_terms, play_and_prune, replay, select_candidates)
from corrprune_edu.core import describe_counts, filter_counts
from corrprune_edu.data import mnist_dls
from corrprune_edu.models import lenet5
from corrprune_edu.channels import analyze_channels
from corrprune_edu.train import cached_baseline, evaluate, fit, make_learner, quiet


# ---------------------------------------------------------------------------------------------------------------
# the promise
@pytest.fixture(scope="module")
def subset_baseline():
    "LeNet-5 trained on 1,000 real MNIST images per class (900 train, 100 validation), cached"
    return cached_baseline("lenet5", "mnist", n_per_class=1000, n_test_per_class=300, epochs=4, seed=0)


def _copy_learner(base):
    return make_learner(copy.deepcopy(base.model), base.dls)


@pytest.mark.slow
def test_promise_lenet5_mnist_subset_tolerance_1pct(subset_baseline, capsys):
    base = subset_baseline
    base_valid, base_test = base.baseline["valid_acc"], base.baseline["test_acc"]
    learn = _copy_learner(base)
    run = play_and_prune(learn, 0.01, phase_batches=30, max_iters=15, lr=2e-3)   # default controller and AFP
    valid, test = evaluate(learn, "valid"), evaluate(learn, "test")
    h = run.frame()
    with capsys.disabled():
        print(f"\nPlay and Prune, tolerance 1%: {describe_counts(filter_counts(learn.model))}, "
              f"MACs -{1 - h.macs.iloc[-1] / h.macs.iloc[0]:.1%}, valid {valid:.4f} (baseline {base_valid:.4f}), "
              f"test {test:.4f} (baseline {base_test:.4f}); stop: {run.stop_reason}")
    assert run.baseline_acc == pytest.approx(base_valid)
    assert valid >= base_valid - 0.01 - 1e-9                 # the promise, on the validation split
    assert h.macs.iloc[-1] <= 0.5 * h.macs.iloc[0]            # ... and it did prune
    assert valid == pytest.approx(h.acc.iloc[-1])             # the record describes the model left in `learn`
    assert filter_counts(base.model)["conv1"] == 20           # the cached baseline is untouched


# ---------------------------------------------------------------------------------------------------------------
# the controller rule
def test_gap_controller_moves_with_the_gap():
    c = GapController(lam=1e-2, W=0.5)
    c.update(0.5, "accepted")
    assert c.lam > 1e-2 and c.W > 0.5
    lam, W = c.lam, c.W
    c.update(-0.5, "recovering")
    assert c.lam < lam and c.W < W
    lam, W = c.lam, c.W
    c.update(-0.5, "rolled back")
    assert c.lam < lam and c.W == pytest.approx(W * 0.75 ** 2)    # a rollback backs off twice as hard


def test_gap_controller_respects_its_bounds():
    c = GapController(lam=1e-2, W=0.5, lam_max=0.05, w_max=0.8, lam_min=1e-3, w_min=0.1)
    for _ in range(50): c.update(10, "accepted")
    assert (c.lam, c.W) == (0.05, 0.8) and c.saturated
    for _ in range(50): c.update(-10, "rolled back")
    assert (c.lam, c.W) == (1e-3, 0.1) and not c.saturated


def test_the_gap_is_clipped():
    a, b = GapController(), GapController()
    a.update(1.0, "accepted"); b.update(25.0, "accepted")
    assert a.state() == b.state()


def test_fixed_controller_never_moves_and_subclassing_is_enough():
    f = FixedController(0.02, 0.4)
    for g in (-3, 0, 3): f.update(g, "accepted")
    assert f.state() == dict(lam=0.02, W=0.4)

    class Halving(PRC):
        def update(self, gap, outcome): self.W = self.W / 2 if gap < 0 else self.W
    h = Halving(0.01, 0.8); h.update(-1, "recovering")
    assert h.state() == dict(lam=0.01, W=0.4)
    with pytest.raises(NotImplementedError): PRC(0.01, 0.5).update(0, "accepted")


# ---------------------------------------------------------------------------------------------------------------
# candidate caps
@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(0, 1), min_size=1, max_size=40), min_size=1, max_size=4),
       st.floats(0, 1), st.floats(0.01, 1), st.integers(1, 5), st.one_of(st.none(), st.integers(1, 10)))
def test_candidate_caps(layers, W, max_frac, min_channels, limit):
    scores = {f"l{i}": torch.tensor(s, dtype=torch.float64) for i, s in enumerate(layers)}
    cand = select_candidates(scores, W, max_frac, min_channels, limit)
    total = 0
    for name, idx in cand.items():
        s, n = scores[name], len(scores[name])
        assert idx == sorted(set(idx)) and len(idx) >= 1
        assert all(s[i] < W for i in idx)                                 # only filters below W
        assert len(idx) <= max(1, int(max_frac * n))                       # at most max_frac of the layer (>= 1)
        assert n - len(idx) >= min_channels                                 # never below min_channels
        rest = [s[i] for i in range(n) if i not in idx and s[i] < W]
        if rest: assert max(s[i] for i in idx) <= min(rest)                # lowest first
        total += len(idx)
    if limit is not None: assert total <= limit


@pytest.mark.parametrize("kwargs, arg", [(dict(W=1.5), "W"), (dict(max_frac=0), "max_frac"),
                                         (dict(min_channels=0), "min_channels"), (dict(limit=0), "limit")])
def test_select_candidates_bad_input_names_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        select_candidates({"a": torch.rand(5)}, **{"W": 0.5, **kwargs})


def test_penalty_covers_exactly_the_candidate_filters():
    net = lenet5()
    terms = penalty_terms(net, analyze_channels(net, (1, 28, 28)), {"conv2": [1, 5]})
    l1_penalty(net, terms).backward()
    g = net.conv2.weight.grad.flatten(1).abs().sum(1)
    assert g[[1, 5]].gt(0).all() and g.sum() == g[[1, 5]].sum()
    assert net.conv2.bias.grad[[1, 5]].abs().sum() > 0 and net.conv1.weight.grad is None


# ---------------------------------------------------------------------------------------------------------------
# recovery and rollback, with scripted accuracies so the state machine is tested exactly
@pytest.fixture
def tiny():
    "LeNet-5 on 30 embedded MNIST images per class: fast, for event and state-machine tests"
    dls = mnist_dls(30, n_test_per_class=10, source="embedded", bs=16)
    learn = make_learner(lenet5(), dls)
    fit(learn, 1)
    return learn


def _script(monkeypatch, accs):
    "Make the controller measure these accuracies, in order (the last one repeats)"
    seq = list(accs)
    monkeypatch.setattr(pap, "_acc", lambda learn: seq.pop(0) if len(seq) > 1 else seq[0])


def _aggressive():
    return dict(controller=FixedController(0.1, 0.95), afp=AFP(max_frac=0.5, negligible=1.0))


def test_recovery_then_acceptance(tiny, monkeypatch):
    _script(monkeypatch, [0.90, 0.80, 0.82, 0.95, 0.95])         # base, drop, still low, back, ...
    cb = PlayAndPruneCallback(0.05, phase_batches=2, recovery_phases=2, max_iters=4, **_aggressive())
    with quiet(tiny): tiny.fit(10, 1e-3, cbs=cb)
    h = cb.loop.frame()
    assert list(h.outcome[:4]) == ["start", "recovering", "recovering", "recovered"]
    assert list(h.phase[1:4]) == ["prune", "recover", "recover"]
    assert h.removed.iloc[1] > 0 and h.removed.iloc[2:4].sum() == 0      # recovery phases never prune
    assert h["filters.conv1"].iloc[3] < 20                                # the pruned model was kept


def test_failed_recovery_rolls_back_to_the_checkpoint(tiny, monkeypatch):
    _script(monkeypatch, [0.90, 0.80, 0.80, 0.80, 0.80])
    before = copy.deepcopy(tiny.model.state_dict())
    cb = PlayAndPruneCallback(0.05, phase_batches=2, recovery_phases=2, max_iters=4, **_aggressive())
    with quiet(tiny): tiny.fit(10, 1e-3, cbs=cb)
    h = cb.loop.frame()
    assert list(h.outcome[:4]) == ["start", "recovering", "recovering", "rolled back"]
    assert h["filters.conv1"].iloc[1] < 20 and h["filters.conv1"].iloc[3] == 20
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)          # weights exactly as accepted
    assert {id(p) for pg in tiny.opt.param_lists for p in pg} == {id(p) for p in tiny.model.parameters()}


def test_one_filter_that_cannot_go_closes_its_layer(tiny, monkeypatch):
    _script(monkeypatch, [0.90, 0.80])                                   # every removal breaks the floor
    cb = PlayAndPruneCallback(0.05, phase_batches=1, recovery_phases=0, max_iters=40, **_aggressive())
    with quiet(tiny): tiny.fit(40, 1e-3, cbs=cb)
    h, loop = cb.loop.frame(), cb.loop
    assert set(h.outcome[1:-1]) == {"rolled back"}
    assert loop.closed == {"conv1", "conv2"} and loop.stop_reason.startswith("no filter can go")
    assert h.tried.iloc[1:-1].tolist()[-1] == 1                            # it ended with one-filter attempts
    assert filter_counts(tiny.model)["conv1"] == 20 and filter_counts(tiny.model)["conv2"] == 50


# ---------------------------------------------------------------------------------------------------------------
# callback event timing
class Spy(Callback):
    "Records, at every training step, the model's filter counts and whether the optimiser holds its parameters"
    order = 90
    def before_fit(self): self.steps, self.extra = [], []
    def after_step(self):
        held = {id(p) for pg in self.learn.opt.param_lists for p in pg}
        self.steps.append((describe_counts(filter_counts(self.learn.model)), held == {id(p) for p in self.learn.model.parameters()}))
    def after_loss(self):
        if self.training: self.extra.append((self.learn.loss_grad - self.learn.loss).item())


def test_callback_events(tiny):
    spy = Spy()
    cb = PlayAndPruneCallback(0.5, phase_batches=3, max_iters=6, anneal=True,
                              controller=FixedController(0.1, 0.95), afp=AFP(max_frac=0.2, negligible=1.0))
    with quiet(tiny): tiny.fit(50, 1e-3, cbs=[cb, spy])
    h = cb.loop.frame()
    body = h[h.phase.isin(["prune", "recover"])]
    assert (body.batches == 3 * body.t).all()                              # a phase is exactly phase_batches steps
    assert len(spy.steps) == 3 * 6                                         # fit was stopped after max_iters phases
    assert all(ok for _, ok in spy.steps)                                  # every step trained the current model
    counts = [c for c, _ in spy.steps]
    changes = [i for i in range(1, len(counts)) if counts[i] != counts[i - 1]]
    assert changes and all(i % 3 == 0 for i in changes)                    # surgery only between phases
    assert max(spy.extra) > 0                                              # the regulariser reached the loss
    assert tiny.opt.hypers[0]["lr"] == pytest.approx(1e-3 * (0.01 + 0.99 * (1 + torch.cos(torch.tensor(2 / 3 * torch.pi)).item()) / 2))


def test_without_candidates_the_loss_is_plain_cross_entropy(tiny):
    spy = Spy()
    cb = PlayAndPruneCallback(0.5, phase_batches=2, max_iters=2, controller=FixedController(0.1, 0.0))
    with quiet(tiny): tiny.fit(5, 1e-3, cbs=[cb, spy])
    assert spy.extra and max(abs(e) for e in spy.extra) == 0 and cb.loop.history[-1]["filters"] == {"conv1": 20, "conv2": 50}


# ---------------------------------------------------------------------------------------------------------------
# interrupted training
class InterruptAt(Callback):
    order = 95
    def __init__(self, n): self.n, self.i = n, 0
    def after_batch(self):
        if self.training:
            self.i += 1
            if self.i == self.n: raise KeyboardInterrupt


def _usable(learn):
    xb = learn.dls.valid.one_batch()[0]
    assert learn.model(xb).shape == (len(xb), 10)
    assert {id(p) for pg in learn.opt.param_lists for p in pg} == {id(p) for p in learn.model.parameters()}
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    shapes = filter_counts(learn.model)
    with quiet(learn): learn.fit(1, 1e-3)
    assert filter_counts(learn.model) == shapes
    assert all(not torch.equal(before[n], p) for n, p in learn.model.named_parameters()), "some layer no longer trains"


def test_interrupted_callback_run_leaves_a_usable_model(tiny):
    cb = PlayAndPruneCallback(0.5, phase_batches=2, max_iters=20, **_aggressive())
    with pytest.raises(KeyboardInterrupt), quiet(tiny): tiny.fit(50, 1e-3, cbs=[cb, InterruptAt(7)])
    assert filter_counts(tiny.model)["conv1"] < 20                         # it was interrupted after some surgery
    _usable(tiny)
    cb.loop.restore_best(tiny)                                              # and the last accepted model is one call away
    last = cb.loop.history[-1]["filters"]
    assert {k: filter_counts(tiny.model)[k] for k in last} == last
    _usable(tiny)


def test_interrupted_function_api_puts_the_last_accepted_model_back(tiny, monkeypatch):
    _script(monkeypatch, [0.90, 0.95, 0.95, 0.80])                         # accepted, accepted, then a bad phase
    with pytest.raises(KeyboardInterrupt):
        play_and_prune(tiny, 0.05, phase_batches=2, max_iters=20, cbs=[InterruptAt(7)], **_aggressive())
    # phases end after batches 2, 4, 6: the third (scripted 0.80) started recovery; the model of phase 2 comes back
    assert filter_counts(tiny.model)["conv1"] < 20
    _usable(tiny)


# ---------------------------------------------------------------------------------------------------------------
# the caller's model, and bad input
def test_function_api_leaves_the_callers_network_alone(tiny):
    net = tiny.model
    before = copy.deepcopy(net.state_dict())
    play_and_prune(tiny, 0.5, phase_batches=2, max_iters=3, **_aggressive())
    assert tiny.model is not net and filter_counts(net) == filter_counts(lenet5())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())     # not even trained
    assert filter_counts(tiny.model)["conv1"] < 20


@pytest.mark.parametrize("kwargs, arg", [(dict(tolerance=1), "tolerance"), (dict(tolerance=0), "tolerance"),
                                         (dict(phase_batches=0), "phase_batches"), (dict(max_iters=0), "max_iters"),
                                         (dict(baseline_acc=99.0), "baseline_acc"), (dict(recovery_phases=-1), "recovery_phases")])
def test_bad_loop_arguments_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg): PlayAndPrune(**kwargs)


@pytest.mark.parametrize("make, arg", [(lambda: AFP(max_frac=0), "max_frac"), (lambda: AFP(negligible=0), "negligible"),
                                       (lambda: AFP(min_channels=0), "min_channels"), (lambda: GapController(W=3), "W"),
                                       (lambda: GapController(lam=-1), "lam"), (lambda: GapController(lam_min=1, lam_max=0.1), "lam_min")])
def test_bad_settings_name_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg): make()


def test_a_controller_must_look_like_one():
    with pytest.raises(TypeError, match="controller"): PlayAndPrune(controller=object())


def test_replay(tiny, monkeypatch):
    _script(monkeypatch, [0.90, 0.89, 0.87, 0.86, 0.86])
    cb = PlayAndPruneCallback(0.05, phase_batches=2, max_iters=4, **_aggressive())
    with quiet(tiny): tiny.fit(10, 1e-3, cbs=cb)
    h = cb.loop.frame()
    assert replay(h, 0.05)["macs"] == h.macs.iloc[-1]
    tight = replay(h, 0.02)                                                 # floor 0.88: stops before the 0.87 model
    assert tight["acc"] == pytest.approx(0.89) and tight["t"] == 1 and tight["macs"] > h.macs.iloc[-1]
    with pytest.raises(ValueError, match="tolerance"): replay(h, 5)


def test_a_resnet_with_tied_groups_and_batch_norm():
    "Residual streams are tied groups written through batch norms: the loop prunes them and the network still trains"
    from corrprune_edu.data import cifar10_dls
    from corrprune_edu.models import resnet_cifar
    learn = make_learner(resnet_cifar(20), cifar10_dls(10, n_test_per_class=5, bs=16))
    cb = PlayAndPruneCallback(0.9, phase_batches=2, max_iters=2, controller=FixedController(0.1, 0.95),
                              afp=AFP(max_frac=0.25, negligible=1.0))
    with quiet(learn): learn.fit(5, 1e-3, cbs=cb)
    counts = filter_counts(learn.model)
    assert counts["conv1"] < 16 and counts["layer1.0.conv2"] == counts["conv1"]          # a residual stream went
    assert counts["layer3.0.conv1"] < 64
    _usable(learn)
