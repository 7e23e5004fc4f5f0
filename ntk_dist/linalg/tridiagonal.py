"""Eigendecomposition in core on the host in 1.5 copies of the matrix (LAPACK's dsyevr
takes two, ``jnp.linalg.eigh`` four): the leaves of the out-of-core eigh
(:mod:`ntk_dist.linalg.qdwh`) and a stored kernel's in-core eigh on CPUs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.linalg

from ntk_dist.linalg.band import compact_wy

__all__ = ["HOST_LEAF_COPIES", "host_eigh"]

HOST_LEAF_COPIES = 1.5  # the block (then half of it, its reflectors) and V
_REFLECTOR_BLOCK = 64  # reflectors of the tridiagonal reduction applied at once


def host_eigh(read: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric matrix ``read()`` (a new
    array, symmetrised in place) in ``HOST_LEAF_COPIES`` copies of its memory (LAPACK's
    dsyevr takes two, ``jnp.linalg.eigh`` four).

    LAPACK's tridiagonal reduction (sytrd) in place; its reflectors are copied out in
    blocks of ``_REFLECTOR_BLOCK`` (compact WY, half the matrix) before the matrix is
    freed; MRRR (stemr) gives all eigenvectors of the tridiagonal matrix at once (so
    they are orthogonal in clusters too), and the reflector blocks are applied to them.
    """
    block = read()
    n = block.shape[0]
    for r in range(0, n, _REFLECTOR_BLOCK * 8):  # (A + A^T) / 2 in place, a strip at a time
        rows = slice(r, r + _REFLECTOR_BLOCK * 8)
        block[rows, r:] = (block[rows, r:] + block[r:, rows].T) / 2
        block[r:, rows] = block[rows, r:].T
    block = block.T  # Fortran order: LAPACK works in place
    sytrd, sytrd_lwork = scipy.linalg.get_lapack_funcs(("sytrd", "sytrd_lwork"), (block,))
    lwork, _ = sytrd_lwork(n, lower=1)
    block, d, e, tau, info = sytrd(block, lower=1, lwork=max(int(lwork), 1), overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK sytrd failed on a {n} x {n} block (info={info})")
    reflectors = []  # Q = H_0 H_1 ... H_{n-2}; H_j acts on rows j+1.. (LAPACK's lower storage)
    for j0 in range(0, n - 1, _REFLECTOR_BLOCK):
        j1 = min(n - 1, j0 + _REFLECTOR_BLOCK)
        v = np.tril(block[j0 + 1 :, j0:j1], -1)
        v[np.arange(j1 - j0), np.arange(j1 - j0)] = 1
        reflectors.append((j0, v, compact_wy(v, tau[j0:j1])))
    del block
    w, z = scipy.linalg.eigh_tridiagonal(d, e, check_finite=False, lapack_driver="stemr")
    zt = z.T  # LAPACK's Fortran order: Q Z as (Z^T Q^T), row-major gemms (~4x faster)
    for j0, v, t in reversed(reflectors):
        for r in range(0, n, _REFLECTOR_BLOCK * 2):  # temporaries of a few rows
            part = zt[r : r + _REFLECTOR_BLOCK * 2, j0 + 1 :]
            part -= ((part @ v) @ t.T) @ v.T
    return w, z
