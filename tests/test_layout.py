"""The package's layout: its import graph, read from the source (imports at module level and inside functions,
relative and absolute), has no cycle; no library module imports the CLI; no name the package exports is also one
of its submodules (so that what `icl_probe.X` is never depends on import order); and every library module has an
`__all__` that lists names it defines, among them every name the rest of the package and the benchmarks use.

An import of a name from a package (`from . import __version__`) depends on the package's `__init__`, and that
`__init__` depends on every submodule it imports, lazily ones included (its `_LAZY` table, read as data).
"""

import ast
import functools
import re
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_names(package: Path) -> dict[str, Path]:
    """Every module of the package under `package` (a folder with __init__.py): dotted name → file."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def lazy_targets(tree: ast.Module, package: str) -> set[str]:
    """The submodules an `__init__` imports on first use: the values of its module-level `_LAZY` dict."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return {f"{package}.{v.value}" for v in node.value.values if isinstance(v, ast.Constant)}
    return set()


def source_of(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    """The absolute dotted name a `from ... import` statement in module `here` imports from."""
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imported(node: ast.Import | ast.ImportFrom, here: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules one import statement in module `here` depends on."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    source = source_of(node, here, is_package)
    if source not in modules:
        return set()
    subs = {f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules}
    names = [a.name for a in node.names if f"{source}.{a.name}" not in modules]
    return subs | ({source} if names or not subs else set())


@functools.cache
def import_graph(package: Path) -> dict[str, set[str]]:
    """module → the package modules it imports anywhere in its source (itself excluded)."""
    files = module_names(package)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        edges = lazy_targets(tree, name) if is_package else set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= imported(node, name, is_package, set(files))
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = [stack.pop()]
                    while component[-1] != node:
                        component.append(stack.pop())
                    on_stack.difference_update(component)
                    if len(component) > 1:
                        found.append(one_cycle(graph, set(component)))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first), closed: [a, b, ..., a]."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle in component {sorted(component)}")


def write(root: Path, files: dict[str, str]) -> Path:
    """A package on disk from {relative path: source}; returns its folder."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root / "pkg"


def test_the_graph_sees_function_level_relative_and_package_imports(tmp_path):
    package = write(tmp_path, {
        "pkg/__init__.py": '_LAZY = {"run": "runner"}\n',
        "pkg/runner.py": "def run():\n    from . import version\n    from .sub import deep\n",
        "pkg/version.py": "from pkg import __doc__\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/deep.py": "import pkg.version\nfrom .. import runner\n",
        "pkg/leaf.py": "import os\nfrom .sub.deep import x\n",
    })  # fmt: skip
    graph = import_graph(package)
    assert graph == {
        "pkg": {"pkg.runner"}, "pkg.runner": {"pkg.version", "pkg.sub.deep"}, "pkg.version": {"pkg"},
        "pkg.sub": set(), "pkg.sub.deep": {"pkg.version", "pkg.runner"}, "pkg.leaf": {"pkg.sub.deep"},
    }  # fmt: skip
    assert sorted(map(tuple, cycles(graph))) == [("pkg", "pkg.runner", "pkg.version", "pkg")]


def test_the_package_has_no_import_cycle():
    graph = import_graph(ROOT / "icl_probe")
    assert len(graph) > 40 and graph["icl_probe.cli.app"], "the graph misses modules or edges"
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_library_module_imports_the_cli():
    graph = import_graph(ROOT / "icl_probe")
    library = {m for m in graph if not m.startswith("icl_probe.cli")}
    bad = {m: sorted(e for e in graph[m] if e.startswith("icl_probe.cli")) for m in library}
    assert not {m: e for m, e in bad.items() if e}


def test_no_exported_name_is_also_a_submodule():
    import icl_probe

    submodules = {name.split(".")[1] for name in module_names(ROOT / "icl_probe") if name.count(".") == 1}
    assert not set(icl_probe.__all__) & submodules


@pytest.mark.parametrize("module", ["dynamics", "heads", "replay"])
def test_a_submodule_stays_a_module_whatever_the_import_order(module):
    import importlib

    import icl_probe

    for name in icl_probe.__all__:
        getattr(icl_probe, name)  # every lazy name loaded: none of them may replace the submodule
    loaded = importlib.import_module(f"icl_probe.{module}")
    assert getattr(icl_probe, module) is loaded is sys.modules[f"icl_probe.{module}"]


def top_level_names(tree: ast.Module) -> tuple[set[str], list[str] | None]:
    """The names a module binds at top level (definitions, assignments, imports), and its `__all__` if any."""
    names, listed = set(), None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            if any(getattr(t, "id", None) == "__all__" for t in targets):
                listed = [e.value for e in node.value.elts]
            if any(getattr(t, "id", None) == "_LAZY" for t in targets):  # the package's names loaded on first use
                names |= {k.value for k in node.value.keys}
    return names, listed


def used_names() -> dict[str, set[str]]:
    """module → the names the rest of the package and the benchmarks take from it: `from .m import x` (x not a
    submodule), and `m.x` where `m` names the module (`from . import m`, `import icl_probe`)."""
    files = module_names(ROOT / "icl_probe")
    sources = [*files.items(), *((None, path) for path in sorted((ROOT / "benchmarks").glob("*.py")))]
    wanted: dict[str, set[str]] = {}
    for here, path in sources:
        tree, aliases = ast.parse(path.read_text(encoding="utf-8")), {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = source_of(node, here, path.name == "__init__.py") if here else node.module or ""
                for a in node.names:
                    if f"{source}.{a.name}" in files:
                        aliases[a.asname or a.name] = f"{source}.{a.name}"
                    elif source in files and source != here:
                        wanted.setdefault(source, set()).add(a.name)
            elif isinstance(node, ast.Import):
                aliases.update(
                    {a.asname or a.name: a.name for a in node.names if a.name in files and "." not in a.name}
                )
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                module = aliases.get(node.value.id, here)
                if module != here and f"{module}.{node.attr}" not in files:
                    wanted.setdefault(module, set()).add(node.attr)
    return wanted


def test_every_library_module_has_an_all():
    """Outside the CLI, each module marks its public names; the rest are its internals."""
    library = {name: path for name, path in module_names(ROOT / "icl_probe").items() if ".cli" not in name}
    missing = [name for name, path in library.items() if top_level_names(ast.parse(path.read_text()))[1] is None]
    assert not missing, f"modules without __all__: {missing}"


def test_every_all_lists_defined_names_and_what_the_package_and_benchmarks_use():
    wanted, problems, listed_any = used_names(), [], 0
    for name, path in module_names(ROOT / "icl_probe").items():
        names, listed = top_level_names(ast.parse(path.read_text(encoding="utf-8")))
        if listed is None:
            continue
        listed_any += 1
        if len(listed) != len(set(listed)):
            problems.append(f"{name}.__all__ repeats a name")
        if set(listed) - names:
            problems.append(f"{name}.__all__ lists names it does not define: {sorted(set(listed) - names)}")
        lacking = wanted.get(name, set()) - set(listed)
        if lacking:
            problems.append(f"{name}.__all__ lacks names the package or the benchmarks use: {sorted(lacking)}")
    assert not problems, "\n".join(problems)
    assert listed_any > 50


def docstring_sections(doc: str) -> dict[str, list[str]]:
    """A docstring's `Args:`, `Returns:` and `Example:` sections → their lines, dedented once; a blank line ends one."""
    sections, current = {}, None
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Returns:", "Example:"):
            current = sections.setdefault(line.strip()[:-1], [])
        elif not line.strip():
            current = None
        elif current is not None:
            current.append(line)
    return {key: textwrap.dedent("\n".join(lines)).splitlines() for key, lines in sections.items()}


@pytest.mark.parametrize("name", sorted(set(__import__("icl_probe").__all__) - {"__version__"}))
def test_every_exported_name_has_a_summary_and_a_three_line_example(name):
    import inspect

    import icl_probe

    obj = getattr(icl_probe, name)
    doc = inspect.getdoc(obj)
    summary, *_ = doc.splitlines()
    assert summary and summary.endswith("."), f"{name}: the first line is a one-line summary"
    sections = docstring_sections(doc)
    example = sections.get("Example", [])
    assert len(example) == 3 and example[0].startswith(">>> "), f"{name}: a three-line Example"
    if inspect.isfunction(obj):
        params = set(inspect.signature(obj).parameters)
        heads = [line.split(":")[0] for line in sections.get("Args", []) if not line.startswith(" ")]
        documented = {p.strip() for head in heads for p in head.split(",")}
        assert documented == params, f"{name}: Args names {sorted(documented)}, the signature {sorted(params)}"
        assert sections.get("Returns"), f"{name}: a Returns section"


ARCHITECTURE = ROOT / "docs" / "architecture.md"
# The one import up a floor that docs/architecture.md names: `study` writes its report through `studyreport`.
KNOWN_UPWARD = {("icl_probe.study", "icl_probe.studyreport")}


def module_of(path: str) -> str:
    """The dotted module a path in docs/architecture.md names: `cli/app.py` → icl_probe.cli.app."""
    parts = path.removeprefix("icl_probe/").removesuffix(".py").split("/")
    return ".".join(["icl_probe", *(parts[:-1] if parts[-1] == "__init__" else parts)])


def doc_floors() -> list[set[str]]:
    """docs/architecture.md's floors, top first: the modules each bold-headed paragraph of its floor list names."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("\n## The floors", 1)[1].split("\n## ", 1)[0]
    blocks = re.split(r"^\*\*", section, flags=re.M)[1:]
    return [{module_of(p) for p in re.findall(r"`([\w/]+\.py)`", block)} for block in blocks]


def test_imports_go_down_the_documented_floors():
    floors = doc_floors()
    assert len(floors) == 6 and all(floors), "docs/architecture.md lists six floors, each with its modules"
    assert sum(map(len, floors)) == len(set().union(*floors)), "a module is on one floor only"
    level = {m: i for i, floor in enumerate(floors) for m in floor}  # 0: the top floor
    graph = import_graph(ROOT / "icl_probe")
    up = sorted(f"{m} -> {e}" for m in graph for e in graph[m] if level.get(e, 99) < level.get(m, -1))
    assert up == sorted(f"{m} -> {e}" for m, e in KNOWN_UPWARD), "imports up a floor:\n" + "\n".join(up)


# ---- size and capture ---------------------------------------------------------------------------------------

LONGEST_FUNCTION = 60  # lines from `def` to the last line, docstring included (issue: the engine made simple)


def functions(package: Path):
    """(path, name, lines) of every function and method in the package's source."""
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(package), node.name, node.end_lineno - node.lineno + 1


def test_the_function_scan_counts_lines_from_def_to_the_end(tmp_path):
    package = write(tmp_path, {"pkg/__init__.py": "", "pkg/m.py": "def f():\n    '''doc'''\n\n    return 1\n"})
    assert list(functions(package)) == [(Path("m.py"), "f", 4)]


def test_no_function_is_longer_than_sixty_lines():
    long = [f"{path}:{name} ({n} lines)" for path, name, n in functions(ROOT / "icl_probe") if n > LONGEST_FUNCTION]
    assert not long, long


def test_only_hooks_py_registers_hooks():
    """Every capture goes through hooks.recording and every edit through hooks.hooked / pre_hooked: no other
    module registers a torch hook of its own."""
    allowed = {Path("hooks.py")}
    found = sorted(
        str(path.relative_to(ROOT / "icl_probe"))
        for path in (ROOT / "icl_probe").rglob("*.py")
        if re.search(r"register_forward(_pre)?_hook", path.read_text())
        and path.relative_to(ROOT / "icl_probe") not in allowed
    )
    assert not found, found
