"""Write a synthetic fraud-like CSV: a binary target with rare positives.

The rows come from scikit-learn's ``make_classification`` (informative, redundant
and noise columns, some label noise), plus two categorical columns (a product line
and a region, drawn from the informative features so they carry signal), so the
table looks like what a bank would feed ``fedq simulate``: numeric and
categorical features and a target ``fraud`` with values ``yes`` / ``no``.

    python bench/make_fraud_csv.py OUT.csv [--rows 50000] [--positive-rate 0.015] [--seed 0]
                                           [--class-sep 0.8] [--flip-y 0.002]

A small ``--class-sep`` with a large ``--flip-y`` gives weak data, on which even an
untrained model scores close to a trained one (docs/quality.md uses it).

Nothing it writes is committed: docs/quality.md gives the command with its options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import make_classification


def make(
    rows: int, positive_rate: float, seed: int, class_sep: float = 0.8, flip_y: float = 0.002
) -> pd.DataFrame:
    """The table: ``f00..f15`` numeric, ``product`` and ``region`` categorical, ``fraud``."""
    x, y = make_classification(
        n_samples=rows,
        n_features=16,
        n_informative=6,
        n_redundant=4,
        n_clusters_per_class=2,
        weights=[1.0 - positive_rate],
        flip_y=flip_y,
        class_sep=class_sep,
        random_state=seed,
    )
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(x, columns=[f"f{i:02d}" for i in range(x.shape[1])]).round(4)
    # A product line tied to the first informative feature (so it splits the banks
    # unevenly and carries signal) and a region that is mostly noise.
    edges = np.quantile(x[:, 0], [0.6, 0.8, 0.9])
    df["product"] = np.array(["cards", "loans", "mortgages", "savings"])[
        np.digitize(x[:, 0], edges)
    ]
    df["region"] = rng.choice(["north", "south", "east", "west"], size=rows, p=[0.4, 0.3, 0.2, 0.1])
    df["fraud"] = np.where(y == 1, "yes", "no")
    return df


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--positive-rate", type=float, default=0.015)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-sep", type=float, default=0.8)
    parser.add_argument("--flip-y", type=float, default=0.002)
    args = parser.parse_args()
    if not 0.0 < args.positive_rate < 0.5 or args.rows < 100:
        parser.error("--positive-rate must be in (0, 0.5) and --rows at least 100")
    if not args.class_sep > 0 or not 0.0 <= args.flip_y < 1.0:
        parser.error("--class-sep must be positive and --flip-y in [0, 1)")
    df = make(args.rows, args.positive_rate, args.seed, args.class_sep, args.flip_y)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    share = (df["fraud"] == "yes").mean()
    print(f"wrote {len(df)} rows to {args.out} ({share:.2%} positives)")


if __name__ == "__main__":
    main()
