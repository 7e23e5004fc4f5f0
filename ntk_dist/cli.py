"""The ``ntk-dist`` command line: ``demo`` and ``bench``."""

import argparse
import sys
from collections.abc import Sequence


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

    bench = commands.add_parser("bench", help="benchmarks, reported as measured ratios")
    bench_kinds = bench.add_subparsers(dest="kind", required=True)
    kernels = bench_kinds.add_parser(
        "kernels", help="NTK implementations on neural-tangents' docs CNN and MLP"
    )
    kernels.add_argument("--n", type=int, default=32, help="examples N of the N x N kernel")
    kernels.add_argument("--repeats", type=int, default=3)
    kernels.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ntk-dist`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from ntk_dist.demo import run_demo

        run_demo(n_train=args.n_train, n_test=args.n_test, out_dir=args.out, seed=args.seed)
    elif args.command == "bench" and args.kind == "kernels":
        from ntk_dist.bench import run_kernels

        run_kernels(n=args.n, repeats=args.repeats, json_path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
