"""Every reference to a Markdown file in the repository points at a file that exists.

All text files of the working tree are scanned (code, tests, docs, configs, the Makefile, README
and CHANGELOG; tracked or not), except virtual environments, git's own files, training runs,
caches and build outputs, and the benchmark CSVs. A reference is any path-like word ending in
``.md`` (``README.md``, ``docs/architecture.md``, ``../README.md``); it is resolved against the
referring file's folder and against the repository root, and one of the two must exist. Links
starting with ``http://`` or ``https://`` are not checked.

The project's design contract is ``docs/architecture.md``; the notes it was first written from
live outside the repository, and the name of that outside file must not appear anywhere in it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MD = ".md"
# the outside design notes, spelt so that this file does not mention them itself
FORBIDDEN = "DESIGN" + MD

SKIP_DIRS = {".venv", "venv", ".git", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache",
             ".hypothesis", ".ipynb_checkpoints", "node_modules", "build", "dist"}
MAX_BYTES = 4 << 20

URL = re.compile(r"https?://\S+")
# a path-like word ending in .md: letters, digits, _ . / - before it, no word character after it
MD_REF = re.compile(r"(?<![\w./-])([\w./-]*\w" + re.escape(MD) + r")(?![\w-])")


def _skipped_dir(rel: Path) -> bool:
    return rel.name in SKIP_DIRS or rel.name.endswith(".egg-info")


def _skipped_file(rel: Path) -> bool:
    return rel.parts[0] == "benchmarks" and rel.suffix == ".csv"


def text_files(root: Path) -> dict[Path, str]:
    """Repository-relative path -> text, for every scanned text file under ``root``."""
    files = {}
    for folder, dirs, names in os.walk(root):
        here = Path(folder).relative_to(root)
        dirs[:] = sorted(d for d in dirs if not _skipped_dir(here / d))
        for name in sorted(names):
            rel = here / name
            path = root / rel
            if _skipped_file(rel) or not path.is_file() or path.stat().st_size > MAX_BYTES:
                continue
            data = path.read_bytes()
            if b"\0" in data:
                continue  # binary (images, compiled files)
            try:
                files[rel] = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
    return files


def md_references(text: str) -> list[tuple[int, str]]:
    """``(line number, reference)`` for every Markdown-file reference outside URLs."""
    refs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for match in MD_REF.finditer(URL.sub(" ", line)):
            refs.append((lineno, match.group(1)))
    return refs


def _resolves(root: Path, referrer: Path, ref: str) -> bool:
    relative = root / referrer.parent / ref
    from_root = root / ref.lstrip("/")
    return relative.is_file() or from_root.is_file()


def broken_references(root: Path) -> list[str]:
    """``"file:line: reference"`` for each reference to a Markdown file that does not exist."""
    broken = []
    for rel, text in text_files(root).items():
        for lineno, ref in md_references(text):
            if not _resolves(root, rel, ref):
                broken.append(f"{rel.as_posix()}:{lineno}: {ref}")
    return broken


def forbidden_mentions(root: Path) -> list[str]:
    """``"file:line: text"`` for each line that names the outside design notes."""
    needle = FORBIDDEN.lower()
    hits = []
    for rel, text in text_files(root).items():
        if needle in rel.name.lower():
            hits.append(f"{rel.as_posix()}: (file name)")
        for lineno, line in enumerate(text.splitlines(), 1):
            if needle in line.lower():
                hits.append(f"{rel.as_posix()}:{lineno}: {line.strip()[:120]}")
    return hits


# --- the helpers on a synthetic repository ---------------------------------------------------


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_helpers_on_a_synthetic_repository(tmp_path):
    good, gone = f"docs/guide{MD}", f"docs/gone{MD}"
    _write(tmp_path, f"README{MD}", f"See [the guide]({good}) and {gone}, and https://example.org/x/remote{MD}.\n")
    _write(tmp_path, good, f"Back to [README](../README{MD}#top); also `./guide{MD}`.\n")
    _write(tmp_path, "pkg/mod.py", f'"""Rules in docs/guide{MD}, notes in NOTES{MD}."""\nx = "{FORBIDDEN}"\n')
    _write(tmp_path, "Makefile", f"docs:\n\tcat README{MD} docs/guide{MD}x other.mdx\n")
    _write(tmp_path, f".venv/lib/site{MD}.py", f"missing{MD}\n")  # skipped folders
    _write(tmp_path, "runs/r1/log.txt", f"missing{MD}\n")
    _write(tmp_path, "thing.egg-info/SOURCES.txt", f"missing{MD}\n")
    _write(tmp_path, "benchmarks/table.csv", f"missing{MD}\n")  # skipped CSV
    (tmp_path / "benchmarks" / "plot.png").write_bytes(b"\x89PNG\0" + f"missing{MD}".encode())  # binary

    assert broken_references(tmp_path) == [
        f"README{MD}:1: {gone}", f"pkg/mod.py:1: NOTES{MD}", f"pkg/mod.py:2: {FORBIDDEN}"]
    assert forbidden_mentions(tmp_path) == [f'pkg/mod.py:2: x = "{FORBIDDEN}"']

    _write(tmp_path, gone, "now it exists\n")
    _write(tmp_path, f"pkg/NOTES{MD}", "next to mod.py\n")  # resolved against the referrer's folder
    assert broken_references(tmp_path) == [f"pkg/mod.py:2: {FORBIDDEN}"]


def test_reference_pattern():
    line = f"a/b{MD}, (c{MD}) `../d-e{MD}` f{MD}'s g.mdx h.{MD[1:]}s x{MD}#anchor http://u/v{MD}"
    assert [ref for _, ref in md_references(line)] == [f"a/b{MD}", f"c{MD}", f"../d-e{MD}", f"f{MD}", f"x{MD}"]


# --- the repository --------------------------------------------------------------------------


def test_markdown_references_exist():
    broken = broken_references(ROOT)
    assert not broken, "references to Markdown files that do not exist:\n  " + "\n  ".join(broken)


def test_outside_design_notes_are_not_mentioned():
    hits = forbidden_mentions(ROOT)
    assert not hits, (
        "the design notes outside the repository must not be named; cite docs/architecture.md "
        "instead:\n  " + "\n  ".join(hits)
    )


def test_architecture_doc_has_its_sections():
    text = (ROOT / "docs/architecture.md").read_text(encoding="utf-8")
    headings = re.findall(r"^(#{2,3} .+?)\s*$", text, flags=re.M)
    for heading in ("## Layers and layout", "### Layout", "## Backend dispatch", "## The math",
                    "## Tests and benchmarks"):
        assert heading in headings, f"docs/architecture{MD} lacks the heading {heading!r}"
