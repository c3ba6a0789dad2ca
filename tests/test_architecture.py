"""The import rules of the layout (issue "Architecture"), read from the source with ``ast``.

Nothing here imports the project: every ``import`` statement of every module under
``tasks/``, ``slothflow/`` and ``flows/`` is parsed, including the ones inside functions
(lazy imports are where cycles and layer breaks hide), relative ones, and
``importlib.import_module("literal")`` calls. ``from x import y`` counts as an import of
``x.y`` when ``x/y.py`` or ``x/y/__init__.py`` exists, otherwise as an import of ``x``.
``if TYPE_CHECKING:`` imports count too: they are dependencies all the same.

The layers:

* ``tasks/core/`` is the small core every stage may use;
* every other direct child of ``tasks/`` (a module ``tasks/x.py`` or a package
  ``tasks/x/``) is a stage; a stage imports only ``tasks.core.*``, its own package
  and libraries, never another stage;
* ``flows/`` and ``slothflow/`` sit on top: nothing under ``tasks/`` imports them;
* MLflow is wrapped by ``tasks/core/tracking/`` and Prefect stays at the edge
  (``flows/``, ``slothflow/``, ``tasks/core/``);
* no import cycles, a package ``__init__`` and its own submodule included.

Each failure lists every offender as ``file:line  import statement``.
"""

from __future__ import annotations

import ast
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("tasks", "slothflow", "flows")


@dataclass(frozen=True)
class Import:
    """One imported module: ``target`` is the full dotted name it resolves to."""

    file: str  # relative to the repository root
    line: int
    module: str  # the importing module
    target: str
    text: str  # the statement as written (one alias of it)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}  {self.text}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_local_module(name: str, root: Path) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        package = package[: len(package) - (level - 1)]
    return ".".join([*package, *([name] if name else [])])


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import in one file, wherever it sits in the file."""
    rel = path.relative_to(root).as_posix()
    module = module_name(path, root)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                text = f"import {alias.name}"
                found.append(Import(rel, node.lineno, module, alias.name, text))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            else:
                base = node.module or ""
            written = "." * node.level + (node.module or "")
            for alias in node.names:
                text = f"from {written} import {alias.name}"
                sub = f"{base}.{alias.name}"
                target = sub if alias.name != "*" and is_local_module(sub, root) else base
                found.append(Import(rel, node.lineno, module, target, text))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            name = node.args[0].value
            text = f"{ast.unparse(node.func)}({name!r})"
            found.append(Import(rel, node.lineno, module, name, text))
    return found


def scan(root: Path = REPO, packages: tuple[str, ...] = SCANNED) -> list[Import]:
    out: list[Import] = []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            out += imports_of(path, root)
    return out


def modules(root: Path = REPO, packages: tuple[str, ...] = SCANNED) -> set[str]:
    return {module_name(p, root) for pkg in packages for p in (root / pkg).rglob("*.py")}


def top(name: str) -> str:
    return name.split(".")[0]


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def stage_of(name: str) -> str | None:
    """``tasks.<stage>...`` -> the stage; ``tasks``, ``tasks.core...`` and the rest -> None."""
    parts = name.split(".")
    if parts[0] != "tasks" or len(parts) < 2 or parts[1] == "core":
        return None
    return parts[1]


def stages(root: Path = REPO) -> list[str]:
    tasks = root / "tasks"
    mods = [p.stem for p in tasks.glob("*.py") if p.name != "__init__.py"]
    pkgs = [p.name for p in tasks.iterdir() if (p / "__init__.py").is_file() and p.name != "core"]
    return sorted(mods + pkgs)


def statements(imports: list[Import]) -> list[str]:
    """``file:line  from x import a, b``: the aliases of one statement on one line."""
    names: dict[tuple[str, int, str], list[str]] = defaultdict(list)
    for i in imports:
        head, _, name = i.text.rpartition(" import ")
        key = (i.file, i.line, head or i.text)
        if name and head and name not in names[key]:
            names[key].append(name)
    return [
        f"{f}:{n}  {head} import {', '.join(sorted(ns))}" if ns else f"{f}:{n}  {head}"
        for (f, n, head), ns in sorted(names.items())
    ]


def report(title: str, offenders: list[Import]) -> str:
    lines = statements(offenders)
    return f"{title} ({len(lines)} statements):\n  " + "\n  ".join(lines)


# --------------------------------------------------------------------------- cycles


def runtime_edges(imports: list[Import], local: set[str]) -> dict[tuple[str, str], list[Import]]:
    """Module -> module edges among ``local`` as Python runs them: importing ``a.b.c`` also
    runs the packages ``a`` and ``a.b`` first, unless they are the importer's own
    packages (imported before it). An import naming its own package explicitly (``from
    . import name``, ``from tasks.data import name``) is an edge like any other. Each
    edge keeps every import that makes it."""
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in sorted(imports, key=lambda i: (i.file, i.line)):
        own = imp.module.split(".")
        own_packages = {".".join(own[:n]) for n in range(1, len(own) + 1)}
        parts = imp.target.split(".")
        for n in range(1, len(parts) + 1):
            dst = ".".join(parts[:n])
            implicit = n < len(parts)
            if dst in local and dst != imp.module and not (implicit and dst in own_packages):
                edges[(imp.module, dst)].append(imp)
    return dict(edges)


def _components(nodes: set[str], edges: set[tuple[str, str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    succ: dict[str, list[str]] = defaultdict(list)
    for a, b in sorted(edges):
        succ[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[set[str]] = []
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(succ[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(succ[nxt])))
                elif nxt in on_stack:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def _shortest_path(src: str, dst: str, succ: dict[str, list[str]]) -> list[str]:
    prev: dict[str, str | None] = {src: None}
    queue = deque([src])
    while queue:
        v = queue.popleft()
        if v == dst:
            break
        for w in succ[v]:
            if w not in prev:
                prev[w] = v
                queue.append(w)
    path = [dst]
    while prev[path[-1]] is not None:
        path.append(prev[path[-1]])  # type: ignore[arg-type]
    return path[::-1]


def cycles(edges: dict[tuple[str, str], list[Import]], local: set[str]) -> list[list[str]]:
    """Shortest cycles covering every edge that lies on a cycle, each starting at its
    smallest module name."""
    found: set[tuple[str, ...]] = set()
    for comp in _components(local, set(edges)):
        inner = sorted((a, b) for a, b in edges if a in comp and b in comp)
        succ: dict[str, list[str]] = defaultdict(list)
        for a, b in inner:
            succ[a].append(b)
        for a, b in inner:
            ring = [a, *_shortest_path(b, a, succ)[:-1]]
            i = ring.index(min(ring))
            found.add(tuple(ring[i:] + ring[:i]))
    return [list(c) for c in sorted(found)]


def describe_cycle(ring: list[str], edges: dict[tuple[str, str], list[Import]]) -> str:
    steps = []
    for a, b in zip(ring, [*ring[1:], ring[0]], strict=True):
        steps.append(f"    {a} -> {b}:")
        direct = [i for i in edges[(a, b)] if i.target == b]
        implicit = [i for i in edges[(a, b)] if i.target != b]
        steps += [f"      {line}" for line in statements(direct)]
        steps += [f"      {line}   (runs the package {b} first)" for line in statements(implicit)]
    return " -> ".join([*ring, ring[0]]) + "\n" + "\n".join(steps)


# --------------------------------------------------------------------------- the rules

IMPORTS = scan()
LOCAL = modules()


def test_the_scan_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The reader itself: lazy, relative, module-from-package and string imports."""
    pkg = tmp_path / "tasks" / "stage"
    pkg.mkdir(parents=True)
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from . import sub\nfrom .sub import thing\n")
    (pkg / "sub.py").write_text(
        "import importlib\n"
        "def f():\n"
        "    from tasks.stage import helper\n"
        "    import mlflow.tracking\n"
        "    importlib.import_module('tasks.other')\n"
        "    from .. import stage\n"
    )
    got = {(i.module, i.target) for i in scan(tmp_path, ("tasks",))}
    assert got == {
        ("tasks.stage", "tasks.stage.sub"),
        ("tasks.stage.sub", "importlib"),
        ("tasks.stage.sub", "tasks.stage"),
        ("tasks.stage.sub", "mlflow.tracking"),
        ("tasks.stage.sub", "tasks.other"),
    }
    edges = runtime_edges(scan(tmp_path, ("tasks",)), modules(tmp_path, ("tasks",)))
    assert cycles(edges, modules(tmp_path, ("tasks",))) == [["tasks.stage", "tasks.stage.sub"]]
    # and it reads the real tree
    assert len(IMPORTS) > 200 and "tasks.core.config" in LOCAL
    assert {"base_model", "data", "train", "export", "evaluate", "gate", "serve"} <= set(stages())


def test_stages_import_only_core_and_their_own_package() -> None:
    """A stage (``tasks/x.py`` or ``tasks/x/``) uses ``tasks.core.*`` and libraries; what
    two stages share belongs in ``tasks/core/``, and the flow wires stage to stage."""
    offenders = [
        i
        for i in IMPORTS
        if (own := stage_of(i.module)) is not None
        and top(i.target) == "tasks"
        and not within(i.target, "tasks.core")
        and stage_of(i.target) != own
    ]
    assert not offenders, report("stage imports another stage (or the tasks root)", offenders)


def test_core_imports_no_stage() -> None:
    offenders = [
        i for i in IMPORTS if within(i.module, "tasks.core") and stage_of(i.target) is not None
    ]
    assert not offenders, report("tasks/core imports a stage", offenders)


def test_flows_never_imported_by_tasks() -> None:
    """Imports go one way: flows and the CLI -> tasks."""
    offenders = [
        i for i in IMPORTS if within(i.module, "tasks") and top(i.target) in {"flows", "slothflow"}
    ]
    assert not offenders, report("tasks imports flows or slothflow", offenders)


def test_no_import_cycles() -> None:
    edges = runtime_edges(IMPORTS, LOCAL)
    found = cycles(edges, LOCAL)
    message = f"{len(found)} import cycle(s):\n" + "\n".join(
        describe_cycle(c, edges) for c in found
    )
    assert not found, message


def test_only_tracking_imports_mlflow() -> None:
    offenders = [
        i
        for i in IMPORTS
        if top(i.target) == "mlflow" and not within(i.module, "tasks.core.tracking")
    ]
    assert not offenders, report("mlflow imported outside tasks/core/tracking", offenders)


def test_prefect_stays_at_the_edge() -> None:
    allowed = ("flows", "slothflow", "tasks.core")
    offenders = [
        i
        for i in IMPORTS
        if top(i.target) == "prefect" and not any(within(i.module, a) for a in allowed)
    ]
    assert not offenders, report(
        "prefect imported outside flows/, slothflow/, tasks/core/", offenders
    )
