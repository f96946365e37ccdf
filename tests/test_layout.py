"""The flat layout stays layered: no import cycles among top-level modules, and the scripts that count or
read data never import the training loop. Imports are read with `ast`, so lazy imports inside
functions count too."""

import ast
import os

from conftest import ROOT

# These must work without the training loop (loading a checkpoint to count one image, reading data).
MUST_NOT_REACH_TRAINING = ("dataset_fsc147", "count_objects", "evaluate_counting")
TRAINING = "train_sequential_attention"
MODEL_FILES = ("model_sequential_simple", "model_sequential_attention")


def project_modules(root: str = ROOT) -> dict[str, str]:
    """{module name: path} of the top-level .py files."""
    return {name[:-3]: os.path.join(root, name) for name in os.listdir(root) if name.endswith(".py")}


def imported_project_modules(path: str, modules: set[str]) -> set[str]:
    """Project modules that a file imports anywhere in its body (top level or inside functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & modules


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    names = set(modules)
    return {name: imported_project_modules(path, names) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    state, stack = {}, []  # state: 1 = on the current path, 2 = done

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_find_cycle_and_reachable_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}, "a") == {"b", "c"}


def test_no_import_cycles_among_top_level_modules():
    graph = import_graph()
    assert {"cli", "model_loading", TRAINING, *MUST_NOT_REACH_TRAINING} <= set(graph)
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_counting_and_data_do_not_import_the_training_script():
    graph = import_graph()
    for name in MUST_NOT_REACH_TRAINING:
        assert TRAINING not in reachable(graph, name), f"{name}.py reaches {TRAINING}.py through its imports"


def test_model_files_do_no_io():
    graph = import_graph()
    for name in MODEL_FILES:
        assert graph[name] <= set(MODEL_FILES), f"{name}.py imports {graph[name]}"
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8").read())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
        assert imported <= {"__future__", "dataclasses", "math", "torch", *MODEL_FILES}, f"{name}.py imports {imported}"
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "open" not in calls and "print" not in calls, f"{name}.py does I/O"
