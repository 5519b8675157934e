"""The repository's docs stand on their own: every link and every `docs/...` citation resolves.

Code comments and the README cite pages under docs/ (with #anchors); a renamed page or heading
would leave them pointing nowhere. Nothing may cite files that a clone does not have.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_CITATION = re.compile(r"\bdocs/([\w.-]+\.md)(#[\w-]+)?")
_OUTSIDE = re.compile(r"\.\./shared/|\bDESIGN\.md\b|\bPROTOCOL\.md\b")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces become hyphens."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            out.add(title.replace(" ", "-"))
    return out


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    keep = (".py", ".md", ".toml", ".yaml", ".yml", ".txt", ".pbtxt", ".proto", ".cfg")
    names = {"Makefile", "Dockerfile", ".dockerignore", "run"}
    files = []
    for name in listed:
        path = ROOT / name
        if "_proto/" in name or not path.is_file():
            continue
        if path.suffix in keep or path.name in names:
            files.append(path)
    return files


def test_anchor_rule() -> None:
    page = DOCS / "protocol.md"
    assert "repository-rpcs" in anchors(page)
    assert "messages-keepalive-compression" in anchors(page)


def test_markdown_links_resolve() -> None:
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    checked = 0
    for page in pages:
        for target in _LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            assert dest.exists(), f"{page.relative_to(ROOT)} links to missing {target}"
            if anchor and dest.suffix == ".md":
                assert anchor in anchors(dest), f"{page.relative_to(ROOT)}: no #{anchor} in {dest}"
            checked += 1
    assert checked >= 10


def test_docs_citations_resolve() -> None:
    checked = 0
    for path in tracked_text_files():
        for page, anchor in _CITATION.findall(path.read_text(errors="replace")):
            dest = DOCS / page
            where = path.relative_to(ROOT)
            assert dest.is_file(), f"{where} cites docs/{page}, which does not exist"
            if anchor:
                assert anchor[1:] in anchors(dest), (
                    f"{where} cites docs/{page}{anchor}: no such heading"
                )
            checked += 1
    assert checked >= 20


def test_nothing_cites_files_outside_the_repository() -> None:
    offenders = []
    for path in tracked_text_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_every_docs_page_is_in_the_index() -> None:
    index = (DOCS / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        if page.name != "README.md":
            assert f"({page.name})" in index, f"docs/README.md does not list {page.name}"
