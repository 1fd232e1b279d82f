#!/usr/bin/env python
"""LeNet-5 on full MNIST: weight pruning to 20x, 71x and 167x fewer non-zero weights (magnitude one-shot and gradual, direct and progressive ADMM) from one cached baseline, at one epoch budget.

    python bench/admm_lenet5.py                              # every method at every rate: 12 rows of 12 epochs
    python bench/admm_lenet5.py --methods gradual,progressive --rates 71,167 --budget 36   # rows "71x, 36 epochs", ...
    CORRPRUNE_THREADS=1 python bench/admm_lenet5.py --rates 167 & CORRPRUNE_THREADS=1 python bench/admm_lenet5.py --rates 71
                                                             # two processes may share the results file (it is locked)
    python bench/admm_lenet5.py --filters                    # structured ADMM against FCP / L1 / random at equal MACs

Protocol (the same for every method and rate):
* Baseline: `cached_baseline("lenet5", "mnist", epochs=3, seed=0)` (the one bench/lenet5_mnist.py uses): Caffe
  LeNet-5 (20-50-500-10, 430,500 conv/fc weights) trained on 54,000 images, validated on 6,000, tested on 10,000.
* Targets: non-zeros per layer from `corrprune_edu.admm.LENET5_KEEP` (PROPOSAL; 71x is the direct-ADMM code's
  80 / 92 / 99.1 / 93% split), the same for every method, so every row at a rate has exactly the same non-zeros.
* Budget: every method gets `--budget` epochs of training after the baseline (one-cycle schedules; retraining with
  Adam at lr 1e-3, the learner's preset), however it spends them:
  - `oneshot`: mask the smallest weights once, retrain `budget` epochs with the masks kept (Han et al. 2015);
  - `gradual`: Zhu & Gupta's cubic schedule over the first 60% of a `budget`-epoch fit (20 pruning steps), then
    retraining at the final rate;
  - `admm`: direct ADMM, `budget/2` epochs of ADMM (SGD with momentum 0.9 at lr 0.02, as the authors' PyTorch code
    uses SGD for ADMM and Adam for retraining; an ADMM iteration every quarter epoch; rho from 0.1, x1.3 per
    iteration, at most 1), hard pruning, `budget/2` epochs of masked retraining;
  - `progressive`: three stages of `budget/3` epochs each (half ADMM, half masked retraining, same ADMM settings);
    each stage starts from the previous one (a pool of one: `progressive_admm` keeps more, but with three stages
    a pool would send two of them straight from the dense model); 167x goes 71x -> 110x -> 167x, 71x goes
    20x -> 38x -> 71x, 20x goes 2.8x -> 7.7x -> 20x (geometric steps per layer between those targets).
* Methods decide only on the validation split; the test set is read once per row, at the end.
* One row per method and rate in bench/results/admm_lenet5.json (see corrprune_edu.results), written as each row
  finishes: non-zeros per layer, compression, test/valid accuracy, accuracy right after pruning, epochs, seconds.

`--filters` (structured ADMM, the filter projection): at the filter counts FCP chose in bench/lenet5_mnist.py (read
from its results: levels 90 / 94 / 96% fewer MACs, 5-9, 3-6, 2-5 filters in conv1-conv2), with that benchmark's budget of 4 epochs:
2 epochs of ADMM (the settings above) whose Z keeps whole filters, surgery along the resulting channel plan, then
2 epochs of one-cycle fine-tuning with Adam at lr 1e-3 (that benchmark's fine-tuning). Rows go to bench/results/admm_filters_lenet5.json;
bench/summarize.py shows them next to FCP, L1 and random from bench/results/lenet5_mnist.json at the same level.
"""
import argparse, fcntl, time
from functools import partial

from fastai.optimizer import SGD
from pathlib import Path

from corrprune_edu.admm import LENET5_KEEP, admm_prune, geometric_stages, progressive_admm
from corrprune_edu.core import set_seed, set_threads
from corrprune_edu.results import load_results, record_run
from corrprune_edu.sparse import GradualMagnitudeCallback, apply_masks, magnitude_masks, maskable_weights, one_shot_magnitude, sparsity_report
from corrprune_edu.train import accuracy_on, cached_baseline, evaluate, quiet

BASELINE = dict(model="lenet5", dataset="mnist", epochs=3, seed=0)
LR = 1e-3               # peak one-cycle learning rate of retraining and magnitude pruning (Adam)
ADMM = dict(rho=0.1, rho_growth=1.3, rho_max=1.0, per_epoch=4, lr=0.02, opt="SGD(mom=0.9)")   # rho x1.3 per ADMM iteration
N_STAGES = 3
DEFAULT_BUDGET = 12     # epochs after the baseline; rows of another budget are recorded as their own level
GRADUAL = dict(end=0.6, n_steps=20)


def baseline():
    "A fresh learner holding the cached baseline (the same weights every time)"
    set_seed(0)
    return cached_baseline(**BASELINE)


def stages(rate):
    "The progressive schedule's targets for `rate`"
    dense = {k.rsplit(".", 1)[0]: p.numel() for k, p in maskable_weights(baseline().model).items()}
    previous = {167: LENET5_KEEP[71], 71: LENET5_KEEP[20]}
    if rate in previous: return [previous[rate]] + geometric_stages(previous[rate], LENET5_KEEP[rate], N_STAGES - 1)
    return geometric_stages(dense, LENET5_KEEP[rate], N_STAGES)


def admm_kwargs(learn):
    "The ADMM phase's settings for `admm_prune` / `progressive_admm` / `admm_channel_plan`"
    return dict(rho=ADMM["rho"], rho_growth=ADMM["rho_growth"], rho_max=ADMM["rho_max"], lr=ADMM["lr"],
                admm_opt_func=partial(SGD, mom=0.9), update_every=len(learn.dls.train) // ADMM["per_epoch"])


def run_oneshot(learn, n_keep, budget):
    masks = magnitude_masks(learn.model, n_keep=n_keep)
    after = accuracy_on(apply_masks(learn.model, masks), learn.dls.valid)
    with quiet(learn): one_shot_magnitude(learn, budget, n_keep=n_keep, lr=LR)
    return dict(valid_acc_after_prune=after)


def run_gradual(learn, n_keep, budget):
    cb = GradualMagnitudeCallback(n_keep=n_keep, **GRADUAL)
    with quiet(learn): learn.fit_one_cycle(budget, LR, cbs=cb)
    return dict(schedule=cb.log)


def run_admm(learn, n_keep, budget):
    with quiet(learn): res = admm_prune(learn, n_keep=n_keep, admm_epochs=budget // 2, retrain_epochs=budget - budget // 2,
                                        retrain_lr=LR, **admm_kwargs(learn))
    h = res.history
    return dict(valid_acc_after_prune=res.valid_acc_pruned,
                admm_iterations=h.groupby("iteration").agg(rel_gap=("rel_gap", "mean"), valid_acc=("valid_acc", "first"),
                                                           valid_acc_pruned=("valid_acc_pruned", "first")).reset_index().to_dict("records"))


def run_progressive(learn, n_keep, budget, rate):
    per = budget // N_STAGES
    with quiet(learn): log = progressive_admm(learn, stages(rate), admm_epochs=per // 2, retrain_epochs=per - per // 2,
                                              keep_best=1, retrain_lr=LR, **admm_kwargs(learn))
    return dict(valid_acc_after_prune=float(log.valid_acc_pruned.iloc[-1]), stages=log.to_dict("records"))


def run_filters(level, filters, budget=4):
    "Structured ADMM to `filters` (conv1, conv2 counts), surgery, fine-tuning: one row in lenet5_mnist.json's format"
    from corrprune_edu.admm import admm_channel_plan
    from corrprune_edu.checkpoint import prune_learner
    from corrprune_edu.core import describe_counts, filter_counts
    from corrprune_edu.flops import count_macs, count_params
    base = baseline()
    learn, t0 = baseline(), time.perf_counter()
    set_seed(0)
    admm_epochs = budget // 2
    with quiet(learn):
        plan, cb = admm_channel_plan(learn, {"conv1": filters[0], "conv2": filters[1]}, admm_epochs=admm_epochs, **admm_kwargs(learn))
    prune_learner(learn, plan, (1, 28, 28))
    after = accuracy_on(learn.model, learn.dls.valid)
    with quiet(learn): learn.fit_one_cycle(budget - admm_epochs, LR, reset_opt=True)
    m0, p0, m1, p1 = (count_macs(base.model, (1, 28, 28)), count_params(base.model),
                      count_macs(learn.model, (1, 28, 28)), count_params(learn.model))
    r = dict(method="admm_filter", level=level, filters=describe_counts(filter_counts(learn.model)),
             base_acc=base.baseline["test_acc"], base_valid_acc=base.baseline["valid_acc"],
             test_acc=evaluate(learn, "test"), valid_acc=evaluate(learn, "valid"), macs=m1, params=p1,
             macs_reduction=1 - m1 / m0, params_reduction=1 - p1 / p0, epochs=budget,
             seconds=round(time.perf_counter() - t0, 1), valid_acc_after_prune=after)
    r["acc_drop_points"] = round(100 * (r["base_acc"] - r["test_acc"]), 2)
    return r


def fcp_filter_levels() -> dict:
    "FCP's conv1-conv2 filter counts per MACs level, read from bench/results/lenet5_mnist.json (the rows to match)"
    rows = load_results(Path(__file__).parent/"results"/"lenet5_mnist.json")["rows"]
    return {r["level"]: tuple(int(n) for n in r["filters"].split("-")[:2])
            for r in rows if r["method"] == "fcp" and not isinstance(r["level"], str)}


METHODS = {"oneshot": run_oneshot, "gradual": run_gradual, "admm": run_admm, "progressive": run_progressive}


def run(method, rate, budget, base_meta):
    learn, t0 = baseline(), time.perf_counter()
    set_seed(0)
    fn = METHODS[method]
    extra = fn(learn, LENET5_KEEP[rate], budget, rate) if method == "progressive" else fn(learn, LENET5_KEEP[rate], budget)
    seconds = time.perf_counter() - t0
    rep = sparsity_report(learn.model)
    if rep.nonzero.tolist()[:-1] != list(LENET5_KEEP[rate].values()):
        raise RuntimeError(f"{method} at {rate}x left {rep.nonzero.tolist()} non-zeros, not {LENET5_KEEP[rate]}")
    level = f"{rate}x" if budget == DEFAULT_BUDGET else f"{rate}x, {budget} epochs"   # a longer budget adds rows, replaces none
    r = dict(method=method, level=level, rate=rate, nonzero="-".join(map(str, rep.nonzero.tolist()[:-1])),
             total_nonzero=int(rep.nonzero.iloc[-1]), compression=round(float(rep.compression.iloc[-1]), 1),
             base_acc=base_meta["test_acc"], base_valid_acc=base_meta["valid_acc"],
             test_acc=evaluate(learn, "test"), valid_acc=evaluate(learn, "valid"),
             epochs=budget, seconds=round(seconds, 1), **extra)
    r["acc_drop_points"] = round(100 * (r["base_acc"] - r["test_acc"]), 2)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="oneshot,gradual,admm,progressive")
    ap.add_argument("--rates", default="20,71,167")
    ap.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="training epochs after the baseline, for every method (a multiple of 6)")
    ap.add_argument("--out", default=str(Path(__file__).parent/"results"/"admm_lenet5.json"))
    ap.add_argument("--filters", action="store_true", help="structured ADMM at FCP's filter counts instead (see above)")
    ap.add_argument("--levels", default="", help="with --filters: MACs levels to run, comma-separated (default: all of FCP's)")
    args = ap.parse_args()
    if args.filters:
        set_threads()
        out = str(Path(__file__).parent/"results"/"admm_filters_lenet5.json")
        levels = fcp_filter_levels()
        wanted = [float(v) for v in args.levels.split(",")] if args.levels else sorted(levels)
        if not levels or set(wanted) - set(levels):
            ap.error(f"--levels: FCP has rows at {sorted(levels)} in bench/results/lenet5_mnist.json (run bench/lenet5_mnist.py first)")
        for level in wanted:
            filters = levels[level]
            r = run_filters(level, filters)
            print(f"{level:.2f} admm_filter {r['filters']:>14}  MACs -{100*r['macs_reduction']:.1f}%  test {100*r['test_acc']:.2f}% "
                  f"({-r['acc_drop_points']:+.2f} pts)  right after surgery (valid) {100*r['valid_acc_after_prune']:.2f}%  {r['seconds']:.0f}s", flush=True)
            with open(out + ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                record_run(out, "admm_filters_lenet5", [r], dict(baseline=BASELINE, budget_epochs=4, admm_epochs=2, lr=LR,
                           admm=ADMM, protocol="filter counts of FCP's rows in lenet5_mnist.json; same baseline and 4-epoch budget"),
                           description="LeNet-5 on full MNIST: structured ADMM (filter projection -> channel plan -> surgery) at FCP's filter counts, against FCP / L1 / random at equal MACs.")
        return
    if args.budget % (2 * N_STAGES): ap.error(f"--budget must be a multiple of {2 * N_STAGES} (progressive: {N_STAGES} stages, each half ADMM, half retraining)")
    threads = set_threads()
    base = baseline()
    meta = base.baseline
    print(f"baseline: test {meta['test_acc']:.4f}, valid {meta['valid_acc']:.4f}", flush=True)
    settings = dict(baseline=BASELINE, budget_epochs=args.budget, lr=LR, optimiser="adam (make_learner preset), one-cycle",
                    admm=ADMM, gradual=GRADUAL, progressive=dict(stages=N_STAGES, keep_best=1), keep=LENET5_KEEP, threads=threads,
                    protocol="one cached baseline; equal post-baseline epochs; identical per-layer non-zeros for every method at a rate")
    for rate in (int(r) for r in args.rates.split(",") if r):
        for method in args.methods.split(","):
            r = run(method, rate, args.budget, meta)
            print(f"{rate:>4}x {method:12} {r['nonzero']:>22}  {r['compression']:6.1f}x  test {100*r['test_acc']:.2f}% "
                  f"({-r['acc_drop_points']:+.2f} pts)  valid {100*r['valid_acc']:.2f}%  {r['epochs']} epochs  {r['seconds']:.0f}s", flush=True)
            with open(args.out + ".lock", "w") as lock:          # two processes may write the same results file
                fcntl.flock(lock, fcntl.LOCK_EX)
                record_run(args.out, "admm_lenet5", [r], settings, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
