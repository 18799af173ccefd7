"""The ``klmonitor`` command: ``reproduce``, ``demo`` and ``report``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from klmonitor.alerts import DEFAULT_DRIFT_THRESHOLD
from klmonitor.table import F_NAMES


def _reproduce(args: argparse.Namespace) -> int:
    from klmonitor.experiment import format_table, gaussian_experiment, plot_estimators

    records = gaussian_experiment(p_means=tuple(args.p_mean), samples=args.samples, seed=args.seed)
    if args.plot:
        out = plot_estimators(args.plot, tuple(args.plot_f or ()))
        print(f"wrote {out}", file=sys.stderr)
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
    else:
        print(format_table(records))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from klmonitor.demo import run_demo

    result = run_demo(
        steps=args.steps,
        kl_coef=args.kl_coef,
        seed=args.seed,
        logdir=args.logdir,
        logger=args.logger,
        batch_size=args.batch_size,
        lr=args.lr,
        log_every_n_steps=args.log_every_n_steps,
        max_kl=args.max_kl,
        progress_bar=not args.no_progress_bar,
    )
    print()
    print(result)
    return 0


def _report(args: argparse.Namespace) -> int:
    from klmonitor.report import report

    notes: list[str] = []
    path = report(
        args.logdir,
        out=args.output,
        run=args.run,
        prefix=args.prefix,
        drift_threshold=args.drift_threshold,
        scale=args.scale,
        format=args.format,
        notes=notes,
        metric=args.metric,
    )
    print(f"wrote {path}")
    for note in notes:
        print(f"note: {note}")
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
    rep.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw the note's figure (k1, k2, k3 as functions of r) to FILE (.png, .pdf, .svg)",
    )
    rep.add_argument(
        "--plot-f",
        nargs="*",
        metavar="NAME",
        choices=list(F_NAMES),
        help="with --plot: also draw these f-divergences' per-sample estimators",
    )
    rep.set_defaults(func=_reproduce)

    demo = sub.add_parser(
        "demo",
        help="a small real RL fine-tune on CPU (well under a minute), monitored by KLMonitor",
        description="Fine-tune a tiny GRU policy with a KL-penalised policy gradient under a "
        "Lightning Trainer, monitored by KLMonitor; the policy drifts past its KL budget and the kl_budget alert fires.",
    )
    demo.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    demo.add_argument("--kl-coef", type=float, default=0.1, help="KL penalty coefficient (default 0.1)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--logdir", default="./klmonitor_logs", help="log directory (default ./klmonitor_logs)")
    demo.add_argument("--logger", choices=("tensorboard", "wandb", "csv"), default="tensorboard")
    demo.add_argument("--batch-size", type=int, default=64, help="sequences per step (default 64)")
    demo.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 0.001)")
    demo.add_argument("--log-every-n-steps", type=int, default=10, help="steps per KL window (default 10)")
    demo.add_argument(
        "--max-kl",
        type=float,
        default=0.1,
        help="KL budget per token: the kl_budget alert fires above it (default 0.1)",
    )
    demo.add_argument("--no-progress-bar", action="store_true", help="hide Lightning's progress bar")
    demo.set_defaults(func=_demo)

    rpt = sub.add_parser(
        "report",
        help="render a PNG dashboard from a run's TensorBoard, CSV or W&B logs",
        description="Read the kl/ scalars, alerts and log-ratio histograms of the newest run under "
        "LOGDIR (or --run): TensorBoard event files, a CSVLogger metrics.csv or a W&B run directory "
        "(wandb/offline-run-*), detected from the files. Draw them to a PNG.",
    )
    rpt.add_argument(
        "logdir", metavar="LOGDIR", help="log directory: TensorBoard, CSVLogger or W&B (searched recursively)"
    )
    rpt.add_argument(
        "-o", "--output", default=None, help="image to write (default LOGDIR/klmonitor_report.png)"
    )
    rpt.add_argument(
        "--run", default=None, help="run directory or file, relative to LOGDIR (default: the newest)"
    )
    rpt.add_argument(
        "--format",
        choices=("auto", "tensorboard", "csv", "wandb"),
        default="auto",
        help="log format to read (default auto: detected from the files)",
    )
    rpt.add_argument("--prefix", default="kl/", help="metric prefix (default kl/)")
    rpt.add_argument(
        "--drift-threshold",
        type=float,
        default=DEFAULT_DRIFT_THRESHOLD,
        help=f"drift threshold drawn (default {DEFAULT_DRIFT_THRESHOLD:g}, the drift rule's)",
    )
    rpt.add_argument(
        "--scale", choices=("auto", "linear", "log"), default="auto", help="y scale of the KL panel"
    )
    rpt.add_argument(
        "--metric",
        default=None,
        metavar="NAME",
        help="a scalar the run logged (e.g. train/reward) to draw beside the KL (default: one whose "
        "name contains 'reward', if any)",
    )
    rpt.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``klmonitor`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"klmonitor {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.command != "report":
            raise
        # Whatever a damaged log makes a reader or matplotlib raise: one line, never a traceback.
        print(
            f"klmonitor report: error: reading or drawing {args.logdir} failed "
            f"({type(exc).__name__}: {_one_line(exc)})",
            file=sys.stderr,
        )
        return 2
    return code


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
