"""One process of the multi-process runs in `test_distributed.py` (not a test module: pytest does not collect it).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py l1 OUT_DIR

Trains LeNet-5 (8-16-32) on a small MNIST subset inside `learn.distrib_ctx(cpu=True)` (gloo), prunes once in the
middle of `fit` with a scenario's callback, and writes what the test checks to OUT_DIR/rank<r>.pt. `--fail exit` or
`--fail hang` makes rank 1 exit or hang at the moment of the cut, to check that the other rank fails, not hangs.
"""
import argparse, os, sys, time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate.utils import InitProcessGroupKwargs
from fastai.callback.core import Callback

from corrprune_edu.core import set_seed, filter_counts
from corrprune_edu.criteria import l1_plan
from corrprune_edu.data import ArrayDataset, embedded_mnist_dls
from corrprune_edu.distributed import (accuracy_counts, all_reduce_sum, broadcast_object, check_agreement,
                                       distributed_accuracy, gather_objects, on_main_process, prune_learner_distributed,
                                       rank, shared_seed, unwrap_model, world_size)
from corrprune_edu.channels import PruningError
from corrprune_edu.flops import eval_mode
from corrprune_edu.models import lenet5
from corrprune_edu.checkpoint import learner_example
from corrprune_edu.surgery import mask_channels
from corrprune_edu.train import make_learner, quiet

WIDTHS = (8, 16, 32)
N_VALID = 45        # odd: two processes see it padded to 46, the repeat must not be counted


def small_dls():
    "450 training images in batches of 16 (14 per process and epoch on two processes); 45 validation images"
    dls = embedded_mnist_dls(n_per_class=50, n_test_per_class=10, bs=16, seed=0)
    v = dls.valid.dataset
    dls.loaders[1] = dls.valid.new(dataset=ArrayDataset(v.x[:N_VALID], v.y[:N_VALID]), bs=16)
    return dls


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in unwrap_model(model).named_parameters()}


class CutWithL1(Callback):
    "Prune once at the first training batch past `at`, with an L1 plan made on rank 0; keeps evidence for the test"
    order = 60
    def __init__(self, at=0.5, amount=0.5, fail=None): self.at, self.amount, self.fail, self.ev = at, amount, fail, {}

    def before_batch(self):
        if self.ev or not self.training or self.pct_train < self.at: return
        ev = self.ev
        if self.fail and rank() == 1:
            print(f"rank 1: simulating a failure ({self.fail}) at the cut", flush=True)
            if self.fail == "exit": os._exit(3)
            time.sleep(3600)
        x = learner_example(self.learn)
        bare = unwrap_model(self.learn.model)
        ev.update(wrapper=type(self.learn.model).__name__, labels=self.learn.yb[0].tolist(), iter=self.iter,
                  epoch=self.epoch, before_cut=snapshot(bare),
                  acc_before=distributed_accuracy(self.learn.model, self.dls.valid))
        plan = on_main_process(l1_plan, bare, x, amount=self.amount)
        with eval_mode(bare): ev["masked_out"] = mask_channels(bare, plan, x)(x)
        old = self.learn.model
        ev["info"] = prune_learner_distributed(self.learn, plan, x)
        new = unwrap_model(self.learn.model)
        with eval_mode(new): ev["pruned_out"] = new(x)
        ev.update(plan=plan, rewrapped=type(self.learn.model).__name__ == "DistributedDataParallel" and self.learn.model is not old
                  and self.learn.model.module is new, after_cut=snapshot(new),
                  acc_after=distributed_accuracy(self.learn.model, self.dls.valid),
                  own_counts=accuracy_counts(self.learn.model, self.dls.valid))


SCENARIOS = {"l1": lambda fail: CutWithL1(fail=fail)}


def primitives() -> dict:
    "Each primitive once, with values that differ by rank; the test checks what every rank got"
    r, got = rank(), {}
    got["sum"] = all_reduce_sum(r + 1, 0.5, torch.full((2,), float(r)), torch.tensor([r, 2 * r]))
    got["broadcast"] = broadcast_object({"from": r}, src=1)
    got["gather"] = gather_objects(r)
    got["seed"] = shared_seed()
    for name, call in [("agreement", lambda: check_agreement({"conv1": [r]}, "a plan that differs")),
                       ("main_fails", lambda: on_main_process(lambda: 1 / 0))]:
        try: call(); got[name] = "no error"
        except (PruningError, ZeroDivisionError, RuntimeError) as e: got[name] = f"{type(e).__name__}: {e}"
    return got


def opt_state(learn) -> dict:
    "The optimiser's per-parameter state, keyed by parameter name"
    names = {id(p): n for n, p in learn.model.named_parameters()}
    return {names[id(p)]: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for p, s in learn.opt.state.items() if id(p) in names}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--fail", choices=["exit", "hang"])
    ap.add_argument("--timeout", type=float, default=60, help="seconds a collective waits for the other processes")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    set_seed(0)
    learn = make_learner(lenet5(widths=WIDTHS), small_dls())
    cb = SCENARIOS[args.scenario](args.fail)
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=args.timeout))
    t0 = time.perf_counter()
    with learn.distrib_ctx(cpu=True, sync_bn=False, kwargs_handlers=[timeout]):
        with quiet(learn): learn.fit(args.epochs, 3e-3, cbs=cb)
    seconds = time.perf_counter() - t0
    record = dict(primitives=primitives(), rank=rank(), world_size=world_size(), seconds=seconds, state=snapshot(learn.model),
                  history=learn.model.pruning_history, counts=filter_counts(learn.model), opt=opt_state(learn),
                  recorder=[[float(v) for v in row] for row in learn.recorder.values], evidence=cb.ev)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(record, args.out/f"rank{rank()}.pt")
    print(f"rank {rank()} of {world_size()}: done in {seconds:.1f}s, filters {filter_counts(learn.model)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
