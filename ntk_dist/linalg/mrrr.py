"""Eigenvectors of a symmetric tridiagonal matrix a slice of columns at a time, by MRRR.

The multiple relatively robust representations algorithm (Dhillon and Parlett; LAPACK's
stemr) finds each eigenvector in ``O(n)`` from a tree of shifted ``L D L^T``
factorisations, orthogonal to the others without Gram-Schmidt, clusters included. stemr
would return all ``n`` vectors at once (``n x n``); its two kernels are called here
instead, through the function pointers scipy exports for Cython (``cython_lapack``):
``larre`` once (the root representation and every eigenvalue by dqds, ``O(n^2)``), then
``larrv`` for a slice of the eigenvalues, writing that slice's vectors straight into the
caller's column-major buffer. A slice's vectors are orthogonal among themselves; across
the slices' borders, which the caller puts at wide gaps, they are orthogonal by the gap
(:data:`SAFE_GAP`) or, at narrower ones, by larrv making the same vectors as in one call
(:meth:`Tridiagonal.vectors`). At N = 2048 this takes 0.1-0.15 s where inverse iteration
(LAPACK's stein, one vector at a time) took 0.22-0.26 s.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import scipy.linalg.cython_lapack

__all__ = ["MRRRError", "Tridiagonal"]

MIN_RELATIVE_GAP = 1e-3  # stemr's MINRGP: a child cluster ends at a relative gap this wide
SAFE_GAP = 2e-3  # over sqrt(n): slices that end at relative gaps this wide are made alone.
# Measured, vectors across a gap g then meet at up to ~eps / 2g (9.5e-13 at n = 30000 and
# g ~ 3.5e-5, as within a slice): a quarter of the 1e3 sqrt(n) eps the caller checks for.
# An even spectrum of n values has gaps ~1 / n.


class MRRRError(ArithmeticError):
    """LAPACK's larre or larrv reported a failure (``info`` in the message)."""


_capsule_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
    ("PyCapsule_GetName", ctypes.pythonapi)
)
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)


def _lapack(name: str, arguments: int) -> ctypes._CFuncPtr:
    """The Cython-exported LAPACK routine ``name``: every argument by pointer, as Fortran
    (a ctypes call releases the GIL)."""
    capsule = scipy.linalg.cython_lapack.__pyx_capi__[name]
    signature = _capsule_name(capsule)
    if b"long" in signature or b"int64" in signature:  # the arrays here are 32-bit ints
        raise RuntimeError(f"scipy's cython_lapack {name} takes 64-bit integers: {signature!r}")
    address = _capsule_pointer(capsule, signature)
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * arguments)(address)


def _int(x: int) -> np.ndarray:
    return np.array([x], np.int32)


def _call(routine: ctypes._CFuncPtr, *arguments: np.ndarray | bytes | int) -> None:
    """``routine`` on the arguments' addresses (an ``int`` is one; the arrays stay
    referenced until it returns: a temporary's address alone would let it be freed first)."""
    routine(*(_address(a) for a in arguments))


def _address(argument: np.ndarray | bytes | int) -> int | ctypes.c_char_p:
    if isinstance(argument, bytes):
        return ctypes.c_char_p(argument)
    return argument if isinstance(argument, int) else argument.ctypes.data


class Tridiagonal:
    """The root representation of the tridiagonal matrix with diagonal ``d`` and
    subdiagonal ``e`` (float32 or float64), its eigenvalues (:attr:`values`), and its
    eigenvectors on demand (:meth:`vectors`).

    :attr:`values` are in LAPACK's order: ascending within each block the matrix splits
    into (at negligible subdiagonal entries), block after block; :attr:`relative_gaps`
    ``[j]`` separates value ``j`` from ``j + 1`` relative to the larger (infinite between
    blocks, whose vectors have disjoint supports).
    """

    def __init__(self, d: np.ndarray, e: np.ndarray):
        dtype = np.result_type(d.dtype, np.float32)
        self.n, self.dtype = n, dtype = len(d), dtype
        if n <= 1:  # larre leaves a 1 x 1 matrix without a block
            self.values, self.relative_gaps = np.array(d, dtype), np.zeros(0, dtype)
            return
        prefix = "d" if dtype == np.float64 else "s"
        self._larrv = _lapack(prefix + "larrv", 25)
        eps = float(np.finfo(dtype).eps)
        self.d = np.array(d, dtype)
        self.e = np.zeros(n, dtype)  # on return: L's subdiagonal, each block's shift at its end
        self.e[: n - 1] = e
        # scaled to norm ~1 by a power of two (exact): larrv fails on norms ~1e30 and up,
        # as stemr does with its own scaling
        norm = float(max(np.abs(self.d).max(initial=0), np.abs(self.e).max(initial=0)))
        if not math.isfinite(norm):
            raise ValueError("the tridiagonal matrix has NaN or Inf entries")
        self.scale = 2.0 ** -round(math.log2(norm)) if norm > 0 else 1.0
        self.d *= self.scale
        self.e *= self.scale
        info = np.zeros(1, np.int32)
        size = _int(n)
        _call(_lapack(prefix + "larrr", 4), size, self.d, self.e, info)
        split_tolerance = eps if info[0] == 0 else -eps  # relative splitting when it is safe
        # stemr's tolerances when vectors follow: larrv refines what it needs
        self.rtol = (np.sqrt(eps), max(np.sqrt(eps) * 5e-3, 4 * eps))
        self.bounds = np.zeros(2, dtype)  # larre's interval holding the spectrum
        self.blocks, self.split = np.zeros(1, np.int32), np.zeros(n, np.int32)
        self.count = np.zeros(1, np.int32)
        self.w, self.werr, self.wgap = (np.zeros(n, dtype) for _ in range(3))
        self.block, self.index = np.zeros(n, np.int32), np.zeros(n, np.int32)
        self.gers, self.pivmin = np.zeros(2 * n, dtype), np.zeros(1, dtype)
        zero = _int(0)
        _call(
            _lapack(prefix + "larre", 25), b"A", size, self.bounds[:1], self.bounds[1:],
            zero, zero, self.d, self.e, self.e**2, self._real(self.rtol[0]),
            self._real(self.rtol[1]), self._real(split_tolerance), self.blocks, self.split,
            self.count, self.w, self.werr, self.wgap, self.block, self.index, self.gers,
            self.pivmin, np.zeros(6 * n, dtype), np.zeros(5 * n, np.int32), info,
        )  # fmt: skip
        if info[0] != 0 or self.count[0] != n:
            raise MRRRError(f"LAPACK {prefix}larre: info {info[0]}, {self.count[0]} of {n} values")
        self.shift = self.e[self.split[self.block - 1] - 1]  # each value's block's shift
        self.values = (self.w + self.shift) / self.scale
        # gaps as larrv's first level of clusters sees them: relative to the root shift
        # (vectors across a gap are the more orthogonal the wider it is there)
        scale = np.maximum(np.abs(self.w[1:]), np.abs(self.w[:-1]))
        gaps = (self.w[1:] - self.w[:-1]) / np.where(scale > 0, scale, 1.0)
        self.relative_gaps = np.where(self.block[1:] == self.block[:-1], gaps, np.inf)

    def _real(self, x: float) -> np.ndarray:
        return np.array([x], self.dtype)

    def vectors(self, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
        """Eigenvectors ``lo .. hi - 1`` (in :attr:`values`' order) written into columns
        ``1 .. hi - lo`` of ``out`` (column-major, at least ``n`` rows; its columns 0 and
        ``hi - lo + 1`` are larrv's workspace, its rows from ``n`` are left alone); returns
        their eigenvalues, refined by larrv.

        larrv sees the eigenvalues :meth:`seen` gives: the slice alone (as after stemr's
        larre for an index range), its vectors orthogonal to others across its ends' wide
        gaps; or the whole first-level clusters it cuts, of which it makes only the slice's
        vectors (its ``DOL..DOU``): the same vectors as if it made them all."""
        n, m = self.n, hi - lo
        if out.shape[1] != m + 2 or out.shape[0] < n or out.strides[0] != out.itemsize:
            raise ValueError(f"out must be column-major with {n}+ rows and {m + 2} columns")
        if n <= 1:
            out[:n, 1:-1] = 1
            return self.values[lo:hi].copy()
        first, last = self.seen(lo, hi)
        below, above = self.bounds
        if self.block[max(first - 1, 0)] == self.block[min(last, n - 1)]:  # all in one block
            if first > 0:  # the neighbours' uncertainty intervals bound the extreme gaps
                below = self.w[first - 1] + self.shift[first - 1] + self.werr[first - 1]
            if last < n:
                above = self.w[last] + self.shift[last] - self.werr[last]
        w = self.w[first:last].copy()
        seen, dol, dou = last - first, lo - first + 1, hi - first
        # Z's column dol is out's column 1; larrv uses columns max(dol - 1, 1) ..
        # min(dou + 1, seen) (out's 0 .. m + 1 at most)
        ld = out.strides[1] // out.itemsize
        z = out.ctypes.data + (2 - dol) * ld * out.itemsize
        info = np.zeros(1, np.int32)
        _call(
            self._larrv, _int(n), self._real(below), self._real(above), self.d.copy(),
            self.e.copy(), self.pivmin, self.split, _int(seen), _int(dol), _int(dou),
            self._real(MIN_RELATIVE_GAP), self._real(self.rtol[0]), self._real(self.rtol[1]),
            w, self.werr[first:last].copy(), self.wgap[first:last].copy(),
            self.block[first:last].copy(), self.index[first:last].copy(), self.gers, z,
            _int(ld), np.zeros(2 * seen, np.int32), np.zeros(12 * n, self.dtype),
            np.zeros(7 * n, np.int32), info,
        )  # fmt: skip
        if info[0] != 0:
            raise MRRRError(f"LAPACK larrv: info {info[0]} for eigenvectors {lo}..{hi - 1}")
        return w[lo - first : hi - first] / self.scale

    @property
    def safe_gap(self) -> float:
        """Slices that end at relative gaps this wide are made alone: ``SAFE_GAP / sqrt(n)``."""
        return SAFE_GAP / math.sqrt(self.n)

    def seen(self, lo: int, hi: int) -> tuple[int, int]:
        """The eigenvalues ``first .. last - 1`` that larrv sees to make vectors ``lo .. hi
        - 1``: the slice alone if both its ends lie at gaps of at least :attr:`safe_gap`,
        else the whole first-level clusters it cuts (for an even spectrum, all of it:
        ``O(n^2)`` refinement for each slice, minutes at n = 30000)."""
        first, last = lo, hi
        if not (self._gap(lo) >= self.safe_gap and self._gap(hi) >= self.safe_gap):
            while self._gap(first) < MIN_RELATIVE_GAP:
                first -= 1
            while self._gap(last) < MIN_RELATIVE_GAP:
                last += 1
        return first, last

    def _gap(self, j: int) -> float:
        """The relative gap before eigenvalue ``j`` (infinite at the ends)."""
        return float(self.relative_gaps[j - 1]) if 0 < j < self.n else math.inf
