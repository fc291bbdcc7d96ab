"""Run configuration: every key with its default, parsed and validated in one place.

The TOML layout (README.md, "Configuration") has four tables ``[problem]``, ``[model]``,
``[integrator]`` and ``[run]``. Every key has a default, so an empty file is a valid run.
Validation happens once, when a :class:`Config` is built; every failure raises
:class:`~ddln_fast.errors.InputError` with one line naming the key, the bad value and what was
expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError, existing_file
from .parametrization import PARAMETRIZATIONS

PROBLEM_KINDS = ("gaussian", "file")
INITS = ("first_layer_zero", "balanced", "gaussian", "shape", "file")
SIGNS = ("positive", "random")
INIT_FROM = ("initial", "last")
METHODS = ("euler", "rk4", "dopri5", "mirror", "sgd", "dual")
#: Methods that take steps of exactly integrator.dt (checkpoints fall on whole steps).
FIXED_STEP_METHODS = ("euler", "rk4", "sgd")
#: Gradient descent and its stochastic variant: the methods that take momentum, label noise,
#: weight decay and step schedules.
DESCENT_METHODS = ("euler", "sgd")
SAMPLINGS = ("without_replacement", "with_replacement")
SCHEDULES = ("constant", "step")
#: Keys added after the first schema (issues 12 and 10): a sweep task's id leaves them out while they hold
#: their defaults, so the tasks of a sweep run before they existed keep their ids and files.
ADDED_KEYS = ("integrator.batch_size", "integrator.sampling", "integrator.momentum",
              "integrator.nesterov", "integrator.label_noise", "integrator.weight_decay",
              "integrator.schedule", "integrator.decay_every", "integrator.decay_factor",
              "run.sharpness", "run.gain", "model.parametrization", "model.power",
              "integrator.activation_level")
SPACINGS = ("log", "linear")
DTYPES = ("float64", "float32")


def _key(kind: type, default: Any, check=None, expected: str = "") -> Any:
    """A config key: its Python type, default and range check (``check(value) -> bool``)."""
    return field(default=default, metadata={"kind": kind, "check": check, "expected": expected})


def _choice(options: tuple[str, ...]):
    return lambda value: value in options, "one of " + ", ".join(f'"{o}"' for o in options)


def _positive(value) -> bool:
    return value > 0


def _non_negative(value) -> bool:
    return value >= 0


@dataclass(frozen=True)
class ProblemConfig:
    """``[problem]``: the regression data."""

    kind: str = _key(str, "gaussian", *_choice(PROBLEM_KINDS))
    n: int = _key(int, 100, _positive, "an integer >= 1")
    d: int = _key(int, 1000, _positive, "an integer >= 1")
    sparsity: int = _key(int, 5, _non_negative, "an integer >= 0")
    noise: float = _key(float, 0.0, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
    seed: int = _key(int, 0, _non_negative, "an integer >= 0")
    per_seed_data: bool = _key(bool, True)
    path: str = _key(str, "")


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: depth and initialization of the diagonal network."""

    parametrization: str = _key(str, "product", *_choice(PARAMETRIZATIONS))
    depth: int = _key(int, 3, lambda v: 1 <= v <= 64, "an integer between 1 and 64")
    power: float = _key(float, 0.0, lambda v: math.isfinite(v) and v >= 0,
                        "a finite number (D >= 2 for parametrization = \"power\"; 0: not set)")
    alpha: float = _key(float, 0.1, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
    init: str = _key(str, "first_layer_zero", *_choice(INITS))
    jitter: float = _key(float, 0.0, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
    layer_scales: list = _key(list, (), None, "a list of numbers")
    init_path: str = _key(str, "")
    init_from: str = _key(str, "initial", *_choice(INIT_FROM))
    signs: str = _key(str, "positive", *_choice(SIGNS))


@dataclass(frozen=True)
class IntegratorConfig:
    """``[integrator]``: method, step control and stopping rules (times are flow time)."""

    method: str = _key(str, "dopri5", *_choice(METHODS))
    dt: float = _key(float, 0.01, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
    rtol: float = _key(float, 1e-8, lambda v: 0 < v < 1, "a number in (0, 1)")
    atol: float = _key(float, 1e-12, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
    t_end: float = _key(float, 100.0, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
    max_steps: int = _key(int, 10_000_000, _positive, "an integer >= 1")
    loss_tol: float = _key(float, 0.0, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
    # gradient descent (euler) and sgd only; the defaults leave euler plain gradient descent
    batch_size: int = _key(int, 0, _non_negative, "an integer from 1 to problem.n (0: not set)")
    sampling: str = _key(str, "without_replacement", *_choice(SAMPLINGS))
    momentum: float = _key(float, 0.0, lambda v: 0 <= v < 1, "a number in [0, 1)")
    nesterov: bool = _key(bool, False)
    label_noise: float = _key(float, 0.0, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
    weight_decay: float = _key(float, 0.0, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
    schedule: str = _key(str, "constant", *_choice(SCHEDULES))
    decay_every: int = _key(int, 0, _non_negative, "an integer >= 1 (steps; 0: not set)")
    decay_factor: float = _key(float, 0.1, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
    activation_level: float = _key(float, 0.0, lambda v: math.isfinite(v) and v >= 0,
                                   "a finite number >= 0 (0: a fraction of the predicted limit)")


@dataclass(frozen=True)
class RunConfig:
    """``[run]``: batch of seeds, checkpoints, storage and threads."""

    seeds: int = _key(int, 8, lambda v: 1 <= v <= 1_000_000, "an integer >= 1")
    seed: int = _key(int, 0, _non_negative, "an integer >= 0")
    checkpoints: int = _key(int, 200, lambda v: v >= 2, "an integer >= 2 (t = 0 and t_end at least)")
    spacing: str = _key(str, "log", *_choice(SPACINGS))
    save_layers: bool = _key(bool, True)
    dtype: str = _key(str, "float64", *_choice(DTYPES))
    threads: int = _key(int, 0, _non_negative, "an integer >= 0 (0: all cores)")
    swmr: bool = _key(bool, True)
    # diagnostics of discrete dynamics, stored at every checkpoint (each costs some work)
    sharpness: bool = _key(bool, False)
    gain: bool = _key(bool, False)


SECTIONS: dict[str, type] = {
    "problem": ProblemConfig,
    "model": ModelConfig,
    "integrator": IntegratorConfig,
    "run": RunConfig,
}
#: Keys that name files, (table, key): relative paths are taken relative to the config file.
PATH_KEYS = {("problem", "path"), ("model", "init_path")}


def suggest(name: str, options) -> str:
    """' (did you mean "X"?)' for the closest of ``options`` to a misspelled ``name``, or ''."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _plain(value: Any) -> Any:
    """numpy scalars (np.int64(4), np.float64, np.bool_, np.str_) as the Python values they hold."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _coerce(dotted: str, value: Any, kind: type) -> Any:
    """Check the TOML type of one value; ints are accepted where floats are expected."""
    value = _plain(value)
    if kind is bool:
        ok = isinstance(value, bool)
        name = "true or false"
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        name = "an integer"
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        name = "a number"
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
        name = "a string"
    else:  # list of numbers
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        name = "a list of numbers"
        value = tuple(float(v) for v in value) if ok else value
    if not ok:
        raise InputError(f"{dotted} = {value!r}: expected {name}, got {type(value).__name__}")
    return value


def _build_section(name: str, table: Any, base_dir: Path | None):
    cls = SECTIONS[name]
    if not isinstance(table, Mapping):
        raise InputError(f"[{name}] must be a table of keys, got {type(table).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name == "problem" and table.get("path") and "kind" not in table:
        table = {**table, "kind": "file"}  # a data file given without a kind: the data is that file
    values = {}
    for key, value in table.items():
        dotted = f"{name}.{key}"
        if key not in fields:
            raise InputError(f"unknown config key {dotted}{suggest(key, fields)}")
        meta = fields[key].metadata
        value = _coerce(dotted, value, meta["kind"])
        if meta["check"] is not None and not meta["check"](value):
            raise InputError(f"{dotted} = {value!r}: expected {meta['expected']}")
        if (name, key) in PATH_KEYS and value and base_dir is not None:
            value = str((base_dir / value).resolve()) if not Path(value).is_absolute() else value
        values[key] = value
    return cls(**values)


@dataclass(frozen=True)
class Config:
    """A validated run configuration (immutable; use :meth:`with_overrides` to vary it).

    Build it with :meth:`from_toml`, :meth:`from_dict` or ``Config()`` for all defaults.
    """

    problem: ProblemConfig = field(default_factory=ProblemConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    integrator: IntegratorConfig = field(default_factory=IntegratorConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        _check_consistency(self)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, tables: Mapping, base_dir: str | Path | None = None) -> "Config":
        """Build from nested tables ``{"model": {"depth": 3}, ...}``; relative paths in
        ``problem.path`` and ``model.init_path`` are taken relative to ``base_dir``."""
        if not isinstance(tables, Mapping):
            raise InputError("a config must be a table of tables")
        base = Path(base_dir) if base_dir is not None else None
        sections = {}
        for name, table in tables.items():
            if name not in SECTIONS:
                raise InputError(f"unknown config table [{name}]{suggest(name, SECTIONS)}; "
                                 f"expected one of [problem], [model], [integrator], [run]")
            sections[name] = _build_section(name, table, base)
        return cls(**sections)

    @classmethod
    def from_toml(cls, path: str | Path | None = None, overrides: Mapping | None = None) -> "Config":
        """Read a TOML file (``None``: the built-in defaults) and apply dotted-key overrides."""
        tables: dict = {}
        base_dir = None
        if path is not None:
            tables = read_toml(path)
            base_dir = Path(path).resolve().parent
        config = cls.from_dict(tables, base_dir)
        return config.with_overrides(overrides) if overrides else config

    def with_overrides(self, overrides: Mapping[str, Any], base_dir: str | Path | None = None) -> "Config":
        """A new config with dotted keys replaced, e.g. ``{"model.depth": 4}``."""
        tables = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = str(dotted).partition(".")
            if not key or "." in key:
                raise InputError(f'override key "{dotted}": expected SECTION.KEY, e.g. model.depth')
            if section not in SECTIONS:
                raise InputError(f"unknown config table [{section}] in override {dotted}"
                                 f"{suggest(section, SECTIONS)}")
            tables[section][key] = value
        if "problem.path" in overrides and "problem.kind" not in overrides and not self.problem.path:
            del tables["problem"]["kind"]  # a new data file without a kind: the data is that file
        return Config.from_dict(tables, base_dir if base_dir is not None else Path.cwd())

    # -- views ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Nested plain tables (lists for tuples), ready for TOML."""
        out = {}
        for name in SECTIONS:
            table = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in table.items()}
        return out

    def to_toml(self) -> str:
        """The fully resolved config as TOML text (every key written)."""
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def flat(self) -> dict[str, Any]:
        """``{"model.depth": 3, ...}`` for every key."""
        return {f"{s}.{k}": v for s, table in self.to_dict().items() for k, v in table.items()}

    def differing_keys(self, other: "Config", ignore: tuple[str, ...] = ()) -> list[str]:
        """Dotted keys whose values differ between two configs."""
        a, b = self.flat(), other.flat()
        return [k for k in a if a[k] != b[k] and k not in ignore]


def _check_consistency(config: Config) -> None:
    """Checks that involve more than one key."""
    p, m = config.problem, config.model
    if p.kind == "gaussian" and p.sparsity > p.d:
        raise InputError(f"problem.sparsity = {p.sparsity} exceeds problem.d = {p.d}")
    if p.kind == "gaussian" and p.path:
        raise InputError(f'problem.path = "{p.path}" is set but problem.kind = "gaussian" (synthetic '
                         f'data): leave out problem.kind (a path means kind = "file") or the path')
    if p.kind == "file" and not p.path:
        raise InputError('problem.kind = "file" needs problem.path (.npz with X, y or .h5 with /X, /y)')
    _check_parametrization(m)
    if m.init == "shape":
        if not all(math.isfinite(v) for v in m.layer_scales):
            raise InputError("model.layer_scales: expected finite numbers")
    i = config.integrator
    if i.method in FIXED_STEP_METHODS and i.t_end < i.dt:
        raise InputError(f"integrator.t_end = {i.t_end:g} is shorter than one step of {i.method} "
                         f"(integrator.dt = {i.dt:g}): nothing to integrate; lower dt or raise t_end")
    if i.method == "dual":
        _check_dual(config)
    if m.init_from == "last" and m.init != "file":
        raise InputError(f'model.init_from = "last" (warm start from the last layers of a run file) needs '
                         f'model.init = "file", got "{m.init}"')
    if m.init == "file" and not m.init_path:
        raise InputError('model.init = "file" needs model.init_path (.npy, .npz or .h5 with u0)')
    _check_descent_keys(config)


def _as_toml(value: Any) -> str:
    """A value as TOML writes it (true, "step", 0.5), for messages about config keys."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)


def _check_descent_keys(config: Config) -> None:
    """The keys of gradient descent and SGD: each only where it means something."""
    i, defaults = config.integrator, IntegratorConfig()
    if i.method == "sgd" and i.batch_size == 0:
        raise InputError('integrator.method = "sgd" needs integrator.batch_size (an integer from 1 to '
                         'problem.n; batch_size = problem.n is full-batch gradient descent)')
    only_sgd = [key for key in ("batch_size", "sampling") if getattr(i, key) != getattr(defaults, key)]
    if i.method != "sgd" and only_sgd:
        key = only_sgd[0]
        raise InputError(f'integrator.{key} = {_as_toml(getattr(i, key))} applies to integrator.method = "sgd" '
                         f'only, not "{i.method}"')
    descent = [key for key in ("momentum", "nesterov", "label_noise", "weight_decay", "schedule",
                               "decay_every", "decay_factor") if getattr(i, key) != getattr(defaults, key)]
    if i.method not in DESCENT_METHODS and descent:
        key = descent[0]
        raise InputError(f'integrator.{key} = {_as_toml(getattr(i, key))} applies to gradient descent only '
                         f'(integrator.method = "euler" or "sgd"), not "{i.method}"')
    if i.nesterov and i.momentum == 0:
        raise InputError("integrator.nesterov = true needs integrator.momentum > 0 (with momentum 0 it "
                         "is plain gradient descent)")
    if i.schedule == "step" and i.decay_every == 0:
        raise InputError('integrator.schedule = "step" needs integrator.decay_every (steps between two '
                         'decays of the step, an integer >= 1)')
    if i.schedule == "constant":
        for key in ("decay_every", "decay_factor"):
            if getattr(i, key) != getattr(defaults, key):
                raise InputError(f'integrator.{key} = {_as_toml(getattr(i, key))} applies to integrator.schedule '
                                 f'= "step" only (the schedule is "constant")')
    p = config.problem
    if i.method == "sgd" and p.kind == "gaussian" and i.batch_size > p.n:
        raise InputError(f"integrator.batch_size = {i.batch_size} exceeds problem.n = {p.n} samples")
    r = config.run
    if r.gain and config.model.parametrization != "product":
        raise InputError(f"run.gain = true (the depth-2 effective initialization of gradient descent) "
                         f"takes the product parametrization only, not \"{config.model.parametrization}\": "
                         f"its identities (u^1 + u^2 and u^1 - u^2 scale by 1 -+ step * g) are derived for u^1 u^2")
    if r.gain:
        if config.model.depth != 2 or i.method not in DESCENT_METHODS:
            raise InputError(f"run.gain = true (the accumulated gain and effective initialization of "
                             f"gradient descent at depth 2) needs model.depth = 2 and integrator.method = "
                             f'"euler" or "sgd", got depth {config.model.depth} and "{i.method}"')
        if i.momentum > 0 or i.weight_decay > 0:
            key = "momentum" if i.momentum > 0 else "weight_decay"
            raise InputError(f"run.gain = true needs plain (stochastic) gradient descent: with "
                             f"integrator.{key} > 0 the layers no longer follow a gradient flow from an "
                             f"effective initialization")


def check_batch_size(config: Config, n: int) -> None:
    """InputError if ``integrator.batch_size`` exceeds the ``n`` samples of the data (known only
    once a data file is read)."""
    b = config.integrator.batch_size
    if config.integrator.method == "sgd" and b > n:
        raise InputError(f"integrator.batch_size = {b} exceeds the {n} samples of the data "
                         f"(problem.n)")


def shape_scale_counts(model: ModelConfig) -> tuple[int, ...]:
    """The lengths ``model.layer_scales`` may have: one per layer of the product (L), one per
    layer of a half or of both halves for the others (L or 2L; 1 or 2 for power)."""
    if model.parametrization == "product":
        return (model.depth,)
    per_half = 1 if model.parametrization == "power" else model.depth
    return (per_half, 2 * per_half)


def _check_parametrization(m: ModelConfig) -> None:
    """model.parametrization against model.power, the layer scales and (power) positivity."""
    if m.parametrization == "power":
        if m.power < 2:
            raise InputError(f'model.power = {m.power:g}: parametrization = "power" (theta = u^D - v^D) '
                             f"needs a real exponent D >= 2")
    elif m.power != 0:
        raise InputError(f'model.power = {m.power:g} is only read by parametrization = "power", '
                         f'not "{m.parametrization}": remove it or set model.parametrization = "power"')
    if m.init == "shape":
        counts = shape_scale_counts(m)
        if len(m.layer_scales) not in counts:
            if m.parametrization == "product":
                needs = f"one per layer (model.depth = {m.depth})"
            else:
                layers = "1 layer" if m.parametrization == "power" else f"{m.depth} layers"
                needs = (f"{counts[0]} (the same for both halves) or {counts[1]} (the u half, then "
                         f"the v half) for the {m.parametrization} parametrization ({layers} per half)")
            raise InputError(f'model.layer_scales has {len(m.layer_scales)} entries: init = "shape" '
                             f"needs {needs}")
    if m.parametrization != "power":
        return
    why = None
    if m.init == "first_layer_zero":
        why = 'init = "first_layer_zero" sets a layer to 0'
    elif m.signs == "random":
        why = 'model.signs = "random" makes layers negative'
    elif m.init == "shape" and any(v <= 0 for v in m.layer_scales):
        why = "model.layer_scales has an entry <= 0"
    if why:
        raise InputError(f'parametrization = "power" needs u, v > 0 at initialization, but {why}; use '
                         f'init = "balanced" (u = v = alpha), "gaussian" or positive layer_scales')


def _check_dual(config: Config) -> None:
    """Settings the dual method cannot honour."""
    if config.run.dtype != "float64":
        raise InputError('integrator.method = "dual" runs in float64 only (run.dtype = '
                         f'"{config.run.dtype}"); set run.dtype = "float64"')
    if config.integrator.atol == 0:
        raise InputError('integrator.atol = 0 with method "dual": the clocks start at 0, where a '
                         "purely relative tolerance is undefined; set atol > 0")


def read_toml(path: str | Path) -> dict:
    """Parse a TOML file, turning every failure into a one-line :class:`InputError`."""
    path = existing_file(path, "config file", "a TOML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"config file {path} cannot be read: {err}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"config file {path} is not valid TOML: {err}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.depth=4"`` -> ``("model.depth", 4)``; the value is read as TOML, and anything that
    is not TOML is taken as a string (``model.init=balanced``, ``problem.path=../data/x.npz``)
    unless it is a malformed number (``1.5.2``) or a malformed TOML array, table or string."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise InputError(f'--set "{text}": expected KEY=VALUE, e.g. --set model.depth=4')
    if not raw:
        raise InputError(f'--set "{text}": missing value after "="')
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        malformed_number = any(c.isdigit() for c in raw) and all(c in "0123456789+-._eE" for c in raw)
        if raw[0] in "[{\"'" or malformed_number:
            raise InputError(f'--set "{text}": the value {raw} is not a TOML value') from None
        value = raw
    return key, value
