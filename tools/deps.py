"""What a notebook depends on: its code, and the book's package modules it imports, transitively.

Imports are read with ``ast``, not executed: ``import mrec_utils.lm``, ``from mrec_utils import
data, lm`` (a name may be a submodule or something ``__init__`` defines), and inside the
packages relative imports such as ``from . import meta`` or ``from .meta import x``. Imports
inside functions count too. Importing ``a.b`` runs ``a/__init__.py``, so it is always included.
Data files inside an imported package's folder are included with its modules.
"""
from __future__ import annotations

import ast
import hashlib
import re
from functools import lru_cache
from pathlib import Path

import nbformat

from book_config import PACKAGES, ROOT

# A chapter that imports this module, or calls one of these functions, needs the language model.
LM_MODULE = "mrec_utils.lm"
LM_FUNCTIONS = {"embed_texts", "load_causal_lm"}

_MAGIC = re.compile(r"^(\s*)[%!]")


def python_source(cell_source: str) -> str:
    """A code cell as plain Python: IPython magics and shell lines become ``pass`` (same indent)."""
    if cell_source.lstrip().startswith("%%"):
        return ""
    return "\n".join(_MAGIC.sub(r"\1pass  #", line) for line in cell_source.splitlines())


def notebook_code(nb: nbformat.NotebookNode, name: str = "notebook") -> ast.Module:
    """All code cells of a notebook parsed into one module; a syntax error names the cell."""
    body = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        try:
            body.extend(ast.parse(python_source(cell.source)).body)
        except SyntaxError as error:
            raise ValueError(f"{name}: code cell {index} is not valid Python ({error.msg}, line {error.lineno})") from None
    return ast.Module(body=body, type_ignores=[])


def _module_file(module: str, root: Path) -> Path | None:
    """``a.b`` -> ``a/b.py`` or ``a/b/__init__.py`` under root, if it exists."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def imported_modules(tree: ast.AST, module: str | None = None, is_package: bool = False,
                     root: Path = ROOT, packages=PACKAGES) -> set[str]:
    """Names of the book's modules that ``tree`` imports (with their parent packages).

    ``module`` is the dotted name of the file ``tree`` came from (None for a notebook); relative
    imports are resolved against it.
    """
    found: set[str] = set()

    def add(name: str) -> None:
        if name.split(".")[0] in packages and _module_file(name, root) is not None:
            found.update(m for m in _with_parents(name) if _module_file(m, root) is not None)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if module is None:
                    continue
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            add(base)
            for alias in node.names:
                add(f"{base}.{alias.name}")  # kept only when it is a submodule
    return found


def module_closure(start: set[str], root: Path = ROOT, packages=PACKAGES) -> set[str]:
    """``start`` and every book module they import, followed transitively."""
    done: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        path = _module_file(name, root)
        todo.extend(_module_imports(path.read_text(encoding="utf-8"), name, path.name == "__init__.py",
                                    root, tuple(packages)) - done)
    return done


@lru_cache(maxsize=None)
def _module_imports(source: str, name: str, is_package: bool, root: Path, packages: tuple) -> frozenset:
    """``imported_modules`` of one module's source (cached: tools ask for the same files often)."""
    return frozenset(imported_modules(ast.parse(source), name, is_package, root, packages))


def notebook_modules(nb: nbformat.NotebookNode, root: Path = ROOT, packages=PACKAGES) -> set[str]:
    """Every book module a notebook imports, directly or through other modules."""
    return module_closure(imported_modules(notebook_code(nb), root=root, packages=packages), root, packages)


def dependency_files(modules: set[str], root: Path = ROOT) -> list[Path]:
    """The modules' files, plus the data files (not ``*.py``) inside each imported package folder."""
    files = {_module_file(m, root) for m in modules}
    for path in list(files):
        if path.name == "__init__.py":
            files.update(
                p for p in path.parent.rglob("*")
                if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
            )
    return sorted(files)


def file_hashes(files: list[Path], root: Path = ROOT) -> dict[str, str]:
    """``{relative path: sha256}``, one entry per file."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def code_hash(nb: nbformat.NotebookNode) -> str:
    """SHA-256 over the sources of the notebook's code cells, in order."""
    h = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            h.update(cell.source.encode("utf-8"))
            h.update(b"\x00")
    return h.hexdigest()


def package_files(nb: nbformat.NotebookNode, root: Path = ROOT) -> dict[str, str]:
    """What a notebook's stored outputs depend on in the packages: ``{path: sha256}``."""
    return file_hashes(dependency_files(notebook_modules(nb, root), root), root)


def uses_language_model(nb: nbformat.NotebookNode, root: Path = ROOT) -> bool:
    """True when the notebook (or a module it imports, transitively) imports ``mrec_utils.lm``,
    or its code calls ``embed_texts`` / ``load_causal_lm``."""
    if LM_MODULE in notebook_modules(nb, root):
        return True
    for node in ast.walk(notebook_code(nb)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in LM_FUNCTIONS:
                return True
    return False


def top_packages(nb: nbformat.NotebookNode, root: Path = ROOT) -> list[str]:
    """The book's packages a notebook imports itself (not through other modules), sorted."""
    direct = imported_modules(notebook_code(nb), root=root)
    return sorted({m.split(".")[0] for m in direct})
