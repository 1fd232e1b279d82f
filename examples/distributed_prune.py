#!/usr/bin/env python
"""Prune a network while it trains on several processes (GPUs or CPU cores), then save it from rank 0.

One process per GPU, on one machine (here 4 GPUs):

    accelerate launch --multi_gpu --num_processes 4 examples/distributed_prune.py

Several machines (2 machines x 4 GPUs; run this on each machine, with its own --machine_rank):

    accelerate launch --multi_gpu --num_machines 2 --num_processes 8 --machine_rank 0 \\
        --main_process_ip 10.0.0.1 --main_process_port 29500 examples/distributed_prune.py

CPU cores, with gloo (`torchrun` starts the processes; `accelerate launch --cpu` would start only one):

    torchrun --standalone --nproc_per_node 2 examples/distributed_prune.py --cpu --data embedded

One process, no launcher: `python examples/distributed_prune.py` (the same code; every collective is skipped).

What it does: LeNet-5 on MNIST, trained with fastai's `fit_one_cycle` inside `learn.distrib_ctx()`; at `--at` of the
training, rank 0 makes an L1 plan (`--amount` of every conv layer's filters), every process receives it, and
`prune_learner_distributed` cuts the network, rebuilds the optimiser with its state and wraps the smaller network
in a new DistributedDataParallel; training goes on. At the end every process holds the same pruned network
(each prints a checksum of its weights), the test accuracy is measured over the whole test set by all processes
together, and rank 0 saves the network with its pruning history (`load_pruned` rebuilds it).

`--method fcp`, `cop` or `pp` prunes with the package's own callbacks instead (FCPCallback, COPCallback,
PlayAndPruneCallback), added to a `fit` that follows the `fit_one_cycle` training: they work inside
`distrib_ctx()` as they are, e.g.

    torchrun --standalone --nproc_per_node 2 examples/distributed_prune.py --cpu --data embedded --method fcp
"""
import argparse, time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate.utils import InitProcessGroupKwargs
from fastai.callback.core import Callback

from corrprune_edu.cop import COPCallback
from corrprune_edu.core import describe_counts, filter_counts, set_seed
from corrprune_edu.criteria import l1_plan
from corrprune_edu.data import get_dls
from corrprune_edu.distributed import (distributed_accuracy, is_main_process, on_main_process, prune_learner_distributed,
                                       rank, unwrap_model, weights_checksum, world_size)
from corrprune_edu.fcp import FCPCallback
from corrprune_edu.models import lenet5
from corrprune_edu.play_and_prune import AFP, GapController, PlayAndPruneCallback
from corrprune_edu.checkpoint import learner_example, save_pruned
from corrprune_edu.train import make_learner, quiet


class PruneOnce(Callback):
    "At the first training batch past `at` of `fit`, remove the `amount` of each conv layer's filters with the smallest L1 norm"
    order = 60
    def __init__(self, at: float = 0.5, amount: float = 0.5): self.at, self.amount, self.done, self.seconds = at, amount, False, None

    def before_batch(self):
        if self.done or not self.training or self.pct_train < self.at: return
        t0 = time.perf_counter()
        x = learner_example(self.learn)
        plan = on_main_process(l1_plan, unwrap_model(self.learn.model), x, amount=self.amount)   # decided once, shared
        prune_learner_distributed(self.learn, plan, x)                                            # same cut everywhere
        self.done, self.seconds = True, time.perf_counter() - t0


# the package's callbacks, as a user adds them to `fit` (any of their arguments works the same on N processes)
METHODS = {"fcp": lambda: FCPCallback(macs_reduction=0.5, tolerance=0.03, n_pairs=4, correlate_iters=20, finetune_iters=40),
           "cop": lambda: COPCallback(amount=0.5, at=0.25),
           "pp": lambda: PlayAndPruneCallback(tolerance=0.02, controller=GapController(lam=0.1, W=0.9, lam_max=1.0),
                                              afp=AFP(negligible=0.2), phase_batches=20, max_iters=10)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["mnist", "embedded"], default="mnist",
                    help="full MNIST from fastai's folder (downloaded if missing: fetch it on each machine first), or the subset inside the package")
    ap.add_argument("--n-per-class", type=int, default=None, help="training images per class (default: all)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bs", type=int, default=64, help="batch size of each process")
    ap.add_argument("--method", choices=["l1", *METHODS], default="l1",
                    help="l1: the PruneOnce callback below, inside fit_one_cycle; fcp, cop, pp: the package's callback in a following fit")
    ap.add_argument("--prune-epochs", type=int, default=3, help="epochs of the fit with the package's callback (--method fcp, cop, pp)")
    ap.add_argument("--prune-lr", type=float, default=1e-3, help="its constant learning rate")
    ap.add_argument("--at", type=float, default=0.5, help="prune at this fraction of training")
    ap.add_argument("--amount", type=float, default=0.5, help="fraction of each conv layer's filters to remove")
    ap.add_argument("--cpu", action="store_true", help="train on CPU cores with gloo (without it, Accelerate uses the GPUs)")
    ap.add_argument("--timeout", type=float, default=10, help="minutes a process waits for the others in a collective")
    ap.add_argument("--save", type=Path, default=Path("lenet5_pruned.pt"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    set_seed(args.seed)                       # every process builds the same data split and the same initial network
    dls = get_dls("mnist_embedded" if args.data == "embedded" else "mnist", n_per_class=args.n_per_class, bs=args.bs, seed=args.seed)
    learn = make_learner(lenet5(), dls, lr=args.lr)
    cb = PruneOnce(args.at, args.amount) if args.method == "l1" else METHODS[args.method]()
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=args.timeout))
    t0 = time.perf_counter()
    # sync_bn=False on CPU: SyncBatchNorm trains on GPUs only (LeNet-5 has no BatchNorm anyway)
    with learn.distrib_ctx(cpu=args.cpu, sync_bn=not args.cpu, kwargs_handlers=[timeout]):
        with quiet(learn):
            if args.method == "l1": learn.fit_one_cycle(args.epochs, args.lr, cbs=cb)
            else:
                learn.fit_one_cycle(args.epochs, args.lr)                         # train, then prune while fine-tuning
                learn.fit(args.prune_epochs, args.prune_lr, cbs=cb)
        seconds = time.perf_counter() - t0
        acc = distributed_accuracy(learn.model, dls.test)          # every process scores its share of the test set
    net = unwrap_model(learn.model)
    print(f"rank {rank()}/{world_size()}: filters {describe_counts(filter_counts(net))}, weights {weights_checksum(net)}, "
          f"fit {seconds:.1f}s" + (f", the cut took {cb.seconds * 1000:.0f} ms" if args.method == "l1" else "") + "\n", end="", flush=True)   # one write: lines of ranks do not mix
    on_main_process(save_pruned, net, args.save)                    # rank 0 writes; the others wait for it
    if is_main_process():
        print(f"{world_size()} process(es): test accuracy {acc:.4f} on {len(dls.test.dataset)} images; saved {args.save}")


if __name__ == "__main__":
    main()
