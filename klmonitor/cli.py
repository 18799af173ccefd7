"""The ``klmonitor`` command: ``reproduce``, ``demo`` and ``report``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _reproduce(args: argparse.Namespace) -> int:
    from klmonitor.experiment import format_table, gaussian_experiment

    records = gaussian_experiment(p_means=tuple(args.p_mean), samples=args.samples, seed=args.seed)
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
    else:
        print(format_table(records))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``klmonitor`` command."""
    parser = argparse.ArgumentParser(
        prog="klmonitor", description="KL(policy || reference) monitoring for RL fine-tuning."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser(
        "reproduce",
        help="the Gaussian estimator experiment: bias and std of k1/k2/k3 relative to the true KL",
    )
    rep.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    rep.add_argument("--samples", type=int, default=10_000_000, help="samples per setting")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument(
        "--p-mean", type=float, nargs="+", default=[0.1, 1.0], help="means of the reference N(mu, 1)"
    )
    rep.set_defaults(func=_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``klmonitor`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"klmonitor {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
