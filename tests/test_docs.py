"""The documents in docs/ cannot silently fall behind the code they describe.

References: the schema table itself (``ddln_fast/store/schema.py``: every dataset path of
``FIELDS`` and every name of ``ROOT_ATTRIBUTES`` must be described in docs/run-files.md), the
status codes of the controller, and the headings of the documents (every reference to
``docs/NAME.md, "Heading"`` anywhere in the repository must name a file and a heading that
exist).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ddln_fast.controller import STATUS_NAMES
from ddln_fast.store.schema import FIELDS, ROOT_ATTRIBUTES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUN_FILES = (DOCS / "run-files.md").read_text(encoding="utf-8")
#: ``docs/NAME.md`` optionally followed by ``, "Heading"`` (how the code and the tests cite the docs).
REFERENCE = re.compile(r'docs/([\w.-]+\.md)(?:,\s*"([^"]+)")?')


@pytest.mark.parametrize("path", [f.path for f in FIELDS])
def test_every_dataset_of_the_schema_is_documented(path):
    assert f"`/{path}`" in RUN_FILES, f"/{path} is in store/schema.py FIELDS but not in docs/run-files.md"


@pytest.mark.parametrize("name", sorted(ROOT_ATTRIBUTES))
def test_every_root_attribute_is_documented(name):
    assert f"`{name}`" in RUN_FILES, f"root attribute {name} is not in docs/run-files.md"


def test_status_codes_are_documented_with_their_numbers():
    for code, name in enumerate(STATUS_NAMES):
        assert re.search(rf"^\| {code} \| `{name}` \|", RUN_FILES, re.MULTILINE), (code, name)
