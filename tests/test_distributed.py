"""Pruning inside fastai's distributed training, with real processes: torchrun, gloo on CPU, 2 ranks.

Each run launches `distributed_worker.py` on two processes, bounded by a timeout (the whole process group is killed
if it is exceeded), and checks what the ranks wrote: they end bitwise equal, the cut is exact, training after the
cut moves every remaining weight, and the accuracy a decision sees is that of the whole validation split.
"""
import os, re, signal, socket, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from distributed_worker import WIDTHS, N_VALID, small_dls
from corrprune_edu.core import filter_counts
from corrprune_edu.models import lenet5
from corrprune_edu.surgery import prune_channels
from corrprune_edu.train import accuracy_on

WORKER = Path(__file__).with_name("distributed_worker.py")


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


def load_ranks(out, n=2):
    return [torch.load(out/f"rank{r}.pt", weights_only=True) for r in range(n)]


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


@pytest.fixture(scope="module")
def l1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("l1")
    t0 = time.perf_counter()
    rc, log = torchrun(["l1", str(out)], out)
    assert rc == 0, f"torchrun failed (exit {rc}):\n{log[-5000:]}"
    ranks = load_ranks(out)
    print(f"\n2-process L1 run: {time.perf_counter() - t0:.1f}s wall with start-up, fit {ranks[0]['seconds']:.1f}s")
    return ranks


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


@pytest.mark.parametrize("fail,message", [("exit", r"Connection (closed|reset) by peer|Broken pipe"),
                                          ("hang", r"(?i)timed out")], ids=["exit", "hang"])
def test_a_failed_rank_fails_the_other(tmp_path, fail, message):
    "Rank 1 exits (or hangs) at the cut; rank 0, with no launcher to stop it, must exit with an error on its own"
    t0 = time.perf_counter()
    rcs, outs = by_hand(["l1", str(tmp_path), "--fail", fail, "--timeout", "10"], tmp_path, timeout=150, kill_rest=True)
    assert rcs[0] != 0, f"rank 0 finished although rank 1 {'exited' if fail == 'exit' else 'hung'}:\n{outs[0][-3000:]}"
    assert re.search(message, outs[0]), f"rank 0 failed for another reason:\n{outs[0][-3000:]}"
    assert rcs[1] == (3 if fail == "exit" else -signal.SIGKILL)
    assert not list(tmp_path.glob("rank*.pt"))
    print(f"\nrank 1 {fail}: rank 0 failed after {time.perf_counter() - t0:.1f}s")
