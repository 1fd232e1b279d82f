#!/usr/bin/env python
"""Does surgery buy real speed? CPU latency of ResNet-56 and VGG-16-CIFAR before and after removing 25%, 50% and
75% of the channels of every conv channel group (smallest L1 norm), at batch 1 and 64 with 2 threads, next to the
MACs ratio.

    python bench/surgery_latency.py [--rounds 15] [--out bench/results/surgery_latency.json]

All variants of a model are timed in interleaved rounds (original, 25%, 50%, 75%, original, ...), so a slow
spell on this shared machine hits them alike; we report medians. Weights are randomly initialised: latency does not
depend on their values.
"""
import argparse
from pathlib import Path

from corrprune_edu.core import set_seed, set_threads
from corrprune_edu.criteria import l1_plan
from corrprune_edu.flops import compare_latency, count_macs, count_params
from corrprune_edu.models import resnet_cifar, vgg16_cifar
from corrprune_edu.results import record_run
from corrprune_edu.surgery import prune_channels

MODELS = {"ResNet-56": lambda: resnet_cifar(56), "VGG-16-CIFAR": vgg16_cifar}
AMOUNTS = (0.25, 0.5, 0.75)
SHAPE = (3, 32, 32)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(Path(__file__).parent/"results"/"surgery_latency.json"))
    args = ap.parse_args()
    set_threads(2); set_seed(0)
    rows = []
    for name, ctor in MODELS.items():
        base = ctor().eval()
        variants = {"original": base}
        for amount in AMOUNTS:
            variants[f"{int(amount*100)}%"] = prune_channels(base, l1_plan(base, SHAPE, amount), SHAPE).eval()
        for bs in (1, 64):
            lat = compare_latency(variants, SHAPE, batch_size=bs, threads=2, rounds=args.rounds, repeats=3 if bs == 64 else 10)
            lat = lat.set_index("model").median_ms
            m0 = count_macs(base, SHAPE)
            for label, m in variants.items():
                macs = count_macs(m, SHAPE)
                row = dict(method="surgery", level=f"{name} {label} bs{bs}", model=name, channels_removed=label, batch_size=bs,
                           macs=macs, params=count_params(m), macs_ratio=m0 / macs, latency_ms=lat[label],
                           speedup=lat["original"] / lat[label])
                row["speedup_over_macs_ratio"] = row["speedup"] / row["macs_ratio"]
                rows.append(row)
                print(f"{name:13} {label:>8}  batch {bs:2}  MACs {macs:>12,} ({row['macs_ratio']:4.2f}x fewer)  "
                      f"{row['latency_ms']:8.2f} ms  speed-up {row['speedup']:4.2f}x  ({row['speedup_over_macs_ratio']:.2f} of the MACs ratio)", flush=True)
    record_run(args.out, "surgery_latency", rows, dict(rounds=args.rounds, threads=2, input=list(SHAPE), amounts=list(AMOUNTS),
               plan="smallest-L1 channels of every conv channel group (residual streams included)"), description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
