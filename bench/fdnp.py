#!/usr/bin/env python
"""FDNP against BA-FDNP, its spatial counterpart (dynamic network surgery) and one-shot magnitude pruning, at equal
training budget from one baseline, at several sparsities of the conv layers.

    python bench/fdnp.py lenet5              # LeNet-5 / full MNIST -> bench/results/fdnp_lenet5.json
    python bench/fdnp.py resnet20            # ResNet-20 / CIFAR-10 subset -> bench/results/fdnp_resnet20.json
    python bench/fdnp.py lenet5 --quick      # a smoke test on tiny subsets; writes nothing

Protocol (everything is in SETTINGS, stored with the results):

* one baseline per model. LeNet-5: the package's cached baseline on the full MNIST training set (54,000 images, 6,000
  held out for validation), 3 one-cycle Adam epochs. ResNet-20: a class-balanced 10,000-image subset of the CIFAR-10
  training set (10% held out), pad-crop-flip augmentation, 8 one-cycle Adam epochs (the full set and a longer schedule
  did not fit the CPU budget of a 2-core machine shared by several jobs); its weights are committed in
  `bench/baselines/` so reruns do not retrain it. Accuracies are on the whole 10,000-image test set;
* every method prunes every conv layer (`nn.Conv2d`; linear layers stay dense: they are where FDNP and its spatial
  counterpart would do the same thing) to the target sparsity `level`, and trains for the same one-cycle epochs at the
  same peak learning rate, with the same seed (same batch order);
* FDNP: DNS rule on the DCT coefficients, one threshold per layer; BA-FDNP: the same with band-dependent thresholds
  (`band_rule='linear'`, `spread` below); spatial: the same rule on spatial weights; magnitude: the smallest weights
  masked once (sparse module's `one_shot_magnitude`), then masked retraining. The dynamic methods set their thresholds
  from the target at the first batch and update the masks for the first 75% of the batches;
* measured per row: test accuracy and drop from the baseline (points), conv-layer compression (conv weights or
  coefficients / non-zeros), whole-model compression (conv + linear weights), theoretical speed-up of the conv layers
  with and without the input transform (see `fdnp_costs`), wall time.

Plan as run (December 2026, a 2-core machine shared by three to five jobs; a LeNet-5 row took 7-23 minutes of wall
time, a ResNet-20 row 5-10): LeNet-5 at 90%, 95% and 98% (98% replaced the planned 97%: it separates the methods
more), all four methods; ResNet-20 at 90% and 95%, all four methods (its baseline alone took 55 minutes; the 95% rows
were added in a later session, reusing the committed baseline and the 90% rows). ResNet-20 gets 2 epochs after the
baseline, far short of the paper's budget: every method loses 12-33 points there, so its rows rank the methods, they
do not test the issue's 8x-at-0.5-points goal.

One seed per row (CPU budget): on the 10,000-image test set a difference of 0.1 point is 10 images, within seed noise.
A run resumes from the rows already recorded for the same settings (a partial file in the cache, else the results);
levels can be added without losing the rows already measured.
"""
import argparse, copy, json, time
from pathlib import Path

import torch
from torch import nn

from corrprune_edu.core import cache_dir, set_seed, set_threads, stable_hash
from corrprune_edu.data import get_dls
from corrprune_edu.fdnp import fdnp, fdnp_costs
from corrprune_edu.models import get_model
from corrprune_edu.results import record_run
from corrprune_edu.sparse import one_shot_magnitude
from corrprune_edu.train import cached_baseline, evaluate, make_learner, quiet

BENCH = Path(__file__).parent
METHODS = ("fdnp", "ba_fdnp", "spatial", "magnitude")
SETTINGS = {
    "lenet5": dict(model="lenet5", dataset="mnist", shape=(1, 28, 28), n_per_class=None, n_test_per_class=None,
                   valid_pct=0.1, bs=128, opt="adam", base_epochs=3, seed=0, threads=1, epochs=3, lr=1e-3,
                   levels=[0.9, 0.95, 0.98], spread=1.0, iter_stop=0.75),
    "resnet20": dict(model="resnet20", dataset="cifar10", shape=(3, 32, 32), n_per_class=1000, n_test_per_class=None,
                     valid_pct=0.1, bs=128, opt="adam", base_epochs=8, seed=0, threads=1, epochs=2, lr=1e-3,
                     levels=[0.9, 0.95], spread=1.0, iter_stop=0.75,
                     committed_baseline="bench/baselines/resnet20_cifar10_1k.pt"),
}
QUICK = dict(n_per_class=50, n_test_per_class=20, base_epochs=1, epochs=1, levels=[0.9], committed_baseline=None)


def baseline(cfg):
    "The trained baseline learner: from the committed weights if there are any, else cached_baseline (trained once)"
    data = dict(n_per_class=cfg["n_per_class"], n_test_per_class=cfg["n_test_per_class"], valid_pct=cfg["valid_pct"],
                bs=cfg["bs"], seed=cfg["seed"])
    path = cfg.get("committed_baseline") and Path(cfg["committed_baseline"])
    if path and path.exists():
        saved = torch.load(path, weights_only=True, map_location="cpu")
        set_seed(cfg["seed"])
        dls = get_dls(cfg["dataset"], **data)
        learn = make_learner(get_model(cfg["model"]), dls, opt=cfg["opt"])
        learn.model.load_state_dict(saved["state_dict"]); learn.baseline = saved["meta"]
        return learn
    set_seed(cfg["seed"])
    learn = cached_baseline(cfg["model"], cfg["dataset"], epochs=cfg["base_epochs"], opt=cfg["opt"], **data)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in learn.baseline.items() if k != "path"}
        torch.save(dict(state_dict=learn.model.state_dict(), meta=meta), path)
    return learn


def prune(method, level, base_model, dls, cfg):
    "Prune a copy of the baseline with one method at one sparsity, within the shared budget; returns the learner"
    set_seed(cfg["seed"] + 1)
    learn = make_learner(copy.deepcopy(base_model), dls, opt=cfg["opt"])
    common = dict(sparsity=level, iter_stop=cfg["iter_stop"])
    if method == "fdnp": fdnp(learn, cfg["epochs"], cfg["lr"], **common)
    elif method == "ba_fdnp": fdnp(learn, cfg["epochs"], cfg["lr"], band_rule="linear", spread=cfg["spread"], **common)
    elif method == "spatial": fdnp(learn, cfg["epochs"], cfg["lr"], domain="spatial", **common)
    elif method == "magnitude":
        convs = [n for n, m in base_model.named_modules() if isinstance(m, nn.Conv2d)]
        with quiet(learn): one_shot_magnitude(learn, cfg["epochs"], sparsity={n: level for n in convs}, lr=cfg["lr"])
    else: raise ValueError(f"unknown method {method!r}: choose from {METHODS}")
    return learn


def measure(method, level, learn, base, cfg, seconds):
    costs = fdnp_costs(learn.model, cfg["shape"])
    conv = costs[costs.layer.isin(base["convs"])]
    total = costs.iloc[-1]
    acc = evaluate(learn, "test")
    return dict(method=method, level=level, epochs=cfg["epochs"], base_acc=base["test_acc"], test_acc=acc,
                drop_pts=round(100 * (base["test_acc"] - acc), 2), valid_acc=evaluate(learn, "valid"),
                conv_weights=int(conv.weights.sum()), conv_nonzero=int(conv.nonzero.sum()),
                conv_compression=float(conv.weights.sum() / max(1, conv.nonzero.sum())), compression=float(total.compression),
                conv_speedup_without_transform=float(conv.dense_macs.sum() / max(1, conv.nonzero_macs.sum())),
                conv_speedup=float(conv.dense_macs.sum() / max(1, (conv.nonzero_macs + conv.transform_macs).sum())),
                seconds=round(seconds, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=sorted(SETTINGS))
    ap.add_argument("--quick", action="store_true", help="tiny smoke run; nothing is recorded")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    args = ap.parse_args()
    cfg = dict(SETTINGS[args.model], **(QUICK if args.quick else {}))
    set_threads(cfg["threads"])
    out = BENCH / "results" / f"fdnp_{args.model}.json"
    key = stable_hash({k: v for k, v in cfg.items() if k != "levels"})   # rows are per level: adding one resumes
    partial = cache_dir("bench") / f"fdnp_{args.model}_{key}.json"
    rows = json.loads(partial.read_text()) if partial.exists() and not args.quick else []
    if not rows and out.exists() and not args.quick and json.loads(out.read_text()).get("settings", {}).get("key") == key:
        rows = [{k: v for k, v in r.items() if k != "run"} for r in json.loads(out.read_text())["rows"]]
    done = {(r["method"], r["level"]) for r in rows}

    t0 = time.perf_counter()
    base_learn = baseline(cfg)
    base_model, dls = base_learn.model.eval(), base_learn.dls
    base = dict(test_acc=evaluate(base_learn, "test"), valid_acc=evaluate(base_learn, "valid"),
                convs=[n for n, m in base_model.named_modules() if isinstance(m, nn.Conv2d)])
    print(f"baseline {args.model}: test {base['test_acc']:.4f}, valid {base['valid_acc']:.4f} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    for level in cfg["levels"]:
        for method in args.methods.split(","):
            if (method, level) in done: continue
            t = time.perf_counter()
            learn = prune(method, level, base_model, dls, cfg)
            r = measure(method, level, learn, base, cfg, time.perf_counter() - t)
            rows.append(r)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
            if not args.quick: partial.write_text(json.dumps(rows))
    if args.quick: return
    settings = dict(cfg, key=key, baseline=dict(test_acc=base["test_acc"], valid_acc=base["valid_acc"],
                                               train_seconds=base_learn.baseline.get("train_seconds")))
    rows = [r for r in rows if r["level"] in cfg["levels"]]
    record_run(out, f"fdnp_{args.model}", rows, settings,
               description=f"FDNP, BA-FDNP, spatial dynamic pruning and one-shot magnitude pruning of {args.model}'s "
                           f"conv layers at equal budget\n" + __doc__)
    print(f"recorded {len(rows)} rows in {out} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
