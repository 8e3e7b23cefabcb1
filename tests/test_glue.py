"""Every result number in the book's prose is computed (issue 14, item 6).

**The rule.** In a chapter's markdown (the markdown cells of ``notebooks/*.ipynb`` and
``book/*.ipynb``, and ``book/*.md``) a decimal number (``0.755``, ``3.82``, ``.5``) or a percentage
(``37%``, ``12.5%``) is a *result* and must come from the code through a myst-nb glue reference,
``{glue:text}`ch02_mae_k20:.3f``` (stored by ``mrec_utils.prose.glue`` or ``myst_nb.glue`` in a
code cell of the same notebook), never typed. Not counted:

- numbers inside math (``$...$``, ``$$...$$``, ``\\begin{...}...\\end{...}``): derivations;
- numbers inside code (inline code spans and fenced code blocks): settings written as code, e.g.
  ``inner_lr=0.1``, which is how a chapter should state a setting it chose;
- numbers on a line that carries a citation (``{cite}``, ``{cite:p}``, ``{cite:t}``...): figures
  quoted from a paper, with the paper on the same line;
- version numbers with two dots (``1.0.4``), and the short ``ALLOWED`` list below: design constants
  that are definitions or settings, each with its reason.

Percentages follow the same principle: a design constant (the 95% level of every interval, the 20%
test and 10% validation shares of a split) is a setting; a measured share ("99.9% of the films have
a year") is a result and is glued (``{glue:text}`name:.1%```).

Integers (counts such as "73 test users") are not checked by this test; glue them too where the
sentence states them as a result.

Two more checks: every glue name a notebook's markdown references is stored in a code cell output
of that notebook (myst-nb's ``scrapbook`` output metadata), with a value that its format spec can
format; and ``mrec_utils.prose.glue`` stores exactly what ``myst_nb.glue`` stores.

``TODO`` would list typed numbers waiting to be glued or rewritten as code; it is empty, and an entry
that is no longer found fails, so it cannot grow stale.
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import colab  # noqa: E402

# A design constant, not a result: a pattern that must cover the number on its line, and why.
ALLOWED = [
    (r"\b0\.5 to 5 stars|\[0\.5, 5\]", "the rating scale of MovieLens: half a star to five stars"),
    (r"\bAUC\b[^.;]{0,40}?\b0\.5\b|\bclears 0\.5\b",
     "AUC 0.5 is the chance level (a random order), a definition, not a measurement"),
    (r"\b95% (?:bootstrap |percentile )*(?:interval|bootstrap)",
     "the confidence level of every interval in the book: a setting"),
    (r"\b20% of the(?: users|$)|\((?:20|10)%\)|\b10% in a validation|\b10% for validation",
     "the test (20%) and validation (10%) shares of a split (tasks.make_split): settings"),
    (r"\b(?:Python|PyTorch(?: older than)?|version) \d+\.\d+\b", "a software version"),
]

# Typed numbers in chapters this change could not edit (the lead edits them): (file, the text on
# the line around the number, what to do). Empty it; a stale entry fails.
TODO: list[tuple[str, str, str]] = []  # (path, text on the line, why): empty, keep it so

NUMBER = re.compile(r"(?<![\w.])(?:\d+(?:\.\d+)?\s?%|\d*\.\d+(?:\.\d+)*)(?![\w])")
CITE = re.compile(r"\{cite(?::\w+)?\}`")
GLUE_ROLE = re.compile(r"\{glue(?::(?:text|any|md))?\}`(?P<content>[^`]*)`")
GLUE_DIRECTIVE = re.compile(r"^\s*(?:`{3,}|:{3,})\{glue(?::\w+)?\}\s*(?P<content>\S+)", re.M)
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
CODE_INFO = re.compile(r"^\s*(?:\{(?:code-cell|code-block|code|sourcecode|literalinclude)\}.*|[\w+.-]*)\s*$")


def _blank(match: re.Match) -> str:
    """The matched text with everything but its line breaks blanked (line numbers stay)."""
    return re.sub(r"[^\n]", " ", match.group(0))


def prose(text: str) -> str:
    """The markdown with code, math, glue references and comments blanked, line by line."""
    lines, out, fence = text.split("\n"), [], None
    for line in lines:  # fenced code blocks (a directive's fence, e.g. ```{note}, holds prose)
        m = FENCE.match(line)
        if fence is None and m and CODE_INFO.match(m.group("info")):
            fence = m.group("fence")
            out.append("")
        elif fence is not None:
            if m and m.group("fence").startswith(fence) and not m.group("info").strip():
                fence = None
            out.append("")
        else:
            out.append(line)
    text = "\n".join(out)
    text = re.sub(r"<!--.*?-->", _blank, text, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$", _blank, text, flags=re.S)
    text = re.sub(r"\\begin\{(\w+\*?)\}.*?\\end\{\1\}", _blank, text, flags=re.S)
    text = re.sub(r"(?<!\\)\$[^$\n]+?(?<!\\)\$", _blank, text)
    # inline code spans and roles (they may wrap onto the next line, not across a blank line)
    text = re.sub(r"(?P<ticks>`+)(?:(?!\n\s*\n).)+?(?P=ticks)", _blank, text, flags=re.S)
    text = re.sub(r"\]\([^)]*\)", _blank, text)  # link targets
    return text


def _allowed(line: str, start: int, end: int) -> bool:
    return any(m.start() <= start and end <= m.end() for pattern, _ in ALLOWED for m in re.finditer(pattern, line))


def typed_numbers(text: str) -> list[tuple[int, str, str]]:
    """(line number, number, line) of every typed result number in one markdown text."""
    found = []
    for number, (line, original) in enumerate(zip(prose(text).split("\n"), text.split("\n")), start=1):
        if CITE.search(original):
            continue
        for m in NUMBER.finditer(line):
            token = m.group(0)
            if token.count(".") > 1 or _allowed(line, m.start(), m.end()):
                continue
            found.append((number, token, original.strip()))
    return found


def markdown_sources() -> list[tuple[str, int | None, str]]:
    """(file, markdown cell index or None for a .md page, text) of the book's prose."""
    sources = []
    for path in sorted(ROOT.glob("notebooks/*.ipynb")) + sorted(ROOT.glob("book/*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        for index, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "markdown":
                sources.append((path.relative_to(ROOT).as_posix(), index, "".join(cell["source"])))
    for path in sorted(ROOT.glob("book/*.md")):
        sources.append((path.relative_to(ROOT).as_posix(), None, path.read_text(encoding="utf-8")))
    return sources


SOURCES = markdown_sources()
FILES = sorted({rel for rel, _, _ in SOURCES})


def _todo(rel: str, token: str, line: str) -> tuple | None:
    return next((entry for entry in TODO if entry[0] == rel and entry[1] in line and token in entry[1]), None)


@pytest.mark.parametrize("rel", FILES)
def test_no_typed_result_numbers(rel):
    typed, todo_seen = [], set()
    for _, index, text in (s for s in SOURCES if s[0] == rel):
        for line_no, token, line in typed_numbers(text):
            entry = _todo(rel, token, line)
            if entry:
                todo_seen.add(entry)
                continue
            where = f"cell {index}, line {line_no}" if index is not None else f"line {line_no}"
            typed.append(f"{where}: {token!r} in: {line}")
    assert not typed, (f"{rel}: typed numbers in the prose; glue them from the code that computes them "
                       "({glue:text}`name:.3f`), write a setting as code, or cite the paper on the same line:\n"
                       + "\n".join(typed))
    stale = [entry for entry in TODO if entry[0] == rel and entry not in todo_seen]
    assert not stale, f"{rel}: TODO entries no longer found, remove them from tests/test_glue.py: {stale}"


# ----------------------------------------------------------------------------- glue references
def glue_values(nb: dict) -> dict[str, str]:
    """name -> stored text/plain of every glued value in a notebook (read by the Colab export's reader,
    which strips the ``mime_prefix`` as myst-nb does)."""
    values = {}
    for name, data in colab._glue_values(nbformat.from_dict(nb)).items():
        text = data.get("text/plain", "")
        values[name] = "".join(text) if isinstance(text, list) else text
    return values


def glue_references(text: str) -> list[tuple[str, str]]:
    """(name, format spec) of every glue role and directive in a markdown text."""
    refs = []
    for m in GLUE_ROLE.finditer(text):
        name, _, spec = m.group("content").partition(":")
        refs.append((name.strip(), spec))
    refs += [(m.group("content"), "") for m in GLUE_DIRECTIVE.finditer(text)]
    return refs


def _format(text: str, spec: str) -> str:
    """What myst-nb prints for ``{glue:text}`name:spec``` (myst_nb.core.variables.format_plain_text)."""
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        value = text
    if not spec:
        return str(value)
    kind = spec[-1]
    if kind in "eEfFgGn%":
        value = float(value)
    elif kind in "bcdoxX":
        value = int(value)
    elif kind == "s":
        value = str(value)
    return format(value, spec)


NOTEBOOKS = sorted(ROOT.glob("notebooks/*.ipynb")) + sorted(ROOT.glob("book/*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_glue_reference_is_stored_in_the_notebook(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    values = glue_values(nb)
    problems = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        for name, spec in glue_references("".join(cell["source"])):
            if name not in values:
                problems.append(f"cell {index}: {name!r} is not glued in a code cell output (execute the notebook)")
                continue
            try:
                _format(values[name], spec)
            except (TypeError, ValueError) as error:
                problems.append(f"cell {index}: {name!r} = {values[name]!r} cannot be formatted with {spec!r}: {error}")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)
    chapter = re.match(r"(\d\d)_", path.name)
    if chapter:  # names carry the chapter, so they read the same in every notebook
        wrong = [n for n in values if not n.startswith(f"ch{chapter.group(1)}_")]
        assert not wrong, f"{path.name}: glue names should start with 'ch{chapter.group(1)}_': {wrong}"


def test_no_book_page_refers_to_glue():
    """A .md page has no code cells, so it cannot glue; it points to the chapter's number instead."""
    refs = [(rel, glue_references(text)) for rel, index, text in SOURCES if index is None]
    assert not [r for r in refs if r[1]], refs


# ----------------------------------------------------------------------------- the test of the test
PLANTED = """\
The meta-learned head reaches an MAE of 0.755 on the test users.
Its AUC is {glue:text}`ch05_auc:.3f`, and $\\alpha = 0.01$ in the update $\\theta - 0.5 g$.
$$
\\mathrm{MSE} \\approx 4.25
$$
SASRec reaches nDCG@10 of 0.5905 {cite:p}`kang2018sasrec`.
We train with `inner_lr=0.1` and report 95% bootstrap intervals; AUC 0.5 is a random order.
```python
print(0.227)
```
:::{note}
The head gains 12.5% over the global head, and 37% of the users like it.
:::
Split: test users (20%) and validation users (10%); ratings from 0.5 to 5 stars; Python 3.11.
<!-- 0.99 in a comment -->
A wrapped code span `settings.replace(lr=
0.3)` and a version 1.0.4.
"""


def test_a_planted_typed_result_is_caught_and_nothing_else():
    found = [(line, token) for line, token, _ in typed_numbers(PLANTED)]
    assert found == [(1, "0.755"), (12, "12.5%"), (12, "37%")]


def test_glue_references_and_values_are_read_as_myst_nb_reads_them():
    assert glue_references("a {glue:text}`ch01_x:.2f` b {glue}`ch01_y` c\n```{glue:figure} ch01_fig\n```") == [
        ("ch01_x", ".2f"), ("ch01_y", ""), ("ch01_fig", "")]
    nb = {"cells": [{"cell_type": "code", "outputs": [{
        "output_type": "display_data", "data": {"application/papermill.record/text/plain": "0.12345"},
        "metadata": {"scrapbook": {"name": "ch01_x", "mime_prefix": "application/papermill.record/"}}}]}]}
    assert glue_values(nb) == {"ch01_x": "0.12345"}
    assert _format("0.12345", ".2f") == "0.12" and _format("'beats'", "") == "beats"
    with pytest.raises(ValueError):
        _format("np.float64(0.5)", ".2f")  # why mrec_utils.prose.glue stores NumPy scalars as Python numbers


def _captured(glue_function, *args, **kwargs):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    started = not InteractiveShell.initialized()
    InteractiveShell.instance()  # what a kernel provides; glue's formatters need it
    try:
        with capture_output() as captured:
            glue_function(*args, **kwargs)
    finally:
        if started:  # leave no IPython shell behind for the other tests
            InteractiveShell.clear_instance()
    return [(out.data, out.metadata) for out in captured.outputs]


@pytest.mark.parametrize("value", [0.755, "beats", 3])
@pytest.mark.parametrize("display", [False, True])
def test_prose_glue_stores_what_myst_nb_glue_stores(value, display):
    myst_nb_glue = pytest.importorskip("myst_nb").glue
    from mrec_utils.prose import glue

    assert _captured(glue, "ch01_x", value, display=display) == _captured(myst_nb_glue, "ch01_x", value, display=display)


def test_prose_glue_stores_numpy_scalars_as_python_numbers():
    np = pytest.importorskip("numpy")
    from mrec_utils.prose import glue

    [(data, metadata)] = _captured(glue, "ch01_x", np.float64(0.25))
    assert data == {"application/papermill.record/text/plain": "0.25"}
    assert metadata["scrapbook"] == {"name": "ch01_x", "mime_prefix": "application/papermill.record/"}
