"""The sweep file and its tasks: parsing, validation, and the task ids.

A sweep file is a base run config, fixed overrides ``[set]``, a cartesian ``[grid]`` and lists
varied together ``[zip]``. Every task is one fully resolved :class:`~ddln_fast.config.Config`.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import ADDED_KEYS, PATH_KEYS, SECTIONS, Config, read_toml, suggest
from ..errors import InputError

SWEEP_KEYS = ("base", "set", "grid", "zip")


@dataclass(frozen=True)
class Task:
    """One run of a sweep: its id, the swept values that define it and the resolved config."""

    id: str
    point: dict
    config: Config


@dataclass(frozen=True)
class Sweep:
    """A parsed and validated sweep file: every task's config is already built."""

    path: Path
    text: str
    fixed: dict
    grid: dict
    zipped: dict
    tasks: list = field(default_factory=list)

    @property
    def swept_keys(self) -> list[str]:
        return list(self.grid) + list(self.zipped)


def task_id(config: Config, digests: dict | None = None) -> str:
    """A stable id of the run a config describes: the first 16 hex digits of SHA-256 of its
    TOML, with every file it names (``problem.path``, ``model.init_path``) replaced by the
    SHA-256 of the file's content.

    So the id is the same on every machine and in every folder (the config itself holds
    absolute paths), and it changes when a data file's content changes (the run would differ).
    A config without files has the id of its TOML as it is. ``run.threads`` is left out: it
    changes how fast a task runs, not which run it is, and the sweep sets the threads of every
    task itself. So are the keys of ``config.ADDED_KEYS`` at their defaults (a sweep from
    before they existed keeps its ids). ``digests`` caches the file digests by path (one read
    per file per sweep).
    """
    import tomli_w

    tables = config.to_dict()
    tables["run"].pop("threads", None)
    defaults = Config().to_dict()
    for dotted in ADDED_KEYS:
        section, key = dotted.split(".")
        if tables[section][key] == defaults[section][key]:
            del tables[section][key]
    digests = {} if digests is None else digests
    for section, key in sorted(PATH_KEYS):
        path = tables[section][key]
        if path:
            if path not in digests:
                digests[path] = file_digest(path, f"{section}.{key}")
            tables[section][key] = f"sha256:{digests[path]}"
    return hashlib.sha256(tomli_w.dumps(tables).encode()).hexdigest()[:16]


def file_digest(path: str, key: str) -> str:
    """SHA-256 of a file's content (InputError naming ``key`` if it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise InputError(f'{key} = "{path}": cannot be read ({err.strerror})') from None
    return digest.hexdigest()


def _flatten(table: Mapping, where: str, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"depth": [2, 3]}}`` (unquoted dotted keys in TOML) -> ``{"model.depth": [2, 3]}``."""
    flat = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, where, dotted + "."))
        else:
            flat[dotted] = value
    for dotted in flat:
        section, _, key = dotted.partition(".")
        if not key or "." in key:
            raise InputError(f'[{where}] key "{dotted}": expected SECTION.KEY, e.g. "model.depth"')
        if section not in SECTIONS:
            raise InputError(f'[{where}] key "{dotted}": unknown config table [{section}]'
                             f"{suggest(section, SECTIONS)}")
        fields = Config().to_dict()[section]
        if key not in fields:
            raise InputError(f'[{where}] key "{dotted}": unknown config key{suggest(key, fields)}')
    return flat


def format_point(point: Mapping) -> str:
    """``model.depth=2, model.alpha=0.5``: the swept values of a task, for messages."""
    return ", ".join(f"{k}={v!r}" for k, v in point.items()) or "(no swept keys)"


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file and build every task's config (nothing runs here).

    Raises
    ------
    InputError
        One line naming the file and what is wrong: unknown top-level keys, a key in two
        sections, empty or non-list values, zip lists of unequal length, any value that fails
        the run-config validation for any task, and a data file that cannot be read.
    """
    path = Path(path)
    tables = read_toml(path)
    where = f"sweep file {path}"
    unknown = [k for k in tables if k not in SWEEP_KEYS]
    if unknown:
        key = unknown[0]
        hint = (f'; put fixed values in [set], e.g. "{key}.KEY" = VALUE' if key in SECTIONS
                else suggest(key, SWEEP_KEYS))
        raise InputError(f"{where}: unknown top-level key {key!r}{hint} "
                         f"(expected base, [set], [grid], [zip])")
    sweep_dir = path.resolve().parent
    base = tables.get("base", "")
    if not isinstance(base, str):
        raise InputError(f"{where}: base = {base!r}: expected a path to a run config (string)")
    for name in ("set", "grid", "zip"):
        if name in tables and not isinstance(tables[name], Mapping):
            raise InputError(f"{where}: {name} must be a table [{name}], got {type(tables[name]).__name__}")
    try:
        fixed = _flatten(tables.get("set", {}), "set")
        grid = _flatten(tables.get("grid", {}), "grid")
        zipped = _flatten(tables.get("zip", {}), "zip")
    except InputError as err:
        raise InputError(f"{where}: {err}") from None
    seen: dict[str, str] = {}
    for name, table in (("set", fixed), ("grid", grid), ("zip", zipped)):
        for key in table:
            if key in seen:
                raise InputError(f"{where}: {key} is in both [{seen[key]}] and [{name}]; give it in one")
            seen[key] = name
    for name, table in (("grid", grid), ("zip", zipped)):
        if "run.threads" in table:
            raise InputError(f"{where}: [{name}] run.threads cannot be swept: the sweep gives every task "
                             f"cores // workers threads (choose the number of workers instead)")
        for key, values in table.items():
            if not isinstance(values, list):
                raise InputError(f"{where}: [{name}] {key} = {values!r}: expected a list of values")
            if not values:
                raise InputError(f"{where}: [{name}] {key} is an empty list: expected at least one value")
    lengths = {key: len(values) for key, values in zipped.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k} has {n}" for k, n in lengths.items())
        raise InputError(f"{where}: [zip] lists must have equal lengths, but {listed}")

    if base:
        base_path = Path(base) if Path(base).is_absolute() else sweep_dir / base
        try:
            base_config = Config.from_toml(base_path)
        except InputError as err:
            raise InputError(f"{where}: base = {base!r}: {err}") from None
    else:
        base_config = Config()

    points = []
    grid_values = itertools.product(*grid.values()) if grid else [()]
    zip_length = next(iter(lengths.values())) if lengths else 1
    for values in grid_values:
        for i in range(zip_length):
            point = dict(zip(grid, values))
            point.update({key: vals[i] for key, vals in zipped.items()})
            points.append(point)
    tasks = []
    by_id: dict[str, dict] = {}
    digests: dict[str, str] = {}
    for point in points:
        try:
            config = base_config.with_overrides({**fixed, **point}, base_dir=sweep_dir)
            tid = task_id(config, digests)
        except InputError as err:
            raise InputError(f"{where}: task {format_point(point)}: {err}") from None
        if tid in by_id:
            raise InputError(f"{where}: tasks {format_point(by_id[tid])} and {format_point(point)} "
                             f"are the same run (a repeated value?)")
        by_id[tid] = point
        tasks.append(Task(tid, point, config))
    return Sweep(path, path.read_text(encoding="utf-8"), fixed, grid, zipped, tasks)
