"""Layer initializations u0 of shape (S, P, d), one reproducible random stream per seed.

P is the number of layer rows of the parametrization (:mod:`ddln_fast.parametrization`): L for
the product, 2L for the difference (the u half, then the v half), 2 for the power. Every init
applies to each half: ``balanced`` gives u^j = v^j = alpha (Woodworth's standard init),
``first_layer_zero`` zeroes the first layer of each half, ``signs = "random"`` flips the last
layer of each half.

Seed ``s`` draws from ``SeedSequence(run.seed, spawn_key=(s,))``, so its initialization is the
same whether it runs alone or among 64 others.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import Config
from .errors import InputError
from .parametrization import Parametrization
from .problem import as_float_array, read_arrays


def seed_generator(master_seed: int, seed_index: int) -> np.random.Generator:
    """The random stream of simulation seed ``seed_index``."""
    return np.random.default_rng(np.random.SeedSequence(master_seed, spawn_key=(seed_index,)))


def base_layer_scales(config: Config) -> np.ndarray:
    """Scale of each layer row before jitter and signs, shape (P,)."""
    m = config.model
    param = Parametrization.from_config(config)
    rows = param.layer_count
    if m.init == "first_layer_zero":
        scales = np.full(rows, m.alpha)
        scales[param.first_layers()] = 0.0
        return scales
    if m.init in ("balanced", "gaussian"):
        return np.full(rows, m.alpha)
    if m.init == "shape":
        scales = np.asarray(m.layer_scales, dtype=np.float64)
        if scales.size != rows:  # one half's scales, for both halves
            scales = np.tile(scales, param.halves)
        return m.alpha * scales
    raise ValueError(f"no base scales for init {m.init!r}")


def initial_layers(config: Config, d: int) -> np.ndarray:
    """Initial layers u0 of every seed, shape (S, P, d), float64 (P: see the module docstring).

    Jitter multiplies each entry by (1 + jitter * N(0, 1)) (for ``gaussian`` it is the point of
    the init); ``signs = "random"`` flips each coordinate of the last layer (of each half) with
    probability 1/2. The power parametrization needs every entry > 0 (else InputError).
    """
    m, r = config.model, config.run
    param = Parametrization.from_config(config)
    seeds, rows = r.seeds, param.layer_count
    if m.init == "file":
        u0 = load_initial_layers(m.init_path, seeds, rows, d, m.init_from, param)
    else:
        scales = base_layer_scales(config)
        u0 = np.empty((seeds, rows, d))
        for s in range(seeds):
            rng = seed_generator(r.seed, s)
            noise = rng.standard_normal((rows, d)) if m.jitter > 0 else 0.0
            u0[s] = scales[:, None] * (1.0 + m.jitter * noise)
    if m.signs == "random":
        for s in range(seeds):
            # A separate child stream: flipping signs does not change the jitter draws.
            rng = np.random.default_rng(np.random.SeedSequence(r.seed, spawn_key=(s, 1)))
            for row in param.last_layers():
                u0[s, row] *= np.where(rng.random(d) < 0.5, -1.0, 1.0)
    if param.name == "power":
        _check_positive(u0, m)
    return u0


def _check_positive(u0: np.ndarray, model) -> None:
    """InputError unless every entry of a power-parametrization init is > 0."""
    bad = ~(u0 > 0)
    if np.any(bad):
        seed = int(np.argmax(bad.any(axis=(1, 2))))
        if model.init == "file":
            source, fix = f"init file {model.init_path}", "give positive layers"
        else:
            source = f'init = "{model.init}" with model.jitter = {model.jitter:g}'
            fix = 'use a smaller jitter or init = "balanced"'
        raise InputError(f'parametrization = "power" needs u, v > 0 at initialization: {source} gives '
                         f"{int(bad.sum())} entries <= 0 (first in seed {seed}); {fix}")


def load_initial_layers(path: str | Path, seeds: int, depth: int, d: int,
                        init_from: str = "initial", param: Parametrization | None = None) -> np.ndarray:
    """u0 of shape (P, d) (repeated for every seed) or (S, P, d) from .npy/.npz/.h5, P = ``depth``
    layer rows (2L for the difference parametrization, 2 for power: ``param`` names them in
    the error).

    Accepted names: ``u0`` or ``u`` (.npz), ``/u0`` or ``/init/u`` (.h5, e.g. another run file).
    ``init_from = "last"`` (a warm start) takes a run file's layers at its last committed
    checkpoint instead of its initial layers.
    """
    path = Path(path)
    if init_from == "last":
        array = _last_layers_of_run(path)
    elif path.suffix.lower() == ".npy":
        if not path.exists():
            raise InputError(f"init file {path} does not exist")
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as err:
            raise InputError(f"init file {path} cannot be read ({type(err).__name__}: {err})") from None
    else:
        arrays = read_arrays(path, ("u0", "u", "init/u"), "init")
        if not arrays:
            raise InputError(f"init file {path} has no array u0 (expected shape (L, d) or (S, L, d))")
        array = next(iter(arrays.values()))
    u0 = as_float_array(array, "u0", path)
    if u0.shape == (depth, d):
        return np.repeat(u0[None], seeds, axis=0)
    if u0.shape == (seeds, depth, d):
        return u0.copy()
    what = f"depth {depth}" if param is None or param.name == "product" else (
        f"the {param.name} parametrization's {depth} layer rows ({param.layer_axis()})")
    raise InputError(f"u0 in {path} has shape {u0.shape}, expected ({depth}, {d}) or ({seeds}, {depth}, {d}) "
                     f"for {what}, dimension {d}, {seeds} seeds")


def _last_layers_of_run(path: Path) -> np.ndarray:
    """/checkpoints/u at the last committed checkpoint of a run file, shape (S, L, d)."""
    from .store import open_run

    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise InputError(f'model.init_from = "last" needs a ddln run file (.h5) as model.init_path, got {path}')
    try:
        run = open_run(path)
    except InputError as err:
        raise InputError(f'model.init_from = "last": {err}') from None
    with run:
        if "u" not in run.file["checkpoints"]:
            raise InputError(f'init file {path} has no saved layers (its run had run.save_layers = false): '
                             f'model.init_from = "last" needs them; use "initial" or a run that saved layers')
        if run.committed == 0:
            raise InputError(f"init file {path} has no committed checkpoint to start from")
        return np.asarray(run.file["checkpoints/u"][run.committed - 1])


def sign_trap_coordinates(u0: np.ndarray) -> np.ndarray:
    """Mask of the coordinates that violate assumption (A): the smallest |u^j_i(0)| is attained
    by more than one layer. Shape (S, d). For depth 1, (A) always holds. (The product
    parametrization only: difference and power have no sign trap.)"""
    magnitudes = np.abs(u0)
    smallest = magnitudes.min(axis=1, keepdims=True)
    return np.sum(magnitudes == smallest, axis=1) > 1
