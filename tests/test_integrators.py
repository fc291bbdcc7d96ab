"""Gradient descent, the depth-2 identities, batching and per-seed random streams.

References:
- a plain numpy gradient-descent loop on the layers (references.gradient_descent: all-but-one
  products by multiplying the other layers, g = X^T (X theta - y) / n);
- the exact per-step identities of gradient descent at depth 2 (docs/theory.md, "Closed forms"):
  (u1 + u2)_{k+1} = (1 - eta g_k)(u1 + u2)_k and (u1 - u2)_{k+1} = (1 + eta g_k)(u1 - u2)_k,
  with g_k recomputed in numpy from the stored layers;
- for batching, the same seed integrated alone (the batch must not change a seed's result);
- for the random streams, the same seed drawn in a run of another size.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from ddln_fast import simulate
from ddln_fast.init import initial_layers
from ddln_fast.integrators import Integrator
from ddln_fast.problem import Problem, make_problem
from references import gradient, gradient_descent

# --- euler is gradient descent ------------------------------------------------------------------


@pytest.mark.parametrize("depth,init,per_seed_data", [
    (2, "gaussian", False),
    (3, "first_layer_zero", False),  # a layer exactly 0: the products must not divide by it
    (4, "gaussian", True),
    (6, "gaussian", False),  # beyond the depths with specialised kernels
])
def test_euler_is_gradient_descent(make_config, depth, init, per_seed_data):
    """Every iterate of euler equals the numpy loop to 1e-12: both do the same arithmetic up to
    the order of the sums in X^T r (a few ulps per step on O(1) layers, 100 steps)."""
    eta, steps = 0.02, 100
    config = make_config({"model.depth": depth, "model.init": init, "problem.per_seed_data": per_seed_data,
                          "integrator.method": "euler", "integrator.dt": eta,
                          "integrator.t_end": eta * steps, "run.checkpoints": steps + 1})
    run = simulate(config)
    assert len(run.t) == steps + 1
    np.testing.assert_allclose(run.t, eta * np.arange(steps + 1), rtol=1e-15)
    for s in range(config.run.seeds):
        X, y = (run.X[s], run.y[s]) if per_seed_data else (run.X, run.y)
        expected = gradient_descent(X, y, run.u0[s], eta, steps)
        assert np.max(np.abs(expected[-1] - expected[0])) > 1e-2  # the layers moved
        np.testing.assert_allclose(run.u[:, s], expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(run.theta[:, s], np.prod(expected, axis=1), rtol=0, atol=1e-12)
    assert np.all(run.nfev[-1] == steps)  # one gradient evaluation per GD step


@pytest.mark.parametrize("depth", [2, 5])
def test_euler_is_gradient_descent_across_coordinate_blocks(make_config, depth):
    """d = 1300: several blocks of coordinates per seed, the last one partial. n = 100 keeps the
    largest eigenvalue of X^T X / n near (sqrt(1300) + 10)^2 / 100 ~ 21: eta = 0.01 is stable."""
    eta, steps = 0.01, 30
    config = make_config({"model.depth": depth, "problem.d": 1300, "problem.n": 100, "integrator.method": "euler",
                          "integrator.dt": eta, "integrator.t_end": eta * steps, "run.checkpoints": 4,
                          "model.alpha": 0.9, "model.jitter": 0.2})
    run = simulate(config)
    for s in range(config.run.seeds):
        expected = gradient_descent(run.X, run.y, run.u0[s], eta, steps)
        np.testing.assert_allclose(run.u[-1, s], expected[-1], rtol=0, atol=1e-12)


def test_depth_two_gradient_descent_identities(make_config):
    """(u1 + u2) is multiplied by (1 - eta g_k) and (u1 - u2) by (1 + eta g_k) at step k, exactly
    in exact arithmetic; in floating point each side is a couple of roundings of O(1) numbers,
    so 1e-13 (100 * eps) bounds the residual."""
    eta, steps = 0.05, 80
    config = make_config({"model.depth": 2, "integrator.method": "euler", "integrator.dt": eta,
                          "integrator.t_end": eta * steps, "run.checkpoints": steps + 1})
    run = simulate(config)
    u = run.u  # (K, S, 2, d), one checkpoint per step
    assert u.shape[0] == steps + 1
    for s in range(config.run.seeds):
        plus = u[:, s, 0] + u[:, s, 1]
        minus = u[:, s, 0] - u[:, s, 1]
        for k in range(steps):
            g = gradient(run.X, run.y, u[k, s, 0] * u[k, s, 1])
            assert np.max(np.abs(plus[k + 1] - (1 - eta * g) * plus[k])) <= 1e-13
            assert np.max(np.abs(minus[k + 1] - (1 + eta * g) * minus[k])) <= 1e-13
        # non-trivial: the sum and difference really changed along the run
        assert np.max(np.abs(plus[-1] - plus[0])) > 1e-2 and np.max(np.abs(minus[-1] - minus[0])) > 1e-2


def test_depth_two_identities_one_step_at_a_time(make_config):
    """The same identities, driving ddln_fast.integrators.Integrator directly step by step."""
    eta = 0.05
    config = make_config({"model.depth": 2, "run.seeds": 3})
    problem = make_problem(config)
    u0 = initial_layers(config, problem.d)
    integrator = Integrator("euler", problem, u0, dt=eta)
    for k in range(1, 21):
        before = integrator.U.copy()
        integrator.advance_to(k * eta)
        after = integrator.U
        assert np.all(integrator.state.steps == k)
        for s in range(3):
            g = gradient(problem.X, problem.y, before[s, 0] * before[s, 1])
            np.testing.assert_allclose(after[s, 0] + after[s, 1], (1 - eta * g) * (before[s, 0] + before[s, 1]),
                                       rtol=0, atol=1e-13)
            np.testing.assert_allclose(after[s, 0] - after[s, 1], (1 + eta * g) * (before[s, 0] - before[s, 1]),
                                       rtol=0, atol=1e-13)


# --- a seed's result does not depend on the batch -----------------------------------------------


def _integrate(method, problem, u0, t_end, dt=0.01):
    integrator = Integrator(method, problem, u0, dt=dt, rtol=1e-9, atol=1e-13)
    integrator.advance_to(t_end / 2)
    integrator.advance_to(t_end)
    return integrator


@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
def test_per_seed_data_seed_alone_equals_seed_in_batch_bitwise(make_config, method):
    """Per-seed data: one product per seed, kernels per seed with fixed-order reductions, so the
    batch changes nothing: bitwise equality (dopri5 too: its step control is per seed)."""
    config = make_config({"problem.per_seed_data": True, "run.seeds": 4, "model.depth": 3})
    problem = make_problem(config)
    u0 = initial_layers(config, problem.d)
    batch = _integrate(method, problem, u0, 1.0)
    for s in range(4):
        alone = _integrate(method, Problem(problem.X[s:s + 1], problem.y[s:s + 1]), u0[s:s + 1], 1.0)
        np.testing.assert_array_equal(alone.U[0], batch.U[s])
        np.testing.assert_array_equal(alone.state.nfev[0], batch.state.nfev[s])
    assert not np.array_equal(batch.U[0], batch.U[1])  # the seeds really differ


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_per_seed_data_run_of_one_equals_seed_zero_of_many(make_config, method):
    """End to end (config -> file): seed 0 of run.seeds = 1 is bit-identical to seed 0 of 4."""
    tables = {"problem.per_seed_data": True, "integrator.method": method, "integrator.t_end": 1.0}
    alone = simulate(make_config({**tables, "run.seeds": 1}))
    batch = simulate(make_config({**tables, "run.seeds": 4}))
    for name in ("u", "theta", "loss", "nfev", "invariant_drift"):
        np.testing.assert_array_equal(getattr(alone, name)[:, 0], getattr(batch, name)[:, 0], err_msg=name)


@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
def test_shared_data_seed_alone_matches_seed_in_batch(make_config, method):
    """Shared X: the seeds go through one GEMM, and OpenBLAS's GEMM result for a row depends on
    the number of rows M (kernel blocking; measured on this machine), so a seed alone (M = 1)
    and in a batch (M = 4) differ by rounding: not bitwise. They agree to 1e-13 relative, since
    the flow is stable over t = 1 and a few ulps per step do not grow."""
    config = make_config({"run.seeds": 4, "model.depth": 3})
    problem = make_problem(config)
    u0 = initial_layers(config, problem.d)
    batch = _integrate(method, problem, u0, 1.0)
    for s in range(4):
        alone = _integrate(method, problem, u0[s:s + 1], 1.0)
        np.testing.assert_allclose(alone.U[0], batch.U[s], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
def test_shared_and_per_seed_paths_agree_on_equal_data(make_config, write_npz, method):
    """The same X given once (n, d) and repeated per seed (S, n, d) in a data file: GEMM vs one
    product per seed, same numbers up to rounding (1e-13 relative, as above)."""
    rng = np.random.default_rng(7)
    seeds, n, d = 3, 9, 14
    X = rng.standard_normal((n, d))
    y = X @ np.where(rng.random(d) < 0.3, 1.5, 0.0)
    shared = write_npz("shared.npz", X=X, y=y)
    repeated = write_npz("repeated.npz", X=np.repeat(X[None], seeds, axis=0), y=np.repeat(y[None], seeds, axis=0))
    base = {"problem.kind": "file", "integrator.method": method, "run.seeds": seeds, "integrator.t_end": 1.0}
    one = simulate(make_config({**base, "problem.path": shared}))
    many = simulate(make_config({**base, "problem.path": repeated}))
    assert one.X.shape == (n, d) and many.X.shape == (seeds, n, d)
    np.testing.assert_array_equal(one.u0, many.u0)
    np.testing.assert_allclose(many.u, one.u, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(many.loss, one.loss, rtol=1e-12, atol=1e-300)


# --- per-seed random streams --------------------------------------------------------------------


def test_seed_draws_do_not_depend_on_run_size(make_config):
    """Seed s gets the same layers and (per-seed) data whether run.seeds is 1, 5 or 64."""
    base = {"problem.per_seed_data": True, "integrator.method": "euler", "integrator.dt": 0.01,
            "integrator.t_end": 0.01, "run.checkpoints": 2}
    runs = {S: simulate(make_config({**base, "run.seeds": S})) for S in (1, 5, 64)}
    big = runs[64]
    assert big.u0.shape == (64, 3, 12) and big.X.shape == (64, 10, 12)
    for S in (1, 5):
        small = runs[S]
        np.testing.assert_array_equal(small.u0, big.u0[:S])
        np.testing.assert_array_equal(small.X, big.X[:S])
        np.testing.assert_array_equal(small.y, big.y[:S])
        np.testing.assert_array_equal(small.theta_star, big.theta_star[:S])
    # independent streams: no two seeds share an init or a design, and signs are mixed
    assert len({row.tobytes() for row in big.u0}) == 64
    assert len({row.tobytes() for row in big.X}) == 64
    assert np.any(big.u0[:, -1] < 0) and np.any(big.u0[:, -1] > 0)


def test_shared_data_does_not_depend_on_run_size(make_config):
    """Shared data comes from problem.seed alone: the same X, y for any run.seeds."""
    one = make_problem(make_config({"run.seeds": 1}))
    many = make_problem(make_config({"run.seeds": 64}))
    np.testing.assert_array_equal(one.X, many.X)
    np.testing.assert_array_equal(one.y, many.y)


# --- stopping rules (per seed) ------------------------------------------------------------------


def test_loss_tol_stops_each_seed_and_freezes_it(make_config):
    """A seed stops at the first accepted step whose loss is below loss_tol; its layers stay put
    while other seeds run on. Reference: f recomputed in numpy from the stored theta."""
    from references import loss as numpy_loss

    config = make_config({"model.depth": 2, "model.alpha": 1.0, "problem.n": 6, "problem.d": 12,
                          "integrator.loss_tol": 1e-6, "integrator.t_end": 400.0, "run.seeds": 3,
                          "run.checkpoints": 30, "run.spacing": "log"})
    run = simulate(config)
    status = run.status[-1]
    assert np.all(status == 2), status  # loss_tol for every seed (n < d: interpolation, f -> 0)
    for s in range(3):
        stopped = np.flatnonzero(run.status[:, s] == 2)[0]
        t_stop = run.t_seed[-1, s]
        assert 0 < t_stop < config.integrator.t_end
        assert numpy_loss(run.X, run.y, run.theta[-1, s]) < 1e-6
        # before it stopped, it had not reached the tolerance yet at a checkpoint
        assert np.all(run.loss[:stopped, s] >= 1e-6)
        # frozen from then on: the same layers and time at every later checkpoint
        np.testing.assert_array_equal(run.u[stopped:, s], np.broadcast_to(run.u[stopped, s], run.u[stopped:, s].shape))
        assert np.all(run.t_seed[stopped:, s] == t_stop)


def test_max_steps_stops_fixed_step_methods(make_config):
    config = make_config({"integrator.method": "rk4", "integrator.dt": 0.01, "integrator.max_steps": 7,
                          "integrator.t_end": 1.0, "run.checkpoints": 5})
    run = simulate(config)
    assert np.all(run.status[-1] == 3)  # max_steps
    np.testing.assert_allclose(run.t_seed[-1], 0.07, rtol=1e-12)
    assert np.all(run.nfev[-1] == 4 * 7)  # four stages per rk4 step


# --- initializations ----------------------------------------------------------------------------


@pytest.mark.parametrize("init,scales", [("first_layer_zero", [0.0, 0.4, 0.4]), ("balanced", [0.4, 0.4, 0.4]),
                                         ("shape", [0.4 * 2.0, 0.4 * 0.5, 0.4 * 1.0])])
def test_deterministic_inits_follow_their_definition(make_config, init, scales):
    """README.md, "Configuration": first_layer_zero: u^1 = 0, the others alpha; balanced: every
    layer alpha; shape: layer j = alpha * layer_scales[j]. No jitter, positive signs: exact
    values."""
    config = make_config({"model.init": init, "model.alpha": 0.4, "model.jitter": 0.0, "model.signs": "positive",
                          "model.layer_scales": [2.0, 0.5, 1.0]})
    u0 = initial_layers(config, 12)
    expected = np.broadcast_to(np.array(scales)[None, :, None], (2, 3, 12))
    np.testing.assert_array_equal(u0, expected)


def test_gaussian_init_statistics_and_random_signs(make_config):
    """gaussian: alpha (1 + jitter N(0, 1)); signs = random flips the last layer only, about half
    of its coordinates. 64 seeds x 3 layers x 200 coordinates: the sample mean and std of
    u / alpha are within 5 standard errors of 1 and jitter."""
    config = make_config({"model.alpha": 0.5, "model.jitter": 0.2, "problem.d": 200, "run.seeds": 64})
    u0 = initial_layers(config, 200)
    magnitudes = np.abs(u0) / 0.5
    assert abs(magnitudes.mean() - 1.0) < 5 * 0.2 / np.sqrt(magnitudes.size)
    assert abs(magnitudes.std() - 0.2) < 5 * 0.2 / np.sqrt(2 * magnitudes.size)
    assert np.all(u0[:, :-1] > 0)  # jitter 0.2: 1 + 0.2 N < 0 would need a 5-sigma draw
    negative = np.mean(u0[:, -1] < 0)
    assert abs(negative - 0.5) < 5 * 0.5 / np.sqrt(64 * 200)


def test_balanced_init_warns_about_the_sign_trap(make_config):
    """Balanced layers violate assumption (A) at every coordinate: the warning counts them all."""
    from ddln_fast.simulate import SignTrapWarning

    config = make_config({"model.init": "balanced", "model.jitter": 0.0, "model.signs": "positive",
                          "integrator.t_end": 0.1, "run.checkpoints": 2})
    with pytest.warns(SignTrapWarning, match="24 of 24 coordinates"):
        simulate(config)


def test_init_from_a_run_file_and_from_one_layer_set(make_config, tmp_path):
    """model.init = "file" reads /init/u of another run (S, L, d), or one (L, d) array used by
    every seed."""
    first = make_config({})
    path = tmp_path / "first.h5"
    simulate(first, out=path).close()
    again = simulate(make_config({"model.init": "file", "model.init_path": str(path), "model.signs": "positive"}))
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(again.u0, f["init/u"][:])
    layers = np.linspace(-1, 1, 36).reshape(3, 12)
    np.savez(tmp_path / "one.npz", u0=layers)
    shared = simulate(make_config({"model.init": "file", "model.init_path": str(tmp_path / "one.npz"),
                                   "model.signs": "positive"}))
    np.testing.assert_array_equal(shared.u0, np.stack([layers, layers]))


def _numpy_fixed_step_until(X, y, u0, method, dt, loss_tol, max_steps):
    """Reference: euler or classical RK4 on the layer flow in plain numpy, checking the loss
    before each step as the stopping rule says. Returns (layers, steps taken)."""
    from references import layer_flow_rhs, loss as numpy_loss

    rhs = layer_flow_rhs(X, y, u0.shape[0])
    z = u0.ravel().copy()
    for step in range(max_steps):
        if numpy_loss(X, y, np.prod(z.reshape(u0.shape), axis=0)) < loss_tol:
            return z.reshape(u0.shape), step
        if method == "euler":
            z = z + dt * rhs(0, z)
        else:
            k1 = rhs(0, z)
            k2 = rhs(0, z + dt / 2 * k1)
            k3 = rhs(0, z + dt / 2 * k2)
            k4 = rhs(0, z + dt * k3)
            z = z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return z.reshape(u0.shape), max_steps


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_seeds_stopping_at_different_steps_keep_the_others_exact(make_config, method):
    """With loss_tol, seeds leave the batch at different steps; the remaining seeds are packed
    into fewer rows. Each seed must still follow its own numpy loop (1e-12) and stop at the
    same step."""
    dt, tol = 0.02, 3e-3  # seeds cross it at different times (losses measured at t = 24: 1e-5 .. 5e-3)
    config = make_config({"model.depth": 2, "model.alpha": 1.0, "problem.n": 6, "problem.d": 12,
                          "integrator.method": method, "integrator.dt": dt, "integrator.loss_tol": tol,
                          "integrator.t_end": 40.0, "run.seeds": 4, "run.checkpoints": 6})
    run = simulate(config)
    stops = []
    for s in range(4):
        layers, steps = _numpy_fixed_step_until(run.X, run.y, run.u0[s], method, dt, tol, 2000)
        assert steps < 2000
        stops.append(steps)
        assert run.status[-1, s] == 2  # loss_tol
        np.testing.assert_allclose(run.t_seed[-1, s], steps * dt, rtol=1e-12)
        np.testing.assert_allclose(run.u[-1, s], layers, rtol=0, atol=1e-12)
    assert len(set(stops)) > 1, stops  # they did stop at different steps


_THREADS_SCRIPT = """
import json, sys
import numba
import numpy as np
from ddln_fast import Config, integrators, simulate, threads

threads.SERIAL_STATE_WORK = 0  # the documented knob: every stage kernel runs on the threads asked
seen = []
pick = integrators.Integrator._pick_threads
def recording(self, m):
    pick(self, m)
    seen.append(numba.get_num_threads())
integrators.Integrator._pick_threads = recording
config = Config.from_dict(json.loads(sys.argv[1]))
runs = {}
for count in (1, 2):
    seen.clear()
    run = simulate(config, threads=count)
    runs[count] = {name: run.file["checkpoints"][name][:].tobytes().hex()
                   for name in ("u", "loss", "invariant_drift", "nfev")}
    runs[count]["kernel_threads"] = sorted(set(seen))
print(json.dumps(runs))
"""


@pytest.mark.parametrize("method", ["euler", "dopri5"])
def test_per_seed_results_do_not_depend_on_the_thread_count(method):
    """docs/design.md, "Threads": the kernels reduce per seed in a fixed order, so 1 and 2 threads
    give the same bits (per-seed data: no BLAS GEMM whose blocking could depend on the thread
    count). d = 1300 gives each seed three blocks of coordinates, so two threads really split a seed's work; the
    serial threshold is lowered to 0 so that the stage kernels do run on 2 threads (checked),
    in a subprocess with NUMBA_NUM_THREADS = 2, whatever the number of cores here."""
    import json
    import os
    import subprocess
    import sys

    from references import small_config_tables

    tables = small_config_tables({"problem.per_seed_data": True, "problem.d": 1300, "problem.n": 100,
                                  "integrator.method": method, "integrator.t_end": 0.5,
                                  "model.alpha": 0.9, "model.jitter": 0.2})
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, json.dumps(tables)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout)
    assert runs["1"]["kernel_threads"] == [1] and runs["2"]["kernel_threads"] == [2]
    for name in ("u", "loss", "invariant_drift", "nfev"):
        assert runs["1"][name] == runs["2"][name], name
