"""Pruning inside fastai's distributed training, with real processes: torchrun, gloo on CPU, 2 ranks.

One torchrun launch of `distributed_worker.py` on two processes runs its scenarios one after the other (an L1 cut
made by hand, the package's FCPCallback, COPCallback and PlayAndPruneCallback, then the weight-level `admm_prune`,
GradualMagnitudeCallback and FDNPCallback), bounded by a timeout (the whole process group is killed if it is exceeded). The tests check what the ranks wrote: they end bitwise equal (weights,
pruning history, optimiser state, the method's own log), every cut is exact and re-wrapped in a new DDP, training
after the last cut or rollback moves every remaining weight, and the accuracy every decision saw is that of the
whole validation split (not a rank's shard). Further launches by hand check that a failed rank fails the other.
"""
import os, re, signal, socket, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from distributed_worker import FDNP_EPOCHS, FDNP_STOP, SPARSITY, WIDTHS, N_VALID, WEIGHT_SCENARIOS, small_dls
from corrprune_edu.checkpoint import replay_pruning
from corrprune_edu.cop import COP, plan_from_selection
from corrprune_edu.core import filter_counts
from corrprune_edu.fdnp import to_frequency, to_spatial
from corrprune_edu.models import lenet5
from corrprune_edu.sparse import apply_masks, keep_counts, maskable_weights
from corrprune_edu.surgery import prune_channels
from corrprune_edu.train import accuracy_on as accuracy_any_threads, make_learner

WORKER = Path(__file__).with_name("distributed_worker.py")


def accuracy_on(model, dl) -> float:
    "Accuracy as the workers compute it, with one thread, so that the same sums decide each prediction here and there"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try: return accuracy_any_threads(model, dl)
    finally: torch.set_num_threads(threads)


def _start(cmd, log: Path, **env):
    "Start `cmd` in its own session (so it can be killed with its children), its output going to `log`"
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env})


def _finish(procs, logs, timeout, kill_rest=False):
    "Wait for the processes in order (with `kill_rest`, stop the others once the first has exited); past `timeout`, kill all and fail"
    deadline = time.monotonic() + timeout
    for i, p in enumerate(procs):
        if i and kill_rest and p.poll() is None: os.killpg(p.pid, signal.SIGKILL)
        try: p.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None: os.killpg(q.pid, signal.SIGKILL)
            tails = "\n".join(log.read_text()[-3000:] for log in logs)
            pytest.fail(f"the distributed run did not finish within {timeout}s (processes killed):\n{tails}")
    return [p.returncode for p in procs], [log.read_text() for log in logs]


def torchrun(args, log_dir: Path, nproc=2, timeout=240):
    "Launch the worker as users do, with torchrun; returns (exit code, output)"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), *args]
    log = log_dir/"torchrun.log"
    (rc,), (out,) = _finish([_start(cmd, log)], [log], timeout)
    return rc, out


def by_hand(args, log_dir: Path, nproc=2, timeout=240, kill_rest=False):
    "Launch each rank as its own process, with no launcher watching them: a rank must notice a failure by itself"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    logs = [log_dir/f"rank{r}.log" for r in range(nproc)]
    procs = [_start([sys.executable, str(WORKER), *args], logs[r], RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                    LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) for r in range(nproc)]
    return _finish(procs, logs, timeout, kill_rest)


def load_ranks(out, scenario, n=2):
    return [torch.load(out/f"{scenario}_rank{r}.pt", weights_only=True) for r in range(n)]


def assert_same(a, b, what):
    "Bitwise equality of two nested structures of tensors, numbers, strings"
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), f"{what} differs between ranks"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{what}: keys differ between ranks"
        for k in a: assert_same(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{what}: lengths differ between ranks"
        for i, (x, y) in enumerate(zip(a, b)): assert_same(x, y, f"{what}[{i}]")
    else: assert a == b, f"{what}: {a!r} != {b!r}"


SCENARIOS = ("l1", "fcp", "cop", "pp", "pp_rollback", *WEIGHT_SCENARIOS)
METHODS = ("fcp", "cop", "pp", "pp_rollback")
PRUNED = ("fcp", "cop", "pp")                                  # pp_rollback ends with the unpruned network


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "Every scenario, in one 2-process torchrun launch: {scenario: [rank 0's record, rank 1's record]}"
    out = tmp_path_factory.mktemp("runs")
    t0 = time.perf_counter()
    rc, log = torchrun([",".join(SCENARIOS), str(out)], out)
    assert rc == 0, f"torchrun failed (exit {rc}):\n{log[-5000:]}"
    ranks = {s: load_ranks(out, s) for s in SCENARIOS}
    for s in (*METHODS, "fdnp"): ranks[s][0]["saved"] = out/f"{s}_model"  # learn.save / learn.load add ".pth"
    fits = ", ".join(f"{s} {ranks[s][0]['seconds']:.1f}s" for s in SCENARIOS)
    print(f"\n2-process launch of {'/'.join(SCENARIOS)}: {time.perf_counter() - t0:.1f}s wall with start-up; fits: {fits}")
    return ranks


@pytest.fixture(scope="module")
def l1_run(runs): return runs["l1"]


def test_l1_ranks_end_bitwise_equal(l1_run):
    r0, r1 = l1_run
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    assert r0["evidence"]["wrapper"] == "DistributedDataParallel"
    assert r0["evidence"]["labels"] != r1["evidence"]["labels"], "both ranks trained on the same batch: data not sharded"
    for key in ("state", "history", "counts", "opt", "recorder"): assert_same(r0[key], r1[key], key)
    for key in ("plan", "before_cut", "after_cut", "acc_before", "acc_after"):
        assert_same(r0["evidence"][key], r1["evidence"][key], key)


def test_l1_cut_is_exact_and_rewrapped(l1_run):
    for r in l1_run:
        ev = r["evidence"]
        assert ev["rewrapped"], "after surgery the model must be in a new DDP around the pruned network"
        assert ev["plan"] and r["counts"] == {"conv1": WIDTHS[0] // 2, "conv2": WIDTHS[1] // 2, "fc1": WIDTHS[2], "fc2": 10}
        assert len(r["history"]) == 1 and r["history"][0]["plan"] == ev["plan"]
        assert ev["info"]["params_after"] < ev["info"]["params_before"]
        torch.testing.assert_close(ev["pruned_out"], ev["masked_out"], atol=1e-5, rtol=1e-5)
        assert ev["epoch"] == 1, "the cut is half-way through a 2-epoch fit"


def test_l1_training_after_the_cut_moves_every_weight(l1_run):
    for r in l1_run:
        cut, end = r["evidence"]["after_cut"], r["state"]
        assert cut.keys() == end.keys()
        for name in cut:
            assert cut[name].shape == end[name].shape
            assert (cut[name] != end[name]).all(), f"rank {r['rank']}: '{name}' has weights training did not move after the cut"
        assert set(r["opt"]) == set(end), "the optimiser must hold state for every pruned parameter"


def _model(params, plan=None):
    net = lenet5(widths=WIDTHS)
    if plan: net = prune_channels(net, plan, (1, 28, 28))
    net.load_state_dict(params)
    return net


def _rebuilt(rec):
    "The network a worker recorded (weights and pruning history), rebuilt in this process"
    net = replay_pruning(lenet5(widths=WIDTHS), rec["history"])
    net.load_state_dict(rec["state"])
    return net


def test_l1_accuracy_is_over_the_whole_split(l1_run):
    valid = small_dls().valid
    assert len(valid.dataset) == N_VALID and N_VALID % 2 == 1
    for r in l1_run:
        ev = r["evidence"]
        assert ev["acc_before"] == accuracy_on(_model(ev["before_cut"]), valid)
        assert ev["acc_after"] == accuracy_on(_model(ev["after_cut"], ev["plan"]), valid)
    seen = [r["evidence"]["own_counts"][1] for r in l1_run]
    assert seen == [(N_VALID + 1) // 2, N_VALID // 2], "each validation image counted once, the padding repeat not at all"
    correct = sum(r["evidence"]["own_counts"][0] for r in l1_run)
    assert correct / N_VALID == l1_run[0]["evidence"]["acc_after"]


def test_primitives_on_two_processes(l1_run):
    got = [r["primitives"] for r in l1_run]
    for g in got:
        assert_same(g["sum"], (3, 1.0, torch.ones(2), torch.tensor([1, 2])), "all_reduce_sum")
        assert g["broadcast"] == {"from": 1} and g["gather"] == [0, 1]
        assert g["agreement"].startswith("PruningError: the processes disagree on a plan that differs: rank(s) [1]")
    assert got[0]["seed"] == got[1]["seed"]
    assert got[0]["main_fails"].startswith("ZeroDivisionError")
    assert got[1]["main_fails"].startswith("RuntimeError") and "ZeroDivisionError" in got[1]["main_fails"]


EXITED, HUNG = r"Connection (closed|reset) by peer|Broken pipe", r"(?i)timed out"

@pytest.mark.parametrize("scenario,fail,message", [("l1", "exit", EXITED), ("l1", "hang", HUNG), ("fcp", "exit", EXITED)],
                         ids=["l1-exit", "l1-hang", "fcp-exit"])
def test_a_failed_rank_fails_the_other(tmp_path, scenario, fail, message):
    "Rank 1 exits (or hangs) at the cut (FCP: right before its first drop); rank 0, with no launcher to stop it, must exit with an error on its own"
    t0 = time.perf_counter()
    rcs, outs = by_hand([scenario, str(tmp_path), "--fail", fail, "--timeout", "10"], tmp_path, timeout=150, kill_rest=True)
    assert rcs[0] != 0, f"rank 0 finished although rank 1 {'exited' if fail == 'exit' else 'hung'}:\n{outs[0][-3000:]}"
    assert re.search(message, outs[0]), f"rank 0 failed for another reason:\n{outs[0][-3000:]}"
    assert rcs[1] == (3 if fail == "exit" else -signal.SIGKILL)
    assert not list(tmp_path.glob("*rank*.pt"))
    print(f"\n{scenario}, rank 1 {fail}: rank 0 failed after {time.perf_counter() - t0:.1f}s")


# The package's own structured callbacks: FCPCallback, COPCallback, PlayAndPruneCallback

@pytest.mark.parametrize("method", METHODS)
def test_method_ranks_end_bitwise_equal(runs, method):
    r0, r1 = runs[method]
    for key in ("state", "history", "counts", "opt", "recorder", "log", "base_acc", "initial", "checked", "last_change"):
        assert_same(r0[key], r1[key], f"{method}: {key}")
    own_batch = ("masked_out", "pruned_out")                   # outputs on each rank's own batch: those differ
    assert_same(*[[{k: v for k, v in c.items() if k not in own_batch} for c in r["cuts"]] for r in (r0, r1)], f"{method}: cuts")


@pytest.mark.parametrize("method", PRUNED)
def test_method_cuts_are_exact_and_rewrapped(runs, method):
    for r in runs[method]:
        cuts, final = r["cuts"], r["final"]
        assert cuts, f"{method} made no cut in this configuration: the test checks nothing"
        if method == "cop": assert len(cuts) == 1
        for c in cuts:
            assert c["rewrapped"], f"{method}: after the cut at batch {c['iter']} the model must be in a new DDP around the pruned network"
            torch.testing.assert_close(c["pruned_out"], c["masked_out"], atol=1e-5, rtol=1e-5)
            assert c["after"]["history"][-1]["plan"] == c["plan"]
        assert [h["plan"] for h in final["history"]] == [h["plan"] for h in r["history"]] and len(final["history"]) >= 1
        assert sum(r["counts"].values()) < sum(filter_counts(lenet5(widths=WIDTHS)).values())
        assert filter_counts(_rebuilt(final)) == r["counts"]


@pytest.mark.parametrize("method", PRUNED)       # (pp_rollback discards its fine-tuning too: below the floor it cannot reach)
def test_method_training_after_the_last_change_moves_every_weight(runs, method):
    for r in runs[method]:
        last, end = r["last_change"], r["final"]
        assert last is not None and last["history"] == end["history"]
        for name, w in last["state"].items():
            assert w.shape == end["state"][name].shape
            assert (w != end["state"][name]).all(), f"{method}, rank {r['rank']}: training did not move all of '{name}' after the last change"
        assert set(r["opt"]) == {n for n, _ in _rebuilt(end).named_parameters()}, "the optimiser must hold state for every parameter"


@pytest.mark.parametrize("method", METHODS)
def test_method_rank0_saves_a_pruned_learner_file(runs, method):
    "rank 0's `learn.save` (through `on_main_process`) loads into a fresh Learner: same shape, same weights as every rank's"
    learn = make_learner(lenet5(widths=WIDTHS), small_dls())
    learn.load(runs[method][0]["saved"])
    assert filter_counts(learn.model) == runs[method][0]["counts"]
    assert_same({n: p.detach() for n, p in learn.model.named_parameters()}, runs[method][1]["state"], f"{method}: loaded file")


def _accuracy(rec, valid): return accuracy_on(_rebuilt(rec), valid)


@pytest.mark.parametrize("method", ["fcp", "pp", "pp_rollback"])
def test_method_decides_on_whole_split_accuracy(runs, method):
    "Every accuracy the method decided with is k/45 of the whole split (a rank's shard of 23 or 22 images could not give it)"
    valid = small_dls().valid
    r = runs[method][0]
    if method != "pp_rollback": assert r["base_acc"] == _accuracy(r["initial"], valid)   # (pp_rollback is given its baseline)
    if method == "fcp":
        rows = r["log"]
        assert len(rows) == len(r["cuts"]) == len(r["checked"]) >= 1, "FCP logs one row per round, and each round cut once"
        for row, cut, seen in zip(rows, r["cuts"], r["checked"]):
            assert row["acc_before_drop"] == _accuracy(cut["before"], valid)
            assert row["acc_after_drop"] == _accuracy(cut["after"], valid)
            assert seen["row"] == row and row["acc_after_finetune"] == _accuracy(seen["model"], valid)
    else:
        # a rolled-back cut is measured on a network that is gone before the watcher can see it: check the others
        measured = [c for c in r["checked"] if c["row"]["outcome"] in ("accepted", "recovering", "recovered")
                    or c["row"]["outcome"] == "rolled back" and c["row"]["removed"] == 0]
        assert len(measured) >= 2
        for c in measured: assert c["row"]["acc"] == _accuracy(c["model"], valid), c["row"]


def test_cop_decision_is_cops_own(runs):
    "The plan rank 0 decided and every rank applied is the one COP makes from the same network in one process"
    cut = runs["cop"][0]["cuts"][0]
    net = _rebuilt(cut["before"])
    selection = COP(net, (1, 28, 28)).select(amount=0.5, alpha=1.0, beta=0.0, gamma=0.0, min_channels=1)   # COPCallback's settings
    assert {k: sorted(int(i) for i in v) for k, v in plan_from_selection(selection).items()} == cut["plan"]


def test_pp_rollbacks_restore_identically(runs):
    "Every cut rolled back, on both ranks alike: the run ends with the unpruned network, trained on"
    r0, r1 = runs["pp_rollback"]
    outcomes = [row["outcome"] for row in r0["log"]]
    assert "rolled back" in outcomes and "accepted" not in outcomes, outcomes
    assert any(row["removed"] for row in r0["log"] if row["outcome"] == "rolled back"), "no rolled-back row had cut anything"
    assert r0["history"] == [] and r0["counts"] == filter_counts(lenet5(widths=WIDTHS))
    assert_same(r0["state"], r1["state"], "weights after the rollbacks")


# The weight-level methods: `admm_prune` (ADMMCallback, hard pruning, masked retraining with KeepMaskedCallback) and
# GradualMagnitudeCallback, both to 80% zeros in every conv and linear weight

def _dense(state, frequency: bool = False):
    "The test's LeNet-5 holding `state` (with `frequency`, its convs as FDNP's DCT layers)"
    net = to_frequency(lenet5(widths=WIDTHS)) if frequency else lenet5(widths=WIDTHS)
    net.load_state_dict(state)
    return net


EXACT = ("admm", "masked")                                     # FDNP's masks are dynamic: no exact per-layer target


@pytest.mark.parametrize("method", WEIGHT_SCENARIOS)
def test_weights_ranks_end_bitwise_equal(runs, method):
    "Weights, masks, optimiser state, the method's log, and every ADMM update's network, Z, U, rho and hard masks"
    r0, r1 = runs[method]
    ran = {"admm": len(r0["updates"]) == 2, "masked": len(r0["steps"]) == 4, "fdnp": len(r0["steps"]) == 1 and r0["mask_updates"] > 0}
    assert ran[method], "nothing to compare: the method did not run"
    for key in sorted(set(r0) - {"rank", "seconds", "primitives", "saved"}): assert_same(r0[key], r1[key], f"{method}: {key}")


@pytest.mark.parametrize("method", EXACT)
def test_weights_nonzeros_are_the_targets(runs, method):
    targets = keep_counts(maskable_weights(lenet5(widths=WIDTHS)), SPARSITY)
    for r in runs[method]:
        assert {k: int(m.sum()) for k, m in r["masks"].items()} == targets
        for k, m in r["masks"].items():
            assert torch.equal(r["state"][k] != 0, m), f"{method}, rank {r['rank']}: '{k}' is not zero exactly where its mask is"
        for u in r["updates"]:                                              # ADMM's Z is projected onto the targets
            assert {k: int(torch.count_nonzero(z)) for k, z in u["Z"].items()} == targets


def test_admm_records_whole_split_accuracy(runs):
    "Every accuracy in ADMM's history is that of the network at that update (and hard-pruned) on all 45 images"
    valid = small_dls().valid
    r = runs["admm"][0]
    assert sorted({row["iteration"] for row in r["history"]}) == [1, 2] == list(range(1, len(r["updates"]) + 1))
    for i, u in enumerate(r["updates"], 1):
        net = _dense(u["state"])
        want = (accuracy_on(net, valid), accuracy_on(apply_masks(net, u["masks"]), valid))
        assert {(row["valid_acc"], row["valid_acc_pruned"]) for row in r["history"] if row["iteration"] == i} == {want}
    assert r["acc"] == [accuracy_on(_dense(r["starts"][1]["state"]), valid), accuracy_on(_dense(r["state"]), valid)]


@pytest.mark.parametrize("method", EXACT)
def test_weights_training_moves_every_kept_weight(runs, method):
    "After the hard pruning (ADMM) or the last pruning step (gradual), training moves every kept weight; masked ones stay zero"
    for r in runs[method]:
        last = r["starts"][1] if method == "admm" else r["steps"][-1]
        if method == "masked": assert_same(last["masks"], r["masks"], "masks after the last step")
        assert last["state"].keys() == r["state"].keys() and set(r["opt"]) == set(r["state"])
        assert r["masks"].keys() == {k for k in r["state"] if k.endswith(".weight")}
        for k, m in r["masks"].items():
            w, end = last["state"][k], r["state"][k]
            assert (w[~m] == 0).all() and (end[~m] == 0).all(), f"{method}, rank {r['rank']}: masked weights of '{k}' moved"
            assert (w[m] != end[m]).all(), f"{method}, rank {r['rank']}: training did not move all kept weights of '{k}'"
        # (a bias is not decayed: one of a ReLU unit that no image switches on at 80% zeros can stay still)
        for k in r["state"].keys() - r["masks"].keys(): assert (last["state"][k] != r["state"][k]).any(), f"'{k}' did not train"


# FDNP (FDNPCallback on the convs): the conversion to DCT layers replaces the parameters, so a new DDP; then dynamic masks

def test_fdnp_converts_the_bare_network_and_rewraps(runs):
    "The fit trains DCT layers inside a new DDP; the mask schedule counts this process's batches (14 per epoch), not 28"
    per_process = -(-len(small_dls().train) // 2)
    for r in runs["fdnp"]:
        start = r["starts"][0]
        assert start["wrapper"] == "DistributedDataParallel", "the converted network is not wrapped in DDP"
        assert (start["layers"]["conv1"], start["layers"]["conv2"], start["layers"]["fc1"]) == ("DCTConv2d", "DCTConv2d", "Linear")
        assert r["iter_stop"] == round(FDNP_STOP * FDNP_EPOCHS * per_process) == 21
        assert 0 < r["mask_updates"] <= r["iter_stop"]
        assert [row["iteration"] for row in r["log"]] == [per_process, 2 * per_process]


def test_fdnp_masks_hold_and_kept_coefficients_train(runs):
    "After the last mask update, pruned coefficients stay exactly zero and training moves every kept one"
    for r in runs["fdnp"]:
        last = r["steps"][0]
        assert r["masks"].keys() == {"conv1.coef", "conv2.coef"}
        assert_same(last["masks"], r["masks"], "masks after the last update")
        for k, m in r["masks"].items():
            w, end = last["state"][k], r["state"][k]
            assert (w[~m] == 0).all() and (end[~m] == 0).all(), f"rank {r['rank']}: pruned coefficients of '{k}' moved"
            assert (w[m] != end[m]).all(), f"rank {r['rank']}: training did not move all kept coefficients of '{k}'"
        kept = sum(int(m.sum()) for m in r["masks"].values()) / sum(m.numel() for m in r["masks"].values())
        assert 0.05 < kept < 0.5, f"{kept:.1%} of the conv coefficients kept: FDNP did not prune to about {1 - SPARSITY:.0%}"


def test_fdnp_accuracy_saved_file_and_deployment(runs):
    "The accuracy is the whole split's; rank 0's file loads into a converted Learner; the spatial network computes the same"
    valid = small_dls().valid
    r0, r1 = runs["fdnp"]
    net = _dense(r0["state"], frequency=True)
    assert r0["acc"] == r1["acc"] == accuracy_on(net, valid)
    learn = make_learner(to_frequency(lenet5(widths=WIDTHS)), small_dls())
    learn.load(r0["saved"])
    assert_same({n: p.detach() for n, p in learn.model.named_parameters()}, r1["state"], "fdnp: loaded file")
    x = valid.one_batch()[0]
    with torch.no_grad(): torch.testing.assert_close(to_spatial(net).eval()(x), net.eval()(x), atol=1e-5, rtol=1e-5)


def test_package_imports_without_accelerate(tmp_path):
    "Only distributed training needs the `distributed` extra: every module imports, and works on one process, without it"
    code = ("import sys, importlib, pkgutil; sys.modules['accelerate'] = None\n"
            "import corrprune_edu\n"
            "names = [m.name for m in pkgutil.walk_packages(corrprune_edu.__path__, 'corrprune_edu.')]\n"
            "for name in names: importlib.import_module(name)\n"
            "import corrprune_edu.distributed as d\n"
            "assert not d.is_distributed() and d.world_size() == 1 and d.all_reduce_sum(2, 3.5) == (2, 3.5)\n"
            "try: d.DistributedDL(None); raise SystemExit('the stand-in DistributedDL was made without accelerate')\n"
            "except ImportError as e: assert 'corrprune_edu[distributed]' in str(e), e\n"
            "print(len(names))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 20, done.stdout      # every module was imported, not an empty list
