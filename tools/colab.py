"""Colab copies of the book's notebooks (``make colab``), in two flavours.

- ``instructors``: the chapter as the book shows it, with outputs and the exercises' solutions;
- ``students``: outputs cleared and solutions removed, ready to be filled in.

Book-only markup becomes plain Markdown that Colab and Jupyter render: citations become
"(Finn et al., 2017)" linked to the online references page; ``{numref}``, ``{eq}``, ``{ref}``,
``{doc}`` and ``{term}`` become text linking to the online book, with the numbers the book shows;
``{glue}`` roles become the value the notebook stored; admonitions become quoted blocks with
their title; equation labels become ``\\tag{n}``; figure captions (cell metadata) become a line under
the figure's cell. The install block is pinned to the commit the copy is made from.

A notebook whose title badge or install block is not in the canonical form is refused (run
``python tools/setup_cells.py --write``), and so is markup this tool does not know.

Usage: ``python tools/colab.py [--out _build/colab] [--ref COMMIT] [NOTEBOOK ...]``
"""
from __future__ import annotations

import argparse
import ast
import copy
import posixpath
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

import book_config as bc
import setup_cells

ADMONITIONS = {"admonition", "note", "tip", "hint", "important", "warning", "caution", "attention",
               "danger", "error", "seealso", "dropdown", "margin", "sidebar", "topic", "epigraph"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|:{3,}|~{3,})(?P<rest>.*)$")
DIRECTIVE = re.compile(r"^\{(?P<name>[\w:.-]+)\}\s*(?P<arg>.*)$")
MATH_LABEL = re.compile(r"\$\$\s*\((?P<label>[^)\s]+)\)\s*$")
TARGET = re.compile(r"^\s*\((?P<label>[^)\s]+)\)=\s*$")
ROLE = re.compile(r"\{(?P<name>[\w:.+-]+)\}`(?P<content>[^`]*)`")
INLINE = re.compile(r"(?P<code>(?P<ticks>`+).+?(?P=ticks))|" + ROLE.pattern)
LINK_TARGET = re.compile(r"(?P<pre>!?\[[^\]]*\]\()(?P<target>[^)\s]+)(?P<post>[^)]*\))")
SOLUTION = re.compile(r"^Solution\b")


class ExportError(ValueError):
    """The notebook cannot be exported as it is; the message says why and what to do."""


# ----------------------------------------------------------------------------- the book's index
@dataclass
class Target:
    kind: str  # "figure", "equation" or "section"
    page: str  # source path relative to the repository, e.g. notebooks/03_maml_reptile.ipynb
    number: int | None = None
    title: str = ""


@dataclass
class BookIndex:
    """What cross-references need: numbers and pages of labels, page titles, citation labels."""
    targets: dict[str, Target] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)  # "notebooks/02_tasks" -> its title
    citations: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (authors, year)
    glossary: str = "book/glossary"
    references: str = "book/references"


def _markdown_of(path: Path) -> list[tuple[str, dict]]:
    """A page as (markdown text, code-cell metadata) items in document order."""
    if path.suffix == ".md":
        return [(path.read_text(encoding="utf-8"), {})]
    nb = nbformat.read(path, as_version=4)
    return [(c.source, {}) if c.cell_type == "markdown" else ("", c.get("metadata", {})) for c in nb.cells]


def _index_page(index: BookIndex, path: Path, rel: str, counters: dict[str, int]) -> None:
    def number(kind: str, label: str, title: str = "") -> None:
        counters[kind] += 1
        index.targets[label] = Target(kind, rel, counters[kind], title)

    entry = rel.rsplit(".", 1)[0]
    for text, meta in _markdown_of(path):
        figure = (meta.get("mystnb") or {}).get("figure") or {}
        if figure.get("caption"):
            counters["figure"] += 1
            if figure.get("name"):
                index.targets[figure["name"]] = Target("figure", rel, counters["figure"])
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if entry not in index.titles and line.startswith("# "):
                index.titles[entry] = line[2:].strip()
            if (m := MATH_LABEL.search(line)) and "$$" in line:
                number("equation", m.group("label"))
            elif (m := TARGET.match(line)):
                heading = next((l for l in lines[i + 1:] if l.strip()), "")
                index.targets[m.group("label")] = Target("section", rel, title=heading.lstrip("#").strip())
            elif (m := FENCE.match(line)) and (d := DIRECTIVE.match(m.group("rest").strip())):
                options = _options(lines[i + 1:])[0]
                if d.group("name") == "math" and "label" in options:
                    number("equation", options["label"])
                elif d.group("name") == "figure":
                    counters["figure"] += 1
                    if "name" in options:
                        index.targets[options["name"]] = Target("figure", rel, counters["figure"])
                elif d.group("name") == "glossary":
                    index.glossary = entry
                elif d.group("name") == "bibliography":
                    index.references = entry


def _citation_labels(bib: Path) -> dict[str, tuple[str, str]]:
    """``key -> ("Finn et al.", "2017")``, as the book's author-year style shows them."""
    from pybtex.backends.plaintext import Backend
    from pybtex.database import parse_file
    from pybtex.richtext import Text

    backend = Backend()

    def plain(latex: str) -> str:
        return Text.from_latex(latex).render(backend)

    def last(person) -> str:
        return plain(" ".join(person.prelast_names + person.last_names))

    labels = {}
    for key, entry in parse_file(str(bib)).entries.items():
        people = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [last(p) for p in people if str(p) != "others"]
        if not names:
            authors = plain(entry.fields.get("title", key))
        elif len(names) == 1 and len(people) == 1:
            authors = names[0]
        elif len(names) == 2 and len(people) == 2:
            authors = f"{names[0]} and {names[1]}"
        else:
            authors = f"{names[0]} et al."
        labels[key] = (authors, entry.fields.get("year", "n.d."))
    return labels


def book_index(root: Path = bc.ROOT) -> BookIndex:
    """Numbers figures and labelled equations through the whole book in reading order, as the
    built book does (tests/test_book.py checks that the numbers agree)."""
    index = BookIndex()
    counters = {"figure": 0, "equation": 0}
    for entry in bc.toc_files(root):
        path = bc.source_file(entry, root)
        _index_page(index, path, path.relative_to(root).as_posix(), counters)
    for bib in (bc.config(root).get("bibtex_bibfiles") or []):
        index.citations.update(_citation_labels(root / bib))
    return index


# ----------------------------------------------------------------------------- markdown
@dataclass
class Page:
    """One notebook being exported."""
    rel: str  # e.g. notebooks/01_movielens.ipynb
    flavour: str
    ref: str
    index: BookIndex
    glue: dict[str, dict] = field(default_factory=dict)  # key -> output data
    root: Path = bc.ROOT

    def error(self, message: str) -> ExportError:
        return ExportError(f"{self.rel}: {message}")

    def url(self, entry_or_rel: str, anchor: str = "") -> str:
        return bc.page_url(entry_or_rel if entry_or_rel.endswith((".ipynb", ".md")) else entry_or_rel + ".html",
                           anchor, self.root)

    def repo_file(self, target: str) -> str:
        """Address of a repository file (relative to this page) at the exported commit."""
        path = posixpath.normpath(posixpath.join(posixpath.dirname(self.rel), target))
        return f"https://raw.githubusercontent.com/{bc.repo_slug(self.root)}/{self.ref}/{path}"


def _options(lines: list[str]) -> tuple[dict[str, str], int]:
    """A directive's ``:key: value`` options (or ``---`` YAML block) and how many lines they take."""
    import yaml

    if lines and lines[0].strip() == "---":
        end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
        if end is not None:
            return {k: str(v) for k, v in (yaml.safe_load("\n".join(lines[1:end])) or {}).items()}, end + 1
    options, used = {}, 0
    for line in lines:
        m = re.match(r"^\s*:([\w-]+):\s*(.*)$", line)
        if not m:
            break
        options[m.group(1)] = m.group(2).strip()
        used += 1
    return options, used


def _split_target(content: str) -> tuple[str | None, str]:
    """``text <target>`` -> (text, target); ``target`` -> (None, target)."""
    m = re.match(r"^(?P<text>.*?)\s*<(?P<target>[^<>]+)>$", content.strip(), flags=re.S)
    return (m.group("text"), m.group("target")) if m else (None, content.strip())


def _cite(page: Page, name: str, content: str) -> str:
    keys = [k.strip() for k in content.split(",") if k.strip()]
    unknown = [k for k in keys if k not in page.index.citations]
    if unknown:
        raise page.error(f"citation keys {unknown} are not in the bibliography")
    url = page.url(page.index.references)
    parts = []
    for key in keys:
        authors, year = page.index.citations[key]
        if name in ("cite:t", "cite:ts"):
            parts.append(f"[{authors} ({year})]({url})")
        elif name == "cite:year":
            parts.append(f"[{year}]({url})")
        elif name == "cite:author":
            parts.append(f"[{authors}]({url})")
        else:
            parts.append(f"[{authors}, {year}]({url})")
    if name in ("cite:t", "cite:ts", "cite:year", "cite:author"):
        return ", ".join(parts)
    return "(" + "; ".join(parts) + ")"


def _glue(page: Page, name: str, content: str) -> str:
    key, _, spec = content.partition(":") if name == "glue:text" else (content, "", "")
    data = page.glue.get(key.strip())
    if data is None:
        raise page.error(f"{{{name}}}`{content}`: no stored glue value {key!r}; execute the notebook (make execute)")
    if name == "glue:md":
        return data.get("text/markdown", data.get("text/plain", ""))
    text = data.get("text/plain", "")
    try:
        value = ast.literal_eval(text.removeprefix("np.float64(").removesuffix(")"))
    except (ValueError, SyntaxError):
        value = None
    if spec:
        if value is None:
            raise page.error(f"glue value {key!r} = {text!r} cannot be formatted with {spec!r}")
        return format(value, spec)
    return value if isinstance(value, str) else text  # a glued string without its quotes, as myst-nb shows it


def convert_role(page: Page, name: str, content: str) -> str:
    """One MyST role as plain Markdown."""
    if name.startswith("cite"):
        return _cite(page, name, content)
    if name in ("numref", "eq", "ref", "numref:fig"):
        text, label = _split_target(content)
        target = page.index.targets.get(label)
        if target is None:
            raise page.error(f"{{{name}}}`{content}`: label {label!r} is not defined anywhere in the book")
        if name == "eq":
            return f"[({target.number})]({page.url(target.page, 'equation-' + label)})"
        if name == "ref":
            return f"[{text or target.title or label}]({page.url(target.page, label)})"
        default = {"figure": "Fig. %s", "equation": "Eq. (%s)"}.get(target.kind, "Section %s")
        shown = (text or default).replace("%s", str(target.number)).replace("{number}", str(target.number))
        return f"[{shown}]({page.url(target.page, label)})"
    if name == "doc":
        text, target = _split_target(content)
        entry = target.lstrip("/") if target.startswith("/") else posixpath.normpath(
            posixpath.join(posixpath.dirname(page.rel), target))
        entry = entry.rsplit(".", 1)[0] if entry.endswith((".md", ".ipynb")) else entry
        if entry not in page.index.titles:
            raise page.error(f"{{doc}}`{content}`: {entry!r} is not a page of the book")
        return f"[{text or page.index.titles[entry]}]({page.url(entry)})"
    if name == "term":
        text, term = _split_target(content)
        anchor = "term-" + re.sub(r"[^a-z0-9]+", "-", term.lower()).strip("-")
        return f"[{text or term}]({page.url(page.index.glossary, anchor)})"
    if name == "math":
        return f"${content}$"
    if name in ("sub", "sup", "kbd"):
        return f"<{name}>{content}</{name}>"
    if name == "abbr":
        return re.sub(r"\s*\(.*\)$", "", content)
    if name == "download":
        text, target = _split_target(content)
        return f"[{text or posixpath.basename(target)}]({page.repo_file(target)})"
    if name in ("glue", "glue:any", "glue:text", "glue:md"):
        return _glue(page, name, content)
    raise page.error(f"the role {{{name}}} has no Colab form; teach tools/colab.py convert_role() about it")


def convert_inline(page: Page, text: str) -> str:
    """Roles become Markdown; code spans stay as they are; relative links point online."""
    def one(m: re.Match) -> str:
        return m.group("code") if m.group("code") else convert_role(page, m.group("name"), m.group("content"))

    def link(m: re.Match) -> str:
        target = m.group("target")
        if re.match(r"^([a-z]+:|#|attachment:)", target):
            return m.group(0)
        path, _, anchor = target.partition("#")
        if path.endswith((".ipynb", ".md")):
            rel = posixpath.normpath(posixpath.join(posixpath.dirname(page.rel), path))
            new = page.url(rel, anchor)
        else:
            new = page.repo_file(path)
        return m.group("pre") + new + m.group("post")

    parts = re.split(r"(`+[^`]*`+)", text)  # leave code spans alone when fixing links
    text = "".join(p if p.startswith("`") else LINK_TARGET.sub(link, p) for p in parts)
    return INLINE.sub(one, text)


def _quote(title: str, body: str) -> str:
    lines = [f"> **{title}**"] if title else []
    if body.strip():
        lines += [">"] if title else []
        lines += [f"> {line}" if line.strip() else ">" for line in body.strip("\n").split("\n")]
    return "\n".join(lines)


def _directive(page: Page, name: str, arg: str, body_lines: list[str]) -> str | None:
    """One directive as Markdown (None: leave it out of this flavour)."""
    options, used = _options(body_lines)
    body_lines = body_lines[used:]
    if name in ADMONITIONS:
        if name == "admonition" or name == "dropdown":
            title = arg
        else:
            title = name.capitalize() if name != "seealso" else "See also"
            if arg:
                body_lines = [arg] + body_lines
        dropdown = name == "dropdown" or "dropdown" in options.get("class", "").split()
        if dropdown and SOLUTION.match(title) and page.flavour == "students":
            return None
        return _quote(convert_inline(page, title), convert_markdown(page, "\n".join(body_lines)))
    if name == "math":
        label = options.get("label")
        tag = f" \\tag{{{page.index.targets[label].number}}}" if label else ""
        return "$$\n" + "\n".join(body_lines).strip("\n") + tag + "\n$$"
    if name in ("code", "code-block", "sourcecode", "code-cell"):
        return f"```{arg}\n" + "\n".join(body_lines).strip("\n") + "\n```"
    if name in ("figure", "image"):
        alt = options.get("alt", "")
        image = f"![{alt}]({page.repo_file(arg)})"
        caption = convert_markdown(page, "\n".join(body_lines)).strip()
        number = page.index.targets[options["name"]].number if "name" in options else None
        if caption and name == "figure":
            image += f"\n\n**Fig. {number}.** {caption}" if number else f"\n\n{caption}"
        return image
    if name == "glue:figure":
        return f"*(The figure `{arg}` is shown in the [online book]({page.url(page.rel)}).)*"
    raise page.error(f"the directive {{{name}}} has no Colab form; teach tools/colab.py _directive() about it")


def _closing(lines: list[str], start: int, fence: str) -> int:
    """Index of the line that closes a fence opened at ``start`` (same character, at least as long)."""
    for i in range(start + 1, len(lines)):
        stripped = lines[i].strip()
        if stripped and set(stripped) == {fence[0]} and len(stripped) >= len(fence):
            return i
    return len(lines)


def convert_markdown(page: Page, text: str) -> str:
    """A markdown cell (or a directive's body) as plain Markdown."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            end = _closing(lines, i, fence.group("fence"))
            directive = DIRECTIVE.match(fence.group("rest").strip())
            if directive is None:  # an ordinary code block: verbatim
                out.extend(lines[i:end + 1])
            else:
                done = _directive(page, directive.group("name"), directive.group("arg").strip(), lines[i + 1:end])
                if done is not None:
                    out.extend(done.split("\n"))
                elif out and not out[-1].strip() and end + 1 < len(lines) and not lines[end + 1].strip():
                    end += 1  # a removed block leaves one blank line, not two
            i = end + 1
            continue
        if line.lstrip().startswith("$$"):
            end = i if line.count("$$") >= 2 else next(
                (j for j in range(i + 1, len(lines)) if "$$" in lines[j]), len(lines) - 1)
            block = lines[i:end + 1]
            label = MATH_LABEL.search(block[-1])
            if label:
                number = page.index.targets[label.group("label")].number
                block[-1] = MATH_LABEL.sub(lambda _: f"\\tag{{{number}}} $$", block[-1])
            out.extend(block)
            i = end + 1
            continue
        if TARGET.match(line) or line.lstrip().startswith("%") or line.strip() == "+++":
            i += 1
            continue
        out.append(convert_inline(page, line))
        i += 1
    return "\n".join(out).strip("\n")


# ----------------------------------------------------------------------------- notebooks
def _glue_values(nb: nbformat.NotebookNode) -> dict[str, dict]:
    values = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            record = out.get("metadata", {}).get("scrapbook") or {}
            if record.get("name"):  # glue(..., display=False) prefixes the mimetypes, as myst-nb strips them
                prefix = record.get("mime_prefix", "")
                values[record["name"]] = {k.removeprefix(prefix): v for k, v in out.get("data", {}).items()}
    return values


def _title_cell(page: Page, source: str) -> str:
    note = f"[Read this chapter in the online book]({page.url(page.rel)})."
    if page.flavour == "students":
        note += " This is the students' copy: outputs cleared, solutions to the exercises left out."
    return setup_cells.BADGE.sub(lambda _: note, source, count=1)


def export(path: Path, flavour: str, ref: str, index: BookIndex, root: Path = bc.ROOT) -> nbformat.NotebookNode:
    """The Colab copy of one notebook."""
    if flavour not in bc.FLAVOURS:
        raise ValueError(f"flavour must be one of {bc.FLAVOURS}, got {flavour!r}")
    rel = path.resolve().relative_to(root).as_posix()
    problems = setup_cells.problems(path, root)
    if problems:
        raise ExportError("\n".join(problems) + "\nrun: python tools/setup_cells.py --write")
    source = nbformat.read(path, as_version=4)
    page = Page(rel, flavour, ref, index, _glue_values(source), root)
    nb = copy.deepcopy(source)
    setup = setup_cells.setup_cell_index(nb, rel)
    nb.cells[setup].source = setup_cells.with_install_block(nb.cells[setup].source,
                                                            setup_cells.install_block(nb, ref, root))
    nb.cells[0].source = _title_cell(page, nb.cells[0].source)
    cells = []
    for number, cell in enumerate(nb.cells):
        meta = cell.get("metadata", {})
        figure = (meta.get("mystnb") or {}).get("figure") or {}
        for key in ("execution", "mystnb", "scrolled", "collapsed"):
            meta.pop(key, None)
        if cell.cell_type == "markdown":
            try:
                cell.source = convert_markdown(page, cell.source)
            except ExportError as error:
                raise ExportError(f"{error} (markdown cell {number})") from None
            if not cell.source.strip():
                continue
        elif cell.cell_type == "code" and flavour == "students":
            cell.outputs = []
            cell.execution_count = None
        cells.append(cell)
        if cell.cell_type == "code" and figure.get("caption"):
            name = figure.get("name")
            label = f"**Fig. {index.targets[name].number}.** " if name in index.targets else ""
            caption = nbformat.v4.new_markdown_cell(label + convert_inline(page, figure["caption"]))
            caption.id = f"{cell.get('id', number)}-caption"[:64]
            cells.append(caption)
    nb.cells = cells
    nb.metadata.pop("mrec", None)
    nb.metadata["mrec_colab"] = {"source": rel, "commit": ref, "flavour": flavour}
    return nb


def head_commit(root: Path = bc.ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        raise ExportError("cannot read the current commit (git rev-parse HEAD); pass --ref COMMIT") from None
    return out.stdout.strip()


def write_all(out: Path, ref: str, paths: list[Path], root: Path = bc.ROOT) -> list[Path]:
    index = book_index(root)
    written = []
    for flavour in bc.FLAVOURS:
        for path in paths:
            target = out / flavour / path.resolve().relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(export(path, flavour, ref, index, root), target)
            written.append(target)
    rows = "\n".join(
        f"| `{p.resolve().relative_to(root).as_posix()}` | "
        + " | ".join(f"[open]({bc.colab_url(p.resolve().relative_to(root), f, root)})" for f in bc.FLAVOURS) + " |"
        for p in paths)
    (out / "README.md").write_text(
        "# Colab copies of the book's notebooks\n\n"
        f"Generated by `tools/colab.py` from commit {ref} of {bc.repo_url(root)}; do not edit here.\n"
        f"The book: {bc.book_url(root)}\n\n"
        "| notebook | " + " | ".join(bc.FLAVOURS) + " |\n|---|" + "---|" * len(bc.FLAVOURS) + "\n" + rows + "\n",
        encoding="utf-8")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the Colab copies of the book's notebooks.")
    parser.add_argument("--out", type=Path, default=bc.ROOT / "_build" / "colab", help="default: _build/colab")
    parser.add_argument("--ref", help="commit the install lines pin (default: git rev-parse HEAD)")
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook of the book")
    args = parser.parse_args(argv)
    paths = args.notebooks or bc.book_notebooks()
    for path in paths:
        if path.suffix != ".ipynb" or not path.is_file():
            parser.error(f"not a notebook: {path}")
    if args.ref is not None and not re.match(r"^[0-9a-f]{7,40}$|^v\d", args.ref):
        parser.error(f"--ref must be a commit hash or a version tag, got {args.ref!r}")
    try:
        written = write_all(args.out, args.ref or head_commit(), paths)
    except (ExportError, bc.ConfigError) as error:
        print(f"make colab: {error}", file=sys.stderr)
        return 1
    print(f"{len(written)} Colab notebooks in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
