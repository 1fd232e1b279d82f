#!/usr/bin/env python
"""LeNet-5 on full MNIST: pruning methods compared at equal MACs, from one cached baseline, with one training budget.

    python bench/lenet5_mnist.py [--methods fcp,l1,random] [--levels 0.90,0.94,0.96] [--budget 4] [--out ...]
    python bench/lenet5_mnist.py --methods cop,cop_fc,l1_cop,random_cop      # the COP rows
    python bench/lenet5_mnist.py --levels "" --tolerances 0.003,0.005,0.01 --methods l1,fcp   # the Play-and-Prune rows
    python bench/lenet5_mnist.py --levels "" --tolerances 0.005,0.01 --methods l1,fcp --pp-fc # ... pruning fc1 too
    python bench/lenet5_mnist.py --levels "" --fcp-at-recorded-tolerances   # only FCP, at Play and Prune's recorded MACs

Protocol (the same for every method; later methods add themselves to METHODS):
* Baseline: `cached_baseline("lenet5", "mnist", epochs=3, seed=0)`: Caffe LeNet-5 (20-50-500-10) trained on the
  54,000 training images (6,000 held out for validation), tested on the 10,000 test images.
* Budget: every method gets the same number of training epochs after the baseline (`--budget`, default 4),
  however it spends them (FCP: its rounds at a constant lr of 1e-3, then fine-tuning with what is left; one-shot
  methods: all fine-tuning).
  Methods decide only on the validation split; the test set is read once, at the end.
* Levels: a MACs reduction of at least 90%, 94% and 96%. Structured methods that choose their own filter counts
  (FCP) run first; L1 and random are then pruned to exactly the same filter counts, so their MACs are equal.
* COP (`cop`: alpha = beta = gamma = 1, the reference code's defaults, conv layers scored; `cop_fc`: the "faster"
  setting 1, 3, 0 with the hidden layer fc1 scored too, as COP's code scores hidden dense layers) selects on the
  baseline until the MACs level is reached, then fine-tunes with the whole budget. `l1_cop` and `random_cop` prune
  to exactly `cop`'s filter counts.
* Play and Prune (`--tolerances`) chooses its own filter counts from an accuracy tolerance (level "tol 0.5%"): its
  controller loop spends the budget but one epoch (phases of a fifth of an epoch, each annealed), then one epoch of
  one-cycle fine-tuning, kept only if still within the tolerance on validation. The methods named in `--methods` then
  run at the same level: one-shot methods pruned to Play and Prune's exact filter counts, FCP to its MACs reduction
  (`--fcp-at-recorded-tolerances` reruns only those FCP rows, at the MACs reduction recorded for Play and Prune).
  With `--pp-fc`, AFP may also remove fc1's hidden units (level "tol 0.5% +fc1"); L1 and random then prune fc1 to
  the same count by the L1 norm of each unit's incoming weights.
* One row per method and level in bench/results/lenet5_mnist.json (see corrprune_edu.results).
"""
import argparse, copy, json, math, time
from pathlib import Path


from torch import nn

from corrprune_edu.play_and_prune import AFP, GapController, play_and_prune
from corrprune_edu.cop import COP
from corrprune_edu.core import describe_counts, filter_counts, set_seed, set_threads
from corrprune_edu.criteria import l1_scores, plan_from_scores, random_scores, select_groups
from corrprune_edu.fcp import fcp
from corrprune_edu.flops import count_macs, count_params
from corrprune_edu.results import record_run
from corrprune_edu.channels import analyze_channels
from corrprune_edu.checkpoint import prune_learner
from corrprune_edu.train import cached_baseline, evaluate, fit

SHAPE = (1, 28, 28)
DEFAULT_BUDGET = 4      # epochs after the baseline; rows run with another budget say so in their level
BASELINE = dict(model="lenet5", dataset="mnist", epochs=3, seed=0)
FT_LR = 1e-3
FCP = dict(lr=1e-3, phase_iters=40, n_pairs=0.4)    # FCP's rounds: constant lr, batches per phase, pairs per layer and round


def baseline():
    "A fresh learner holding the cached baseline (the same weights every time)"
    set_seed(0)
    return cached_baseline(**BASELINE)


def row(method, level, learn, base, epochs, seconds, **extra):
    "One results row: filters, accuracies, reductions (fractions), budget used"
    m0, p0 = count_macs(base.model, SHAPE), count_params(base.model)
    m1, p1 = count_macs(learn.model, SHAPE), count_params(learn.model)
    r = dict(method=method, level=level, filters=describe_counts(filter_counts(learn.model)),
             base_acc=base.baseline["test_acc"], base_valid_acc=base.baseline["valid_acc"],
             test_acc=evaluate(learn, "test"), valid_acc=evaluate(learn, "valid"),
             macs=m1, params=p1, macs_reduction=1 - m1 / m0, params_reduction=1 - p1 / p0,
             epochs=epochs, seconds=round(seconds, 1), **extra)
    r["acc_drop_points"] = round(100 * (r["base_acc"] - r["test_acc"]), 2)
    return r


def prune_to_counts(learn, counts, scores_fn):
    "Remove the lowest-scoring filters (or hidden units) of each layer until it has `counts[layer]` of them"
    a = analyze_channels(learn.model, SHAPE)
    scores = scores_fn(learn.model, a, select_groups(a, layer_types=(nn.Conv2d, nn.Linear), model=learn.model))
    prune_learner(learn, plan_from_scores(scores, {g: len(s) - counts[g] for g, s in scores.items()}), SHAPE)


def one_shot(name, scores_fn):
    def run(level, budget, base, counts, **_):
        learn, t0 = baseline(), time.perf_counter()
        prune_to_counts(learn, counts, scores_fn)
        acc_after_prune = evaluate(learn, "valid")
        set_seed(0); fit(learn, budget, lr=FT_LR)
        return row(name, level, learn, base, budget, time.perf_counter() - t0, valid_acc_after_prune=acc_after_prune)
    return run


def run_fcp(level, budget, base, counts=None, lr=FCP["lr"], phase_iters=FCP["phase_iters"], n_pairs=FCP["n_pairs"], **_):
    "FCP rounds (correlate, fold, drop, fine-tune) to the MACs level, then one-cycle fine-tuning with the rest of the budget"
    learn, t0 = baseline(), time.perf_counter()
    set_seed(0)
    log = fcp(learn, macs_reduction=level, lr=lr, n_pairs=n_pairs, correlate_iters=phase_iters, finetune_iters=phase_iters)
    used = log.pairs.size * 2 * phase_iters / len(learn.dls.train)
    rest = max(0, math.floor(budget - used))
    if rest: fit(learn, rest, lr=FT_LR)
    return row("fcp", level, learn, base, round(used + rest, 2), time.perf_counter() - t0, rounds=len(log), fcp=dict(FCP, lr=lr),
               mean_drop_cost=round(float((log.acc_before_drop - log.acc_after_drop).mean()), 4),
               trajectory=log.drop(columns="episode").to_dict("records"))


def run_cop(level, budget, base, name="cop", alpha=1.0, beta=1.0, gamma=1.0, layer_types=(nn.Conv2d,), **_):
    "COP's greedy selection on the baseline until the MACs level, surgery, then one-cycle fine-tuning for the whole budget"
    learn, t0 = baseline(), time.perf_counter()
    plan = COP(learn.model, SHAPE, layer_types=layer_types).plan(macs_reduction=level, alpha=alpha, beta=beta, gamma=gamma)
    prune_learner(learn, plan, SHAPE)
    acc_after_prune = evaluate(learn, "valid")
    set_seed(0); fit(learn, budget, lr=FT_LR)
    return row(name, level, learn, base, budget, time.perf_counter() - t0, valid_acc_after_prune=acc_after_prune,
               cop=dict(alpha=alpha, beta=beta, gamma=gamma, layer_types=[t.__name__ for t in layer_types]))


# Play and Prune's settings (tuned on the validation split for this budget; see corrprune_edu.play_and_prune):
# phases of 1/5 epoch at lr 2e-3 annealed within each phase; the controller starts at high pressure (lambda 0.05,
# W 0.9) and AFP may take 30% of a layer's filters per iteration; one final epoch of one-cycle fine-tuning.
PP = dict(lr=2e-3, phases_per_epoch=5, lam=0.05, W=0.9, max_frac=0.3, final_epochs=1)


def run_play_and_prune(level, budget, base, tolerance, layer_types=(nn.Conv2d,), **_):
    "Play and Prune at `tolerance`: the controller loop with all but `final_epochs` of the budget, then fine-tuning"
    learn, t0 = baseline(), time.perf_counter()
    set_seed(0)
    n = len(learn.dls.train)
    phase = n // PP["phases_per_epoch"]
    afp = AFP(max_frac=PP["max_frac"], layer_types=layer_types)
    run = play_and_prune(learn, tolerance, controller=GapController(lam=PP["lam"], W=PP["W"]), afp=afp,
                         lr=PP["lr"], phase_batches=phase, max_iters=(budget - PP["final_epochs"]) * PP["phases_per_epoch"],
                         final_epochs=PP["final_epochs"], baseline_acc=base.baseline["valid_acc"])
    h = run.frame()
    cols = ["t", "phase", "outcome", "lam", "W", "candidates", "removed", "macs", "params", "acc", "gap", "batches"]
    traj = h[cols + [c for c in h.columns if c.startswith("filters.")]].to_dict("records")
    name = "play_and_prune" if layer_types == (nn.Conv2d,) else "play_and_prune_fc"
    return row(name, level, learn, base, round(run.batches / n, 2), time.perf_counter() - t0, tolerance=tolerance,
               stop_reason=run.stop_reason, iterations=int(h.t.iloc[-1]),
               settings=dict(PP, phase_batches=phase, layer_types=[t.__name__ for t in layer_types]), trajectory=traj)


def tolerance_level(tolerance, budget, base, others, with_fc=False):
    "Play and Prune at one tolerance, then `others` at the same level: one-shot methods at its filter counts, FCP at its MACs"
    label = f"tol {tolerance:.1%}" + (" +fc1" if with_fc else "") + ("" if budget == DEFAULT_BUDGET else f" ({budget} epochs)")
    pp = run_play_and_prune(label, budget, base, tolerance, layer_types=(nn.Conv2d, nn.Linear) if with_fc else (nn.Conv2d,))
    counts = dict(zip(filter_counts(base.model), map(int, pp["filters"].split("-"))))
    rows = [pp]
    for name in others:
        r = run_fcp(pp["macs_reduction"], budget, base) if name == "fcp" else METHODS[name](label, budget, base, counts=counts)
        r["level"] = label
        rows.append(r)
    return rows


def fcp_at_recorded_tolerances(path, budget, base):
    "FCP rows of the tolerance levels again, each at the MACs reduction recorded for Play and Prune at that level"
    recorded = [r for r in json.loads(Path(path).read_text())["rows"] if r["method"].startswith("play_and_prune")
                and str(r["level"]).startswith("tol") and r.get("epochs", 0) <= budget and "epochs)" not in r["level"]]
    rows = []
    for pp in recorded:
        r = run_fcp(pp["macs_reduction"], budget, base)
        r.update(level=pp["level"], play_and_prune_run=pp["run"])
        rows.append(r)
    return rows


# Methods that choose their own filter counts come first; the others prune to those counts (the first chooser's,
# or the one named in FOLLOWS).
METHODS = {"fcp": run_fcp, "l1": one_shot("l1", l1_scores),
           "random": one_shot("random", lambda m, a, gs: random_scores(gs, seed=0)),
           "cop": run_cop,
           "cop_fc": lambda level, budget, base, **kw: run_cop(level, budget, base, "cop_fc", 1.0, 3.0, 0.0, (nn.Conv2d, nn.Linear)),
           "l1_cop": one_shot("l1_cop", l1_scores),
           "random_cop": one_shot("random_cop", lambda m, a, gs: random_scores(gs, seed=0))}
CHOOSERS = ("fcp", "cop", "cop_fc")
FOLLOWS = {"l1_cop": "cop", "random_cop": "cop"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="fcp,l1,random")
    ap.add_argument("--levels", default="0.90,0.94,0.96")
    ap.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="training epochs after the baseline, for every method")
    ap.add_argument("--tolerances", default="", help="Play-and-Prune tolerances, e.g. 0.003,0.005,0.01 (then --methods run at its counts)")
    ap.add_argument("--pp-fc", action="store_true", help="Play and Prune also prunes fc1's hidden units (level 'tol x% +fc1')")
    ap.add_argument("--fcp-at-recorded-tolerances", action="store_true",
                    help="rerun only the FCP rows of the tolerance levels, at Play and Prune's recorded MACs reduction")
    ap.add_argument("--out", default=str(Path(__file__).parent/"results"/"lenet5_mnist.json"))
    args = ap.parse_args()
    set_threads(2)
    base = baseline()
    print(f"baseline {describe_counts(filter_counts(base.model))}: test {base.baseline['test_acc']:.4f}, valid {base.baseline['valid_acc']:.4f}", flush=True)
    methods = args.methods.split(",")
    for level in (float(l) for l in args.levels.split(",") if l):
        rows, counts, counts_of = [], None, {}
        for name in sorted(methods, key=lambda m: m not in CHOOSERS):
            r = METHODS[name](level, args.budget, base, counts=counts_of.get(FOLLOWS.get(name), counts))
            if name in CHOOSERS:
                counts_of[name] = dict(zip(filter_counts(base.model), map(int, r["filters"].split("-"))))
                if counts is None: counts = counts_of[name]
            rows.append(r)
            print(f"{level:.2f} {name:8} {r['filters']:>14}  MACs -{100*r['macs_reduction']:.1f}%  params -{100*r['params_reduction']:.1f}%  "
                  f"test {100*r['test_acc']:.2f}% ({-r['acc_drop_points']:+.2f} pts)  {r['epochs']} epochs  {r['seconds']:.0f}s", flush=True)
        record_run(args.out, "lenet5_mnist", rows, dict(baseline=BASELINE, budget_epochs=args.budget, fine_tune_lr=FT_LR, threads=2, fcp=FCP,
                   protocol="one cached baseline; equal post-baseline epochs; L1/random pruned to the filter counts of the method that chose them"),
                   description=__doc__.splitlines()[0])
    if args.fcp_at_recorded_tolerances:
        rows = fcp_at_recorded_tolerances(args.out, args.budget, base)
        for r in rows:
            print(f"{r['level']} fcp {r['filters']:>14}  MACs -{100*r['macs_reduction']:.1f}%  test {100*r['test_acc']:.2f}% "
                  f"({-r['acc_drop_points']:+.2f} pts)  {r['epochs']} epochs  {r['seconds']:.0f}s", flush=True)
        record_run(args.out, "lenet5_mnist", rows, dict(baseline=BASELINE, budget_epochs=args.budget, fine_tune_lr=FT_LR, threads=2, fcp=FCP,
                   protocol="FCP to the MACs reduction recorded for Play and Prune at each tolerance level (its run id in each row)"),
                   description=__doc__.splitlines()[0])
    for tol in (float(t) for t in args.tolerances.split(",") if t):
        rows = tolerance_level(tol, args.budget, base, [m for m in methods if m], with_fc=args.pp_fc)
        for r in rows:
            print(f"{r['level']} {r['method']:14} {r['filters']:>14}  MACs -{100*r['macs_reduction']:.1f}%  params -{100*r['params_reduction']:.1f}%  "
                  f"valid {100*r['valid_acc']:.2f}%  test {100*r['test_acc']:.2f}% ({-r['acc_drop_points']:+.2f} pts)  {r['epochs']} epochs  {r['seconds']:.0f}s", flush=True)
        record_run(args.out, "lenet5_mnist", rows, dict(baseline=BASELINE, budget_epochs=args.budget, fine_tune_lr=FT_LR, threads=2, play_and_prune=PP, fcp=FCP,
                   protocol="one cached baseline; equal post-baseline epochs; Play and Prune chooses its counts from a tolerance; "
                            "one-shot methods pruned to its counts, FCP to its MACs reduction"),
                   description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
