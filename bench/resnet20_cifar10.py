#!/usr/bin/env python
"""ResNet-20 on CIFAR-10: COP against FCP, L1 and random filter selection at equal MACs, on 2 CPU cores.

    python bench/resnet20_cifar10.py                 # the recorded run (about 1-2 hours on 2 shared CPU cores)
    python bench/resnet20_cifar10.py --quick         # a smoke test on a tiny subset; writes nothing
    python bench/resnet20_cifar10.py --levels 0.4 --methods cop,l1,random,fcp,fcp_budget,l1_fcp,l1_fcp_long
                                                     # the recorded rows (one level, l1_uniform skipped: CPU time)

The schedule (all in SETTINGS, stored with the results) is a CPU-sized version of the papers' CIFAR protocol:

* baseline: ResNet-20 trained once (and cached) on a class-balanced 10,000-image subset of the CIFAR-10 training set
  (10% held out for validation) with pad-crop-flip augmentation, fastai one-cycle Adam, 10 epochs (the same cached
  baseline as the surgery and COP tutorials); every accuracy below is on the whole 10,000-image test set;
* each method removes filters from that baseline until at least `level` of the MACs are gone, then the pruned network
  is fine-tuned for the same 4 one-cycle epochs (the learning rate restarts, as in COP's recipe);
* COP: alpha, beta, gamma = 1, 3, 0 (the reference code's CIFAR-10 ResNet setting), conv groups, the selection stops at
  the first cut that reaches the MACs level; fine-tuned through `COPCallback(at=0)` inside `fit`;
* L1 and random: exactly COP's filter counts per channel group (so exactly COP's MACs and parameters), channels
  chosen by the smallest L1 norm or at random: the comparison isolates *which* channels each criterion removes;
* L1 uniform: the same fraction of every conv group removed by L1 norm, the smallest fraction that reaches the MACs
  level (the classic Li et al. allocation);
* FCP (when `corrprune_edu.fcp` is importable): its own rounds (10% of each layer's filters paired per round, 50
  batches correlating, 50 batches fine-tuning, lr 1e-3) until the MACs level, then the same 4-epoch fine-tune. FCP
  therefore trains more than the others; the extra batches are recorded in `extra_train_batches`;
* FCP budget (`fcp_budget`): FCP inside the same budget (25 + 25 batches per round, then the whole epochs left of
  the 4), the fair comparison with the rows above;
* L1 at FCP's filter counts, fine-tuned for the shared 4 epochs (`l1_fcp`) and as long as FCP trained in all
  (`l1_fcp_long`): separates FCP's choice of channels from its allocation and from its extra training.
  A run resumes from the rows already recorded (partial cache, else the results file); `--rerun` names the methods
  to measure again all the same (e.g. the FCP rows after a fix: `--rerun fcp,fcp_budget,l1_fcp,l1_fcp_long`).

One seed (CPU budget): differences below about one point of accuracy are within seed noise for this protocol.
"""
import argparse, copy, json, math, time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from corrprune_edu.cop import COP, COPCallback
from corrprune_edu.core import cache_dir, describe_counts, filter_counts, set_seed, set_threads, stable_hash
from corrprune_edu.criteria import l1_scores, plan_from_scores, random_scores, select_groups
from corrprune_edu.flops import count_macs, count_params
from corrprune_edu.results import record_run
from corrprune_edu.channels import analyze_channels
from corrprune_edu.surgery import prune_channels
from corrprune_edu.train import accuracy_on, cached_baseline, evaluate, fit, make_learner

SETTINGS = dict(model="resnet20", dataset="cifar10", n_per_class=1000, n_test_per_class=None, valid_pct=0.1,
                augment=True, base_epochs=10, finetune_epochs=4, bs=128, opt="adam", seed=0, threads=2,
                levels=[0.4, 0.6], cop=dict(alpha=1.0, beta=3.0, gamma=0.0, layer_types="Conv2d", top_k=3, normalize="max"),
                fcp=dict(n_pairs=0.1, correlate_iters=50, finetune_iters=50, lr=1e-3),
                random_seed=0)
# FCP within the same 4-epoch budget (method `fcp_budget`): half-length phases, then the epochs that are left
FCP_BUDGET = dict(n_pairs=0.1, correlate_iters=25, finetune_iters=25, lr=1e-3)
QUICK = dict(SETTINGS, n_per_class=60, n_test_per_class=20, base_epochs=1, finetune_epochs=1, levels=[0.4],
             fcp=dict(SETTINGS["fcp"], correlate_iters=2, finetune_iters=2))
SHAPE = (3, 32, 32)


def uniform_l1_plan(model, analysis, level):
    "The smallest uniform L1 fraction (over all conv groups) whose pruned model loses at least `level` of the MACs"
    scores = l1_scores(model, analysis, select_groups(analysis, layer_types=(nn.Conv2d,), model=model))
    base = count_macs(model, SHAPE)
    red = lambda f: 1 - count_macs(prune_channels(model, plan_from_scores(scores, f), analysis=analysis), SHAPE) / base
    lo, hi = 0.0, 0.95
    for _ in range(30):
        mid = (lo + hi) / 2
        if red(mid) >= level: hi = mid
        else: lo = mid
    return plan_from_scores(scores, hi), hi


def finetune(model, dls, cfg, cbs=None):
    "Fine-tune with the shared budget; returns the learner"
    set_seed(cfg["seed"])
    learn = make_learner(model, dls, opt=cfg["opt"])
    fit(learn, cfg["finetune_epochs"], cbs=cbs)
    return learn


def row(method, level, learn, base, acc_pruned, t0, **extra):
    m = learn.model
    macs, params = count_macs(m, SHAPE), count_params(m)
    return dict(method=method, level=level, filters=describe_counts(filter_counts(m)), base_acc=base["test_acc"],
                test_acc=evaluate(learn, "test"), valid_acc=evaluate(learn, "valid"), acc_pruned=acc_pruned,
                macs=macs, params=params, macs_reduction=1 - macs / base["macs"], params_reduction=1 - params / base["params"],
                seconds=round(time.perf_counter() - t0, 1), **extra)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run; nothing is recorded")
    ap.add_argument("--out", default="bench/results/resnet20_cifar10.json")
    ap.add_argument("--levels", default="", help="comma-separated subset of SETTINGS['levels'] to run (default: all)")
    ap.add_argument("--methods", default="cop,l1,random,l1_uniform,fcp", help="comma-separated subset of the methods to run")
    ap.add_argument("--rerun", default="", help="comma-separated methods to measure again even if rows for them are recorded")
    args = ap.parse_args()
    cfg = QUICK if args.quick else SETTINGS
    set_threads(cfg["threads"])
    try:
        from corrprune_edu.fcp import fcp
    except ImportError:
        fcp = None
    partial = cache_dir("bench") / f"resnet20_cifar10_{stable_hash(cfg)}.json"      # resume after an interruption
    rows = json.loads(partial.read_text()) if partial.exists() and not args.quick else []
    if not rows and Path(args.out).exists() and not args.quick:    # rows recorded by an earlier complete run
        rows = [{k: v for k, v in r.items() if k != "run"} for r in json.loads(Path(args.out).read_text())["rows"]]
    rows = [r for r in rows if r["method"] not in args.rerun.split(",")]
    done = {(r["method"], r["level"]) for r in rows}
    if args.levels:                       # after the resume key: a partial run continues the same file
        cfg = dict(cfg, levels=[float(v) for v in args.levels.split(",")])
    methods = args.methods.split(",")
    def keep(r):
        rows.append(r); print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        if not args.quick: partial.write_text(json.dumps(rows))

    t0 = time.perf_counter()
    base_learn = cached_baseline("resnet20", "cifar10", n_per_class=cfg["n_per_class"], n_test_per_class=cfg["n_test_per_class"],
                                 epochs=cfg["base_epochs"], seed=cfg["seed"], bs=cfg["bs"], opt=cfg["opt"], valid_pct=cfg["valid_pct"])
    dls, base_model = base_learn.dls, base_learn.model.eval()
    base = dict(test_acc=evaluate(base_learn, "test"), valid_acc=evaluate(base_learn, "valid"),
                macs=count_macs(base_model, SHAPE), params=count_params(base_model))
    print(f"baseline: {base} ({time.perf_counter() - t0:.0f}s)", flush=True)
    x = dls.valid.one_batch()[0][:2].as_subclass(torch.Tensor)
    a = analyze_channels(base_model, x)
    groups = select_groups(a, layer_types=(nn.Conv2d,), model=base_model)
    cop_cfg = {k: v for k, v in cfg["cop"].items() if k not in ("alpha", "beta", "gamma", "layer_types")}
    abg = {k: cfg["cop"][k] for k in ("alpha", "beta", "gamma")}
    cop = COP(base_model, analysis=a, layer_types=(nn.Conv2d,), **cop_cfg)
    test_acc_of = lambda m: accuracy_on(m, dls.test)

    for level in cfg["levels"]:
        plan = cop.plan(macs_reduction=level, **abg)
        counts = {g.name: len(plan.get(g.name, [])) for g in groups}
        plans = {"l1": plan_from_scores(l1_scores(base_model, a, groups), counts),
                 "random": plan_from_scores(random_scores(groups, cfg["random_seed"]), counts)}
        plans["l1_uniform"], frac = uniform_l1_plan(base_model, a, level)

        if ("cop", level) not in done and "cop" in methods:
            t = time.perf_counter()
            acc_pruned = test_acc_of(prune_channels(base_model, plan, analysis=a))
            cb = COPCallback(macs_reduction=level, **abg, layer_types=(nn.Conv2d,), **cop_cfg)
            learn = finetune(copy.deepcopy(base_model), dls, cfg, cbs=cb)
            assert cb.plan == plan, "COPCallback chose a different plan from the same weights"
            keep(row("cop", level, learn, base, acc_pruned, t, settings_used=dict(abg)))
        for method in ("l1", "random", "l1_uniform"):
            if (method, level) in done or method not in methods: continue
            t = time.perf_counter()
            pruned = prune_channels(base_model, plans[method], analysis=a)
            acc_pruned = test_acc_of(pruned)
            learn = finetune(pruned, dls, cfg)
            keep(row(method, level, learn, base, acc_pruned, t, **({"uniform_fraction": round(frac, 4)} if method == "l1_uniform" else {})))
        if fcp is not None and ("fcp", level) not in done and "fcp" in methods:
            t = time.perf_counter()
            set_seed(cfg["seed"])
            learn = make_learner(copy.deepcopy(base_model), dls, opt=cfg["opt"])
            f = cfg["fcp"]
            log = fcp(learn, macs_reduction=level, lr=f["lr"], n_pairs=f["n_pairs"],
                      correlate_iters=f["correlate_iters"], finetune_iters=f["finetune_iters"])
            rounds = len(log)
            acc_pruned = test_acc_of(learn.model)
            learn = finetune(learn.model, dls, cfg)
            keep(row("fcp", level, learn, base, acc_pruned, t, rounds=rounds,
                     extra_train_batches=rounds * (f["correlate_iters"] + f["finetune_iters"])))

        if fcp is not None and ("fcp_budget", level) not in done and "fcp_budget" in methods:
            # FCP inside the others' budget: its rounds count against the fine-tuning epochs (as in bench/lenet5_mnist.py)
            t = time.perf_counter()
            set_seed(cfg["seed"])
            learn = make_learner(copy.deepcopy(base_model), dls, opt=cfg["opt"])
            f = FCP_BUDGET
            log = fcp(learn, macs_reduction=level, lr=f["lr"], n_pairs=f["n_pairs"],
                      correlate_iters=f["correlate_iters"], finetune_iters=f["finetune_iters"])
            used = len(log) * (f["correlate_iters"] + f["finetune_iters"])
            rest = max(1, round(cfg["finetune_epochs"] - used / len(dls.train)))
            acc_pruned = test_acc_of(learn.model)
            learn = finetune(learn.model, dls, dict(cfg, finetune_epochs=rest))
            keep(row("fcp_budget", level, learn, base, acc_pruned, t, rounds=len(log), settings_used=f,
                     train_batches=used + rest * len(dls.train)))
        fcp_row = next((r for r in rows if r["method"] == "fcp" and r["level"] == level), None)
        for method in ("l1_fcp", "l1_fcp_long"):
            # L1 at FCP's own filter counts: with the shared budget, and trained as long as FCP was (rounds + fine-tune)
            if not fcp_row or (method, level) in done or method not in methods: continue
            t = time.perf_counter()
            fcp_counts = dict(zip(filter_counts(base_model), map(int, fcp_row["filters"].split("-"))))
            remove = {g.name: g.n_channels - fcp_counts[g.name] for g in groups}
            pruned = prune_channels(base_model, plan_from_scores(l1_scores(base_model, a, groups), remove), analysis=a)
            assert describe_counts(filter_counts(pruned)) == fcp_row["filters"]
            epochs = cfg["finetune_epochs"] + (round(fcp_row["extra_train_batches"] / len(dls.train)) if method == "l1_fcp_long" else 0)
            acc_pruned = test_acc_of(pruned)
            learn = finetune(pruned, dls, dict(cfg, finetune_epochs=epochs))
            keep(row(method, level, learn, base, acc_pruned, t, finetune_epochs=epochs))

    if fcp is None: print("corrprune_edu.fcp is not available: FCP rows were not run", flush=True)
    if args.quick: return
    record_run(args.out, "resnet20_cifar10", rows, dict(cfg, methods=methods, fcp_available=fcp is not None, baseline=base),
               description="ResNet-20 on CIFAR-10 (10k-image training subset, full test set): COP vs FCP, L1 and random "
                           "filter selection at equal MACs from one baseline; 4-epoch fine-tune unless a row says otherwise")
    print(f"recorded {len(rows)} rows in {args.out}; {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
