"""Benchmarks that report speed as ratios measured side by side in one run.

``ntk-dist bench kernels`` times each NTK implementation on the two networks of
neural-tangents' empirical-kernel docs (a CNN of three 3x3x32 convolutions and
an MLP 3072-1024-1024-10, both on 32x32x3 inputs) for an N x N train-train
kernel traced over the logits, and prints examples^2/s and auto / best.
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from ntk_dist import models
from ntk_dist.bench import time_call
from ntk_dist.empirical import NtkImplementation, choose_implementation, empirical_ntk_fn

NETWORKS: dict[str, Callable] = {"docs CNN": models.docs_cnn, "docs MLP": models.docs_mlp}
IMPLEMENTATIONS = (
    NtkImplementation.JACOBIAN_CONTRACTION,
    NtkImplementation.NTK_VECTOR_PRODUCTS,
    NtkImplementation.AUTO,
)


def bench_kernels(n: int = 32, repeats: int = 3, seed: int = 0) -> list[dict]:
    """Time every implementation on both docs networks; one row per network."""
    rows = []
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(seed + 1), (n, 32, 32, 3)), np.float32)
    for name, build in NETWORKS.items():
        f, params = build(jax.random.PRNGKey(seed))
        seconds = {}
        for impl in IMPLEMENTATIONS:
            ntk_fn = jax.jit(
                empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0, implementation=impl),
            )
            seconds[impl.name] = time_call(lambda fn=ntk_fn, p=params: fn(x, None, p), repeats)
        chosen = choose_implementation(f, x, None, params, trace_axes=(-1,), vmap_axes=0)
        best = min(seconds[i.name] for i in IMPLEMENTATIONS[:2])
        rows.append(
            {
                "network": name,
                "n": n,
                "params": int(sum(leaf.size for leaf in jax.tree.leaves(params))),
                "examples2_per_s": {k: n * n / v for k, v in seconds.items()},
                "auto_chose": chosen.name,
                "auto_over_best_time": seconds["AUTO"] / best,
            }
        )
    return rows


def format_kernels_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`bench_kernels` rows (the README shows it)."""
    lines = [
        "| network | N | params | impl 1 ex²/s | impl 2 ex²/s | auto ex²/s | auto chose |"
        " auto ÷ best (time) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = r["examples2_per_s"]
        lines.append(
            f"| {r['network']} | {r['n']} | {r['params']:,} "
            f"| {rate['JACOBIAN_CONTRACTION']:,.0f} | {rate['NTK_VECTOR_PRODUCTS']:,.0f} "
            f"| {rate['AUTO']:,.0f} | {r['auto_chose']} | {r['auto_over_best_time']:.2f} |"
        )
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ntk-dist bench kernels``."""
    parser = subparsers.add_parser(
        "kernels", help="NTK implementations on neural-tangents' docs CNN and MLP"
    )
    parser.add_argument("--n", type=int, default=32, help="examples N of the N x N kernel")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Run, print the table, optionally save the rows as JSON."""
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}")
    rows = bench_kernels(n=args.n, repeats=args.repeats)
    print(format_kernels_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
