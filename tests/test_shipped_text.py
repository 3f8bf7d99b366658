"""What the project ships to readers points only at what it ships: every document a text of
the package, the README, the docs or the examples names is in the repository, and no path
leads out of it. Also: the licence and the citation file say what ``pyproject.toml`` says."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "dgm_eit"
TEXT_SUFFIXES = {".py", ".toml", ".md", ".cff", ".txt"}
# documents a command writes (named in the texts as outputs, not as things to read here)
WRITTEN_DOCUMENTS = {"report.md"}
DOCUMENT = re.compile(r"[\w./-]*\w\.(?:md|txt|rst|pdf|cff|ipynb)\b")
# a relative path that climbs (it must land on a file or folder of the repository) or a
# machine's absolute path (never portable)
CLIMBING = re.compile(r"(?<![\w.])(?:\.\./)+[^\s`'\")\]]*")
ABSOLUTE = re.compile(r"(?<![\w.])/(?:work|home|Users|mnt|srv|opt)/[^\s`'\")\]]*")


def shipped_texts() -> list[Path]:
    texts = [ROOT / "README.md", ROOT / "LICENSE", ROOT / "CITATION.cff", ROOT / "pyproject.toml"]
    texts += sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "examples").glob("*.py"))
    texts += sorted(p for p in PACKAGE.rglob("*") if p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts)
    return texts


def repository_files() -> set[str]:
    """Names of the files in the working tree (hidden folders such as .git and .venv left out)."""
    names = set()
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d != "__pycache__"]
        names.update(files)
    return names


def problems(path: Path, names: set[str], text: str | None = None) -> list[str]:
    """What ``text`` (default: the file's) names that the repository does not hold; relative
    paths are tried from the repository root, the file's folder and the package."""
    found = []
    text = path.read_text(encoding="utf-8") if text is None else text
    for number, line in enumerate(text.splitlines(), 1):
        for match in ABSOLUTE.finditer(line):
            found.append(f"{path.relative_to(ROOT)}:{number}: an absolute path ({match.group().rstrip('.,;:')!r})")
        for match in CLIMBING.finditer(line):
            climb = match.group().rstrip(".,;:")
            target = (path.parent / climb).resolve()
            if not (target.is_relative_to(ROOT) and target.exists()):
                found.append(f"{path.relative_to(ROOT)}:{number}: a path outside the repository ({climb!r})")
        for match in DOCUMENT.finditer(line):
            document = match.group()
            name = document.rsplit("/", 1)[-1]
            if name in WRITTEN_DOCUMENTS:
                continue
            here = [ROOT / document, path.parent / document, PACKAGE / document]   # package data: from the package
            if "/" in document and not any(p.is_file() for p in here):
                found.append(f"{path.relative_to(ROOT)}:{number}: names {document}, not in the repository")
            elif name not in names:
                found.append(f"{path.relative_to(ROOT)}:{number}: names {document}, not in the repository")
    return found


def test_shipped_texts_name_only_files_the_repository_holds():
    names = repository_files()
    texts = shipped_texts()
    assert len(texts) > 40 and ROOT / "src/dgm_eit/configs/quick.toml" in texts
    found = [p for path in texts for p in problems(path, names)]
    assert not found, "\n".join(found)


def test_the_check_catches_what_it_is_for():
    """The check itself: a document that is not there and a path leading out are caught; the
    repository's own documents and a command's output are not."""
    text = ("see REFERENCE.md section 2\nfiles in `../shared/ktc2023/`, /work/paper/x.txt\n"
            "see docs/DESIGN.md, README.md and ../README.md; writes DIR/report.md\n")
    found = problems(ROOT / "docs" / "probe.md", repository_files(), text)
    expected = ["names REFERENCE.md", "an absolute path ('/work/paper/x.txt')", "names /work/paper/x.txt",
                "outside the repository ('../shared/ktc2023/')"]
    assert len(found) == len(expected) and all(any(e in f for f in found) for e in expected), found


def test_licence_and_citation_match_the_project():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    cff = (ROOT / "CITATION.cff").read_text()
    assert f"version: {project['version']}" in cff and "license: MIT" in cff
    assert "doi: 10.1515/jiip-2023-0037" in cff
    from dgm_eit.paper import PAPER_CITATION

    assert "10.1515/jiip-2023-0037" in PAPER_CITATION
    readme = " ".join((ROOT / "README.md").read_text().replace("> ", "").split())
    assert PAPER_CITATION in readme


def test_ktc_data_terms_sit_beside_the_shipped_files_and_in_the_readme():
    beside = (PACKAGE / "ktc" / "public" / "README.md").read_text()
    assert "Terms of use" in beside and "8252370" in beside and "does not cover them" in beside
    assert "8252370" in (ROOT / "README.md").read_text()
