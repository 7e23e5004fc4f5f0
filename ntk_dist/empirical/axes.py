"""Bookkeeping of trace / diagonal axes and the layout of kernel outputs.

For outputs ``fx1`` of shape ``(N1, A, ...)`` and ``fx2`` of shape ``(N2, A', ...)`` the
kernel walks the output axes in order: a traced axis is summed over and divided by its size
(so the kernel is a mean over it), a diagonal axis contributes one axis, and every other
("free") axis contributes two adjacent axes, fx1's then fx2's. An axis listed in both
``trace_axes`` and ``diagonal_axes`` counts as traced, as in neural-tangents.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

Axes = int | Sequence[int]


@dataclasses.dataclass(frozen=True)
class KernelAxes:
    """Non-negative, sorted trace and diagonal axes of one output with ``ndim`` axes."""

    ndim: int
    trace: tuple[int, ...]
    diagonal: tuple[int, ...]

    @property
    def free(self) -> tuple[int, ...]:
        """Axes that appear twice in the kernel (once for x1, once for x2)."""
        return tuple(i for i in range(self.ndim) if i not in self.trace + self.diagonal)

    def kernel_shape(self, shape1: Sequence[int], shape2: Sequence[int]) -> tuple[int, ...]:
        """Shape of the kernel between outputs of shapes ``shape1`` and ``shape2``."""
        out: list[int] = []
        for i in range(self.ndim):
            if i in self.diagonal:
                out.append(shape1[i])
            elif i not in self.trace:
                out += [shape1[i], shape2[i]]
        return tuple(out)

    def trace_size(self, shape: Sequence[int]) -> int:
        """Number of entries averaged over by the trace (1 when nothing is traced)."""
        return math.prod(shape[i] for i in self.trace)

    def layout_permutation(self) -> tuple[int, ...]:
        """Transpose taking an array ordered ``(diagonal..., free1..., free2...)`` to layout.

        This is the order ``jax.lax.dot_general`` returns (batch, lhs free, rhs free).
        """
        n_diag, n_free = len(self.diagonal), len(self.free)
        perm: list[int] = []
        for i in range(self.ndim):
            if i in self.diagonal:
                perm.append(self.diagonal.index(i))
            elif i not in self.trace:
                j = self.free.index(i)
                perm += [n_diag + j, n_diag + n_free + j]
        return tuple(perm)

    def position(self, axis: int) -> int:
        """Index of the first kernel axis that output axis ``axis`` contributes."""
        return sum(0 if i in self.trace else 1 if i in self.diagonal else 2 for i in range(axis))

    def without(self, axis: int) -> KernelAxes:
        """The same rules for an output that lacks ``axis`` (e.g. one example of a batch)."""

        def drop(axes: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(a - (a > axis) for a in axes if a != axis)

        return KernelAxes(self.ndim - 1, drop(self.trace), drop(self.diagonal))


def _normalize(axes: Axes, name: str, ndim: int, where: str, shape: Sequence[int]) -> set[int]:
    if isinstance(axes, int):
        axes = (axes,)
    if not isinstance(axes, Sequence):
        raise ValueError(f"{name}={axes!r} must be an int or a sequence of ints.")
    out = set()
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int):
            raise ValueError(f"{name}={axes!r} must be an int or a sequence of ints; got {a!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{name}={tuple(axes)!r} contains {a}, out of range for {where} with "
                f"{ndim} axes (shape {tuple(shape)}); use axes in [{-ndim}, {ndim - 1}]."
            )
        out.add(a % ndim)
    return out


def resolve_axes(
    trace_axes: Axes,
    diagonal_axes: Axes,
    shape1: Sequence[int],
    shape2: Sequence[int],
    where: str = "f(params, x)",
) -> KernelAxes:
    """Validate the axes against both output shapes and return them canonicalised.

    ``where`` names the output in error messages (e.g. "output 1 of f(params, x)").
    """
    shape1, shape2 = tuple(shape1), tuple(shape2)
    if len(shape1) != len(shape2):
        raise ValueError(
            f"{where} has shape {shape1} for x1 but {shape2} for x2: the outputs need the "
            "same number of axes. Pass x1 and x2 with the same feature shape."
        )
    ndim = len(shape1)
    trace = _normalize(trace_axes, "trace_axes", ndim, where, shape1)
    diagonal = _normalize(diagonal_axes, "diagonal_axes", ndim, where, shape1) - trace
    for kind, axes in (("trace", trace), ("diagonal", diagonal)):
        for a in sorted(axes):
            if shape1[a] != shape2[a]:
                raise ValueError(
                    f"{kind} axis {a} of {where} has size {shape1[a]} for x1 (shape {shape1}) "
                    f"but {shape2[a]} for x2 (shape {shape2}); {kind} axes need equal sizes. "
                    f"Pass x1 and x2 that agree along axis {a}, or drop it from {kind}_axes."
                )
    return KernelAxes(ndim, tuple(sorted(trace)), tuple(sorted(diagonal)))
