"""Bad inputs to Play and Prune (issue 9): hyper-parameters of the loop, the controller, AFP, the function API and its
helpers that are NaN, infinite, negative, of the wrong type or out of range, and models with NaN or infinite weights.

Every case asserts the exception type, that the message names the argument (or the tensor) at fault, that it says
what to do, and that the caller's model is the very same object, with the same weights, after the call. All of them
fail before any training starts.
"""
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from fastai.callback.schedule import ParamScheduler
from torch import nn

from corrprune_edu.channels import analyze_channels
from corrprune_edu.data import mnist_dls
from corrprune_edu.models import lenet5
from corrprune_edu.play_and_prune import (AFP, FixedController, GapController, PlayAndPruneCallback, penalty_terms,
                                          phase_cosine, play_and_prune, replay, select_candidates)
from corrprune_edu.core import filter_counts
from corrprune_edu.train import make_learner, quiet

DO = re.compile(r"\b(pass|give|keep|use|reload|retrain|continue|start|compute)\b", re.I)
NAN, INF = float("nan"), float("inf")


@dataclass
class Case:
    id: str
    call: Callable            # called with a learner around the caller's model
    error: type               # the exception type expected
    names: str                # a regex the message must contain: the argument or tensor at fault


def pp(**kw):
    "play_and_prune with these arguments (the learner comes first)"
    return lambda learn: play_and_prune(learn, **kw)


def fit_with(**kw):
    "the callback used directly, in a fit"
    def call(learn):
        with quiet(learn): learn.fit(1, 1e-3, cbs=PlayAndPruneCallback(**kw))
    return call


def poisoned(param, value):
    "the caller's model has one NaN or infinite entry in `param`"
    def make(learn):
        with torch.no_grad(): learn.model.get_parameter(param).view(-1)[0] = value
    return make


def scores(): return {"conv1": torch.tensor([.2, .9, .5, 1.]), "conv2": torch.tensor([.1, 1., .7])}


CASES = [
    # the loop (through the function API, the callback, or the loop itself)
    Case("tolerance-nan", pp(tolerance=NAN), ValueError, "tolerance"),
    Case("tolerance-one", pp(tolerance=1.0), ValueError, "tolerance"),
    Case("tolerance-negative", pp(tolerance=-0.01), ValueError, "tolerance"),
    Case("tolerance-string", pp(tolerance="0.01"), TypeError, "tolerance"),
    Case("phase_batches-zero", pp(phase_batches=0), ValueError, "phase_batches"),
    Case("phase_batches-float", pp(phase_batches=2.5), TypeError, "phase_batches"),
    Case("recovery_phases-negative", pp(recovery_phases=-1), ValueError, "recovery_phases"),
    Case("max_iters-zero", pp(max_iters=0), ValueError, "max_iters"),
    Case("max_iters-negative", fit_with(max_iters=-3), ValueError, "max_iters"),
    Case("patience-negative", pp(patience=-1), ValueError, "patience"),
    Case("patience-zero", fit_with(patience=0), ValueError, "patience"),
    Case("baseline_acc-inf", pp(baseline_acc=INF), ValueError, "baseline_acc"),
    Case("baseline_acc-percent", pp(baseline_acc=98.0), ValueError, "baseline_acc"),
    Case("controller-not-one", pp(controller=object()), TypeError, "controller"),
    Case("afp-dict", pp(afp=dict(max_frac=0.3)), TypeError, "afp"),
    # the controller's lambda and W, and its steps and bounds
    Case("lam-nan", lambda learn: pp(controller=GapController(lam=NAN))(learn), ValueError, "lam"),
    Case("lam-negative", lambda learn: pp(controller=GapController(lam=-1e-2))(learn), ValueError, "lam"),
    Case("lam-inf-fixed", lambda learn: pp(controller=FixedController(INF, 0.5))(learn), ValueError, "lam"),
    Case("W-inf", lambda learn: pp(controller=GapController(W=INF))(learn), ValueError, r"\bW\b"),
    Case("W-percent", lambda learn: pp(controller=FixedController(0.01, 50))(learn), ValueError, r"\bW\b"),
    Case("eta_lam-negative", lambda learn: GapController(eta_lam=-1), ValueError, "eta_lam"),
    Case("eta_w-nan", lambda learn: GapController(eta_w=NAN), ValueError, "eta_w"),
    Case("lam_max-below-lam_min", lambda learn: GapController(lam_min=1, lam_max=0.1), ValueError, "lam_max"),
    Case("w_max-below-w_min", lambda learn: GapController(w_min=0.5, w_max=0.2), ValueError, "w_max"),
    Case("gap_clip-zero", lambda learn: GapController(gap_clip=0), ValueError, "gap_clip"),
    # AFP's settings
    Case("max_frac-above-one", lambda learn: pp(afp=AFP(max_frac=1.5))(learn), ValueError, "max_frac"),
    Case("negligible-nan", lambda learn: AFP(negligible=NAN), ValueError, "negligible"),
    Case("min_channels-zero", lambda learn: AFP(min_channels=0), ValueError, "min_channels"),
    Case("layer_types-strings", lambda learn: AFP(layer_types=("conv",)), TypeError, "layer_types"),
    Case("clip_at_zero-string", lambda learn: AFP(clip_at_zero="yes"), TypeError, "clip_at_zero"),
    Case("layer_types-absent", pp(afp=AFP(layer_types=(nn.Conv1d,))), ValueError, "layer_types"),
    # the function API's own arguments
    Case("lr-negative", pp(lr=-1e-3), ValueError, r"\blr\b"),
    Case("lr-nan", pp(lr=NAN), ValueError, r"\blr\b"),
    Case("final_epochs-negative", pp(final_epochs=-1), ValueError, "final_epochs"),
    Case("final_epochs-float", pp(final_epochs=0.5), TypeError, "final_epochs"),
    Case("scheduler-with-anneal", pp(cbs=[ParamScheduler({"lr": lambda pos: 1e-3})]), ValueError, "anneal"),
    # helpers
    Case("phase_cosine-n_phase-zero", lambda learn: phase_cosine(1e-3, 0, 100), ValueError, "n_phase"),
    Case("phase_cosine-final-above-one", lambda learn: phase_cosine(1e-3, 4, 100, final=2.0), ValueError, "final"),
    Case("select_candidates-W-nan", lambda learn: select_candidates(scores(), NAN), ValueError, r"\bW\b"),
    Case("select_candidates-limit-zero", lambda learn: select_candidates(scores(), 0.5, limit=0), ValueError, "limit"),
    Case("select_candidates-inf-score", lambda learn: select_candidates({**scores(), "conv2": torch.tensor([.1, INF, .5])}, 0.5),
         ValueError, "conv2"),
    Case("penalty_terms-unknown-group", lambda learn: penalty_terms(learn.model, analyze_channels(learn.model, (1, 28, 28)), {"conv9": [0]}),
         ValueError, "conv9"),
    Case("replay-tolerance-nan", lambda learn: replay(_history(), NAN), ValueError, "tolerance"),
]

# models with NaN or infinite weights: refused by name before any training, by the function and by the callback
DEAD = [("nan-weight-function", "conv2.weight", NAN, pp(tolerance=0.02)),
        ("inf-bias-callback", "conv1.bias", INF, fit_with(tolerance=0.02)),
        ("nan-fc-function", "fc1.weight", NAN, pp(tolerance=0.02, afp=AFP(layer_types=(nn.Conv2d, nn.Linear))))]


def _history():
    import pandas as pd
    return pd.DataFrame(dict(t=[0, 1], outcome=["start", "accepted"], acc=[0.9, 0.89], macs=[10, 5], params=[4, 2]))


@pytest.fixture(scope="module")
def dls():
    return mnist_dls(10, n_test_per_class=5, source="embedded", bs=16)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) or (a[k].isnan() == b[k].isnan()).all() and
                                        torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a)


def _check(learn, call, error, names):
    net, before = learn.model, _state(learn.model)
    with pytest.raises(error) as e: call(learn)
    msg = str(e.value)
    assert re.search(names, msg), f"the message does not name {names!r}: {msg}"
    assert DO.search(msg), f"the message does not say what to do: {msg}"
    assert learn.model is net and _same(_state(net), before), "the caller's model changed"
    assert filter_counts(net) == filter_counts(lenet5())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_argument(case, dls):
    _check(make_learner(lenet5(), dls), case.call, case.error, case.names)


@pytest.mark.parametrize("id, param, value, call", DEAD, ids=[d[0] for d in DEAD])
def test_a_dead_model_is_refused_by_name(id, param, value, call, dls):
    learn = make_learner(lenet5(), dls)
    poisoned(param, value)(learn)
    _check(learn, call, ValueError, re.escape(param))


def test_a_paused_run_refuses_another_model(dls):
    "Continuing a run on a model it did not leave is refused; the replacement model is left as it was"
    learn = make_learner(lenet5(), dls)
    cb = PlayAndPruneCallback(0.5, phase_batches=2, max_iters=50, controller=FixedController(0.1, 0.95),
                              afp=AFP(max_frac=0.5, negligible=1.0))
    with quiet(learn): learn.fit(1, 1e-3, cbs=cb)
    assert cb.loop.history[-1]["outcome"] == "paused" and filter_counts(learn.model)["conv1"] < 20
    learn.model = lenet5()
    _check(learn, lambda l: l.fit(1, 1e-3, cbs=cb), ValueError, "learn.model")
