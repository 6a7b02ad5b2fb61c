"""The structure every next capability builds on: one interpreter, one walk, one compat
layer, one description of how axes move, no import cycles."""

import ast
import pathlib

import pytest

import jlora
from jlora import _axes, _rules

PACKAGE = pathlib.Path(jlora.__file__).resolve().parent
SOURCES = {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def _jlora_imports(tree) -> set[str]:
    """Every jlora module a module imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "jlora":
                out.update(a.name for a in node.names)
            elif node.module.startswith("jlora."):
                out.add(node.module.split(".", 1)[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("jlora."):
                    out.add(a.name.split(".", 1)[1])
    return {m for m in out if m in SOURCES}


def test_the_import_graph_of_jlora_has_no_cycle():
    graph = {name: _jlora_imports(tree) for name, tree in SOURCES.items()}
    graph["__init__"] = set()  # the package re-exports; nothing inside imports it
    for name, deps in graph.items():
        assert "__init__" not in deps, f"{name} imports the package itself"
    state: dict[str, str] = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import cycle: " + " -> ".join(trail + [node])
        state[node] = "open"
        for dep in sorted(graph[node]):
            visit(dep, trail + [node])
        state[node] = "done"

    for name in graph:
        visit(name, [])
    # The interpreter is imported by the rules and the public face, never the reverse.
    assert not graph["_interpret"] & {"_rules", "_transform"}
    assert "_interpret" in graph["_rules"] and "_rules" in graph["_transform"]


def _calls(tree, attr: str) -> list[str]:
    """The functions in which `<anything>.attr(...)` is called."""
    found = []

    class Finder(ast.NodeVisitor):
        def __init__(self):
            self.func = "<module>"

        def visit_FunctionDef(self, node):
            outer, self.func = self.func, node.name
            self.generic_visit(node)
            self.func = outer

        def visit_Call(self, node):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == attr:
                found.append(self.func)
            self.generic_visit(node)

    Finder().visit(tree)
    return found


def test_only_the_walk_flattens_trees_with_paths():
    users = {
        f"{name}.{fn}"
        for name, tree in SOURCES.items()
        for fn in _calls(tree, "tree_flatten_with_path")
    }
    assert users == {"_targets.walk"}


def test_only_the_compat_layer_reads_jax_internals():
    internals = []
    for name, tree in SOURCES.items():
        if name == "_jax_compat":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("params", "aval", "avals"):
                internals.append(f"{name}: .{node.attr} (line {node.lineno})")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [node.module] if isinstance(node, ast.ImportFrom) else []
                mods += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                for mod in filter(None, mods):
                    if mod.startswith(("jax._src", "jax.extend", "jax.core")):
                        internals.append(f"{name}: imports {mod}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("core", "extend", "_src")
                and isinstance(node.value, ast.Name)
                and node.value.id == "jax"
            ):
                internals.append(f"{name}: jax.{node.attr} (line {node.lineno})")
    assert not internals, internals


def test_every_primitive_with_a_rule_is_one_the_probe_follows():
    """One description of how axes move serves both: the rule table and the probe's
    table cover the same primitives."""
    assert set(_rules.RULES) == set(_axes.KNOWN)


@pytest.mark.parametrize(
    "shape, moves",
    [
        ((1, 6, 6), (1, 2)),  # a layer indexed out of a stack
        ((6, 5), (None, 0, 1)),  # w[None]
        ((3, 1, 6), (0, 2, None)),  # drop one size-1 axis, add another
        ((2, 3), None),  # a real reshape mixes axes
    ],
)
def test_reshape_moves(shape, moves):
    import jax
    import jax.numpy as jnp

    target = {
        (1, 6, 6): (6, 6),
        (6, 5): (1, 6, 5),
        (3, 1, 6): (3, 6, 1),
        (2, 3): (3, 2),
    }[shape]
    eqn = jax.make_jaxpr(lambda w: jnp.reshape(w, target))(jnp.ones(shape)).jaxpr.eqns[0]
    assert _axes.moves(eqn, shape) == moves
