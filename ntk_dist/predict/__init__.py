"""Training-dynamics predictors; drop-in for ``neural_tangents.predict``.

``gradient_descent_mse``, ``gradient_descent``, ``ODEState`` and ``max_learning_rate``
match neural-tangents; ``gradient_descent_mse_params`` (weight space) is new. Kernels may
be arrays of layout ``(N1, N2, A1, A2, ...)``, a :class:`~ntk_dist.store.KernelStore`
or any :class:`KernelOperator` (:mod:`ntk_dist.linalg`).
"""

from ntk_dist.linalg.operator import DenseKernelOperator, KernelOperator
from ntk_dist.predict.integrator import ConvergenceError
from ntk_dist.predict.learning_rate import max_learning_rate
from ntk_dist.predict.mse import gradient_descent_mse
from ntk_dist.predict.ode import ODEState, gradient_descent
from ntk_dist.predict.weight_space import gradient_descent_mse_params

__all__ = [
    "ConvergenceError",
    "DenseKernelOperator",
    "KernelOperator",
    "ODEState",
    "gradient_descent",
    "gradient_descent_mse",
    "gradient_descent_mse_params",
    "max_learning_rate",
]
