"""Adaptive explicit Runge-Kutta integration (Dormand-Prince 5(4)) of ``dy/dt = rhs(t, y)``.

The state is one flat vector and ``rhs`` any callable returning an array like it (a jitted
JAX function, or a host function streaming a kernel from disk): the step loop runs on the
host in NumPy. Steps land exactly on requested output times (no interpolation). Local
error control uses the 4th-order embedded estimate, weighted RMS norm
``atol + rtol * |y|``, and a PI step-size controller.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

Rhs = Callable[[float, np.ndarray], np.ndarray]

# Dormand-Prince 5(4) tableau: stage nodes, stage coefficients, 5th-order weights (which
# equal the last stage row, giving "first same as last") and the error weights b5 - b4.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)

_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 5.0
_ALPHA, _BETA = 0.7 / 5, 0.4 / 5  # PI controller exponents for an order-5 error estimate
_POLISH_STEPS = 40  # quarter-size steps that damp stability-limited modes ~1e-14-fold


class ConvergenceError(RuntimeError):
    """The integrator ran out of its step budget or its step size collapsed."""


def default_tolerances(dtype: np.dtype) -> tuple[float, float]:
    """``(rtol, atol)``: tight in float64, loose enough to be reachable in float32."""
    if np.dtype(dtype).itemsize >= 8:
        return 1e-10, 1e-10
    return 1e-5, 1e-6


def _tolerances(dtype: np.dtype, rtol: float | None, atol: float | None) -> tuple[float, float]:
    d_rtol, d_atol = default_tolerances(dtype)
    rtol, atol = d_rtol if rtol is None else rtol, d_atol if atol is None else atol
    if rtol < 0 or atol < 0 or rtol == atol == 0:
        raise ValueError(f"need rtol, atol >= 0, not both 0; got rtol={rtol}, atol={atol}")
    return rtol, atol


@dataclasses.dataclass
class DormandPrince45:
    """One adaptive integration in progress: call :meth:`step` to advance ``t`` and ``y``.

    ``f`` is always ``rhs(t, y)`` (reused by the next step); ``n_steps`` counts accepted
    steps, ``n_rejected`` rejected ones, ``n_rhs`` right-hand-side evaluations.
    """

    rhs: Rhs
    t: float
    y: np.ndarray
    rtol: float
    atol: float
    f: np.ndarray = dataclasses.field(init=False)
    h: float = dataclasses.field(init=False)
    n_steps: int = 0
    n_rejected: int = 0
    n_rhs: int = 0
    _err_prev: float = 1.0

    def __post_init__(self) -> None:
        self.y = np.array(self.y)
        self.f = self._eval(self.t, self.y)
        self.h = self._initial_step()

    def _eval(self, t: float, y: np.ndarray) -> np.ndarray:
        self.n_rhs += 1
        return np.asarray(self.rhs(t, y), dtype=self.y.dtype)

    def _weights(self, *ys: np.ndarray) -> np.ndarray:
        scale = np.abs(ys[0]).astype(np.float64)
        for y in ys[1:]:
            scale = np.maximum(scale, np.abs(y))
        return self.atol + self.rtol * scale

    @staticmethod
    def _rms(x: np.ndarray) -> float:
        return math.sqrt(float(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0

    def _initial_step(self) -> float:
        """A first step whose Euler error is about the tolerance (Hairer, Norsett, Wanner)."""
        w = self._weights(self.y)
        d0, d1 = self._rms(self.y / w), self._rms(self.f / w)
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        f1 = self._eval(self.t + h0, self.y + h0 * self.f)
        d2 = self._rms((f1 - self.f) / w) / h0
        if max(d1, d2) <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1 / 5)
        return min(100 * h0, h1)

    def norm(self, x: np.ndarray) -> float:
        """Weighted RMS norm of ``x`` at the current state (1 means "at tolerance")."""
        return self._rms(x / self._weights(self.y))

    def step(self, t_max: float = math.inf, max_steps: int | None = None) -> None:
        """Take one accepted step without passing ``t_max`` (landing on it exactly if close).

        Raises :class:`ConvergenceError` if ``n_steps + n_rejected`` would exceed
        ``max_steps`` or the step size underflows.
        """
        while True:
            if max_steps is not None and self.n_steps + self.n_rejected >= max_steps:
                raise ConvergenceError(
                    f"integrator used its budget of {max_steps} steps at t={self.t:.6g}; "
                    "pass a larger max_steps or looser rtol/atol"
                )
            h = self.h
            clipped = self.t + 1.01 * h >= t_max
            if clipped:
                h = t_max - self.t
            elif h <= 8 * np.finfo(np.float64).eps * max(abs(self.t), 1.0):
                raise ConvergenceError(f"step size underflow at t={self.t:.6g}")
            ks = [self.f]
            for c, a in zip(_C[1:], _A[1:], strict=True):
                y_stage = self.y + h * sum(ai * ki for ai, ki in zip(a, ks, strict=False))
                ks.append(self._eval(self.t + c * h, y_stage))
            y_new = self.y + h * sum(b * k for b, k in zip(_B, ks, strict=True))
            t_new = t_max if clipped else self.t + h
            f_new = self._eval(t_new, y_new)
            ks.append(f_new)
            err_vec = h * sum(e * k for e, k in zip(_E, ks, strict=True))
            err = self._rms(err_vec / self._weights(self.y, y_new))
            if err <= 1.0:
                factor = _SAFETY * max(err, 1e-10) ** -_ALPHA * self._err_prev**_BETA
                factor = min(_MAX_FACTOR, max(_MIN_FACTOR, factor))
                self._err_prev = max(err, 1e-4)
                self.h = max(self.h, h * factor) if clipped else h * factor
                self.t, self.y, self.f = t_new, y_new, f_new
                self.n_steps += 1
                return
            self.n_rejected += 1
            if math.isfinite(err):
                factor = max(_MIN_FACTOR, _SAFETY * err ** (-1 / 5))
            else:
                factor = _MIN_FACTOR
            self.h = h * min(1.0, factor)


def integrate(
    rhs: Rhs,
    y0: np.ndarray,
    t_eval: np.ndarray,
    *,
    t0: float = 0.0,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 100_000,
) -> np.ndarray:
    """Solve ``dy/dt = rhs(t, y)``, ``y(t0) = y0``; return ``y`` at each of ``t_eval``.

    ``t_eval`` must be non-decreasing and ``>= t0``; the result has shape
    ``(len(t_eval),) + y0.shape``. Tolerances default to :func:`default_tolerances`.
    """
    y0 = np.asarray(y0)
    t_eval = np.asarray(t_eval, dtype=np.float64)
    if t_eval.size and (t_eval[0] < t0 or np.any(np.diff(t_eval) < 0)):
        raise ValueError(f"t_eval must be non-decreasing and >= t0={t0}; got {t_eval}")
    rtol, atol = _tolerances(y0.dtype, rtol, atol)
    out = np.empty((t_eval.size,) + y0.shape, dtype=y0.dtype)
    solver = None
    for i, t_target in enumerate(t_eval):
        if t_target == t0:
            out[i] = y0
            continue
        if solver is None:
            solver = DormandPrince45(rhs, float(t0), y0, rtol, atol)
        while solver.t < t_target:
            solver.step(float(t_target), max_steps)
        out[i] = solver.y
    return out


def _remaining_change(solver: DormandPrince45, max_steps: int) -> float:
    """Estimate how far ``y`` still moves, in tolerance units, after smoothing the state.

    Near a steady state the step size is limited by stability, not accuracy, and the
    fastest modes sit at tolerance level without decaying, which spoils derivative-based
    estimates. A few steps at a quarter of that size damp them; then the estimate
    ``|f|^2 / |df/dt|`` (``f = dy/dt``) is exact for exponential decay of the slowest mode,
    and stays large for algebraic decay such as logits under cross-entropy. A derivative
    that moves ``y`` by at most 100 units of round-off per step counts as zero.
    """
    h = solver.h / 4
    for i in range(_POLISH_STEPS):
        if i == _POLISH_STEPS - 10:
            t_mid, f_mid = solver.t, solver.f
        solver.step(solver.t + h, max_steps)
    speed = solver.norm(solver.f)
    roundoff = solver.norm(np.finfo(solver.y.dtype).eps * np.abs(solver.y)) / h
    if speed <= 100 * roundoff:
        return 0.0
    accel = solver.norm((solver.f - f_mid) / (solver.t - t_mid))
    return speed**2 / accel if accel > 0 else math.inf


def integrate_to_steady_state(
    rhs: Rhs,
    y0: np.ndarray,
    *,
    t0: float = 0.0,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 10_000,
) -> tuple[float, np.ndarray]:
    """Integrate until ``y`` stops changing; return ``(t, y)`` there.

    Each time the elapsed time doubles, if ``y`` moved by at most the tolerance (weighted
    RMS norm <= 1) since the last such check, the estimated remaining change (see
    ``_remaining_change``) is computed; the state is steady when that is <= 1 too.
    Raises :class:`ConvergenceError` after ``max_steps`` steps, e.g. for cross-entropy,
    whose logits grow without bound.
    """
    y0 = np.asarray(y0)
    rtol, atol = _tolerances(y0.dtype, rtol, atol)
    solver = DormandPrince45(rhs, float(t0), y0, rtol, atol)
    if not np.any(solver.f):
        return solver.t, solver.y
    y_checked, t_check = solver.y, t0
    try:
        while True:
            solver.step(max_steps=max_steps)
            if solver.t < t_check:
                continue
            if solver.norm(solver.y - y_checked) <= 1 and _remaining_change(solver, max_steps) <= 1:
                return solver.t, solver.y
            y_checked, t_check = solver.y, t0 + 2 * (solver.t - t0)
    except ConvergenceError as e:
        raise ConvergenceError(
            f"no steady state reached: {e}. The dynamics may not converge (e.g. "
            "cross-entropy keeps growing the logits); pass finite times t instead"
        ) from e
