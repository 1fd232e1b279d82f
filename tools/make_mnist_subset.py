#!/usr/bin/env python
"""Regenerate the MNIST subset shipped inside the package (corrprune_edu/assets/mnist_subset.npz).

It draws 600 training and 100 test images per class from the real MNIST folder (fastai layout,
found by `corrprune_edu.data.dataset_path`) with a fixed seed, so running it again gives the same file.
"""
import argparse
from pathlib import Path

import numpy as np

from corrprune_edu.data import build_mnist_subset

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1]/"corrprune_edu"/"assets"/"mnist_subset.npz"))
    ap.add_argument("--path", default=None, help="MNIST folder (default: fastai's data folder)")
    args = ap.parse_args()
    arrays = build_mnist_subset(path=args.path)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {Path(args.out).stat().st_size/1e6:.2f} MB, "
          f"{len(arrays['y_train'])} train / {len(arrays['y_test'])} test images")
