"""Run configuration: every key with its default, parsed and validated in one place.

The TOML layout is the one of INTERFACE.md: four tables ``[problem]``, ``[model]``,
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

from .errors import InputError

PROBLEM_KINDS = ("gaussian", "file")
INITS = ("first_layer_zero", "balanced", "gaussian", "shape", "file")
SIGNS = ("positive", "random")
INIT_FROM = ("initial", "last")
METHODS = ("euler", "rk4", "dopri5", "mirror")
#: Methods that take steps of exactly integrator.dt (checkpoints fall on whole steps).
FIXED_STEP_METHODS = ("euler", "rk4")
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

    depth: int = _key(int, 3, lambda v: 1 <= v <= 64, "an integer between 1 and 64")
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
    if m.init == "shape":
        if len(m.layer_scales) != m.depth:
            raise InputError(f'model.layer_scales has {len(m.layer_scales)} entries: init = "shape" '
                             f"needs one per layer (model.depth = {m.depth})")
        if not all(math.isfinite(v) for v in m.layer_scales):
            raise InputError("model.layer_scales: expected finite numbers")
    i = config.integrator
    if i.method in FIXED_STEP_METHODS and i.t_end < i.dt:
        raise InputError(f"integrator.t_end = {i.t_end:g} is shorter than one step of {i.method} "
                         f"(integrator.dt = {i.dt:g}): nothing to integrate; lower dt or raise t_end")
    if m.init_from == "last" and m.init != "file":
        raise InputError(f'model.init_from = "last" (warm start from the last layers of a run file) needs '
                         f'model.init = "file", got "{m.init}"')
    if m.init == "file" and not m.init_path:
        raise InputError('model.init = "file" needs model.init_path (.npy, .npz or .h5 with u0)')


def read_toml(path: str | Path) -> dict:
    """Parse a TOML file, turning every failure into a one-line :class:`InputError`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"config file {path} does not exist")
    if path.is_dir():
        raise InputError(f"config file {path} is a directory, expected a TOML file")
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
