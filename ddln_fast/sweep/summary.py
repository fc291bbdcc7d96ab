"""The summary table of a sweep: ``OUTDIR/summary.csv`` and ``OUTDIR/summary.h5``.

One row per task: ``task`` (its id), the swept keys, ``status`` (complete, failed, interrupted,
not run), the :data:`~ddln_fast.sweep.metrics.METRICS`, ``seed_status`` and ``message``.

``summary.csv`` is the export for other tools: numbers are written exactly (``repr``), NaN and
infinities as ``nan``/``inf``, booleans as ``true``/``false``; ``pandas.read_csv`` reads it as
it is, and :func:`summary_frame` does so with the booleans typed. ``summary.h5`` holds the same
table as one compound dataset ``/summary`` for h5py (pandas' ``read_hdf`` would need PyTables
and its own layout; no Parquet, which would add pyarrow for a table of one row per task).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from .metrics import METRICS


def summary_columns(swept_keys) -> list[str]:
    return ["task", *swept_keys, "status", *METRICS, "seed_status", "message"]


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                         ("inf" if value > 0 else "-inf"))
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def write_summary(outdir: str | Path, rows: list[dict], swept_keys: list[str]) -> None:
    """``summary.csv`` and ``summary.h5`` (a compound dataset ``/summary``, same columns), each
    written to a temporary name and renamed, so a reader never sees half a table."""
    import h5py

    outdir = Path(outdir)
    columns = summary_columns(swept_keys)
    tmp = outdir / "summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row.get(c)) for c in columns])
    os.replace(tmp, outdir / "summary.csv")

    dtypes = []
    for c in columns:
        values = [row.get(c) for row in rows]
        present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if c in METRICS and c != "nfev":
            dtypes.append((c, "f8"))
        elif present and all(isinstance(v, bool) for v in present):
            dtypes.append((c, "?"))
        elif c == "nfev" or (present and all(isinstance(v, int) and not isinstance(v, bool) for v in present)):
            dtypes.append((c, "i8"))
        elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            dtypes.append((c, "f8"))
        else:
            dtypes.append((c, h5py.string_dtype()))
    table = np.zeros(len(rows), dtype=np.dtype(dtypes))
    for i, row in enumerate(rows):
        for c, kind in dtypes:
            value = row.get(c)
            if kind == "f8":
                table[c][i] = math.nan if value is None else float(value)
            elif kind == "i8":
                table[c][i] = -1 if value is None else int(value)
            elif kind == "?":
                table[c][i] = bool(value)
            else:
                table[c][i] = _csv_value(value)
    tmp = outdir / "summary.h5.tmp"
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset("summary", data=table)
        ds.attrs["swept_keys"] = json.dumps(list(swept_keys))
        ds.attrs["columns"] = json.dumps(columns)
        ds.attrs["note"] = ("one row per task; medians over seeds except final_loss_max, t_final "
                            "(max) and nfev (sum); -1 in nfev and NaN in metrics: no value")
    os.replace(tmp, outdir / "summary.h5")


def _parse_cell(text: str):
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def summary_path(outdir: str | Path) -> Path:
    """``OUTDIR/summary.csv``; InputError if OUTDIR or the file is not there."""
    path = Path(outdir) / "summary.csv"
    if not Path(outdir).is_dir():
        raise InputError(f"sweep output {outdir} does not exist or is not a directory")
    if not path.exists():
        raise InputError(f"{path} does not exist: run ddln sweep SWEEP.toml -o {outdir} first")
    return path


def read_summary(outdir: str | Path) -> tuple[list[str], list[dict]]:
    """(swept keys, rows) of ``OUTDIR/summary.csv``; numbers parsed back."""
    path = summary_path(outdir)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(f"{path} is empty") from None
        if "task" not in header or "status" not in header:
            raise InputError(f"{path} is not a ddln sweep summary (no task/status columns)")
        swept = header[header.index("task") + 1:header.index("status")]
        rows = [{c: _parse_cell(v) for c, v in zip(header, line)} for line in reader]
    return swept, rows


def summary_frame(outdir: str | Path):
    """``OUTDIR/summary.csv`` as a pandas DataFrame (needs pandas): one row per task, the
    metrics as floats (NaN where there is none), nfev as integers, booleans typed."""
    try:
        import pandas
    except ImportError:
        raise InputError("summary_frame needs pandas: pip install pandas") from None
    return pandas.read_csv(summary_path(outdir), true_values=["true"], false_values=["false"],
                           keep_default_na=False, na_values={m: ["nan", ""] for m in METRICS},
                           dtype={"task": str, "status": str, "seed_status": str, "message": str})
