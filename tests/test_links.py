"""One repository address: every link, badge, launch button and install line follows ``_config.yml``.

``repository.url`` names the repository and ``html.baseurl`` the online book, once each. Every
address of this repository in the notebooks, the prose, the README, ``CITATION.cff`` and the build
files must be derived from them (a fork edits ``_config.yml`` and runs ``tools/setup_cells.py
--write`` and ``tools/readme_table.py --write``).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import book_config as bc  # noqa: E402
import readme_table  # noqa: E402

TOP_LEVEL = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}
ADDRESS = re.compile(
    r"git\+https?://[^\s\"'@]+"
    r"|colab\.research\.google\.com/github/[^/\s]+/[^/\s]+"
    r"|mybinder\.org/v2/gh/[^/\s]+/[^/\s]+"
    r"|raw\.githubusercontent\.com/[^/\s]+/[^/\s]+/[^/\s]+/[^/\s\"')]+"
    r"|github\.com/[^/\s]+/[^/\s]+/(?:blob|tree|raw)/[^/\s]+/[^/\s\"')]+"
)


def wrong_addresses(text: str, slug: str, top_level: set[str] = TOP_LEVEL) -> list[str]:
    """Addresses of this repository in ``text`` that name another repository than ``slug``.

    An address counts as this repository's when it installs from git, opens a notebook in Colab
    or Binder, or points at a file whose first folder is one of this repository's.
    """
    wrong = []
    for match in ADDRESS.finditer(text):
        address = match.group(0)
        if address.startswith("git+"):
            named = address.split("://", 1)[1].removeprefix("github.com/")
        elif address.startswith(("colab.", "mybinder.")):
            named = "/".join(address.split("/")[-2:])
        else:
            parts = address.split("/")
            named, first_folder = "/".join(parts[1:3]), parts[-1]
            if first_folder not in top_level:
                continue  # another project's file
        if named.removesuffix(".git") != slug:
            wrong.append(address)
    return wrong


def _texts():
    for path in bc.book_notebooks():
        nb = nbformat.read(path, as_version=4)
        yield path, "\n".join(c.source for c in nb.cells)
    for pattern in ("book/*.md", "*.md", "*.yml", "*.cff", "Makefile", "postBuild", ".github/workflows/*.yml",
                    "pyproject.toml", "mrec_*/*.py", "benchmarks/*.sh"):
        for path in sorted(ROOT.glob(pattern)):
            yield path, path.read_text(encoding="utf-8")


def test_the_address_check_can_fail():
    slug = "someone/somebook"
    text = ('%pip install "mrec_utils @ git+https://github.com/other/repo@v1" '
            "https://colab.research.google.com/github/other/repo/blob/colab/x.ipynb "
            "https://raw.githubusercontent.com/other/repo/main/notebooks/01.ipynb "
            "https://github.com/pytorch/pytorch/blob/main/functorch/examples/maml.py")
    assert wrong_addresses(text, slug, {"notebooks"}) == [
        "git+https://github.com/other/repo", "colab.research.google.com/github/other/repo",
        "raw.githubusercontent.com/other/repo/main/notebooks"]
    assert wrong_addresses(text.replace("other/repo", slug), slug, {"notebooks"}) == []


def test_every_address_of_this_repository_follows_the_config():
    slug = bc.repo_slug()
    problems = [f"{path.relative_to(ROOT)}: {a}" for path, text in _texts() for a in wrong_addresses(text, slug)]
    assert not problems, f"addresses that do not follow repository.url ({bc.repo_url()}):\n" + "\n".join(problems)


def test_citation_file_follows_the_config_and_the_version():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation["repository-code"] == bc.repo_url()
    assert citation["url"] == bc.book_url()
    assert str(citation["version"]) == bc.version(), "CITATION.cff's version must be pyproject.toml's"
    assert set(citation["license"]) == {"MIT", "CC-BY-4.0"}


README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_links_the_online_book_the_pdf_and_chapter_one_in_colab():
    first = next(e for e in bc.toc_files() if e.startswith("notebooks/"))
    assert f"<{bc.book_url()}>" in README, "README: link the online book (html.baseurl)"
    assert f"<{bc.book_url()}book.pdf>" in README, "README: link the PDF beside the site"
    chapter1 = bc.colab_url(bc.source_file(first).relative_to(ROOT))
    assert f"[chapter 1]({chapter1})" in README, f"README: link chapter 1 in Colab: {chapter1}"


def test_readme_links_only_to_pages_that_exist():
    pages = {e + ".html" for e in bc.toc_files()} | {"book.pdf", ""}
    linked = re.findall(re.escape(bc.book_url()) + r"([^)\s>#]*)", README)
    assert linked and all(page in pages for page in linked), f"README links missing pages: {set(linked) - pages}"
    colab = re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", README)
    expected = {bc.colab_url(p.relative_to(ROOT), f) for p in bc.book_notebooks() for f in bc.FLAVOURS}
    assert colab and set(colab) <= expected, f"README: Colab links to no published copy: {set(colab) - expected}"


def test_readme_chapter_table_is_current():
    try:
        current = readme_table.updated(README)
    except readme_table.TableError as error:
        pytest.fail(str(error))
    assert current == README, "README.md: the chapter table is out of date; run python tools/readme_table.py --write"


def test_readme_speaks_to_any_reader():
    for phrase in ("our machines", "../shared", "/work/", "shared/data"):
        assert phrase not in README, f"README: {phrase!r} only makes sense on the authors' machines"
    for words in ("make book", "make test", "MREC_DATA_DIR", "MIT", "CC BY 4.0", "Not tested"):
        assert words in README, f"README must mention {words!r}"
