"""Staleness per notebook (``tools/deps.py``, ``tools/execute_notebooks.py``): a notebook's stored
outputs depend on its code and on the package modules it imports, transitively, and on nothing else."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import deps  # noqa: E402
import execute_notebooks  # noqa: E402

MODULES = {
    "mrec_utils/__init__.py": '"""The package."""\n',
    "mrec_utils/data.py": "import os\n",
    "mrec_utils/meta.py": "from . import train\nfrom .metrics import auc\n",
    "mrec_utils/metrics.py": "def auc():\n    from mrec_utils.train import seed  # a lazy import counts too\n",
    "mrec_utils/train.py": "def seed():\n    pass\n",
    "mrec_utils/lm.py": "from .train import seed\n\ndef embed_texts():\n    pass\n",
    "mrec_utils/sub/__init__.py": "from ..data import os\n",
    "mrec_utils/sub/deep.py": "from .. import lm\n",
    "mrec_bench/__init__.py": "from mrec_utils import meta\n",
    "mrec_bench/results/table.csv": "a,b\n1,2\n",
}


@pytest.fixture
def root(tmp_path):
    for rel, text in MODULES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def _nb(*sources: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Title")] + [nbformat.v4.new_code_cell(s) for s in sources]
    return nb


def _files(nb, root) -> list[str]:
    return sorted(deps.package_files(nb, root))


@pytest.mark.parametrize("code, expected", [
    ("from mrec_utils import data", ["mrec_utils/__init__.py", "mrec_utils/data.py"]),
    ("import mrec_utils.data as d", ["mrec_utils/__init__.py", "mrec_utils/data.py"]),
    ("from mrec_utils.metrics import auc", ["mrec_utils/__init__.py", "mrec_utils/metrics.py", "mrec_utils/train.py"]),
    ("from mrec_utils import meta", ["mrec_utils/__init__.py", "mrec_utils/meta.py", "mrec_utils/metrics.py",
                                     "mrec_utils/train.py"]),
    ("from mrec_utils.sub import deep", ["mrec_utils/__init__.py", "mrec_utils/data.py", "mrec_utils/lm.py",
                                         "mrec_utils/sub/__init__.py", "mrec_utils/sub/deep.py", "mrec_utils/train.py"]),
    ("import mrec_bench", ["mrec_bench/__init__.py", "mrec_bench/results/table.csv", "mrec_utils/__init__.py",
                           "mrec_utils/meta.py", "mrec_utils/metrics.py", "mrec_utils/train.py"]),
    ("import numpy as np\n%matplotlib inline\nif True:\n    !echo hi", []),
])
def test_dependencies_follow_imports_transitively(root, code, expected):
    assert _files(_nb(code), root) == expected


def test_editing_a_module_makes_only_its_importers_stale(root):
    chapter1, bench = _nb("from mrec_utils import data"), _nb("import mrec_bench")
    before1, before_bench = deps.package_files(chapter1, root), deps.package_files(bench, root)
    (root / "mrec_bench" / "__init__.py").write_text("from mrec_utils import meta\nX = 1\n")
    (root / "mrec_utils" / "train.py").write_text("def seed():\n    return 1\n")
    assert deps.package_files(chapter1, root) == before1
    after = deps.package_files(bench, root)
    assert {f for f in after if after[f] != before_bench[f]} == {"mrec_bench/__init__.py", "mrec_utils/train.py"}


def test_code_hash_sees_code_not_prose():
    nb = _nb("x = 1")
    before = deps.code_hash(nb)
    nb.cells[0].source = "# Another title"
    assert deps.code_hash(nb) == before
    nb.cells[1].source = "x = 2"
    assert deps.code_hash(nb) != before


def test_language_model_use_is_detected(root):
    assert deps.uses_language_model(_nb("from mrec_utils import lm"), root)
    assert deps.uses_language_model(_nb("from mrec_utils.sub import deep"), root)  # through another module
    assert deps.uses_language_model(_nb("from mrec_utils import data\nv = something.embed_texts(['a'])"), root)
    assert not deps.uses_language_model(_nb("from mrec_utils import meta, data"), root)


def test_a_syntax_error_names_the_cell(root):
    with pytest.raises(ValueError, match="code cell 2 is not valid Python"):
        deps.notebook_code(_nb("x = 1", "def f(:"))


def test_stamp_only_records_hashes_without_running(root, monkeypatch, capsys):
    nb = _nb("from mrec_utils import data")
    nb.metadata["mrec"] = {"code_hash": "old", "package_hash": "old", "seconds": 12.5}
    path = root / "nb.ipynb"
    nbformat.write(nb, path)
    monkeypatch.setattr(execute_notebooks.bc, "ROOT", root)
    assert execute_notebooks.main(["--stamp-only", str(path)]) == 0
    meta = nbformat.read(path, as_version=4).metadata["mrec"]
    assert meta["code_hash"] == deps.code_hash(nb) and meta["seconds"] == 12.5 and "package_hash" not in meta
    assert set(meta["package_files"]) == {"mrec_utils/__init__.py", "mrec_utils/data.py"}
    assert "WITHOUT executing" in capsys.readouterr().out
    assert execute_notebooks.main(["--stamp-only", str(path)]) == 0
    assert "already current" in capsys.readouterr().out


def test_command_line_needs_notebooks():
    with pytest.raises(SystemExit):
        execute_notebooks.main(["--stamp-only"])
    with pytest.raises(SystemExit):
        execute_notebooks.main(["no_such_notebook.ipynb"])
