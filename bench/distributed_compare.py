#!/usr/bin/env python
"""FCP, COP, Play and Prune, ADMM and FDNP on one process and on two, same configuration: filters or non-zeros, accuracy, wall time.

    python bench/distributed_compare.py                    # 1 and 2 CPU processes (gloo), writes bench/results/distributed_compare.json
    python bench/distributed_compare.py --procs 1,2,4 --methods fcp,pp
    python bench/distributed_compare.py --methods admm,fdnp       # the weight-level methods only (rows of other methods are kept)

Each process count is one `torchrun --standalone` launch of this script in worker mode (`--worker`), which trains
LeNet-5 (20-50-500) on the MNIST subset shipped with the package inside `learn.distrib_ctx(cpu=True)`: a short
pre-training (`fit_one_cycle`), then a `fit` at a constant, lower learning rate with the method's callback (FDNP:
`FDNPCallback` on the convs), except ADMM: `admm_prune` runs its own two one-cycle fits (ADMM, then masked
retraining) with that learning rate as their peak. The global batch is the same for every process count (each
process takes `--global-bs / N` images per step), so every configuration takes the same optimiser steps with the same
learning rate, and the methods' phase lengths (in batches) mean the same steps. Every rank reports a checksum of its
final weights; the driver fails if the ranks of a launch disagree, then records one row per method and process
count. The accuracies are over the whole validation and test splits (all processes together).
"""
import argparse, json, os, subprocess, sys, tempfile, time
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn
from accelerate.utils import InitProcessGroupKwargs

from corrprune_edu.admm import admm_prune
from corrprune_edu.cop import COPCallback
from corrprune_edu.core import describe_counts, filter_counts, set_seed
from corrprune_edu.data import embedded_mnist_dls
from corrprune_edu.distributed import distributed_accuracy, rank, unwrap_model, weights_checksum, world_size
from corrprune_edu.fcp import FCPCallback
from corrprune_edu.fdnp import DCTConv2d, FDNPCallback, to_spatial
from corrprune_edu.flops import count_macs
from corrprune_edu.models import lenet5
from corrprune_edu.play_and_prune import AFP, GapController, PlayAndPruneCallback
from corrprune_edu.results import record_run
from corrprune_edu.sparse import WEIGHT_LAYERS, sparsity_report
from corrprune_edu.train import make_learner, quiet

HERE = Path(__file__).resolve()
RESULTS = HERE.parent/"results"/"distributed_compare.json"
METHODS = ("fcp", "cop", "pp", "admm", "fdnp")

# one configuration per method: the same for every process count
SETTINGS = dict(model="lenet5 (20-50-500)", data="embedded MNIST subset (5400 train / 600 valid / 1000 test)", global_bs=64,
                lr=3e-3, pretrain_epochs=2, prune_lr=1e-3, seed=0,
                fcp=dict(epochs=3, macs_reduction=0.5, tolerance=0.03, n_pairs=4, correlate_iters=20, finetune_iters=40),
                cop=dict(epochs=2, amount=0.5, at=0.25),
                pp=dict(epochs=3, tolerance=0.02, controller=dict(lam=0.1, W=0.9, lam_max=1.0), afp=dict(negligible=0.2),
                        phase_batches=20, max_iters=10),
                admm=dict(epochs=3, sparsity=0.9, admm_epochs=2, retrain_epochs=1, rho=1e-2),   # every conv and fc weight
                fdnp=dict(epochs=3, sparsity=0.9, iter_stop=0.75))                             # the conv layers' DCT coefficients


def make_callback(method: str):
    kw = {k: v for k, v in SETTINGS[method].items() if k != "epochs"}
    if method == "pp": kw.update(controller=GapController(**kw["controller"]), afp=AFP(**kw["afp"]))
    return {"fcp": FCPCallback, "cop": COPCallback, "pp": PlayAndPruneCallback, "fdnp": FDNPCallback}[method](**kw)


def prune(learn, method: str):
    "The method's pruning fit(s) on `learn`, at the configuration's learning rate"
    kw = {k: v for k, v in SETTINGS[method].items() if k != "epochs"}
    if method == "admm": admm_prune(learn, lr=SETTINGS["prune_lr"], **kw)
    else: learn.fit(SETTINGS[method]["epochs"], SETTINGS["prune_lr"], cbs=make_callback(method))


def worker(methods, out: Path):
    "One process of a launch: every method in turn, from the same pre-trained network; writes <out>/rank<r>.json"
    torch.set_num_threads(1)
    n = int(os.environ.get("WORLD_SIZE", "1"))
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=5))
    rows = []
    for method in methods:
        set_seed(SETTINGS["seed"])
        dls = embedded_mnist_dls(bs=SETTINGS["global_bs"] // n, seed=SETTINGS["seed"])
        learn = make_learner(lenet5(), dls)
        base_macs = count_macs(learn.model, (1, 28, 28))
        with learn.distrib_ctx(cpu=True, sync_bn=False, kwargs_handlers=[timeout]):
            with quiet(learn):
                learn.fit_one_cycle(SETTINGS["pretrain_epochs"], SETTINGS["lr"])
                base_acc = distributed_accuracy(learn.model, dls.valid)
                t0 = time.perf_counter()
                prune(learn, method)
                seconds = time.perf_counter() - t0
            valid_acc, test_acc = distributed_accuracy(learn.model, dls.valid), distributed_accuracy(learn.model, dls.test)
        weights = sparsity_report(unwrap_model(learn.model), (*WEIGHT_LAYERS, DCTConv2d)).iloc[-1]   # FDNP's convs: DCT coefficients
        convs = sparsity_report(unwrap_model(learn.model), (nn.Conv2d, DCTConv2d)).iloc[-1]
        net = to_spatial(unwrap_model(learn.model))      # filters and MACs of the network as deployed (FDNP: back to nn.Conv2d)
        rows.append(dict(method=method, processes=world_size(), filters=describe_counts(filter_counts(net)),
                         macs_reduction=1 - count_macs(net, (1, 28, 28)) / base_macs, base_acc=base_acc, valid_acc=valid_acc,
                         test_acc=test_acc, nonzero=int(weights.nonzero), compression=round(float(weights.compression), 2),
                         conv_compression=round(float(convs.compression), 2),
                         fit_seconds=round(seconds, 1), cuts=len(getattr(net, "pruning_history", [])),
                         checksum=weights_checksum(net)))
    out.mkdir(parents=True, exist_ok=True)
    (out/f"rank{rank()}.json").write_text(json.dumps(rows))


def launch(nproc: int, methods, out: Path, timeout: float) -> tuple[list, float]:
    "torchrun this script on `nproc` CPU processes; every rank's rows, and the launch's wall time"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(HERE),
           "--worker", "--methods", ",".join(methods), "--out", str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if done.returncode: raise SystemExit(f"{nproc}-process launch failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return [json.loads((out/f"rank{r}.json").read_text()) for r in range(nproc)], wall


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="1,2", help="process counts to compare, comma-separated")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (worker mode: its folder for per-rank files)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a launch may take")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    methods = args.methods.split(",")
    if set(methods) - set(METHODS): ap.error(f"--methods: choose from {METHODS}")
    if args.worker: return worker(methods, args.out)
    rows = []
    for nproc in (int(p) for p in args.procs.split(",")):
        with tempfile.TemporaryDirectory() as d:
            ranks, wall = launch(nproc, methods, Path(d), args.timeout)
        for k, row in enumerate(ranks[0]):
            same = all(r[k]["checksum"] == row["checksum"] and r[k]["filters"] == row["filters"] for r in ranks)
            if not same: raise SystemExit(f"{row['method']} on {nproc} processes: the ranks ended with different networks: {[r[k] for r in ranks]}")
            rows.append(dict(row, level=f"{nproc} process{'es' if nproc > 1 else ''}", ranks_bitwise_equal=same, launch_wall_seconds=round(wall, 1)))
            print(json.dumps(rows[-1]), flush=True)
    record_run(args.out, "distributed_compare", rows, dict(SETTINGS, threads_per_process=1), replace_on=("method", "processes"),
               description="FCP, COP, Play and Prune, ADMM and FDNP inside fastai's distributed training on 1 and 2 CPU processes "
                           "(gloo), same configuration and global batch: filters kept, MACs removed, non-zero weights, whole-split "
                           "accuracies, fit time")


if __name__ == "__main__":
    sys.exit(main())
