"""Shared fixtures: tiny configs and in-memory runs. The references themselves (scipy, numpy
loops, closed forms) live in ``references.py`` and in each test module, never here."""

from __future__ import annotations

import numpy as np
import pytest

from references import small_config_tables


@pytest.fixture
def make_config():
    """``make_config({"model.depth": 2, ...}, base_dir=None)`` -> a validated tiny Config."""
    from ddln_fast import Config

    def build(overrides: dict | None = None, base_dir=None) -> "Config":
        return Config.from_dict(small_config_tables(overrides), base_dir)

    return build


@pytest.fixture
def write_npz(tmp_path):
    """``write_npz("name.npz", X=..., y=...)`` -> the path of a new .npz file in tmp_path."""

    def write(name: str, **arrays) -> str:
        path = tmp_path / name
        np.savez(path, **arrays)
        return str(path)

    return write
