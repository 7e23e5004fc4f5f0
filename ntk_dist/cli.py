"""The ``ntk-dist`` command line: ``kernel``, ``inspect``, ``demo`` and ``bench KIND``.

This module only parses; the work lives in :mod:`ntk_dist.jobs`, :mod:`ntk_dist.demo`
and :mod:`ntk_dist.bench`.
"""

import argparse
import importlib
import re
import sys
from collections.abc import Sequence

from ntk_dist.bench import KINDS as BENCH_KINDS
from ntk_dist.empirical.implementation import NtkImplementation

_IMPLEMENTATIONS = {m.name.lower(): int(m) for m in NtkImplementation}
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _axes(text: str) -> tuple[int, ...]:
    """'-1' or '0,2' (empty for no axes)."""
    try:
        return tuple(int(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integer axes, e.g. -1 or 1,2 "
            "(an empty string for none)"
        ) from None


def _block_size(text: str) -> int | tuple[int, int]:
    """'512' (square) or '512,256' (rows, cols)."""
    sizes = _axes(text)
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"block size {text!r} must be N or ROWS,COLS (positive)")
    return sizes[0] if len(sizes) == 1 else sizes


def _bytes(text: str) -> int:
    """'2G', '512M', '1000000' (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"memory budget {text!r} must look like 2G, 512M or bytes")
    return int(float(match[1]) * _UNITS[match[2]])


def _vmap_axes(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--vmap-axes {text!r} must be an integer or none"
        ) from None


def _implementation(text: str) -> int:
    key = text.lower()
    if key in _IMPLEMENTATIONS:
        return _IMPLEMENTATIONS[key]
    if key in {str(v) for v in _IMPLEMENTATIONS.values()}:
        return int(key)
    numbers = ", ".join(str(v) for v in _IMPLEMENTATIONS.values())
    raise argparse.ArgumentTypeError(
        f"implementation {text!r} is not one of {', '.join(_IMPLEMENTATIONS)} (or {numbers})"
    )


def _add_kernel(commands: argparse._SubParsersAction) -> None:
    kernel = commands.add_parser(
        "kernel",
        help="compute a kernel tile by tile into a resumable Zarr store",
        description="Compute the empirical NTK/NNGP of a model on .npy/Zarr data into a store. "
        "Rerunning the same command resumes: only missing or damaged tiles are computed.",
    )
    kernel.add_argument(
        "--model", required=True, help="module:function (or file.py:function) returning (f, params)"
    )
    kernel.add_argument("--x1", required=True, help="examples: a .npy file or a Zarr array")
    kernel.add_argument("--x2", default=None, help="second examples (default: x1, symmetric)")
    kernel.add_argument("--out", required=True, help="store path (a directory)")
    kernel.add_argument("--kind", choices=("ntk", "nngp"), default="ntk")
    kernel.add_argument("--trace-axes", type=_axes, default=(-1,), help="e.g. -1 (default), ''")
    kernel.add_argument("--diagonal-axes", type=_axes, default=(), help="e.g. 0 or 1 (default '')")
    kernel.add_argument(
        "--implementation",
        type=_implementation,
        default=0,
        help=f"{', '.join(_IMPLEMENTATIONS)} (or 0-{len(_IMPLEMENTATIONS) - 1}); default auto",
    )
    kernel.add_argument(
        "--vmap-axes", type=_vmap_axes, default=None, help="batch axis of x and f(x), or none"
    )
    kernel.add_argument("--block-size", type=_block_size, default=None, help="N or ROWS,COLS")
    kernel.add_argument(
        "--memory-budget", type=_bytes, default=None, help="bytes per device, e.g. 2G"
    )
    kernel.add_argument("--devices", type=int, default=None, help="use the first N local devices")
    kernel.add_argument(
        "--ray",
        metavar="auto|ADDRESS",
        default=None,
        help="run on a Ray cluster (one worker per node writes into the shared store)",
    )
    kernel.add_argument(
        "--model-name", default=None, help="name in the fingerprint (default: --model)"
    )
    kernel.add_argument(
        "--overwrite", action="store_true", help="replace a store of another kernel"
    )
    kernel.add_argument("--x64", action="store_true", help="compute and store in float64")
    kernel.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    kernel.set_defaults(run=_run_kernel)


def _run_kernel(args: argparse.Namespace) -> int:
    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    from ntk_dist import jobs

    f, params = jobs.load_model(args.model)
    x1 = jobs.load_array(args.x1)
    x2 = None if args.x2 is None else jobs.load_array(args.x2)
    kernel_fn = jobs.kernel_function(
        f, args.kind, args.trace_axes, args.diagonal_axes, args.vmap_axes, args.implementation
    )
    result = jobs.run_kernel_job(
        kernel_fn,
        x1,
        x2,
        params,
        args.out,
        devices=args.devices,
        ray=args.ray,
        progress=not args.no_progress,
        block_size=args.block_size,
        memory_budget=args.memory_budget,
        overwrite=args.overwrite,
        model_name=args.model_name or args.model,
    )
    store = result.store
    print(
        f"{store.metadata['kind']} {store.shape} {store.dtype.name} in {store.path}: "
        f"{result.tiles_computed} of {result.tiles_total} tiles computed "
        f"in {result.seconds:.1f} s on {result.ran_on}"
    )
    return 0


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser("inspect", help="what a kernel store holds; --verify checksums")
    inspect.add_argument("store", help="store path")
    inspect.add_argument(
        "--verify",
        action="store_true",
        help="re-read every completed tile, check its checksum; exit 1 if any is damaged",
    )
    inspect.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from ntk_dist.jobs import inspect_store

    text, ok = inspect_store(args.store, verify=args.verify)
    print(text)
    return 0 if ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntk-dist",
        description="Empirical NTK/NNGP kernels at data-set scale, and training predictions.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_kernel(commands)
    _add_inspect(commands)

    demo = commands.add_parser("demo", help="NTK of a small CNN on real digits, then predictions")
    demo.add_argument("--n-train", type=int, default=300, help="training images (default 300)")
    demo.add_argument("--n-test", type=int, default=300, help="test images (default 300)")
    demo.add_argument(
        "--out", default="out", help="folder for kernel stores and the plot (default ./out)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--block-size", type=int, default=150, help="tile side (default 150)")
    demo.set_defaults(run=_run_demo)

    bench = commands.add_parser("bench", help="benchmarks, reported as measured ratios")
    bench_kinds = bench.add_subparsers(dest="kind", required=True)
    for kind in BENCH_KINDS:
        importlib.import_module(f"ntk_dist.bench.{kind}").register(bench_kinds)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from ntk_dist.demo import run_demo

    run_demo(
        n_train=args.n_train,
        n_test=args.n_test,
        out_dir=args.out,
        seed=args.seed,
        block_size=args.block_size,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ntk-dist`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    status = args.run(args)
    return 0 if status is None else status


if __name__ == "__main__":
    sys.exit(main())
