"""Stochastic gradient descent, momentum, label noise, weight decay and step schedules (issue 12).

References, all written here from the definitions:
- :func:`reference_descent`: a plain numpy loop of PyTorch's SGD on the layers (all-but-one
  products by multiplying the other layers; for the difference and power parametrizations
  d theta / d layer of references.py: the other layers of the half, negated in the v half, or
  +-D u^(D-1)), whose batches and label noise are drawn again from
  the seed material the run file records (its root attribute ``random_streams``: entropy and
  spawn keys) with the documented protocol (a permutation per epoch, or ``integers`` per step;
  ``standard_normal`` per step);
- full-batch gradient descent (``euler``) for sgd with b = n, compared byte for byte;
- the depth-2 identities of gradient descent, (u1 + u2)_{k+1} = (1 - x_k)(u1 + u2)_k and
  (u1 - u2)_{k+1} = (1 + x_k)(u1 - u2)_k with x_k = step * (batch gradient), and the gain sums
  accumulated in numpy;
- the depth-2 closed form of the flow, theta = a b cosh 2s - (a^2 + b^2)/2 sinh 2s, whose dual
  equation X theta(X^T nu) = y is solved by scipy's ``root`` (the limit from an initialization);
- scipy's DOP853 on the layer flow (heavy ball in rescaled time);
- the Hessian of the loss by central differences of its gradient, and numpy's ``eigvalsh``;
- the spectral radius of the two-step recursion of momentum on a quadratic (numpy ``eigvals``).
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from references import all_but_one_products, parametrized_theta, parametrized_theta_gradient, reference_layers


def reference_streams(run, seed_index):
    """(batch generator, label-noise generator) of one seed, rebuilt from the run file's record
    (None where the run draws none)."""
    record = json.loads(run.file.attrs["random_streams"]) if "random_streams" in run.file.attrs else {}

    def stream(name):
        if name not in record:
            return None
        key = record[name]["key"]
        return np.random.default_rng(np.random.SeedSequence(record["entropy"], spawn_key=(seed_index, key)))

    return stream("batches"), stream("label_noise")


def reference_descent(X, y, u0, steps, dt, *, batch=None, sampling="without_replacement",
                      batch_rng=None, noise_rng=None, label_noise=0.0, momentum=0.0,
                      nesterov=False, weight_decay=0.0, decay_every=0, decay_factor=1.0,
                      record=None, parametrization="product", power=0.0):
    """PyTorch's SGD on the layers of one seed, every iterate, shape (steps + 1, P, d), with
    theta = ``parametrized_theta(parametrization, U, power)``.

    Batches: ``batch`` None is the whole data in order; without replacement a new
    ``permutation(n)`` each epoch, cut into n // batch batches; with replacement
    ``integers(n, size=batch)`` each step. ``record`` (a list) receives (indices, labels, step)
    of every step."""
    n = X.shape[0]
    U = np.array(u0, dtype=np.float64)
    V = np.zeros_like(U)
    order, position = None, n
    out = [U.copy()]
    for k in range(steps):
        if batch is None:
            idx = np.arange(n)
        elif sampling == "without_replacement":
            if position + batch > n:
                order, position = batch_rng.permutation(n), 0
            idx = order[position:position + batch]
            position += batch
        else:
            idx = batch_rng.integers(n, size=batch)
        labels = y[idx] + (label_noise * noise_rng.standard_normal(len(idx)) if label_noise else 0.0)
        step = dt * decay_factor ** (k // decay_every) if decay_every else dt
        if record is not None:
            record.append((idx, labels, step))
        Xb = X[idx]
        g = Xb.T @ (Xb @ parametrized_theta(parametrization, U, power) - labels) / len(idx)
        grad = g[None, :] * parametrized_theta_gradient(parametrization, U, power) + weight_decay * U
        V = momentum * V + grad
        U = U - step * (grad + momentum * V if nesterov else V)
        out.append(U.copy())
    return np.array(out)


def flow_depth2(a, b, s):
    """theta of the depth-2 flow from layers (a, b) at clock s (closed form)."""
    return a * b * np.cosh(2 * s) - 0.5 * (a * a + b * b) * np.sinh(2 * s)


def flow_limit_depth2(X, y, a, b):
    """The interpolator the depth-2 flow from (a, b) ends at: theta(X^T nu) with X theta(X^T nu) = y
    (the clock stays in range(X^T)), solved by scipy's root with the exact Jacobian."""
    from scipy.optimize import root

    def equation(nu):
        return X @ flow_depth2(a, b, X.T @ nu) - y

    def jacobian(nu):
        theta = flow_depth2(a, b, X.T @ nu)
        h = np.sqrt((a * a - b * b) ** 2 + 4 * theta * theta)
        return -(X * h) @ X.T

    sol = root(equation, np.zeros(X.shape[0]), jac=jacobian, method="hybr", options={"xtol": 1e-15})
    theta = flow_depth2(a, b, X.T @ sol.x)
    assert np.linalg.norm(X @ theta - y) <= 1e-11 * np.linalg.norm(y), sol.message
    return theta


# --- configs ----------------------------------------------------------------------------------------
def tables(**overrides):
    """A tiny run: n = 10 samples, d = 12, 3 seeds, gaussian init with random signs, one
    checkpoint per step (``steps`` steps of dt)."""
    steps = overrides.pop("steps", 30)
    dt = overrides.get("integrator.dt", 0.05)
    base = {"problem.n": 10, "problem.d": 12, "problem.sparsity": 3, "problem.seed": 3,
            "problem.per_seed_data": False, "model.depth": 3, "model.alpha": 0.8,
            "model.init": "gaussian", "model.jitter": 0.3, "model.signs": "random",
            "integrator.method": "sgd", "integrator.dt": dt, "integrator.t_end": dt * steps,
            "run.seeds": 3, "run.seed": 11, "run.checkpoints": steps + 1, "run.spacing": "linear"}
    base.update(overrides)
    from ddln_fast import Config

    return Config().with_overrides(base)


VARIANTS = {
    "sgd": {"integrator.batch_size": 3},  # 10 = 3 * 3 + 1: a sample sits each epoch out
    "with_replacement_label_noise": {"integrator.batch_size": 4, "integrator.sampling": "with_replacement",
                                     "integrator.label_noise": 0.2, "problem.per_seed_data": True},
    "heavy_ball": {"integrator.batch_size": 3, "integrator.momentum": 0.6},
    "nesterov_decay_schedule": {"integrator.batch_size": 5, "integrator.momentum": 0.5,
                                "integrator.nesterov": True, "integrator.weight_decay": 0.02,
                                "integrator.schedule": "step", "integrator.decay_every": 7,
                                "integrator.decay_factor": 0.5, "problem.per_seed_data": True},
    "gd_momentum_label_noise": {"integrator.method": "euler", "integrator.momentum": 0.5,
                                "integrator.label_noise": 0.1},
    "gd_nesterov_weight_decay_schedule": {"integrator.method": "euler", "integrator.momentum": 0.3,
                                          "integrator.nesterov": True, "integrator.weight_decay": 0.05,
                                          "integrator.schedule": "step", "integrator.decay_every": 10,
                                          "integrator.decay_factor": 0.7},
}


def reference_of(run, config, s, steps, record=None):
    i = config.integrator
    batch_rng, noise_rng = reference_streams(run, s)
    X, y = (run.X[s], run.y[s]) if run.X.ndim == 3 else (run.X, run.y)
    return reference_descent(
        X, y, run.u0[s], steps, i.dt, batch=i.batch_size if i.method == "sgd" else None,
        sampling=i.sampling, batch_rng=batch_rng, noise_rng=noise_rng, label_noise=i.label_noise,
        momentum=i.momentum, nesterov=i.nesterov, weight_decay=i.weight_decay,
        decay_every=i.decay_every if i.schedule == "step" else 0, decay_factor=i.decay_factor,
        record=record, parametrization=config.model.parametrization, power=config.model.power)


#: (parametrization, depth, D): the product at depths 1-4 and 6 and difference halves of 1-3 layers
#: (kept in registers) and 5 (gradient rows in scratch), power with integer and real exponents.
MODELS = [("product", 1, 0.0), ("product", 2, 0.0), ("product", 3, 0.0), ("product", 4, 0.0),
          ("product", 6, 0.0), ("difference", 1, 0.0), ("difference", 2, 0.0), ("difference", 3, 0.0),
          ("difference", 5, 0.0), ("power", 1, 2.0), ("power", 1, 2.5), ("power", 1, 3.0)]


def parametrized(name, depth, power):
    """Overrides of :func:`tables` for a parametrization (the product too); power needs u, v > 0
    (positive signs, jitter 0.2: 1 + 0.2 N(0, 1) > 0 on these few coordinates) and, its
    curvature growing like D^2 u^(2D - 2), alpha 0.6 and steps of 0.02 (heavy ball must not
    overshoot u or v past 0)."""
    extra = {"model.parametrization": name, "model.depth": depth}
    if name == "power":
        extra.update({"model.power": power, "model.signs": "positive", "model.jitter": 0.2,
                      "model.alpha": 0.6, "integrator.dt": 0.02})
    return extra


@pytest.mark.parametrize("name, depth, power", MODELS,
                         ids=[f"{n}-{p if n == 'power' else d}" for n, d, p in MODELS])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_iterate_equals_the_numpy_loop_on_the_recorded_batches(variant, name, depth, power):
    """1e-12: the same arithmetic up to the order of the sums of the products (a few ulps of O(1)
    layers per step, 30 steps), with d theta / d layer of each parametrization."""
    from ddln_fast import simulate

    steps = 30
    config = tables(steps=steps, **{**parametrized(name, depth, power), **VARIANTS[variant]})
    run = simulate(config)
    assert run.u.shape[0] == steps + 1
    assert run.u.shape[2] == {"product": depth, "difference": 2 * depth, "power": 2}[name]
    for s in range(config.run.seeds):
        expected = reference_of(run, config, s, steps)
        assert np.max(np.abs(expected[-1] - expected[0])) > 1e-2  # the layers moved
        np.testing.assert_allclose(run.u[:, s], expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(run.theta[:, s], [parametrized_theta(name, U, power) for U in expected],
                                   rtol=0, atol=1e-12)
    assert np.all(run.nfev[-1] == steps)
    # each seed draws its own batches: the seeds' trajectories differ even on shared data
    assert not np.allclose(run.u[-1, 0], run.u[-1, 1])


@pytest.mark.parametrize("sampling, name, depth, power", [
    ("without_replacement", "product", 3, 0.0), ("with_replacement", "product", 3, 0.0),
    ("without_replacement", "difference", 2, 0.0), ("with_replacement", "difference", 6, 0.0),
    ("without_replacement", "power", 1, 2.5)])
def test_gemm_paths_and_several_coordinate_blocks(sampling, name, depth, power):
    """Shared X large enough for the GEMM products (6 seeds x 100 x 2000) and d = 2000 (four
    coordinate blocks, the last partial): full-batch label noise with momentum and weight decay,
    and minibatches with Nesterov and weight decay, against the numpy loop."""
    from ddln_fast import simulate

    steps = 6
    common = {**parametrized(name, depth, power), "problem.n": 100, "problem.d": 2000, "run.seeds": 6,
              "model.alpha": 0.9, "model.jitter": 0.2, "integrator.dt": 0.002}
    for extra in ({"integrator.method": "euler", "integrator.momentum": 0.4, "integrator.label_noise": 0.3,
                   "integrator.weight_decay": 0.1},
                  {"integrator.batch_size": 16, "integrator.sampling": sampling, "integrator.momentum": 0.4,
                   "integrator.nesterov": True, "integrator.weight_decay": 0.1}):
        config = tables(steps=steps, **common, **extra)
        run = simulate(config)
        for s in (0, 5):
            expected = reference_of(run, config, s, steps)
            assert np.max(np.abs(expected[-1] - expected[0])) > 1e-3
            np.testing.assert_allclose(run.u[-1, s], expected[-1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["shared_serial", "shared_gemm", "per_seed", "float32", "loss_tol"])
def test_sgd_with_the_whole_batch_is_gradient_descent_bitwise(case, tmp_path):
    """b = n without replacement takes the data in its natural order through euler's products and
    step: every dataset of the run file equals euler's byte for byte (loss_tol: seeds stop at the
    same step, screened on the full loss at every step as euler does)."""
    from faults_support import committed_arrays

    from ddln_fast.simulate import run_simulation

    overrides = {"shared_serial": {}, "per_seed": {"problem.per_seed_data": True},
                 "shared_gemm": {"problem.n": 100, "problem.d": 2000, "run.seeds": 6, "model.alpha": 0.9,
                                 "integrator.dt": 0.002},
                 "float32": {"run.dtype": "float32"},
                 "loss_tol": {"model.depth": 2, "integrator.dt": 0.2, "integrator.loss_tol": 0.02}}[case]
    euler = tables(steps=40, **{"integrator.method": "euler", **overrides})
    sgd = euler.with_overrides({"integrator.method": "sgd", "integrator.batch_size": euler.problem.n})
    files = {}
    for name, cfg in (("euler", euler), ("sgd", sgd)):
        run_simulation(cfg, tmp_path / f"{name}.h5", threads=1).run.close()
        files[name] = committed_arrays(tmp_path / f"{name}.h5")[1]
    assert set(files["euler"]) == set(files["sgd"])
    for key, value in files["euler"].items():
        assert value.tobytes() == files["sgd"][key].tobytes(), key
    if case == "loss_tol":
        status = files["sgd"]["status"][-1]
        assert np.any(status == 2) and np.any(status != 2)  # some seeds stopped by loss_tol


def test_depth_two_identities_gain_and_effective_initialization():
    """Depth 2, minibatches with label noise and a step schedule: each step multiplies u1 + u2 by
    1 - x and u1 - u2 by 1 + x (x = step * batch gradient, recomputed here from the stored layers
    and the re-drawn batches) to 1e-13; the stored gain and effective initialization equal their
    numpy accumulation; and the layers are those of the flow from the effective initialization
    at clock s = sum x (closed form) to 1e-12."""
    from ddln_fast import simulate

    steps = 60
    config = tables(steps=steps, **{"model.depth": 2, "integrator.batch_size": 4, "integrator.dt": 0.1,
                                    "integrator.label_noise": 0.1, "integrator.schedule": "step",
                                    "integrator.decay_every": 25, "integrator.decay_factor": 0.5,
                                    "run.gain": True})
    run = simulate(config)
    u, gain, effective = run.u, run.checkpoint("gain"), run.checkpoint("effective_init")
    for s in range(config.run.seeds):
        record = []
        expected = reference_of(run, config, s, steps, record)
        np.testing.assert_allclose(u[:, s], expected, rtol=0, atol=1e-12)
        plus, minus = u[:, s, 0] + u[:, s, 1], u[:, s, 0] - u[:, s, 1]
        q_plus = q_minus = clock = 0.0
        for k, (idx, labels, step) in enumerate(record):
            Xb = run.X[idx]
            x = step * Xb.T @ (Xb @ (u[k, s, 0] * u[k, s, 1]) - labels) / len(idx)
            assert np.max(np.abs(plus[k + 1] - (1 - x) * plus[k])) <= 1e-13
            assert np.max(np.abs(minus[k + 1] - (1 + x) * minus[k])) <= 1e-13
            q_plus = q_plus - 2 * x - np.log((1 - x) ** 2)
            q_minus = q_minus + 2 * x - np.log((1 + x) ** 2)
            clock = clock + x
            np.testing.assert_allclose(gain[k + 1, s], 0.5 * (q_plus + q_minus), rtol=1e-9, atol=1e-15)
            a, b = run.u0[s, 0], run.u0[s, 1]
            a_eff = 0.5 * ((a + b) * np.exp(-q_plus / 2) + (a - b) * np.exp(-q_minus / 2))
            b_eff = 0.5 * ((a + b) * np.exp(-q_plus / 2) - (a - b) * np.exp(-q_minus / 2))
            np.testing.assert_allclose(effective[k + 1, s], [a_eff, b_eff], rtol=1e-12, atol=1e-15)
            # gradient flow from the effective initialization, at clock s = sum x
            np.testing.assert_allclose(plus[k + 1], (a_eff + b_eff) * np.exp(-clock), rtol=1e-12)
            np.testing.assert_allclose(minus[k + 1], (a_eff - b_eff) * np.exp(clock), rtol=1e-12)
        assert np.max(gain[-1, s]) > 1e-3 and run.checkpoint("max_step_gradient")[-1, s] < 1


def test_limit_of_depth_two_gradient_descent_is_the_projection_of_its_effective_initialization():
    """A step large enough that the limit differs from the gradient-flow prediction by more than
    1e-3, run to a loss of 1e-28: it equals the limit of the flow from the effective
    initialization of its last checkpoint to 1e-9 (both limits from the closed form and scipy)."""
    from ddln_fast import simulate

    config = tables(steps=1, **{"model.depth": 2, "problem.n": 10, "problem.d": 30, "model.alpha": 0.3,
                                "integrator.method": "euler", "integrator.dt": 0.2,
                                "integrator.t_end": 2000.0, "integrator.loss_tol": 1e-28,
                                "run.checkpoints": 20, "run.spacing": "log", "run.gain": True})
    run = simulate(config)
    assert np.all(run.status[-1] == 2)  # loss_tol
    for s in range(config.run.seeds):
        a_eff, b_eff = run.checkpoint("effective_init")[-1, s]
        descent = flow_limit_depth2(run.X, run.y, a_eff, b_eff)
        flow = flow_limit_depth2(run.X, run.y, run.u0[s, 0], run.u0[s, 1])
        theta = run.theta[-1, s]
        assert np.linalg.norm(flow - descent) / np.linalg.norm(descent) > 1e-3
        assert np.linalg.norm(theta - descent) / np.linalg.norm(descent) < 1e-9
        assert run.checkpoint("max_step_gradient")[-1, s] < 1


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_at_a_small_step_tracks_the_flow_in_rescaled_time(nesterov):
    """Heavy ball (and Nesterov) with beta = 0.5 after k steps of size gamma is near the layer flow
    at time k gamma / (1 - beta) (DOP853), and the error shrinks about in proportion to gamma."""
    from ddln_fast import simulate

    beta, flow_time = 0.5, 1.0
    errors = []
    for gamma in (0.02, 0.01, 0.005):
        steps = int(round(flow_time * (1 - beta) / gamma))
        config = tables(steps=1, **{"integrator.method": "euler", "integrator.dt": gamma,
                                    "integrator.t_end": steps * gamma, "integrator.momentum": beta,
                                    "integrator.nesterov": nesterov, "run.checkpoints": 2})
        run = simulate(config)
        worst = 0.0
        for s in range(config.run.seeds):
            exact = reference_layers(run.X, run.y, run.u0[s], np.array([0.0, flow_time]))[-1]
            worst = max(worst, float(np.max(np.abs(run.u[-1, s] - exact))))
        errors.append(worst)
    assert errors[0] > 1e-4  # the discretization error is visible at all
    assert errors[1] < 0.6 * errors[0] and errors[2] < 0.6 * errors[1], errors


def test_sharpness_is_the_top_eigenvalue_of_the_hessian_and_the_threshold_follows_the_step():
    """Stored sharpness = numpy's largest eigenvalue of the Hessian of the loss plus weight decay,
    built by central differences of its gradient (1e-6 relative); stored threshold =
    2 (1 + beta) / step for heavy ball, with the step of the schedule."""
    from ddln_fast import simulate

    beta, decay, dt = 0.3, 0.02, 0.05
    config = tables(steps=12, **{"problem.n": 6, "problem.d": 5, "integrator.method": "euler",
                                 "integrator.momentum": beta, "integrator.weight_decay": decay,
                                 "integrator.schedule": "step", "integrator.decay_every": 5,
                                 "integrator.decay_factor": 0.5, "run.checkpoints": 4,
                                 "run.sharpness": True})
    run = simulate(config)
    X, y = run.X, run.y
    n = X.shape[0]

    def objective_gradient(flat, shape):
        U = flat.reshape(shape)
        g = X.T @ (X @ np.prod(U, axis=0) - y) / n
        return (g[None, :] * all_but_one_products(U) + decay * U).ravel()

    sharpness, threshold = run.checkpoint("sharpness"), run.checkpoint("stability_threshold")
    steps_at = np.round(run.t / dt).astype(int)
    for k in range(len(run.t)):
        step = dt * 0.5 ** (steps_at[k] // 5)
        np.testing.assert_allclose(threshold[k], 2 * (1 + beta) / step, rtol=1e-15)
        for s in range(config.run.seeds):
            U = run.u[k, s]
            size, h = U.size, 1e-5
            H = np.empty((size, size))
            for i in range(size):
                e = np.zeros(size)
                e[i] = h
                H[:, i] = (objective_gradient(U.ravel() + e, U.shape)
                           - objective_gradient(U.ravel() - e, U.shape)) / (2 * h)
            top = np.linalg.eigvalsh(0.5 * (H + H.T)).max()
            np.testing.assert_allclose(sharpness[k, s], top, rtol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9])
def test_stability_bound_of_momentum_is_where_the_recursion_stops_contracting(beta, nesterov):
    """On a quadratic of curvature lambda, z = step * lambda: (x, step * v) evolves by
    [[1 - z, -beta], [z, beta]] (heavy ball) or [[1 - z (1 + beta), -beta^2], [z, beta]]
    (Nesterov); the bound must sit where the spectral radius crosses 1."""
    from ddln_fast.stochastic import DescentOptions

    bound = DescentOptions(momentum=beta, nesterov=nesterov and beta > 0).stability_bound

    def radius(z):
        if nesterov:
            M = np.array([[1 - z * (1 + beta), -beta * beta], [z, beta]])
        else:
            M = np.array([[1 - z, -beta], [z, beta]])
        return np.max(np.abs(np.linalg.eigvals(M)))

    assert radius(bound * (1 - 1e-6)) < 1 < radius(bound * (1 + 1e-6))


# --- resume ---------------------------------------------------------------------------------------
def _stop_after_draws(at_checkpoint, draws):
    """An on_checkpoint hook: after checkpoint ``at_checkpoint``, SIGINT to this process at the
    ``draws``-th batch draw (the solver stops before its next step: mid-interval)."""

    def hook(k, t, integrator):
        if k != at_checkpoint:
            return
        original = integrator._draw_batches
        calls = [0]

        def counting(active):
            calls[0] += 1
            if calls[0] == draws:
                os.kill(os.getpid(), signal.SIGINT)
            return original(active)

        integrator._draw_batches = counting

    return hook


@pytest.mark.parametrize("overrides", [
    {"integrator.momentum": 0.5, "integrator.nesterov": True, "integrator.label_noise": 0.2,
     "integrator.sampling": "with_replacement", "integrator.batch_size": 4},
    {"model.depth": 2, "integrator.batch_size": 3, "integrator.schedule": "step",
     "integrator.decay_every": 11, "run.gain": True, "run.sharpness": True},
])
def test_stop_mid_epoch_then_resume_is_bit_identical(tmp_path, overrides):
    from faults_support import assert_same_run_file

    from ddln_fast import open_run
    from ddln_fast.simulate import run_simulation

    config = tables(steps=1, **{"integrator.t_end": 4.0, "run.checkpoints": 9, **overrides})
    reference = tmp_path / "reference.h5"
    run_simulation(config, reference, threads=1).run.close()
    out = tmp_path / "stopped.h5"
    report = run_simulation(config, out, threads=1, on_checkpoint=_stop_after_draws(3, 7))
    report.run.close()
    assert report.interrupted == "SIGINT"
    with open_run(out) as run:
        index, state = run.state()
    assert index == 3 and np.all(state["steps"] == 3 * 10 + 7)  # 10 steps per interval; the 7th after stops
    if config.integrator.sampling == "without_replacement":
        assert np.all((state["batch_position"] > 0) & (state["batch_position"] < 9))  # mid-epoch
    run_simulation(config, out, resume=True, threads=1).run.close()
    assert_same_run_file(reference, out)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    """``ddln run`` processes killed (SIGKILL) at random instants of an sgd run with momentum and
    label noise (epochs of 6 steps, checkpoints every 20 steps: the saved states fall inside
    epochs), each resumed: every killed file holds the reference's committed rows, and the
    finished file equals the uninterrupted reference byte for byte."""
    import random
    import time

    from faults_support import (assert_prefix_equal, assert_same_run_file, committed_arrays, ddln,
                                start_ddln, wait_for_writing, write_config)

    from ddln_fast import Config, open_run
    from ddln_fast.simulate import run_simulation

    run_tables = {"problem": {"n": 20, "d": 40, "sparsity": 3},
                  "model": {"depth": 3, "alpha": 0.5},
                  "integrator": {"method": "sgd", "batch_size": 3, "momentum": 0.5, "label_noise": 0.1,
                                 "dt": 0.01, "t_end": 150.0},
                  "run": {"seeds": 3, "checkpoints": 751, "spacing": "linear"}}
    config_path = write_config(tmp_path / "sgd.toml", run_tables)
    reference = tmp_path / "reference.h5"
    run_simulation(Config.from_toml(config_path), reference, threads=1).run.close()
    _, ref_arrays, _ = committed_arrays(reference)
    out = tmp_path / "killed.h5"
    rng = random.Random(int(os.environ.get("DDLN_KILL_SEED", "12")))
    positions = []
    for _ in range(30):
        # (until one kill has landed mid-epoch: on a fresh clone every process compiles first,
        # and the first three kills all landed just after a checkpoint at the epoch's end)
        if len(positions) >= 3 and any(p < 18 for p in positions):
            break
        before = (out.stat().st_mtime_ns, out.stat().st_size) if out.exists() else None
        proc = start_ddln("run", config_path, "-o", out, *(["--resume"] if out.exists() else []),
                          "--threads", 1, "--quiet")
        if wait_for_writing(out, proc, before):
            time.sleep(rng.uniform(0.05, 0.5))
        if proc.poll() is not None:  # finished before the kill: start again
            assert proc.returncode == 0, proc.communicate()[1]
            out.unlink()
            continue
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if not out.exists():
            continue
        k, arrays, complete = committed_arrays(out)
        assert_prefix_equal(ref_arrays, arrays, k)
        if complete:
            out.unlink()
            continue
        if k:
            with open_run(out) as run:
                positions.append(int(run.state()[1]["batch_position"][0]))
    assert len(positions) >= 3, "the run kept finishing before it could be killed"
    assert any(p < 18 for p in positions), positions  # 18: the last batch of an epoch
    done = ddln("run", config_path, "-o", out, "--resume", "--threads", 1, "--quiet")
    assert done.returncode == 0, done.stderr
    assert_same_run_file(reference, out)


@pytest.mark.parametrize("overrides, warned", [
    ({"integrator.method": "sgd", "integrator.batch_size": 2}, False),
    ({"integrator.method": "sgd", "integrator.batch_size": 5, "integrator.sampling": "with_replacement"}, False),
    ({"integrator.method": "euler", "integrator.label_noise": 0.1}, False),
    ({"integrator.method": "sgd", "integrator.batch_size": 5}, True),  # the whole batch: one run
    ({"integrator.method": "euler", "integrator.momentum": 0.5}, True),
])
def test_seeds_on_one_problem_differ_through_their_own_draws(overrides, warned):
    """One X, y and the same initial layers: the seeds are copies of one run (warned) unless each
    draws its own batches or label noise (not warned, and their trajectories differ)."""
    import warnings

    from ddln_fast import Config, simulate
    from ddln_fast.simulate import IdenticalSeedsWarning

    config = Config().with_overrides({"problem.n": 5, "problem.d": 8, "problem.sparsity": 2,
                                      "problem.per_seed_data": False, "integrator.dt": 0.01,
                                      "integrator.t_end": 0.2, "run.checkpoints": 2, "run.seeds": 3,
                                      **overrides})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = simulate(config)
    assert any(issubclass(w.category, IdenticalSeedsWarning) for w in caught) == warned
    assert np.all(run.theta[-1] == run.theta[-1, :1]) == warned


_THREAD_COUNTS_SCRIPT = """
import json, sys
import numba
from ddln_fast import Config, simulate, threads
from ddln_fast.stochastic import StochasticGradientDescent as Solver

threads.SERIAL_STATE_WORK = 0  # every kernel runs on the threads asked
seen, step = [], Solver._fixed_step
Solver._fixed_step = lambda self, active: (seen.append(numba.get_num_threads()), step(self, active))
config = Config().with_overrides(json.loads(sys.argv[1]))
out = {}
for threads in (1, 2):
    seen.clear()
    run = simulate(config, threads=threads)
    out[threads] = {"u": run.file["checkpoints/u"][:].tobytes().hex(), "threads": sorted(set(seen))}
print(json.dumps(out))
"""


def test_draws_and_results_depend_neither_on_the_thread_count_nor_on_the_other_seeds():
    """SGD on one shared X with momentum and label noise: the layers are the same bits on 1 and 2
    threads (a subprocess with NUMBA_NUM_THREADS = 2, kernels really on 2 threads; d = 1300:
    several blocks per seed), and seed 0 run alone equals seed 0 of 4 (its own streams; the
    gathered products never mix seeds)."""
    import subprocess
    import sys

    from ddln_fast import simulate

    overrides = {"problem.n": 40, "problem.d": 1300, "problem.per_seed_data": False, "model.depth": 3,
                 "model.alpha": 0.9, "model.init": "gaussian", "model.jitter": 0.2,
                 "integrator.method": "sgd", "integrator.batch_size": 7, "integrator.momentum": 0.5,
                 "integrator.label_noise": 0.1, "integrator.dt": 0.002, "integrator.t_end": 0.1,
                 "run.seeds": 4, "run.checkpoints": 3}
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", _THREAD_COUNTS_SCRIPT, json.dumps(overrides)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout)
    assert runs["1"]["threads"] == [1] and runs["2"]["threads"] == [2]
    assert runs["1"]["u"] == runs["2"]["u"]
    alone = simulate(tables(steps=1, **{**overrides, "run.seeds": 1, "run.spacing": "log"}))
    batch = simulate(tables(steps=1, **{**overrides, "run.spacing": "log"}))
    assert alone.u[:, 0].tobytes() == batch.u[:, 0].tobytes()
    assert not np.array_equal(batch.u[-1, 0], batch.u[-1, 1])


def test_analyze_puts_the_effective_initialization_prediction_next_to_the_flow_one(tmp_path, capsys):
    """``ddln analyze --json`` of depth-2 gradient-descent runs with run.gain: at a stable step the
    run ends at its effective-initialization prediction (1e-9), away from the flow's; at a step
    where |step * gradient| reached 1 there is no effective initialization, and it says so."""
    import tomli_w

    from ddln_fast.cli import main

    tables = {"problem": {"n": 10, "d": 30, "sparsity": 3, "per_seed_data": False},
              "model": {"depth": 2, "alpha": 0.3, "init": "gaussian", "jitter": 0.3, "signs": "random"},
              "integrator": {"method": "euler", "dt": 0.2, "t_end": 2000.0, "loss_tol": 1e-28},
              "run": {"seeds": 2, "checkpoints": 20, "gain": True}}
    results = {}
    for dt in (0.2, 1.5):
        tables["integrator"]["dt"] = dt
        config = tmp_path / f"gd{dt}.toml"
        config.write_text(tomli_w.dumps(tables))
        out = tmp_path / f"gd{dt}.h5"
        with pytest.raises(SystemExit):
            main(["run", str(config), "-o", str(out), "--threads", "1", "--quiet"])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["analyze", str(out), "--json"])
        assert exit_info.value.code in (0, None)
        results[dt] = json.loads(capsys.readouterr().out)["step_size_bias"]
    for seed in results[0.2]:
        assert seed["gap_to_descent_prediction"] < 1e-9 and seed["flow_vs_descent"] > 1e-3
        assert seed["max_step_gradient"] < 1 and seed["note"] == ""
    for seed in results[1.5]:
        assert seed["max_step_gradient"] >= 1 and seed["gap_to_descent_prediction"] is None
        assert "no effective initialization" in seed["note"]


def test_the_gain_diagnostic_does_not_change_the_run():
    """run.gain sends euler through the descent solver (full batch, euler's products and step)
    and only reads the gradients: the layers are euler's, byte for byte."""
    from ddln_fast import simulate

    plain = tables(steps=25, **{"model.depth": 2, "integrator.method": "euler", "integrator.dt": 0.1})
    with_gain = plain.with_overrides({"run.gain": True})
    assert simulate(plain).u.tobytes() == simulate(with_gain).u.tobytes()
