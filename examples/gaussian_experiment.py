"""Schulman's Gaussian experiment: bias and std of k1, k2, k3 relative to the true KL.

The policy is q = N(0, 1), the reference p = N(mu, 1); both KL directions are mu**2 / 2.
The same as ``klmonitor reproduce``.

    python examples/gaussian_experiment.py                  # 10 million samples per setting
    python examples/gaussian_experiment.py --samples 100000 --p-mean 0.1 0.5 1.0
"""

from __future__ import annotations

import argparse

from klmonitor.experiment import format_table, gaussian_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000_000, help="samples per setting")
    parser.add_argument("--p-mean", type=float, nargs="+", default=[0.1, 1.0], help="means of p = N(mu, 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    records = gaussian_experiment(p_means=tuple(args.p_mean), samples=args.samples, seed=args.seed)
    print(format_table(records))


if __name__ == "__main__":
    main()
