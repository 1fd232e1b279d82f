"Wrong answers to assignment 4 (a pruning-rate controller for Play and Prune)."
import copy
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np

from corrprune_edu.play_and_prune import AFP, PRC, GapController, play_and_prune
from corrprune_edu.train import evaluate

from . import wrong

A4 = "04_play_and_prune"
LOOP = dict(phase_batches=5, max_iters=2)


@lru_cache(maxsize=1)
def _trained():
    from corrprune_edu.train import cached_baseline
    return cached_baseline("lenet5", "mnist_embedded", epochs=3)

def _run_inputs():
    return dict(learn=_trained(), controller=GapController(lam=0.05, W=0.9), **LOOP)

@lru_cache(maxsize=1)
def _reference_run():
    from corrprune_edu.core import set_seed
    from corrprune_edu.train import make_learner
    set_seed(0)
    learn = make_learner(copy.deepcopy(_trained().model), _trained().dls)
    return play_and_prune(learn, 0.02, GapController(lam=0.05, W=0.9), AFP(max_frac=0.3), lr=2e-3, **LOOP)

def _plot_inputs(): return dict(run=_reference_run())


# Task 4.1 -------------------------------------------------------------------------------------------------------
@wrong("4.1", "your controller lowered the pressure while accuracy was above the floor", e2e=A4)
class MyController__sign_error(PRC):
    "Reads the gap the wrong way round: shrinks λ and W when there is room, grows them below the floor"
    def __init__(self, lam: float = 0.05, W: float = 0.9):
        super().__init__(lam, W)

    def update(self, gap: float, outcome: str) -> None:
        g = float(np.clip(gap, -2, 2))
        self.lam = float(np.clip(self.lam - 0.02 * g, 0, 0.2))
        self.W = float(np.clip(self.W - 0.05 * np.sign(g), 0.05, 1.0))

@wrong("4.1", "W is a threshold on normalised scores, so it must stay in [0, 1]")
class MyController__unbounded(PRC):
    def __init__(self, lam: float = 0.05, W: float = 0.5):
        super().__init__(lam, W)

    def update(self, gap: float, outcome: str) -> None:
        self.lam = max(0.0, self.lam + 0.01 * gap)
        self.W = self.W + 0.1 * np.sign(gap)          # no clipping

@wrong("4.1", "your update changed neither λ nor W: update sets self.lam and self.W (it returns nothing)")
class MyController__returns_values(PRC):
    def __init__(self, lam: float = 0.05, W: float = 0.5):
        super().__init__(lam, W)

    def update(self, gap: float, outcome: str):
        return self.lam * 2 ** gap, float(np.clip(self.W + 0.05 * np.sign(gap), 0, 1))


# Task 4.2 -------------------------------------------------------------------------------------------------------
@wrong("4.2", "your controller read the test loader during the loop", inputs=_run_inputs)
def run_controller__controller_reads_test(learn, controller, tolerance, phase_batches, max_iters):
    class Reporting(PRC):
        "Passes the decisions on, and prints the test accuracy as it goes"
        def __init__(self): super().__init__(controller.lam, controller.W)
        def update(self, gap, outcome):
            print(f"test accuracy {evaluate(learn, 'test'):.4f}")
            controller.update(gap, outcome)
            self.lam, self.W = controller.lam, controller.W
    return play_and_prune(learn, tolerance, Reporting(), AFP(max_frac=0.3), lr=2e-3, phase_batches=phase_batches, max_iters=max_iters)

@wrong("4.2", "your code read the test loader before the loop started", inputs=_run_inputs)
def run_controller__test_baseline(learn, controller, tolerance, phase_batches, max_iters):
    return play_and_prune(learn, tolerance, controller, AFP(max_frac=0.3), lr=2e-3, phase_batches=phase_batches,
                          max_iters=max_iters, baseline_acc=evaluate(learn, "test"))

@wrong("4.2", "tolerance is a fraction of accuracy (0.02 = two percentage points)", inputs=_run_inputs)
def run_controller__points(learn, controller, tolerance, phase_batches, max_iters):
    return play_and_prune(learn, 100 * tolerance, controller, AFP(max_frac=0.3), lr=2e-3, phase_batches=phase_batches, max_iters=max_iters)

@wrong("4.2", "the final model is below the floor", inputs=_run_inputs)
def run_controller__prunes_more(learn, controller, tolerance, phase_batches, max_iters):
    from corrprune_edu.checkpoint import prune_learner
    from corrprune_edu.criteria import l1_plan
    run = play_and_prune(learn, tolerance, controller, AFP(max_frac=0.3), lr=2e-3, phase_batches=phase_batches, max_iters=max_iters)
    prune_learner(learn, l1_plan(learn.model, (1, 28, 28), amount=0.8))     # "a bit more" for free
    return run


# Task 4.3 -------------------------------------------------------------------------------------------------------
@wrong("4.3", "give every line a label= and call ax.legend()", e2e=A4, inputs=_plot_inputs)
def plot_trajectory__no_legend(run):
    h = run.frame()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
    ax1.plot(h.t, h.acc, "-o", ms=3)
    ax1.axhline(run.floor, color="tab:red", ls="--")
    ax1.set_xlabel("iteration t"); ax1.set_ylabel("accuracy")
    ax2.plot(h.t, h.lam); ax2.plot(h.t, h.W)
    ax2.set_xlabel("iteration t"); ax2.set_ylabel("λ and W")
    return fig

@wrong("4.3", "draw the floor with ax.axhline(run.floor)", inputs=_plot_inputs)
def plot_trajectory__no_floor(run):
    h = run.frame()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(12, 3))
    ax1.plot(h.t, h.acc); ax2.plot(h.t, h.lam); ax3.plot(h.t, h.W)
    for ax, y in zip((ax1, ax2, ax3), ("accuracy", "λ", "W")): ax.set_xlabel("iteration t"); ax.set_ylabel(y)
    return fig

@wrong("4.3", "label every axis", inputs=_plot_inputs)
def plot_trajectory__unlabelled(run):
    h = run.frame()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(12, 3))
    ax1.plot(h.t, h.acc, label="accuracy"); ax1.axhline(run.floor, label="floor"); ax1.legend()
    ax2.plot(h.t, h.lam); ax3.plot(h.t, h.W)
    return fig
