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
#: ``docs/NAME.md`` or ``README.md``, optionally followed by ``, "Heading"`` (how the code and the
#: tests cite the documents).
REFERENCE = re.compile(r'(docs/[\w.-]+\.md|README\.md)(?:,\s*"([^"]+)")?')


@pytest.mark.parametrize("path", [f.path for f in FIELDS])
def test_every_dataset_of_the_schema_is_documented(path):
    assert f"`/{path}`" in RUN_FILES, f"/{path} is in store/schema.py FIELDS but not in docs/run-files.md"


@pytest.mark.parametrize("name", sorted(ROOT_ATTRIBUTES))
def test_every_root_attribute_is_documented(name):
    assert f"`{name}`" in RUN_FILES, f"root attribute {name} is not in docs/run-files.md"


def test_status_codes_are_documented_with_their_numbers():
    for code, name in enumerate(STATUS_NAMES):
        assert re.search(rf"^\| {code} \| `{name}` \|", RUN_FILES, re.MULTILINE), (code, name)


def headings(doc: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in doc.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


def repository_texts():
    for pattern in ("ddln_fast/**/*.py", "tests/*.py", "bench/*.py", "examples/*.py",
                    "data/**/*.toml", "docs/*.md", "README.md", "Makefile"):
        for path in ROOT.glob(pattern):
            if path != Path(__file__).resolve():  # this file names the pattern, not a document
                yield path, path.read_text(encoding="utf-8")


def flattened(path: Path, text: str) -> str:
    """The text with line breaks of comments and docstrings removed, and in Python the
    concatenation of string literals undone (a reference may be wrapped over two lines)."""
    flat = re.sub(r"\s*\n\s*(#\s*)?", " ", text)
    if path.suffix == ".py":
        flat = re.sub(r'"\s+f?"', "", flat.replace('\\"', '"'))
    return flat


def test_every_reference_to_the_documents_names_an_existing_file_and_heading():
    found = 0
    for path, text in repository_texts():
        for name, heading in REFERENCE.findall(flattened(path, text)):
            found += 1
            doc = DOCS / name.removeprefix("docs/") if name.startswith("docs/") else ROOT / name
            where = path.relative_to(ROOT)
            assert doc.is_file(), f"{where} cites {name}, which does not exist"
            if heading:
                assert heading in headings(doc), f'{where} cites {name}, "{heading}": no such heading'
    assert found > 10  # the references exist, so this test checks something


def test_the_index_lists_every_document():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for doc in DOCS.glob("*.md"):
        if doc.name != "README.md":
            assert f"({doc.name})" in index, f"docs/README.md does not list {doc.name}"


def python_blocks(doc: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", doc.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)


def test_the_python_examples_of_run_files_run(tmp_path):
    """Each python block of docs/run-files.md runs on a real run file (``run.h5``; ``live.h5``
    is a copy: a finished file opens the same way)."""
    import shutil
    import subprocess
    import sys

    from ddln_fast import Config, simulate

    simulate(Config.from_toml(ROOT / "data" / "live.toml", overrides={"run.threads": 1}),
             out=str(tmp_path / "run.h5")).close()
    shutil.copy(tmp_path / "run.h5", tmp_path / "live.h5")
    blocks = python_blocks(DOCS / "run-files.md")
    assert len(blocks) >= 3
    for code in blocks:
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        assert result.returncode == 0, f"{code}\n{result.stdout}"


def test_every_image_the_documents_show_is_in_the_repository():
    """Each ![...](path) of README.md and docs/*.md names a file of the repository (on a fresh
    clone an ignored or uncommitted picture is missing; a wrong path was the same)."""
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    shown = [(doc, target) for doc in documents
             for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8"))]
    assert shown, "no image found: the pattern is wrong"
    missing = [f"{doc.name}: {target}" for doc, target in shown if not (doc.parent / target).is_file()]
    assert not missing, missing
