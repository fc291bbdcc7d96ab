"""Regression data: the planted sparse Gaussian problem and the .npz/.h5 loaders.

A :class:`Problem` holds either one design shared by every simulation seed (``X`` of shape
(n, d)) or one per seed (``X`` of shape (S, n, d), ``per_seed_data = true``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Config
from .errors import InputError, existing_file


@dataclass
class Problem:
    """Least-squares data f(theta) = ||X theta - y||^2 / (2n).

    Attributes
    ----------
    X : ndarray of shape (n, d) or (S, n, d)
        Design, shared by all seeds or one per seed.
    y : ndarray of shape (n,) or (S, n)
        Targets.
    theta_star : ndarray of shape (d,) or (S, d), or None
        The planted vector, when known.
    """

    X: np.ndarray
    y: np.ndarray
    theta_star: np.ndarray | None = None

    @property
    def per_seed(self) -> bool:
        return self.X.ndim == 3

    @property
    def n(self) -> int:
        return self.X.shape[-2]

    @property
    def d(self) -> int:
        return self.X.shape[-1]

    def for_seed(self, s: int) -> "Problem":
        """The data of simulation seed ``s`` alone (shared data: the same arrays)."""
        if not self.per_seed:
            return self
        star = None if self.theta_star is None else self.theta_star[s]
        return Problem(self.X[s], self.y[s], star)


def data_seed_sequence(data_seed: int, seed_index: int | None) -> np.random.SeedSequence:
    """The random stream of the data: one for shared data, one per seed index otherwise."""
    if seed_index is None:
        return np.random.SeedSequence(data_seed)
    return np.random.SeedSequence(data_seed, spawn_key=(seed_index,))


def planted_sparse_regression(n: int, d: int, sparsity: int, noise: float,
                              rng: np.random.Generator):
    """X with iid N(0, 1) entries, theta_star with ``sparsity`` entries of random sign and
    magnitude in [1, 2] at random coordinates, y = X theta_star + noise * N(0, 1)."""
    X = rng.standard_normal((n, d))
    theta_star = np.zeros(d)
    support = rng.choice(d, size=sparsity, replace=False)
    theta_star[support] = rng.choice([-1.0, 1.0], size=sparsity) * (1.0 + rng.random(sparsity))
    y = X @ theta_star + noise * rng.standard_normal(n)
    return X, y, theta_star


def make_problem(config: Config) -> Problem:
    """The data of a run, generated (seeded) or loaded, validated, in float64."""
    p = config.problem
    seeds = config.run.seeds
    if p.kind == "file":
        return load_problem(p.path, seeds)
    if not p.per_seed_data:
        rng = np.random.default_rng(data_seed_sequence(p.seed, None))
        return Problem(*planted_sparse_regression(p.n, p.d, p.sparsity, p.noise, rng))
    X = np.empty((seeds, p.n, p.d))
    y = np.empty((seeds, p.n))
    star = np.empty((seeds, p.d))
    for s in range(seeds):
        rng = np.random.default_rng(data_seed_sequence(p.seed, s))
        X[s], y[s], star[s] = planted_sparse_regression(p.n, p.d, p.sparsity, p.noise, rng)
    return Problem(X, y, star)


def read_arrays(path: Path, names: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """Read named arrays from .npz (keys) or .h5 (datasets ``/name``); missing names are left out."""
    path = existing_file(path, f"{what} file", "an .npz or .h5 file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".npz", ".npy"):
            with np.load(path, allow_pickle=False) as data:
                if isinstance(data, np.ndarray):  # pragma: no cover - np.load of .npy returns array
                    return {names[0]: data}
                return {k: np.asarray(data[k]) for k in names if k in data.files}
        if suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                return {k: np.asarray(f[k]) for k in names if k in f and isinstance(f[k], h5py.Dataset)}
    except InputError:
        raise
    except Exception as err:  # any reader failure is bad input, reported on one line
        raise InputError(f"{what} file {path} cannot be read ({type(err).__name__}: {err})") from None
    raise InputError(f"{what} file {path}: expected a .npz or .h5 file, got '{suffix or 'no suffix'}'")


def as_float_array(array: np.ndarray, name: str, path: Path) -> np.ndarray:
    """``array`` (named ``name`` in the file ``path``) as contiguous float64, or InputError if
    it is not real or holds NaN or inf."""
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{name} in {path} has dtype {array.dtype}, expected real numbers")
    out = np.ascontiguousarray(array, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise InputError(f"{name} in {path} has {int(np.sum(~np.isfinite(out)))} non-finite entries (NaN or inf)")
    return out


def load_problem(path: str | Path, seeds: int) -> Problem:
    """Load X, y (and theta_star) from .npz or .h5; X may be (n, d) or (seeds, n, d)."""
    path = Path(path)
    arrays = read_arrays(path, ("X", "y", "theta_star"), "data")
    for name in ("X", "y"):
        if name not in arrays:
            raise InputError(f"data file {path} has no array '{name}' (expected X of shape (n, d) and y of shape (n,))")
    X = as_float_array(arrays["X"], "X", path)
    y = as_float_array(arrays["y"], "y", path)
    if X.ndim not in (2, 3) or X.size == 0:
        raise InputError(f"X in {path} has shape {X.shape}, expected (n, d) or (seeds, n, d)")
    if X.ndim == 3 and X.shape[0] != seeds:
        raise InputError(f"X in {path} has {X.shape[0]} per-seed designs, but run.seeds = {seeds}")
    if y.shape != X.shape[:-1]:
        raise InputError(f"y in {path} has shape {y.shape}, expected {X.shape[:-1]} to match X of shape {X.shape}")
    star = arrays.get("theta_star")
    if star is not None:
        star = as_float_array(star, "theta_star", path)
        expected = X.shape[:-2] + X.shape[-1:]
        if star.shape != expected:
            raise InputError(f"theta_star in {path} has shape {star.shape}, expected {expected}")
    return Problem(X, y, star)
