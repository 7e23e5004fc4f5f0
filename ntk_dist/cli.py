"""The ``ntk-dist`` command line: ``demo`` and ``bench KIND``."""

import argparse
import importlib
import sys
from collections.abc import Sequence

from ntk_dist.bench import KINDS as BENCH_KINDS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntk-dist",
        description="Empirical NTK/NNGP kernels at data-set scale, and training predictions.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="NTK of a small CNN on real digits, then predictions")
    demo.add_argument("--n-train", type=int, default=300, help="training images (default 300)")
    demo.add_argument("--n-test", type=int, default=300, help="test images (default 300)")
    demo.add_argument("--out", default="out", help="folder for the plot (default ./out)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_run_demo)

    bench = commands.add_parser("bench", help="benchmarks, reported as measured ratios")
    bench_kinds = bench.add_subparsers(dest="kind", required=True)
    for kind in BENCH_KINDS:
        importlib.import_module(f"ntk_dist.bench.{kind}").register(bench_kinds)
    return parser


def _run_demo(args: argparse.Namespace) -> None:
    from ntk_dist.demo import run_demo

    run_demo(n_train=args.n_train, n_test=args.n_test, out_dir=args.out, seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ntk-dist`` console script."""
    args = _parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
