"""What ddln_fast is measured against, each written the way a researcher would write it.

- :class:`Floor`: the two products with X alone (GEMMs for shared X, numpy's batched products
  for per-seed X) plus one read-and-write pass over the state: what any gradient evaluation of
  the layer flow must cost on this machine.
- :class:`NumpyGD`: a vectorized numpy gradient-descent loop (prefix/suffix products with
  ``cumprod``, batched over seeds).
- :class:`TorchGD`: a PyTorch eager CPU loop, autograd through the batched layers.
- :func:`scipy_rhs`: the flattened layer system of one seed for ``scipy.integrate.solve_ivp``.
- :class:`DdlnSteps`: ddln_fast's :class:`~ddln_fast.integrators.Integrator` (or another solver)
  advanced a few steps per call.
- :class:`GatheredFloor`: the floor of a minibatch step: each seed's batch rows gathered by
  numpy, the two products with them as BLAS matrix-vector products, one pass over the state.
- :class:`TorchSGD`: a PyTorch eager minibatch SGD loop (``torch.randperm`` batches per seed,
  autograd).

Every runner times itself (``perf_counter`` around the work only) and keeps the cost per step
and per gradient evaluation of each call, so that a benchmark can interleave several runners
in one loop and compare their minima: on a shared machine only ratios measured side by side
mean anything.
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit, prange

from ddln_fast.integrators import Integrator


@njit(parallel=True, cache=True)
def _stream_pass(flat, scale):
    """flat[i] = flat[i] * scale: one read and one write of every element (``scale`` is a run
    time value, so the compiler cannot drop the pass)."""
    for i in prange(flat.shape[0]):
        flat[i] = flat[i] * scale


class Timed:
    """Base class: ``self.per_step`` and ``self.per_eval`` hold the cost of each call (s)."""

    steps_per_call = 1
    evals_per_step = 1

    def __init__(self):
        self.per_step: list[float] = []
        self.per_eval: list[float] = []

    def __call__(self):
        start = time.perf_counter()
        steps, evals = self.run()
        elapsed = time.perf_counter() - start
        self.per_step.append(elapsed / steps)
        self.per_eval.append(elapsed / evals)

    def run(self) -> tuple[int, int]:
        """Do the work of one call; return (steps, batched gradient evaluations) done."""
        raise NotImplementedError

    @property
    def best_step(self) -> float:
        return min(self.per_step)

    @property
    def best_eval(self) -> float:
        return min(self.per_eval)


class Floor(Timed):
    """Two products with X for every seed, then one read-and-write pass over the state."""

    def __init__(self, X, U, theta):
        super().__init__()
        self.X = X
        self.per_seed = X.ndim == 3
        self.theta = np.ascontiguousarray(theta)
        S, n = theta.shape[0], X.shape[-2]
        self.R = np.zeros((S, n), dtype=X.dtype)
        self.G = np.zeros_like(self.theta)
        self.flat = U.reshape(-1)
        self.one = X.dtype.type(1.0)

    def run(self):
        if self.per_seed:
            np.matmul(self.X, self.theta[:, :, None], out=self.R[:, :, None])
            np.matmul(self.R[:, None, :], self.X, out=self.G[:, None, :])
        else:
            np.matmul(self.theta, self.X.T, out=self.R)
            np.matmul(self.R, self.X, out=self.G)
        _stream_pass(self.flat, self.one)
        return 1, 1


class NumpyGD(Timed):
    """Plain numpy gradient descent on the layers of all seeds at once."""

    def __init__(self, X, y, u0, dt, steps_per_call=2):
        super().__init__()
        self.X, self.y, self.U, self.dt = X, y, np.array(u0), dt
        self.n = X.shape[-2]
        self.steps_per_call = steps_per_call

    def step(self):
        U, X = self.U, self.X
        theta = U.prod(axis=1)
        if X.ndim == 3:
            R = np.einsum("snd,sd->sn", X, theta) - self.y
            G = np.einsum("sn,snd->sd", R, X) / self.n
        else:
            R = theta @ X.T - self.y
            G = R @ X / self.n
        ones = np.ones_like(U[:, :1])
        prefix = np.cumprod(np.concatenate([ones, U[:, :-1]], axis=1), axis=1)
        suffix = np.cumprod(np.concatenate([ones, U[:, :0:-1]], axis=1), axis=1)[:, ::-1]
        U -= self.dt * G[:, None, :] * prefix * suffix

    def run(self):
        for _ in range(self.steps_per_call):
            self.step()
        return self.steps_per_call, self.steps_per_call


class TorchGD(Timed):
    """PyTorch eager gradient descent: autograd through prod over the layers."""

    def __init__(self, X, y, u0, dt, threads, steps_per_call=2):
        import torch

        super().__init__()
        torch.set_num_threads(threads)
        self.torch = torch
        self.X = torch.from_numpy(np.ascontiguousarray(X))
        self.y = torch.from_numpy(np.ascontiguousarray(y))
        self.U = torch.tensor(u0, requires_grad=True)
        self.n, self.dt = X.shape[-2], dt
        self.steps_per_call = steps_per_call

    def step(self):
        torch, U = self.torch, self.U
        theta = U.prod(dim=1)
        if self.X.dim() == 3:
            R = torch.bmm(self.X, theta.unsqueeze(2)).squeeze(2) - self.y
        else:
            R = theta @ self.X.T - self.y
        loss = R.pow(2).sum() / (2 * self.n)  # a sum over seeds: each seed's gradient is its own
        loss.backward()
        with torch.no_grad():
            U -= self.dt * U.grad
        U.grad = None

    def run(self):
        for _ in range(self.steps_per_call):
            self.step()
        return self.steps_per_call, self.steps_per_call


class DdlnSteps(Timed):
    """ddln_fast's integrator; fixed-step methods advance ``steps_per_call`` steps per call,
    dopri5 advances ``t_per_call`` of flow time (its steps and evaluations are counted)."""

    def __init__(self, method, problem, u0, dt, dtype=np.float64, steps_per_call=4,
                 rtol=1e-8, atol=1e-12, t_per_call=None, solver=None, parametrization=None):
        super().__init__()
        self.it = solver or Integrator(method, problem, u0, dt=dt, rtol=rtol, atol=atol, dtype=dtype,
                                       parametrization=parametrization)
        self.method, self.dt = method, dt
        self.steps_per_call = steps_per_call
        self.t_per_call = t_per_call
        self.t = 0.0

    def run(self):
        st = self.it.state
        steps0, evals0 = int(st.steps.max()), int(st.nfev.max())
        if self.method == "dopri5":
            self.t += self.t_per_call
        else:
            self.t += self.steps_per_call * self.dt
        self.it.advance_to(self.t)
        steps, evals = int(st.steps.max()) - steps0, int(st.nfev.max()) - evals0
        return max(steps, 1), max(evals, 1)


class GatheredFloor(Timed):
    """What a minibatch step must cost: for each seed, its batch's rows of X gathered into a
    buffer (``np.take``), r = X_B theta - y_B and X_B^T r as BLAS matrix-vector products, then
    one read-and-write pass over the state, whose time is also kept alone (``per_pass``: a pass
    over the state right after the products, the cost "one more pass" is measured in)."""

    def __init__(self, X, y, U, theta, batch, seed=0):
        super().__init__()
        self.X, self.y = X, y
        self.theta = np.ascontiguousarray(theta)
        S, n = theta.shape[0], X.shape[0]
        rng = np.random.default_rng(seed)
        self.batches = np.stack([rng.permutation(n)[:batch] for _ in range(S)])
        self.rows = np.empty((batch, X.shape[1]), dtype=X.dtype)
        self.G = np.zeros_like(self.theta)
        self.flat = U.reshape(-1)
        self.one = X.dtype.type(1.0)
        self.per_pass: list[float] = []

    def run(self):
        for s in range(self.theta.shape[0]):
            rows = self.batches[s]
            np.take(self.X, rows, axis=0, out=self.rows)
            r = self.rows @ self.theta[s] - self.y[rows]
            np.dot(r, self.rows, out=self.G[s])
        start = time.perf_counter()
        _stream_pass(self.flat, self.one)
        self.per_pass.append(time.perf_counter() - start)
        return 1, 1


class TorchSGD(TorchGD):
    """PyTorch eager minibatch SGD on the layers of all seeds: each seed draws a
    ``torch.randperm(n)`` per epoch and takes its batches in order, the batch rows are gathered
    by indexing (S, b, d), autograd through the product of the layers."""

    def __init__(self, X, y, u0, dt, batch, threads, steps_per_call=2):
        import torch

        super().__init__(X, y, u0, dt, threads, steps_per_call)
        self.batch = batch
        self.generators = [torch.Generator().manual_seed(s) for s in range(u0.shape[0])]
        self.order, self.position = None, self.n

    def step(self):
        torch, U, b = self.torch, self.U, self.batch
        if self.position + b > self.n:
            self.order = torch.stack([torch.randperm(self.n, generator=g) for g in self.generators])
            self.position = 0
        rows = self.order[:, self.position:self.position + b]
        self.position += b
        R = torch.bmm(self.X[rows], U.prod(dim=1).unsqueeze(2)).squeeze(2) - self.y[rows]
        (R.pow(2).sum() / (2 * b)).backward()  # a sum over seeds: each seed's gradient is its own
        with torch.no_grad():
            U -= self.dt * U.grad
        U.grad = None


def scipy_rhs(X, y):
    """The right-hand side of one seed's flattened layer system (L*d,), for solve_ivp."""
    n, d = X.shape

    def rhs(t, v):
        U = v.reshape(-1, d)
        theta = U.prod(axis=0)
        g = X.T @ (X @ theta - y) / n
        ones = np.ones((1, d))
        prefix = np.cumprod(np.concatenate([ones, U[:-1]]), axis=0)
        suffix = np.cumprod(np.concatenate([ones, U[:0:-1]]), axis=0)[::-1]
        return (-g * prefix * suffix).ravel()

    return rhs


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
