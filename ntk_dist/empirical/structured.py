"""NTK by structured derivatives (implementation 3): J1 J2^T from the structure of f's ops.

A parameter W used once, as ``y = X W`` (an operand of ``dot_general``, or the kernel of a
convolution whose input is rewritten as patches), has ``df_o/dW = sum_s X[s] ⊗ G[o, s]``
with ``G = df/dy`` and s the positions of y (tokens, pixels). Hence

    <df1_o1/dW, df2_o2/dW> = sum_{s,t} (X1[s] · X2[t]) (G1[o1, s] · G2[o2, t]),

the *Gram route*, which never forms W's Jacobian (Novak, Sohl-Dickstein, Schoenholz, "Fast
Finite Width NTK", ICML 2022). Where that is dearer than contracting Jacobians (large
convolutions: many pairs of positions), and for every other leaf (biases, scales, gathers,
leaves used twice, unknown primitives), the leaf's Jacobians are contracted as in
implementation 1. The route is chosen per leaf and block from static shapes.

f is traced to a jaxpr per example (nested ``jit`` calls inlined) and re-evaluated with a
zero perturbation added to the output y of each Gram-route equation: one Jacobian per
example with respect to (perturbations, other leaves) gives every G and the other leaves'
Jacobians in one pass. Examples are independent only with ``vmap_axes``; without it every
leaf takes the Jacobian route (this is implementation 1).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Literal

from ntk_dist.empirical import jacobian_contraction
from ntk_dist.empirical.axes import Axes, KernelAxes, resolve_axes
from ntk_dist.empirical.batching import VmapAxes, per_example_fn, split_batched_kwargs
from ntk_dist.empirical.features import contract_features_fn, ntk_features
from ntk_dist.empirical.jacobian_contraction import batched_gemm, contract, jacobian_fn
from ntk_dist.empirical.problem import KernelProblem, make_problem
from ntk_dist.precision import HIGHEST

# Call primitives whose sub-jaxprs are evaluated inline, so that parameters reach the
# equations inside them; the parameter holding the sub-jaxpr.
_INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr"}


@dataclasses.dataclass(frozen=True)
class _Site:
    """Equation ``index`` (in evaluation order) computing y = X W for parameter leaf ``leaf``.

    y transposed by ``y_perm`` is ``(positions..., features...)``, of sizes S and F; X (the
    other operand, or its patches for a convolution) transposed by ``x_perm`` is
    ``(positions..., contracted...)``, of sizes S and C; W transposed by ``w_perm`` is
    ``(contracted..., features...)`` in the same orders.
    """

    leaf: int
    index: int
    position: int
    is_conv: bool
    y_perm: tuple[int, ...]
    x_perm: tuple[int, ...]
    w_perm: tuple[int, ...]
    w_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    y_dtype: np.dtype
    positions: int
    contracted: int
    features: int

    def prefers_gram(self, pair_entries: int) -> bool:
        """Whether the Gram route is cheaper than contracting W's Jacobians.

        ``pair_entries`` counts the products J1[o1] · J2[o2] one pair of examples needs
        (kernel entries per pair times the traced size, over all outputs). Per pair, the
        Gram route costs ``S^2 (C + F pair_entries)``, the Jacobian route ``C F pair_entries``.
        """
        s2 = self.positions**2
        gram = s2 * (self.contracted + self.features * pair_entries)
        return gram < self.contracted * self.features * pair_entries

    def input_matrix(self, eqn: JaxprEqn, operands: list[Any]) -> jax.Array:
        """X as an (S, C) matrix, from the operands of this site's equation."""
        x = operands[1 - self.position]
        if self.is_conv:
            p = eqn.params
            rhs_spec = p["dimension_numbers"].rhs_spec
            x = jax.lax.conv_general_dilated_patches(
                x,
                filter_shape=[self.w_shape[d] for d in sorted(rhs_spec[2:])],
                window_strides=p["window_strides"],
                padding=p["padding"],
                lhs_dilation=p["lhs_dilation"],
                rhs_dilation=p["rhs_dilation"],
                dimension_numbers=p["dimension_numbers"],
                precision=HIGHEST,  # patches must be exact copies
                preferred_element_type=p["preferred_element_type"],
            )
        return jnp.transpose(x, self.x_perm).reshape(self.positions, self.contracted)

    def cotangent(self, jac: jax.Array, out_ndim: int) -> jax.Array:
        """G of shape ``out + (S, F)`` from the Jacobian ``out + y.shape`` of one output."""
        perm = (*range(out_ndim), *(out_ndim + d for d in self.y_perm))
        return jnp.transpose(jac, perm).reshape(
            (*jac.shape[:out_ndim], self.positions, self.features)
        )

    def materialise(self, x: jax.Array, g: jax.Array) -> jax.Array:
        """W's Jacobian ``(N, out..., W.size)`` from X ``(N, S, C)`` and G ``(N, out..., S, F)``.

        Needed only when the other block took the Jacobian route for this leaf.
        """
        j = jnp.einsum("nsc,n...sf->n...cf", x, g, precision=HIGHEST)
        lead = j.shape[:-2]
        j = j.reshape((*lead, *(self.w_shape[d] for d in self.w_perm)))
        inverse = np.argsort(self.w_perm)
        j = jnp.transpose(j, (*range(len(lead)), *(len(lead) + int(d) for d in inverse)))
        return j.reshape((*lead, -1))


def _dot_site(eqn: JaxprEqn, leaf: int, index: int, position: int) -> _Site | None:
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    if lhs_b or rhs_b:
        return None
    x_shape = eqn.invars[1 - position].aval.shape
    w_shape = eqn.invars[position].aval.shape
    w_c, x_c = (rhs_c, lhs_c) if position == 1 else (lhs_c, rhs_c)
    x_free = tuple(d for d in range(len(x_shape)) if d not in x_c)
    w_free = tuple(d for d in range(len(w_shape)) if d not in w_c)
    n_y = len(x_free) + len(w_free)
    # y's axes are (lhs free..., rhs free...)
    y_perm = tuple(range(n_y)) if position == 1 else (*range(len(w_free), n_y), *range(len(w_free)))
    return _Site(
        leaf=leaf,
        index=index,
        position=position,
        is_conv=False,
        y_perm=y_perm,
        x_perm=(*x_free, *x_c),
        w_perm=(*w_c, *w_free),
        w_shape=tuple(w_shape),
        y_shape=tuple(eqn.outvars[0].aval.shape),
        y_dtype=np.dtype(eqn.outvars[0].aval.dtype),
        positions=math.prod(x_shape[d] for d in x_free),
        contracted=math.prod(x_shape[d] for d in x_c),
        features=math.prod(w_shape[d] for d in w_free),
    )


def _conv_site(eqn: JaxprEqn, leaf: int, index: int, position: int) -> _Site | None:
    p = eqn.params
    if position != 1 or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None
    _, rhs_spec, out_spec = p["dimension_numbers"]
    w_shape = tuple(eqn.invars[1].aval.shape)
    y_shape = eqn.outvars[0].aval.shape
    y_perm = (*(d for d in range(len(y_shape)) if d != out_spec[1]), out_spec[1])
    features = w_shape[rhs_spec[0]]
    return _Site(
        leaf=leaf,
        index=index,
        position=1,
        is_conv=True,
        y_perm=y_perm,
        x_perm=y_perm,  # patches have y's layout, with C = patch size as feature axis
        # patches order their features (input channel, kernel dims in axis order)
        w_perm=(rhs_spec[1], *sorted(rhs_spec[2:]), rhs_spec[0]),
        w_shape=w_shape,
        y_shape=tuple(y_shape),
        y_dtype=np.dtype(eqn.outvars[0].aval.dtype),
        positions=math.prod(y_shape) // features,
        contracted=math.prod(w_shape) // features,
        features=features,
    )


_RULES = {"dot_general": _dot_site, "conv_general_dilated": _conv_site}


def _interpret(
    jaxpr: Jaxpr,
    consts: list[Any],
    args: list[Any],
    apply: Callable[[int, JaxprEqn, list[Any]], list[Any]],
    counter: Iterator[int],
) -> list[Any]:
    """Evaluate ``jaxpr`` with ``apply(index, eqn, operands) -> outputs`` for each equation.

    Equations of inlined calls are numbered in the same walk, so indices identify
    equations across walks of the same jaxpr.
    """
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        operands = [read(v) for v in eqn.invars]
        key = _INLINED.get(eqn.primitive.name)
        sub = eqn.params.get(key) if key else None
        if isinstance(sub, ClosedJaxpr):
            outs = _interpret(sub.jaxpr, sub.consts, operands, apply, counter)
        else:
            outs = apply(next(counter), eqn, operands)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """Marks the value of parameter leaf ``index`` while tracking where leaves are used."""

    index: int


def _analyse(
    closed: ClosedJaxpr, n_params: int, pair_entries: int
) -> tuple[dict[int, _Site], list[int]]:
    """(Gram-route sites by equation index, the parameter leaves f reads at all).

    A leaf takes the Gram route when it is used exactly once, by a rule above, with no
    other leaf as operand (a leaf used twice has cross terms), and that route is cheaper.
    Leaves f never reads have zero derivative and no features.
    """
    uses: dict[int, list[_Site | None]] = {i: [] for i in range(n_params)}

    def note(index: int, eqn: JaxprEqn, operands: list[Any]) -> list[Any]:
        leaves = [i for i, v in enumerate(operands) if isinstance(v, _Leaf)]
        rule = _RULES.get(eqn.primitive.name)
        for position in leaves:
            site = None
            inexact = jnp.issubdtype(eqn.invars[position].aval.dtype, jnp.inexact)
            if rule is not None and len(leaves) == 1 and inexact:
                site = rule(eqn, operands[position].index, index, position)
            uses[operands[position].index].append(site)
        return [None] * len(eqn.outvars)

    args = [_Leaf(i) for i in range(n_params)]
    args += [None] * (len(closed.jaxpr.invars) - n_params)
    outs = _interpret(closed.jaxpr, list(closed.consts), args, note, itertools.count())
    for v in outs:  # a leaf returned as an output is a use no rule covers
        if isinstance(v, _Leaf):
            uses[v.index].append(None)
    sites = [u[0] for u in uses.values() if len(u) == 1 and u[0] is not None]
    gram = {s.index: s for s in sites if s.prefers_gram(pair_entries)}
    return gram, [i for i, u in uses.items() if u]


def _evaluate(
    closed: ClosedJaxpr, args: list[Any], sites: dict[int, _Site], eps: dict[int, jax.Array]
) -> tuple[list[Any], dict[int, jax.Array]]:
    """f's outputs with ``eps[i]`` added to the output of site i, and each site's X."""
    inputs: dict[int, jax.Array] = {}

    def apply(index: int, eqn: JaxprEqn, operands: list[Any]) -> list[Any]:
        with eqn.ctx.manager:  # the context f traced the equation in (as jax.core does)
            out = eqn.primitive.bind(*operands, **eqn.primitive.get_bind_params(eqn.params))
        out = out if eqn.primitive.multiple_results else [out]
        site = sites.get(index)
        if site is not None:
            inputs[index] = site.input_matrix(eqn, operands)
            out = [out[0] + eps[index]]
        return out

    outs = _interpret(closed.jaxpr, list(closed.consts), args, apply, itertools.count())
    return outs, inputs


@dataclasses.dataclass(frozen=True)
class StructuredFeatures:
    """Features of one block for implementation 3; every array has the examples first.

    ``jacobians[leaf][i]``: output i's Jacobian w.r.t. a Jacobian-route parameter leaf,
    ``(N, *out_i, leaf size)``. ``inputs[leaf]`` ``(N, S, C)`` and ``cotangents[leaf][i]``
    ``(N, *out_i, S, F)``: X and G of a Gram-route leaf, whose rule is in ``sites``.
    ``outputs[i]``: f's output i ``(N, *out_i)``, giving the kernel's shape and dtype.
    ``out_i`` omits the batch axis, which is ``batch_axes[i]`` of f's output.
    """

    jacobians: dict[int, list[jax.Array]]
    inputs: dict[int, jax.Array]
    cotangents: dict[int, list[jax.Array]]
    outputs: list[jax.Array]
    sites: tuple[_Site, ...]
    batch_axes: tuple[int, ...]
    out_tree: Any

    def jacobian(self, leaf: int, i: int) -> jax.Array:
        """Output i's Jacobian w.r.t. ``leaf``, materialised from X and G if need be."""
        if leaf in self.jacobians:
            return self.jacobians[leaf][i]
        site = next(s for s in self.sites if s.leaf == leaf)
        return site.materialise(self.inputs[leaf], self.cotangents[leaf][i])


jax.tree_util.register_dataclass(
    StructuredFeatures,
    data_fields=["jacobians", "inputs", "cotangents", "outputs"],
    meta_fields=["sites", "batch_axes", "out_tree"],
)


def _pair_entries(shape: tuple[int, ...], axes: KernelAxes) -> int:
    """Products J1[o1] · J2[o2] one kernel between two such outputs needs."""
    free = axes.free
    return math.prod(n * n if a in free else n for a, n in enumerate(shape))


def _one_example(tree: Any, axes: Any) -> Any:
    """Shapes and dtypes of one example of ``tree`` batched along ``axes`` (a prefix)."""
    specs = jax.eval_shape(lambda t: t, tree)
    axes = jax.tree.broadcast(axes, specs, is_leaf=lambda a: a is None)

    def drop(axis: int | None, s: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        if axis is None:
            return s
        axis %= len(s.shape)
        return jax.ShapeDtypeStruct(s.shape[:axis] + s.shape[axis + 1 :], s.dtype)

    return jax.tree.map(drop, axes, specs, is_leaf=lambda a: a is None)


def block_features(problem: KernelProblem, x: Any, kwargs: dict[str, Any]) -> StructuredFeatures:
    """Features of the examples x (``problem.vmap`` must be set), for ``contract_blocks``."""
    vmap: VmapAxes = problem.vmap
    batched, batched_axes, static = split_batched_kwargs(vmap, kwargs)
    g = per_example_fn(problem.f, vmap, batched_axes, static, problem.out_axes)
    closed = jax.make_jaxpr(g)(
        problem.params, _one_example(x, vmap.in_axes), _one_example(batched, batched_axes)
    )
    params = jax.tree.leaves(problem.params)
    out_shapes = [tuple(a.shape) for a in closed.out_avals]
    pair_entries = sum(
        _pair_entries(s, axes.without(b))
        for s, axes, b in zip(out_shapes, problem.axes, problem.out_axes, strict=True)
    )
    sites, used = _analyse(closed, len(params), pair_entries)
    gram_leaves = {s.leaf for s in sites.values()}
    jacobian_leaves = [
        i
        for i in used
        if i not in gram_leaves and jnp.issubdtype(jnp.result_type(params[i]), jnp.inexact)
    ]
    in_size = sum(math.prod(s.y_shape) for s in sites.values())
    in_size += sum(math.prod(np.shape(params[i])) for i in jacobian_leaves)
    jac_fn = jacobian_fn(sum(math.prod(s) for s in out_shapes), in_size)

    def one(x_one: Any, kwargs_one: dict[str, Any]) -> tuple[Any, ...]:
        def run(eps: dict[int, jax.Array], replaced: dict[int, jax.Array]) -> tuple[Any, Any]:
            args = [replaced.get(i, p) for i, p in enumerate(params)]
            args += jax.tree.leaves(x_one) + jax.tree.leaves(kwargs_one)
            outs, inputs = _evaluate(closed, args, sites, eps)
            return outs, (outs, inputs)

        eps = {i: jnp.zeros(s.y_shape, s.y_dtype) for i, s in sites.items()}
        replaced = {i: params[i] for i in jacobian_leaves}
        per_output, (outs, inputs) = jac_fn(run, argnums=(0, 1), has_aux=True)(eps, replaced)
        jacobians = {
            i: [d[1][i].reshape((*s, -1)) for d, s in zip(per_output, out_shapes, strict=True)]
            for i in jacobian_leaves
        }
        cotangents = {
            site.leaf: [
                site.cotangent(d[0][index], len(s))
                for d, s in zip(per_output, out_shapes, strict=True)
            ]
            for index, site in sites.items()
        }
        x_matrices = {site.leaf: inputs[index] for index, site in sites.items()}
        return jacobians, x_matrices, cotangents, outs

    jacobians, x_matrices, cotangents, outs = jax.vmap(one, in_axes=(vmap.in_axes, batched_axes))(
        x, batched
    )
    return StructuredFeatures(
        jacobians=jacobians,
        inputs=x_matrices,
        cotangents=cotangents,
        outputs=outs,
        sites=tuple(sites.values()),
        batch_axes=tuple(problem.out_axes),
        out_tree=problem.out_tree,
    )


def _gram_term(
    x1: jax.Array, g1: jax.Array, x2: jax.Array, g2: jax.Array, axes: KernelAxes, batch: int
) -> jax.Array:
    """sum_{s,t} (X1[s] · X2[t]) (G1[o1, s] · G2[o2, t]) laid out by ``axes``.

    X is ``(N, S, C)``; G is ``(*out, S, F)`` with N at f's batch axis ``batch`` of out.
    A traced batch axis is kept as a diagonal until X's Gram matrix has weighted it.
    """
    traced = batch in axes.trace
    trace = tuple(a for a in axes.trace if a != batch)
    diagonal = tuple(sorted({*axes.diagonal, batch})) if traced else axes.diagonal
    # positions as one more (free) output axis, F as the summed extra axis
    with_positions = KernelAxes(axes.ndim + 1, trace, diagonal)
    gg = contract(g1, g2, with_positions)  # (kernel axes..., s, t)
    p = with_positions.position(batch)
    shape = [1] * (gg.ndim - 2)
    if batch in diagonal:
        xx = batched_gemm(x1, x2, (2,), (0,))  # (n, s, t)
        shape[p] = xx.shape[0]
    else:
        xx = jnp.transpose(batched_gemm(x1, x2, (2,), ()), (0, 2, 1, 3))  # (n, m, s, t)
        shape[p : p + 2] = xx.shape[:2]
    kernel = jnp.sum(gg * xx.reshape((*shape, *xx.shape[-2:])), axis=(-2, -1))
    return jnp.mean(kernel, axis=p) if traced else kernel


def contract_blocks(
    a: StructuredFeatures, b: StructuredFeatures, axes: list[KernelAxes]
) -> list[jax.Array]:
    """Kernel of each output between two blocks' features: a sum over parameter leaves.

    A leaf on the Gram route in both blocks contracts X and G; otherwise its Jacobians,
    materialised from X and G on a block where the Gram route was cheaper (a block whose
    examples have other shapes can decide otherwise).
    """
    leaves = sorted({*a.jacobians, *a.inputs} & {*b.jacobians, *b.inputs})
    kernels = []
    for i, (ax, batch) in enumerate(zip(axes, a.batch_axes, strict=True)):

        def full(t: jax.Array, batch: int = batch) -> jax.Array:
            return jnp.moveaxis(t, 0, batch)

        out1, out2 = full(a.outputs[i]), full(b.outputs[i])
        dtype = jnp.result_type(out1, out2)
        kernel = jnp.zeros(ax.kernel_shape(out1.shape, out2.shape), dtype)
        for leaf in leaves:
            if leaf in a.inputs and leaf in b.inputs:
                g1, g2 = full(a.cotangents[leaf][i]), full(b.cotangents[leaf][i])
                term = _gram_term(a.inputs[leaf], g1, b.inputs[leaf], g2, ax, batch)
            else:
                term = contract(full(a.jacobian(leaf, i)), full(b.jacobian(leaf, i)), ax)
            kernel = kernel + term
        kernels.append(kernel)
    return kernels


def ntk(problem: KernelProblem) -> list[jax.Array]:
    """Empirical NTK of each output leaf of f, by structured derivatives."""
    if problem.vmap is None:
        return jacobian_contraction.ntk(problem)
    a = block_features(problem, problem.x1, problem.kwargs1)
    b = a if problem.x2 is None else block_features(problem, problem.x2, problem.kwargs2)
    return contract_blocks(a, b, problem.axes)


def two_stage(
    f: Callable[..., Any], trace_axes: Axes, diagonal_axes: Axes, vmap: VmapAxes | None
) -> tuple[Callable[..., Any], Callable[[Any, Any], Any]]:
    """``(features(x, params, **kwargs), contract_features(features1, features2))``.

    Without ``vmap_axes`` these are implementation 1's, as is the kernel.
    """
    if vmap is None:
        return ntk_features(f, trace_axes, diagonal_axes, vmap), contract_features_fn(
            trace_axes, diagonal_axes
        )

    def features(x: Any, params: Any, **kwargs: Any) -> StructuredFeatures:
        problem = make_problem(f, x, None, params, kwargs, trace_axes, diagonal_axes, vmap)
        return block_features(problem, x, problem.kwargs1)

    def contract_features(a: StructuredFeatures, b: StructuredFeatures) -> Any:
        axes = []
        for i, (u, v, batch) in enumerate(zip(a.outputs, b.outputs, a.batch_axes, strict=True)):
            where = "the output of f(params, x)" if len(a.outputs) == 1 else f"output {i}"
            shape1 = jnp.moveaxis(u, 0, batch).shape
            shape2 = jnp.moveaxis(v, 0, batch).shape
            axes.append(resolve_axes(trace_axes, diagonal_axes, shape1, shape2, where))
        return jax.tree.unflatten(a.out_tree, contract_blocks(a, b, axes))

    return features, contract_features
