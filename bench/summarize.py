#!/usr/bin/env python
"""Print the benchmark tables (Markdown) from bench/results/*.json; bench/README.md is this script's output.

    python bench/summarize.py > bench/README.md   # every results file
    python bench/summarize.py lenet5_mnist        # one benchmark
"""
import sys
from pathlib import Path

import pandas as pd

from corrprune_edu.results import load_results, results_table

RESULTS = Path(__file__).parent / "results"
PCT = lambda v: f"{100 * v:.1f}%"


def accuracy_table(name: str) -> pd.DataFrame:
    "Pruning benchmarks: one row per method and level, accuracies in %, drops in points"
    df = results_table(RESULTS / f"{name}.json")
    out = pd.DataFrame({"level": df.level, "method": df.method, "filters": df.filters,
                        "MACs removed": df.macs_reduction.map(PCT), "params removed": df.params_reduction.map(PCT),
                        "test acc": (100 * df.test_acc).round(2), "drop (pts)": (100 * (df.base_acc - df.test_acc)).round(2)})
    out["level"] = out.level.map(lambda v: f"{v:.0%}" if isinstance(v, float) else v)
    return out.sort_values(["level", "method"], kind="stable")


def surgery_speed() -> pd.DataFrame:
    return results_table(RESULTS / "surgery_speed.json", ["model", "groups_pruned", "params_before", "params_after", "corrprune_s",
                                                           "torch_pruning_s", "ratio_tp_over_ours", "same_shapes", "max_output_diff"])


def surgery_latency() -> pd.DataFrame:
    return results_table(RESULTS / "surgery_latency.json", ["model", "channels_removed", "batch_size", "macs_ratio",
                                                             "latency_ms", "speedup", "speedup_over_macs_ratio"])


def weight_pruning_table(name: str) -> pd.DataFrame:
    "Weight-pruning benchmarks: one row per rate and method; non-zeros per layer, accuracy, budget and wall time"
    df = results_table(RESULTS / f"{name}.json")
    out = pd.DataFrame({"rate": df.level, "method": df.method, "non-zeros per layer": df.nonzero,
                        "compression": df.compression.map(lambda v: f"{v:.1f}x"), "test acc": (100 * df.test_acc).round(2),
                        "drop (pts)": df.acc_drop_points, "valid acc right after pruning": df.get("valid_acc_after_prune", pd.Series(index=df.index, dtype=float)).map(
                            lambda v: "n/a" if pd.isna(v) else f"{100 * v:.2f}"),
                        "epochs": df.epochs, "wall time (s)": df.seconds.round(0).astype(int)})
    order = {m: i for i, m in enumerate(["oneshot", "gradual", "admm", "progressive"])}
    return out.assign(_r=df.rate, _m=df.method.map(order)).sort_values(["_r", "epochs", "_m"]).drop(columns=["_r", "_m"])


def filter_admm_table() -> pd.DataFrame:
    "Structured ADMM next to the filter methods of lenet5_mnist.json at the same levels (same filter counts, same budget)"
    ours = accuracy_table("admm_filters_lenet5")
    theirs = accuracy_table("lenet5_mnist")
    same = theirs[theirs.level.isin(ours.level) & theirs.method.isin(["fcp", "l1", "random"])]
    return pd.concat([ours, same]).sort_values(["level", "method"], kind="stable")


def distributed_compare() -> pd.DataFrame:
    "One row per method and process count: filters kept, MACs removed and accuracies in %, prune-fit seconds"
    df = results_table(RESULTS / "distributed_compare.json")
    out = pd.DataFrame({"method": df.method, "processes": df.processes, "filters": df.filters,
                        "MACs removed": df.macs_reduction.map(PCT), "valid acc (pre-trained)": df.base_acc.map(PCT),
                        "valid acc": df.valid_acc.map(PCT), "test acc": df.test_acc.map(PCT),
                        "conv compression": df.get("conv_compression", pd.Series(index=df.index, dtype=float)).map(
                            lambda v: "" if pd.isna(v) or v == 1 else f"{v:.1f}x"),
                        "fit s": df.fit_seconds, "ranks equal": df.ranks_bitwise_equal})
    return out.sort_values(["method", "processes"], kind="stable")

def fdnp_table(name: str) -> pd.DataFrame:
    "Weight-level benchmarks: one row per method and sparsity; compression = weights (or coefficients) / non-zeros"
    df = results_table(RESULTS / f"{name}.json")
    out = pd.DataFrame({"sparsity": df.level.map(PCT), "method": df.method, "epochs": df.epochs,
                        "test acc": (100 * df.test_acc).round(2), "drop (pts)": df.drop_pts,
                        "conv compression": df.conv_compression.round(1), "model compression": df.compression.round(2),
                        "conv speed-up (no transform)": df.conv_speedup_without_transform.round(1),
                        "conv speed-up": df.conv_speedup.round(1), "seconds": df.seconds})
    return out.sort_values(["sparsity", "method"], kind="stable")


FDNP_GOAL_DROP = {"fdnp_lenet5": 0.1, "fdnp_resnet20": 0.5}


def fdnp_goals(name: str) -> pd.DataFrame:
    "Per method: the highest conv compression whose accuracy drop stays within the goal's budget"
    df, budget = results_table(RESULTS / f"{name}.json"), FDNP_GOAL_DROP[name]
    rows = []
    for method, d in df.groupby("method", sort=False):
        ok = d[d.drop_pts <= budget]
        rows.append({"method": method, f"best conv compression at drop <= {budget} pts":
                     round(float(ok.conv_compression.max()), 1) if len(ok) else "none",
                     "its drop (pts)": float(ok.loc[ok.conv_compression.idxmax(), "drop_pts"]) if len(ok) else "-"})
    out = pd.DataFrame(rows)
    best = out.set_index("method").iloc[:, 0]
    if isinstance(best.get("spatial"), float):                      # the goal: FDNP >= 1.3x its spatial counterpart
        out["x spatial"] = [round(b / best["spatial"], 2) if isinstance(b, float) else "-" for b in best]
    return out


TABLES = {"lenet5_mnist": lambda: accuracy_table("lenet5_mnist"),
          "resnet20_cifar10": lambda: accuracy_table("resnet20_cifar10"),
          "surgery_speed": surgery_speed, "surgery_latency": surgery_latency,
          "admm_lenet5": lambda: weight_pruning_table("admm_lenet5"), "admm_filters_lenet5": filter_admm_table,
          "distributed_compare": distributed_compare,
          "fdnp_lenet5": lambda: fdnp_table("fdnp_lenet5"), "fdnp_resnet20": lambda: fdnp_table("fdnp_resnet20")}
EXTRA = {"fdnp_lenet5": fdnp_goals, "fdnp_resnet20": fdnp_goals}
SCRIPTS = {"fdnp_lenet5": "fdnp.py lenet5", "fdnp_resnet20": "fdnp.py resnet20", "admm_filters_lenet5": "admm_lenet5.py --filters"}


def markdown(df: pd.DataFrame) -> str:
    "A Markdown table (no extra dependency)"
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


HEADER = """# Benchmarks

Scripts in this folder measure; their results live in `results/*.json` (one format, see `corrprune_edu.results`:
the command, date, machine and settings of every run, one row per method and level). This page is generated by
`python bench/summarize.py > bench/README.md`; every figure below is read from those files. Accuracy differences
below a few tenths of a point are within seed noise (one seed per row: CPU budget). Reading notes: NOTES.md.
"""


def main(names):
    if not names: print(HEADER)
    for name in names or TABLES:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            print(f"## {name}\n\n(no results yet: run bench/{SCRIPTS.get(name, name + '.py')})\n"); continue
        data = load_results(path)
        runs = data["runs"]
        machine = runs[-1].get("machine", {})
        print(f"## {name}\n\n{data.get('description', '').splitlines()[0]}\n\n`{data.get('command', '')}` "
              f"(last run {data.get('date', '?')}, {len(runs)} run(s); machine: {machine.get('cpu', '?')}, "
              f"{machine.get('torch_threads', '?')} threads, torch {machine.get('torch', '?')})\n")
        print(markdown(TABLES[name]()), "\n")
        if name in EXTRA: print(markdown(EXTRA[name](name)), "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
