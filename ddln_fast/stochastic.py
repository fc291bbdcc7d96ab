"""Gradient descent beyond the full batch: minibatch SGD, label noise, heavy-ball and Nesterov
momentum, weight decay and step schedules, for many seeds at once and resumable bit for bit.

``integrator.method = "sgd"`` runs :class:`StochasticGradientDescent` with batches of
``integrator.batch_size`` samples; ``"euler"`` (full-batch gradient descent) runs it as soon as
one of momentum, label noise, weight decay, a step schedule or the gain diagnostic is asked for
(plain gradient descent stays :class:`ddln_fast.integrators.Integrator`). One step k, with step
size gamma_k (``integrator.dt``, times ``decay_factor`` once per ``decay_every`` steps with the
"step" schedule), follows PyTorch's SGD::

    grad = (X_B^T (X_B theta - y_B) / b) * d theta / d u^j + weight_decay * u^j
    v^j  = momentum * v^j + grad                               (v = 0 at the start)
    u^j -= gamma_k * (grad + momentum * v^j)   (Nesterov)   or   gamma_k * v^j

for every layer row u^j, with B the step's batch of b samples and y_B its labels (plus label
noise). d theta / d u^j is the product of the other layers (of its half, negated in the v half,
for "difference"), or +-D u^(D-1) for "power" (:mod:`ddln_fast.parametrization`). A run's time
is t = k * dt (the step count times the first step size), as for gradient descent.

Randomness
----------
Each seed s draws from its own numpy ``Generator(PCG64(SeedSequence(run.seed, spawn_key=(s, K))))``
(keys K = 0 and 1 are the initialization's jitter and signs, see :mod:`ddln_fast.init`):

- K = 2, batches. ``without_replacement``: at the start of every epoch the seed draws
  ``order = rng.permutation(n)`` and its next n // b steps use ``order[k b:(k + 1) b]``, k = 0, 1,
  ... (the n mod b samples left over sit that epoch out, so every batch has b samples);
  ``with_replacement``: every step draws ``rng.integers(n, size=b)``. A batch of b = n samples
  without replacement is the whole data in its natural order (no draws): gradient descent.
- K = 3, label noise: the values of one ``xi = rng.standard_normal(b)`` per step (b = n for
  the full batch); the i-th sample of the batch gets the label y + label_noise * xi_i. They are
  drawn in blocks of whole steps (about :data:`NOISE_VALUES_PER_DRAW` values: one call into
  numpy per seed every few steps), which gives the same values: ``standard_normal`` fills its
  output one value after the other.

Only running seeds draw, so a seed's draws depend neither on the other seeds nor on the thread
count. The generator states, the epoch's order and position and the velocity are part of the
solver state (exact resume, also in the middle of an epoch); the run file records the seed
material in its root attribute ``random_streams``.

The loss a step computes is that of its batch (and noisy labels): it stops a seed that diverges.
``integrator.loss_tol`` is checked on the full loss at every checkpoint, or at every step when
the step's loss is the full loss (full batch without label noise, as plain gradient descent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from . import controller, kernels, stochastic_kernels
from .controller import LOSS_TOL, RUNNING
from .errors import InputError
from .integrators import Integrator
from .problem import Problem

#: spawn_key[1] of each seed's random streams (0 and 1: initialization jitter and signs).
BATCH_STREAM, LABEL_NOISE_STREAM = 2, 3
#: Label noise is drawn in blocks of whole steps of at most this many values per seed (or one
#: step's): a call into numpy per seed and step cost as much as a pass over a small state.
NOISE_VALUES_PER_DRAW = 1024
WITHOUT_REPLACEMENT = "without_replacement"


@dataclass(frozen=True)
class DescentOptions:
    """What makes a run more than plain full-batch gradient descent (``[integrator]`` keys).

    ``batch_size`` 0 means the full batch in its natural order (``euler``); ``master_seed`` is
    ``run.seed``; ``gain`` is ``run.gain`` (depth-2 gain sums, see :mod:`ddln_fast.effective`).
    """

    batch_size: int = 0
    sampling: str = WITHOUT_REPLACEMENT
    momentum: float = 0.0
    nesterov: bool = False
    label_noise: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    decay_every: int = 0
    decay_factor: float = 0.1
    gain: bool = False
    master_seed: int = 0

    @classmethod
    def from_config(cls, config) -> "DescentOptions":
        i = config.integrator
        return cls(batch_size=i.batch_size if i.method == "sgd" else 0, sampling=i.sampling,
                   momentum=i.momentum, nesterov=i.nesterov, label_noise=i.label_noise,
                   weight_decay=i.weight_decay, schedule=i.schedule, decay_every=i.decay_every,
                   decay_factor=i.decay_factor, gain=config.run.gain, master_seed=config.run.seed)

    @property
    def plain(self) -> bool:
        """Full-batch gradient descent with a constant step and nothing else."""
        return self == DescentOptions(master_seed=self.master_seed)

    def step_sizes(self, dt: float, steps: np.ndarray) -> np.ndarray:
        """The step size of step number ``steps`` (counted from 0), same shape."""
        steps = np.asarray(steps)
        if self.schedule == "constant":
            return np.full(steps.shape, dt)
        return dt * self.decay_factor ** (steps // self.decay_every)

    @property
    def stability_bound(self) -> float:
        """z = step * lambda with which the method is linearly stable on a quadratic of
        curvature lambda exactly for 0 < z < bound: 2 for gradient descent, 2 (1 + beta) for
        heavy ball and 2 (1 + beta) / (1 + 2 beta) for Nesterov (the roots of the characteristic
        polynomial of the two-step recursion stay in the unit disc)."""
        beta = self.momentum
        if beta == 0:
            return 2.0
        return 2 * (1 + beta) / (1 + 2 * beta) if self.nesterov else 2 * (1 + beta)


def seed_stream(master_seed: int, seed_index: int, stream: int) -> np.random.Generator:
    """Random stream ``stream`` (:data:`BATCH_STREAM`, :data:`LABEL_NOISE_STREAM`) of seed
    ``seed_index``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(master_seed,
                                                                      spawn_key=(seed_index, stream))))


_LOW = (1 << 64) - 1


def generator_states(generators) -> np.ndarray:
    """The PCG64 states of the generators as uint64 rows (state and increment, high and low
    halves, has_uint32, uinteger), shape (len(generators), 6)."""
    out = np.zeros((len(generators), 6), dtype=np.uint64)
    for s, gen in enumerate(generators):
        st = gen.bit_generator.state
        core = st["state"]
        out[s] = [core["state"] >> 64, core["state"] & _LOW, core["inc"] >> 64, core["inc"] & _LOW,
                  st["has_uint32"], st["uinteger"]]
    return out


def restore_generator_states(generators, rows: np.ndarray) -> None:
    """Set each generator to its row of :func:`generator_states`."""
    for gen, row in zip(generators, np.asarray(rows, dtype=np.uint64)):
        hi, lo, inc_hi, inc_lo, has, value = (int(v) for v in row)
        gen.bit_generator.state = {"bit_generator": "PCG64",
                                   "state": {"state": (hi << 64) | lo, "inc": (inc_hi << 64) | inc_lo},
                                   "has_uint32": has, "uinteger": value}


class LabelNoise:
    """The label noise of every seed: standard normal values drawn in blocks of whole steps.

    ``values[s, starts[s] + i]`` is the noise of the i-th sample of seed s's batch after
    :meth:`draw`. The state of a resumable run is each generator's state before its current
    block and the position in it (the block is drawn again on restore).

    Parameters
    ----------
    master_seed, seeds : int
    per_step : int
        Values one step takes (the batch size).
    """

    def __init__(self, master_seed: int, seeds: int, per_step: int):
        self.generators = [seed_stream(master_seed, s, LABEL_NOISE_STREAM) for s in range(seeds)]
        self.per_step = per_step
        self.values = np.zeros((seeds, max(1, NOISE_VALUES_PER_DRAW // per_step) * per_step))
        self.position = np.zeros(seeds, dtype=np.int64)
        self.starts = np.zeros(seeds, dtype=np.int64)
        self.block_states = generator_states(self.generators)
        for s in range(seeds):
            self.generators[s].standard_normal(out=self.values[s])

    def draw(self, active) -> None:
        """The next step's values for the seeds in ``active``."""
        width = self.values.shape[1]
        for s in active[self.position[active] + self.per_step > width]:
            self.block_states[s] = generator_states(self.generators[s:s + 1])[0]
            self.generators[s].standard_normal(out=self.values[s])
            self.position[s] = 0
        self.starts[active] = self.position[active]
        self.position[active] += self.per_step

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"noise_generator": self.block_states, "noise_position": self.position}

    def restore(self, arrays) -> None:
        self.block_states[...] = arrays["noise_generator"]
        self.position[...] = arrays["noise_position"]
        restore_generator_states(self.generators, self.block_states)
        for s, gen in enumerate(self.generators):
            gen.standard_normal(out=self.values[s])


class StochasticGradientDescent(Integrator):
    """(Stochastic) gradient descent on the layers with the options of :class:`DescentOptions`.

    Parameters
    ----------
    method : str
        ``"sgd"`` or ``"euler"`` (the run file's method name).
    problem : Problem
    u0 : ndarray of shape (S, P, d)
    options : DescentOptions
    dt, loss_tol, max_steps, dtype, parametrization
        As for :class:`ddln_fast.integrators.Integrator` (``dt`` is the first step size); every
        option runs every parametrization (the gain diagnostic: the product at depth 2).
    """

    def __init__(self, method: str, problem: Problem, u0, options: DescentOptions, dt=0.01,
                 rtol=1e-8, atol=1e-12, loss_tol=0.0, max_steps=10_000_000, dtype=np.float64,
                 parametrization=None):
        super().__init__("euler", problem, u0, dt=dt, rtol=rtol, atol=atol, loss_tol=loss_tol,
                         max_steps=max_steps, dtype=dtype, parametrization=parametrization)
        self.method = method
        self.options = o = options
        n, S = problem.n, self.seeds
        batch = o.batch_size or n
        if batch > n:
            raise InputError(f"integrator.batch_size = {batch} exceeds the {n} samples of the data")
        self.batch = batch
        self.without_replacement = o.sampling == WITHOUT_REPLACEMENT
        #: batches are gathered rows (else: the whole data in its natural order, as euler)
        self.gathers = not (batch == n and self.without_replacement)
        #: the loss of a step is the full loss: loss_tol is checked at every step (as euler)
        self.step_loss_is_full = not self.gathers and o.label_noise == 0
        self.inv_batch = self.dtype(1.0 / batch)
        self.inv_2batch = 0.5 / batch
        self.batch_generators = None
        if self.gathers:
            self.batch_generators = [seed_stream(o.master_seed, s, BATCH_STREAM) for s in range(S)]
            #: the epoch's sample order (with replacement: the step's samples) of every seed
            self.order = np.zeros((S, n if self.without_replacement else batch), dtype=np.int64)
            #: where the next batch starts in the epoch's order; n: a new epoch starts
            self.position = np.full(S, n, dtype=np.int64)
            self.starts = np.zeros(S, dtype=np.int64)
        self.noise = LabelNoise(o.master_seed, S if o.label_noise else 0, batch)
        if o.label_noise and not self.gathers:  # the full batch: euler's products, these labels
            self.labels = np.zeros((S, n), dtype=self.dtype)
            self.y_of_seed = np.broadcast_to(self.products.y, (S, n))
            self.sample_offsets = np.arange(n)
        self.velocity = np.zeros_like(self.U) if o.momentum else np.zeros((S, self.depth, 0), self.dtype)
        if o.gain:
            self.gain_plus = np.zeros((S, self.dim))
            self.gain_minus = np.zeros((S, self.dim))
            self.max_step_gradient = np.zeros(S)

    # -- one step ---------------------------------------------------------------------------------
    # a step evaluates its batch (and its labels), not the products a checkpoint computes
    REUSES_CHECKPOINT_GRADIENT = False

    def _fixed_step(self, active) -> None:
        st, o = self.state, self.options
        m = active.size
        if o.schedule != "constant":
            self.h_work[active] = o.step_sizes(self.dt, st.steps[active])
        if self.gathers:
            self._draw_batches(active)
        noise = self.noise
        if o.label_noise:
            noise.draw(active)
        if self.gathers:
            p = self.products
            stochastic_kernels.gathered_products(p.X_by_seed, p.y, p.per_seed, self.theta, active,
                                                 self.order, self.starts, self.batch, noise.values,
                                                 noise.starts, o.label_noise, self.G,
                                                 self.inv_2batch, self.stage_loss)
        else:
            labels = None
            if o.label_noise:
                labels = self.labels
                xi = noise.values[active[:, None], noise.starts[active, None] + self.sample_offsets]
                labels[active] = self.y_of_seed[active] + o.label_noise * xi
            self.products.residual_and_gradient(self.theta, active, self.R, self.G, self.stage_loss,
                                                labels=labels)
        self.live[:m] = 1
        controller.screen_losses(active, self.live, self.stage_loss,
                                 self.loss_tol if self.step_loss_is_full else 0.0, st)
        if o.gain:
            stochastic_kernels.accumulate_gain(self.G, self.inv_batch, self.h_work, active, self.live,
                                               self.gain_plus, self.gain_minus, self.max_step_gradient)
        if o.momentum or o.weight_decay:
            stochastic_kernels.momentum_step(self.U, self.velocity, self.G, self.inv_batch, self.h_work,
                                             self.param, active, self.live, o.momentum, o.nesterov,
                                             o.weight_decay, self.theta, self.scratch)
        else:
            kernels.euler_step(self.U, self.G, self.inv_batch, self.h_work, self.param, active,
                               self.live, self.theta, self.scratch)

    def _draw_batches(self, active) -> None:
        """Each active seed's next batch: ``order[s, starts[s]:starts[s] + b]``."""
        n, b = self.products.n, self.batch
        if not self.without_replacement:
            for s in active:
                self.order[s] = self.batch_generators[s].integers(n, size=b)
            return
        position = self.position
        for s in active[position[active] + b > n]:  # the epoch is over: a new permutation
            self.order[s] = self.batch_generators[s].permutation(n)
            position[s] = 0
        self.starts[active] = position[active]
        position[active] += b

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_values(self, save_layers: bool) -> dict[str, np.ndarray]:
        """The layer integrator's values; a running seed whose full loss is below loss_tol stops
        here when the steps do not see the full loss; with the gain diagnostic also ``gain``
        (S, d), ``effective_init`` (S, 2, d) and ``max_step_gradient`` (S,)."""
        values = super().checkpoint_values(save_layers)
        st = self.state
        if not self.step_loss_is_full and self.loss_tol > 0:
            reached = (st.status == RUNNING) & (values["loss"] < self.loss_tol)
            st.status[reached] = LOSS_TOL
            st.t_stop[reached] = st.t[reached]
        if self.options.gain:
            from .effective import effective_initialization

            values["gain"] = 0.5 * (self.gain_plus + self.gain_minus)
            values["effective_init"] = effective_initialization(self.u0, self.gain_plus, self.gain_minus)
            values["max_step_gradient"] = self.max_step_gradient.copy()
        return values

    def checkpoint_rows(self) -> dict[str, tuple]:
        if not self.options.gain:
            return {}
        from .effective import gain_rows

        return {name: ((self.seeds, *shape), dtype, labels, meaning)
                for name, (shape, dtype, labels, meaning) in gain_rows(self.dim).items()}

    def run_attributes(self) -> dict[str, str]:
        """``random_streams``: the seed material and the draw protocol of the batches and the
        label noise (JSON)."""
        o = self.options
        streams = {"entropy": o.master_seed, "bit_generator": "PCG64",
                   "generator": "numpy.random.Generator(PCG64(SeedSequence(entropy, spawn_key=(s, key))))"}
        if self.gathers:
            protocol = (f"each epoch: order = rng.permutation({self.products.n}); step k of the epoch "
                        f"uses order[k * {self.batch}:(k + 1) * {self.batch}], k < {self.products.n // self.batch}"
                        if self.without_replacement else f"each step: rng.integers({self.products.n}, size={self.batch})")
            streams["batches"] = {"key": BATCH_STREAM, "sampling": o.sampling, "batch_size": self.batch,
                                  "protocol": protocol}
        if o.label_noise:
            streams["label_noise"] = {"key": LABEL_NOISE_STREAM, "label_noise": o.label_noise,
                                      "protocol": f"each step: xi = rng.standard_normal({self.batch}) "
                                                  f"(the same values drawn in blocks of whole steps); "
                                                  f"label of the i-th sample of the batch: y + label_noise * xi[i]"}
        if len(streams) == 3:
            return {}
        return {"random_streams": json.dumps(streams)}

    # -- exact resume -----------------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """The layer integrator's state, and: ``velocity`` (S, L, d) with momentum;
        ``batch_order`` (S, n or b), ``batch_position`` (S,) and ``batch_generator`` (S, 6) when
        batches are drawn; ``noise_generator`` (S, 6) (before the current block of noise) and
        ``noise_position`` (S,) with label noise; ``gain_plus``,
        ``gain_minus`` (S, d) and ``max_step_gradient`` (S,) with the gain diagnostic."""
        arrays = super().state_arrays()
        o = self.options
        if o.momentum:
            arrays["velocity"] = self.velocity
        if self.gathers:
            arrays.update(batch_order=self.order, batch_position=self.position,
                          batch_generator=generator_states(self.batch_generators))
        if o.label_noise:
            arrays.update(self.noise.state_arrays())
        if o.gain:
            arrays.update(gain_plus=self.gain_plus, gain_minus=self.gain_minus,
                          max_step_gradient=self.max_step_gradient)
        return arrays

    def restore_state(self, arrays) -> None:
        super().restore_state(arrays)
        o = self.options
        if o.momentum:
            self.velocity[...] = arrays["velocity"]
        if self.gathers:
            self.order[...] = arrays["batch_order"]
            self.position[...] = arrays["batch_position"]
            restore_generator_states(self.batch_generators, arrays["batch_generator"])
        if o.label_noise:
            self.noise.restore(arrays)
        if o.gain:
            self.gain_plus[...] = arrays["gain_plus"]
            self.gain_minus[...] = arrays["gain_minus"]
            self.max_step_gradient[...] = arrays["max_step_gradient"]
