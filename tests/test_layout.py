"""The package's shape: imports go one way (nanochat <- common, plots <- checkpoints, hub <-
data <- train, eval <- serve, pipelines), never in a circle, and this package's modules are
imported at the top of a file, never inside a function."""

import ast

from tests.conftest import REPO_ROOT

# A module's unit is its top-level module or sub-package under sciassist/ (or nanochat).
LAYERS = {
    "nanochat": 0, "sciassist": 1,
    "sciassist.common": 1, "sciassist.memory": 1, "sciassist.plots": 1, "sciassist.hf_import": 1,
    "sciassist.checkpoints": 2, "sciassist.hub": 2,
    "sciassist.data": 3,
    "sciassist.train": 4, "sciassist.eval": 4,
    "sciassist.serve": 5, "sciassist.pipelines": 5, "sciassist.export": 5,
    "sciassist.model_card": 4,
    "sciassist.cli": 6,  # the command: every program, imported by name when asked for
}
OURS = ("nanochat", "sciassist")


def module_name(path):
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit(name):
    parts = name.split(".")
    return "nanochat" if parts[0] == "nanochat" else ".".join(parts[:2])


def package_files():
    return sorted(p for root in OURS for p in (REPO_ROOT / root).rglob("*.py"))


def imports(tree, module):
    """(imported module, line, inside a function?) for every import of our packages."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.split(".")[0] in OURS)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module \
                    and child.module.split(".")[0] in OURS:
                names = [f"{child.module}.{a.name}" for a in child.names]
                # "from sciassist.data import scienceqa" imports the submodule
                targets = [n for n in names if (REPO_ROOT / (n.replace(".", "/") + ".py")).is_file()]
                found.extend((t, child.lineno, in_function) for t in targets or [child.module])
            visit(child, nested)

    visit(tree, False)
    return found


def import_graph():
    graph = {}
    for path in package_files():
        module = module_name(path)
        graph[module] = (path, imports(ast.parse(path.read_text(encoding="utf-8")), module))
    return graph


def test_every_unit_has_a_layer():
    assert {unit(m) for m in import_graph()} <= set(LAYERS)


def upward(module, found):
    """The imports of `module` that point to its own layer (another unit) or a higher one."""
    return [(target, line) for target, line, _ in found
            if unit(target) != unit(module) and LAYERS[unit(target)] >= LAYERS[unit(module)]]


def test_imports_go_one_way_only():
    wrong = [f"{path.relative_to(REPO_ROOT)}:{line} {module} imports {target}"
             for module, (path, found) in import_graph().items() for target, line in upward(module, found)]
    assert wrong == []


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in found if t in import_graph_names()} for m, (_, found) in import_graph().items()}
    state, cycles = {}, []

    def walk(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert cycles == []


def import_graph_names():
    return {module_name(p) for p in package_files()}


def test_package_modules_are_imported_at_the_top():
    local = [f"{path.relative_to(REPO_ROOT)}:{line} {target}"
             for path, found in import_graph().values() for target, line, inside in found if inside]
    assert local == []


def test_the_checks_catch_what_they_look_for():
    found = imports(ast.parse("from sciassist.eval.run import evaluate\nfrom sciassist.data import scienceqa\n"),
                    "sciassist.train.loop")
    assert upward("sciassist.train.loop", found) == [("sciassist.eval.run", 1)]
    assert upward("sciassist.serve.chat_cli", found) == []
    assert imports(ast.parse("def f():\n    import sciassist.common\n"), "x") == [("sciassist.common", 2, True)]
