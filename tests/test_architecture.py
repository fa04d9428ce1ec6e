"""The layers' arrows: no import cycles among the project's modules, `models` imports neither p2p nor
weights_tools, and nothing in the library imports the miniature but the demo command."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "p2p", "weights_tools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import of one file, relative ones resolved; `from X import a`
    names the module X.a when a is a module, else X."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    ROOT / Path(*sub.split(".")) / "__init__.py").exists()
                out.append((sub if is_module else base, node.lineno))
    return out


def project_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m, _ in imports(path) if m in files and m != name}
    return graph


def test_no_import_cycles():
    graph = project_graph()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_models_import_neither_p2p_nor_weights_tools():
    for path in (ROOT / "models").rglob("*.py"):
        bad = [m for m, _ in imports(path) if m.split(".")[0] in ("p2p", "weights_tools")]
        assert not bad, f"{path}: {bad}"


def test_only_the_demo_command_imports_the_miniature():
    demo = {n.lineno for fn in ast.walk(ast.parse((ROOT / "p2p" / "cli.py").read_text()))
            if isinstance(fn, ast.FunctionDef) and fn.name == "cmd_demo"
            for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "miniature" in path.parts:
                continue
            users = [(m, line) for m, line in imports(path) if m.startswith("p2p.miniature")
                     and not (path == ROOT / "p2p" / "cli.py" and line in demo)]
            assert not users, f"{path} imports the miniature: {users}"


def functions(pkg: str):
    for path in (ROOT / pkg).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def test_functions_are_short_and_import_at_module_level():
    """About 50 lines a function; imports at module level (the demo command's import of the
    miniature is the one kept inside a function: the library does not depend on the toy model)."""
    for pkg in ("p2p", "weights_tools"):
        for path, fn in functions(pkg):
            lines = fn.end_lineno - fn.lineno + 1
            assert lines <= 50, f"{path}:{fn.lineno} {fn.name} is {lines} lines"
            inner = [n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
            assert not inner or (path, fn.name) == (ROOT / "p2p" / "cli.py", "cmd_demo"), f"{path}:{inner} in {fn.name}"
