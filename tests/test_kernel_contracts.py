"""Performance contracts of the kernels that results alone cannot show (docs/design.md,
"Performance rules"; issue 6): the time loop allocates nothing, and each kernel compiles once per
dtype.

References: Numba's own allocation counter (``NUMBA_NRT_STATS=1``, read with
``numba.core.runtime.rtsys.get_allocation_stats()``), which must not grow with the number of
steps; and each dispatcher's ``signatures``. Both run in a fresh interpreter, because the
counter must be switched on before Numba is imported and the signatures must not include calls
made by other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    from numba.core.runtime import rtsys
    from ddln_fast import controller, integrators, kernels, stochastic, stochastic_kernels
    from ddln_fast.integrators import Integrator
    from ddln_fast.parametrization import Parametrization
    from ddln_fast.problem import Problem
    from ddln_fast.stochastic import DescentOptions, StochasticGradientDescent

    # Every compiled function the integrators call, wrapped: Numba counts one allocation per
    # array argument it receives (its MemInfo; also each array inside a tuple argument), so
    # anything above that was allocated inside.
    excess, calls = {}, {}

    def array_count(value):
        if isinstance(value, np.ndarray):
            return 1
        if isinstance(value, tuple):
            return sum(array_count(v) for v in value)
        return 0

    def counting(name, fn):
        def wrapper(*args):
            before = rtsys.get_allocation_stats().alloc
            out = fn(*args)
            inside = rtsys.get_allocation_stats().alloc - before
            excess[name] = max(excess.get(name, 0), inside - array_count(args))
            calls[name] = calls.get(name, 0) + 1
            return out
        return wrapper

    kernels.n_blocks(1)  # starts Numba's runtime (and its counters)
    rng = np.random.default_rng(0)
    S, L, n, d = 3, 3, 8, 700   # d > BLOCK: two coordinate blocks per seed
    u0 = 0.5 * (1 + 0.1 * rng.standard_normal((S, L, d)))
    problems = [(rng.standard_normal((n, d)) / np.sqrt(d), rng.standard_normal(n)),
                (rng.standard_normal((S, n, d)) / np.sqrt(d), rng.standard_normal((S, n))),
                # large enough for the BLAS path and two threads
                (rng.standard_normal((100, 4000)) / 60, rng.standard_normal(100))]

    descent = [DescentOptions(batch_size=4, momentum=0.5, label_noise=0.1),
               DescentOptions(batch_size=4, momentum=0.5, nesterov=True, sampling="with_replacement"),
               DescentOptions(weight_decay=0.1, label_noise=0.1, gain=True),
               DescentOptions(batch_size=3, schedule="step", decay_every=2)]

    def run_all():
        for X, y in problems:
            layers = u0 if X.shape[-1] == d else 0.5 * np.ones((4, L, X.shape[-1]))
            for dtype in (np.float64, np.float32):
                solvers = [Integrator(method, Problem(X, y), layers, dt=1e-3, rtol=1e-6,
                                      atol=1e-9, dtype=dtype)
                           for method in ("euler", "rk4", "dopri5", "cash_karp")]
                # the difference (2L rows) and power (2 rows) parametrizations: same kernels,
                # same signatures (the parametrization is one (int, float) argument)
                for method in ("euler", "rk4", "dopri5"):
                    solvers.append(Integrator(method, Problem(X, y), np.concatenate([layers, layers], axis=1),
                                              dt=1e-3, rtol=1e-6, atol=1e-9, dtype=dtype,
                                              parametrization=Parametrization("difference", L)))
                    solvers.append(Integrator(method, Problem(X, y), layers[:, :2], dt=1e-3, rtol=1e-6,
                                              atol=1e-9, dtype=dtype,
                                              parametrization=Parametrization("power", 1, 2.5)))
                for options in descent:  # SGD's solver (the gain needs depth 2)
                    solvers.append(StochasticGradientDescent(
                        "sgd", Problem(X, y), layers[:, :2 if options.gain else L], options,
                        dt=1e-3, dtype=dtype))
                # momentum and weight decay on difference and power layers: the same kernels
                for options, rows, param in (
                        (descent[0], np.concatenate([layers, layers], axis=1), Parametrization("difference", L)),
                        (DescentOptions(weight_decay=0.1), np.concatenate([layers, layers], axis=1),
                         Parametrization("difference", L)),
                        (descent[1], layers[:, :2], Parametrization("power", 1, 2.5))):
                    solvers.append(StochasticGradientDescent("sgd", Problem(X, y), rows, options, dt=1e-3,
                                                             dtype=dtype, parametrization=param))
                for it in solvers:
                    it.advance_to(0.005)
                    it.current_losses(); it.theta_of_all(); it.invariant_drift()

    # Compile (or load from the cache) everything first: compiled code resolves its callees
    # through its module's globals at compile time, and the wrapping below replaces some of them
    # with Python functions. Later compilations would show up in the signature counts below.
    run_all()
    # Then wrap what the integrators call from Python, through stand-ins for their `kernels`
    # and `controller` modules, and run again, counting allocations per call.
    import types
    for module in (kernels, controller):
        stand_in = types.SimpleNamespace(**{k: getattr(module, k) for k in dir(module)})
        for name in dir(module):
            fn = getattr(module, name)
            if hasattr(fn, "signatures"):
                setattr(stand_in, name, counting(name, fn))
        setattr(integrators, module.__name__.rsplit(".", 1)[1], stand_in)
        setattr(stochastic, module.__name__.rsplit(".", 1)[1], stand_in)
    stand_in = types.SimpleNamespace(**{k: getattr(stochastic_kernels, k) for k in dir(stochastic_kernels)})
    for name in ("gathered_products", "accumulate_gain"):
        setattr(stand_in, name, counting(name, getattr(stochastic_kernels, name)))
    stochastic.stochastic_kernels = stand_in
    for key, fn in list(stochastic_kernels.MOMENTUM_STEP_KERNELS.items()):
        stochastic_kernels.MOMENTUM_STEP_KERNELS[key] = counting(f"momentum_step{key}", fn)
    for name in dir(integrators):  # the integrators' own compiled helpers, called from Python
        fn = getattr(integrators, name)
        if hasattr(fn, "signatures") and name.startswith("_"):
            setattr(integrators, name, counting(name, fn))

    run_all()
    signatures = {}
    for key, fn in stochastic_kernels.MOMENTUM_STEP_KERNELS.items():  # wrapped: the kernel is a cell
        kernel = next(c.cell_contents for c in fn.__closure__ if hasattr(c.cell_contents, "signatures"))
        signatures[f"momentum_step{key}"] = len(kernel.signatures)
    for module in (kernels, controller, integrators, stochastic_kernels):
        for name in dir(module):
            fn = getattr(module, name)
            cells = [c.cell_contents for c in getattr(fn, "__closure__", None) or ()]
            inner = next((c for c in cells if hasattr(c, "signatures")), fn)
            if hasattr(inner, "signatures"):
                signatures[name] = len(inner.signatures)
    print(json.dumps(dict(excess=excess, calls=calls, signatures=signatures)))
""")


def _run_script():
    env = dict(os.environ, NUMBA_NRT_STATS="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernels_allocate_nothing_and_compile_once_per_dtype():
    result = _run_script()
    assert {"rk_stage", "euler_step", "stage_input", "layer_products", "per_seed_products",
            "shared_products_serial", "residual_and_loss", "accept_steps", "rms_of_blocks",
            "invariant_drift_blocks", "screen_losses", "_finish_fixed", "control_steps_fastmath",
            "propose_steps_fastmath", "gathered_products", "accumulate_gain",
            "momentum_step(False, False)", "momentum_step(True, False)",
            "momentum_step(True, True)"} <= set(result["calls"])
    for name, extra in result["excess"].items():
        assert extra == 0, f"{name} allocates {extra} array(s) per call (the time loop must not)"
    assert {"rk_stage", "euler_step", "control_steps_fastmath"} <= set(result["signatures"])
    for name, count in result["signatures"].items():
        # float64 and float32 runs: at most two compilations of any kernel called from Python
        # (helpers inlined into kernels, such as _k_row, are typed once per call site: their
        # count reflects the kernels' source, not how the integrators call them)
        if name in result["calls"]:
            assert count <= 2, f"{name} compiled {count} times"
