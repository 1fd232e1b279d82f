#!/usr/bin/env python
"""How long does surgery take? Build the channel groups and prune 50% of every group's channels of resnet50,
ResNet-56 and vgg16_bn, with corrprune_edu and with Torch-Pruning (the reference) on the same plans.

    python bench/surgery_speed.py [--runs 7] [--out bench/results/surgery_speed.json]

Each timed run starts from a fresh copy of the model (copying is not timed) and includes everything from the
unpruned model to the pruned one: tracing and grouping, then cutting every tensor. The two tools alternate run by
run, so drifting machine load affects both alike; we report medians and the ratio. Both pruned models are then
checked to compute the same outputs.
"""
import argparse, copy, statistics, time
from pathlib import Path

import torch
import torchvision
import torch_pruning as tp
from torch import nn

from corrprune_edu.core import set_seed, set_threads
from corrprune_edu.criteria import l1_scores, plan_from_scores, select_groups
from corrprune_edu.flops import count_params
from corrprune_edu.models import resnet_cifar
from corrprune_edu.results import record_run
from corrprune_edu.channels import analyze_channels
from corrprune_edu.surgery import prune_channels

MODELS = {
    "resnet50 (torchvision)": (lambda: torchvision.models.resnet50(), (1, 3, 224, 224)),
    "ResNet-56 (CIFAR)": (lambda: resnet_cifar(56), (1, 3, 32, 32)),
    "vgg16_bn (torchvision)": (lambda: torchvision.models.vgg16_bn(), (1, 3, 224, 224)),
}


def half_plan(model, x):
    "Remove the 50% smallest-L1 channels of every prunable group (conv and hidden linear layers)"
    a = analyze_channels(model, x)
    return plan_from_scores(l1_scores(model, a, select_groups(a, layer_types=(nn.Conv2d, nn.Linear), model=model)), 0.5)


def ours(model, plan, x):
    prune_channels(model, plan, x, inplace=True)
    return model


def torch_pruning(model, plan, x):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    for layer, idxs in plan.items():
        m = model.get_submodule(layer)
        fn = tp.prune_conv_out_channels if isinstance(m, nn.Conv2d) else tp.prune_linear_out_channels
        group = dg.get_pruning_group(m, fn, idxs=idxs)
        if dg.check_pruning_group(group): group.prune()
    return model


def timed(fn, model, plan, x):
    m = copy.deepcopy(model)
    t0 = time.perf_counter(); out = fn(m, plan, x); return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent/"results"/"surgery_speed.json"))
    args = ap.parse_args()
    set_threads(2); set_seed(0)
    rows = []
    for name, (ctor, shape) in MODELS.items():
        model, x = ctor().eval(), torch.randn(shape)
        plan = half_plan(model, x)
        times = {"corrprune_edu": [], "torch-pruning": []}
        for _ in range(args.runs):
            for tool, fn in (("corrprune_edu", ours), ("torch-pruning", torch_pruning)):
                t, pruned = timed(fn, model, plan, x)
                times[tool].append(t); results = getattr(main, "_last", {}); results[tool] = pruned; main._last = results
        a, b = main._last["corrprune_edu"].eval(), main._last["torch-pruning"].eval()
        with torch.no_grad():
            same_shapes = [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
            max_diff = (a(x) - b(x)).abs().max().item() if same_shapes else float("nan")
        ours_s, tp_s = statistics.median(times["corrprune_edu"]), statistics.median(times["torch-pruning"])
        row = dict(method="surgery", level=name, model=name, input=list(shape), groups_pruned=len(plan),
                   params_before=count_params(model), params_after=count_params(a),
                   corrprune_s=ours_s, torch_pruning_s=tp_s, ratio_tp_over_ours=tp_s / ours_s,
                   corrprune_runs_s=times["corrprune_edu"], torch_pruning_runs_s=times["torch-pruning"],
                   same_shapes=same_shapes, max_output_diff=max_diff)
        rows.append(row)
        print(f"{name:24} groups {len(plan):3}  params {row['params_before']:>11,} -> {row['params_after']:>11,}  "
              f"corrprune_edu {ours_s:6.3f}s  torch-pruning {tp_s:6.3f}s  TP/ours {tp_s/ours_s:5.2f}x  "
              f"same shapes {same_shapes}  max |diff| {max_diff:.2e}", flush=True)
    record_run(args.out, "surgery_speed", rows, dict(runs=args.runs, threads=2, plan="50% smallest-L1 channels of every prunable group",
               torch_pruning=tp.__version__), description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
