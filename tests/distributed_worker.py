"""One process of the multi-process runs in `test_distributed.py` (not a test module: pytest does not collect it).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py l1 OUT_DIR
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py fcp,cop,pp OUT_DIR

Trains LeNet-5 (8-16-32) on a small MNIST subset inside `learn.distrib_ctx(cpu=True)` (gloo) and prunes in the
middle of `fit` with a scenario's callback: `l1` cuts once with an L1 plan; `fcp`, `cop` and `pp` run the package's
own callbacks (FCPCallback, COPCallback, PlayAndPruneCallback; `pp_rollback` sets a floor no network reaches, so
every cut is rolled back), `admm` runs `admm_prune` (ADMMCallback, then masked retraining with KeepMaskedCallback) and
`masked` GradualMagnitudeCallback and `fdnp` FDNPCallback (its layers converted to the frequency domain, so a new DDP),
on a briefly pre-trained network, one after the other in the same processes. It writes what the test checks to OUT_DIR/<scenario>_rank<r>.pt. `--fail exit` or
`--fail hang` makes rank 1 exit or hang at the moment of the L1 cut (or right before FCP's first drop), to check that
the other rank fails, not hangs.
"""
import argparse, os, sys, time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate.utils import InitProcessGroupKwargs
from fastai.callback.core import Callback

from corrprune_edu.admm import ADMMCallback, admm_prune
from corrprune_edu.core import set_seed, filter_counts
from corrprune_edu.cop import COPCallback
from corrprune_edu.criteria import l1_plan
from corrprune_edu.data import ArrayDataset, embedded_mnist_dls
from corrprune_edu.distributed import (accuracy_counts, all_reduce_sum, broadcast_object, check_agreement,
                                       distributed_accuracy, gather_objects, on_main_process, prune_learner_distributed,
                                       rank, shared_seed, unwrap_model, world_size)
from corrprune_edu.channels import PruningError
from corrprune_edu.flops import eval_mode
from corrprune_edu.models import lenet5
from corrprune_edu.checkpoint import learner_example, pruning_record
from corrprune_edu.fcp import FCPCallback, fold_pairs
from corrprune_edu.fdnp import DCTConv2d, FDNPCallback
from corrprune_edu.channels import analyze_channels
from corrprune_edu.play_and_prune import AFP, GapController, PlayAndPruneCallback
from corrprune_edu.sparse import GradualMagnitudeCallback
from corrprune_edu.surgery import copy_model, mask_channels
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
        if self.fail and rank() == 1: simulate_failure(self.fail)
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


def simulate_failure(how: str):
    "Rank 1 exits (status 3) or hangs; the other rank must notice by itself"
    print(f"rank 1: simulating a failure ({how})", flush=True)
    if how == "exit": os._exit(3)
    time.sleep(3600)


class FailBeforeDrop(Callback):
    "On rank 1, fail at the batch after which FCP drops its first episode (runs just before FCPCallback)"
    order = FCPCallback.order - 1
    def __init__(self, fcp_cb, how): self.fcp_cb, self.how = fcp_cb, how
    def after_batch(self):
        run = self.fcp_cb.fcp
        if rank() == 1 and run.phase == "correlate" and run.iters + 1 >= run.c_iters: simulate_failure(self.how)


def record(model) -> dict:
    "What rebuilds a network in the test: its weights and its pruning history (replayed on `lenet5(widths=WIDTHS)`)"
    net = unwrap_model(model)
    return dict(state={k: v.detach().clone() for k, v in net.state_dict().items()}, history=pruning_record(net)["history"])


def plain(o):
    "Numbers, strings, lists and dicts only (numpy scalars become Python numbers), so that `weights_only` loading reads it"
    if isinstance(o, dict): return {str(k): plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)): return [plain(v) for v in o]
    return o.item() if hasattr(o, "item") and not isinstance(o, torch.Tensor) else o


def method_log(cb) -> list:
    "The method's own record of its decisions, without wall-clock times (which differ between processes)"
    if isinstance(cb, FCPCallback): rows = cb.fcp.log
    elif isinstance(cb, PlayAndPruneCallback): rows = cb.loop.history
    else: rows = [] if cb.selection is None else cb.selection.to_dict("records") + [cb.summary]
    return plain([{k: v for k, v in r.items() if k != "seconds"} for r in rows])


def baseline_acc(cb):
    "The accuracy the method measured before pruning, as it holds it"
    return cb.fcp.base_acc if isinstance(cb, FCPCallback) else cb.loop.baseline_acc if isinstance(cb, PlayAndPruneCallback) else None


class WatchBefore(Callback):
    "Runs first at every event: the network as the method callback is about to see it"
    order = -20
    def __init__(self, method): self.method, self.pre = method, None
    def before_fit(self): self.initial = record(self.learn.model)
    def _look(self):
        self.pre = dict(record(self.learn.model), net=copy_model(unwrap_model(self.learn.model)), wrapper=self.learn.model,
                        params=[id(p) for p in unwrap_model(self.learn.model).parameters()], x=learner_example(self.learn))
        if isinstance(self.method, FCPCallback): self.pre["fold_x"] = broadcast_object(self.learn.xb[0])   # the batch FCP folds with
    def before_batch(self):
        if self.training: self._look()
    def after_batch(self):
        if self.training: self._look()


class WatchAfter(Callback):
    "Runs last at every event: what the method callback changed (a cut, a rollback) and the accuracies it logged"
    order = 200
    def __init__(self, before): self.before, self.cuts, self.checked, self.last_change, self.n_log = before, [], [], None, 0
    def _look(self):
        pre, net = self.before.pre, unwrap_model(self.learn.model)
        history = getattr(net, "pruning_history", [])
        changed = [id(p) for p in net.parameters()] != pre["params"]
        if changed: self.last_change = record(net)
        measured_on = {k: pre[k] for k in ("state", "history")}             # what the method measured this batch
        if changed and len(history) == len(pre["history"]) + 1:            # a cut (an accepted or a rejected one)
            x, plan = pre["x"], history[-1]["plan"]
            base = pre["net"]
            cb = self.before.method
            if isinstance(cb, FCPCallback) and cb.fcp.fold:                  # FCP folds before it cuts: mask the folded network
                fold_pairs(base, analyze_channels(base, x), cb.fcp.recorded[-1], pre["fold_x"])
            with eval_mode(base): masked = mask_channels(base, plan, x)(x)
            with eval_mode(net): pruned = net(x)
            w, after = self.learn.model, record(net)
            self.cuts.append(dict(iter=self.train_iter, plan=plan, before=measured_on, after=after, masked_out=masked, pruned_out=pruned,
                                  rewrapped=type(w).__name__ == "DistributedDataParallel" and w is not pre["wrapper"] and w.module is net))
            measured_on = after                                               # P&P measures the network right after its cut
        if isinstance(self.before.method, COPCallback): return            # COP logs no accuracy
        log = method_log(self.before.method)
        for row in log[self.n_log:]: self.checked.append(dict(row=row, model=measured_on))
        self.n_log = len(log)
    def before_batch(self):                                                   # COP cuts here
        if self.training: self._look()
    def after_batch(self):                                                    # FCP and Play and Prune cut here
        if self.training: self._look()


SCENARIOS = {"l1": lambda fail: CutWithL1(fail=fail),
             # two rounds of 3 + 3 batches, then 16 batches that fine-tune the final network
             "fcp": lambda fail: FCPCallback(macs_reduction=0.6, tolerance=0.2, n_pairs=2, correlate_iters=3, finetune_iters=3,
                                             max_rounds=2),
             # one cut of half the conv filters, before batch 14 of 28
             "cop": lambda fail: COPCallback(amount=0.5, at=0.5),
             # four phases of 4 batches, then 12 batches that fine-tune the final network
             "pp": lambda fail: PlayAndPruneCallback(tolerance=0.05, controller=GapController(lam=1.0, W=0.9, lam_max=1.0),
                                                     afp=AFP(max_frac=0.3, negligible=0.9), phase_batches=4, max_iters=4),
             # a floor no network reaches (baseline 100%): every cut is rolled back at once, then 16 batches fine-tune
             "pp_rollback": lambda fail: PlayAndPruneCallback(tolerance=0.001, baseline_acc=1.0, recovery_phases=0,
                                                              controller=GapController(lam=1.0, W=0.9, lam_max=1.0),
                                                              afp=AFP(max_frac=0.3, negligible=0.9), phase_batches=4, max_iters=3)}


# The weight-level methods: ADMM (`admm_prune`: ADMMCallback, hard pruning, masked retraining with KeepMaskedCallback)
# and gradual magnitude pruning (GradualMagnitudeCallback), at 80% zeros in every conv and linear weight
SPARSITY = 0.8
WEIGHT_SCENARIOS = ("admm", "masked", "fdnp")
FDNP_EPOCHS, FDNP_STOP = 2, 0.75           # FDNP: dynamic masks during the first 3/4 of a 2-epoch fit, then fixed


class WatchWeights(Callback):
    "Runs after the mask and ADMM callbacks: the network each fit starts from, and at every ADMM update or pruning step"
    order = 200
    def __init__(self): self.starts, self.updates, self.steps = [], [], []
    def before_fit(self):
        net = unwrap_model(self.learn.model)
        self.starts.append(dict(record(net), wrapper=type(self.learn.model).__name__,
                                layers={n: type(m).__name__ for n, m in net.named_children()}))
    def after_batch(self):
        if not self.training: return
        admm = next((c for c in self.cbs if isinstance(c, ADMMCallback)), None)
        if admm is not None and admm.iteration > len(self.updates):     # what the accuracies of this update measured
            self.updates.append(dict(record(self.learn.model), masks=admm.hard_masks(), rho={k: l.rho for k, l in admm.layers.items()},
                                     Z={k: l.Z.clone() for k, l in admm.layers.items()}, U={k: l.U.clone() for k, l in admm.layers.items()}))
    def before_batch(self):                                                 # GradualMagnitudeCallback prunes in its before_batch
        gm = next((c for c in self.cbs if isinstance(c, GradualMagnitudeCallback)), None)
        if self.training and gm is not None and len(gm.log) > len(self.steps):
            self.steps.append(dict(record(self.learn.model), masks={k: m.clone() for k, m in gm.masks.items()}))
        fd = next((c for c in self.cbs if isinstance(c, FDNPCallback)), None)   # FDNP updates its masks in its before_batch
        if self.training and fd is not None and fd.pruner.iteration == fd.pruner.iter_stop and not self.steps:
            self.steps.append(dict(record(self.learn.model), masks={k: m.clone() for k, m in fd.masks.items()}))


def run_weights(scenario: str, args) -> dict:
    "A weight-level method inside `learn.distrib_ctx()`; what this process holds at the end"
    set_seed(0)
    learn = make_learner(lenet5(widths=WIDTHS), small_dls())
    watch = WatchWeights()
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=args.timeout))
    with learn.distrib_ctx(cpu=True, sync_bn=False, kwargs_handlers=[timeout]):
        with quiet(learn):
            learn.fit(1, 3e-3)                                   # from a (briefly) trained network
            learn.add_cb(watch)
            t0 = time.perf_counter()
            if scenario == "admm":                               # two ADMM updates (7 of 14 batches each), one epoch retrained
                res = admm_prune(learn, sparsity=SPARSITY, admm_epochs=1, retrain_epochs=1, lr=3e-3, update_every=7, rho=1e-2)
                out = dict(masks=res.masks, history=plain(res.history.to_dict("records")),
                           acc=[res.valid_acc_pruned, res.valid_acc])
            elif scenario == "masked":                           # four pruning steps in the first half of two epochs
                gm = GradualMagnitudeCallback(sparsity=SPARSITY, end=0.5, n_steps=4)
                learn.fit(2, 3e-3, cbs=gm)
                out = dict(masks=gm.masks, log=plain(gm.log))
            else:                                                # FDNP on the convs: a new DDP over DCT layers, then dynamic masks
                fd = FDNPCallback(sparsity=SPARSITY, iter_stop=FDNP_STOP)
                learn.fit(FDNP_EPOCHS, 3e-3, cbs=fd)
                out = dict(masks=fd.masks, log=plain(fd.log.to_dict("records")), iter_stop=fd.pruner.iter_stop,
                           mask_updates=fd.pruner.updates, acc=distributed_accuracy(learn.model, learn.dls.valid))
                on_main_process(learn.save, args.out/"fdnp_model")   # rank 0 writes, the others wait
            seconds = time.perf_counter() - t0
            learn.remove_cb(watch)
    out.update(rank=rank(), seconds=seconds, state=snapshot(learn.model), opt=opt_state(learn), starts=watch.starts,
               updates=watch.updates, steps=watch.steps, recorder=[[float(v) for v in row] for row in learn.recorder.values])
    print(f"rank {rank()} of {world_size()}: {scenario} done in {seconds:.1f}s", flush=True)
    return out


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


def run(scenario: str, args) -> dict:
    "One scenario's fit inside `learn.distrib_ctx()`; what this process holds at the end"
    set_seed(0)
    learn = make_learner(lenet5(widths=WIDTHS), small_dls())
    cb = SCENARIOS[scenario](args.fail)
    cbs = [cb]
    if args.fail and scenario == "fcp": cbs.append(FailBeforeDrop(cb, args.fail))
    if scenario != "l1": watch = WatchBefore(cb); after = WatchAfter(watch); cbs += [watch, after]
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=args.timeout))
    with learn.distrib_ctx(cpu=True, sync_bn=False, kwargs_handlers=[timeout]):
        with quiet(learn):
            if scenario != "l1": learn.fit(1, 3e-3)          # the package's methods start from a (briefly) trained network
            t0 = time.perf_counter()
            learn.fit(args.epochs, 3e-3, cbs=cbs)
            seconds = time.perf_counter() - t0
            if scenario != "l1": on_main_process(learn.save, args.out/f"{scenario}_model")   # pruning-aware; rank 0 writes, the others wait
    out = dict(rank=rank(), world_size=world_size(), seconds=seconds, state=snapshot(learn.model),
               history=getattr(learn.model, "pruning_history", []), counts=filter_counts(learn.model), opt=opt_state(learn),
               recorder=[[float(v) for v in row] for row in learn.recorder.values])
    if scenario == "l1": out["evidence"] = cb.ev
    else:
        out.update(log=method_log(cb), base_acc=baseline_acc(cb), initial=watch.initial, cuts=after.cuts, checked=after.checked,
                   last_change=after.last_change, final=record(learn.model))
    print(f"rank {rank()} of {world_size()}: {scenario} done in {seconds:.1f}s, filters {filter_counts(learn.model)}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenarios", help=f"comma-separated, from {sorted(SCENARIOS) + list(WEIGHT_SCENARIOS)}")
    ap.add_argument("out", type=Path)
    ap.add_argument("--fail", choices=["exit", "hang"])
    ap.add_argument("--timeout", type=float, default=60, help="seconds a collective waits for the other processes")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    scenarios = args.scenarios.split(",")
    if set(scenarios) - set(SCENARIOS) - set(WEIGHT_SCENARIOS): ap.error(f"unknown scenario(s) {sorted(set(scenarios) - set(SCENARIOS) - set(WEIGHT_SCENARIOS))}")
    if args.fail and scenarios not in (["l1"], ["fcp"]): ap.error("--fail is for the l1 or the fcp scenario alone")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {s: run_weights(s, args) if s in WEIGHT_SCENARIOS else run(s, args) for s in scenarios}
    results[scenarios[0]]["primitives"] = primitives()
    for s, record_ in results.items(): torch.save(record_, args.out/f"{s}_rank{rank()}.pt")


if __name__ == "__main__":
    sys.exit(main())
