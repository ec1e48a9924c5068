"""The library's shape: no import cycles, one lazy import, ops classes that all speak ``UpdateOps``."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from optimi._fused.ops import SPLIT, FusedOps
from optimi._fused.packing import PackedOps
from optimi._ops import FOREACH_OPS, TENSOR_OPS, ForeachOps, TensorOps, UpdateOps

PACKAGE = Path(__file__).resolve().parent.parent / "optimi"

#: the imports of optimi modules that run inside a function rather than at import time: one
#: deliberate import, [Note: the single lazy import] in ``optimi/optimizer.py``, made where the
#: single-process code first meets a sharded parameter (the optimizer's step) or a distributed
#: model (gradient release's installer registry). ``optimi.distributed`` builds on those modules,
#: so importing it at their module level would be a cycle.
ALLOWED_LAZY_IMPORTS = {
    ("optimi.optimizer", "optimi.distributed"),
    ("optimi.gradient_release", "optimi.distributed"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(node: ast.AST, known: set[str]) -> list[str]:
    """The optimi modules an ``import`` statement loads (``from optimi import adam`` loads ``optimi.adam``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "optimi"]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "optimi":
        submodules = [f"{node.module}.{alias.name}" for alias in node.names]
        return [name for name in submodules if name in known] or [node.module]
    return []


def top_level_imports(tree: ast.Module, known: set[str]) -> list[str]:
    """Imports that run when the module is imported: everything outside function bodies."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            found.extend(imported_modules(child, known))
            visit(child)

    visit(tree)
    return found


def lazy_imports(tree: ast.Module, known: set[str]) -> list[str]:
    """Imports inside function bodies."""
    found = []
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                found.extend(imported_modules(node, known))
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, or ``None``."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Module-level and lazy import edges between optimi's modules."""
    known = set(modules())
    eager, lazy = {}, {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        # a package's own submodules are loaded after it: an edge from a submodule to its parent
        # package is the normal ``from optimi._fused.ops import ...`` inside ``optimi/_fused``
        eager[name] = {target for target in top_level_imports(tree, known) if target != name}
        lazy[name] = set(lazy_imports(tree, known))
    return eager, lazy


def test_the_import_graph_has_no_cycle():
    eager, _ = import_graph()
    parents = {name: {p for p in eager if name.startswith(p + ".")} for name in eager}
    # importing optimi.x imports its parent packages first; their own imports of x are not cycles
    graph = {name: {t for t in targets if t not in parents[name]} for name, targets in eager.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_find_cycle_finds_one():
    """The checker itself: a planted cycle is reported."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_only_lazy_imports_are_the_documented_ones():
    _, lazy = import_graph()
    found = {
        (module, "optimi.distributed" if target.startswith("optimi.distributed") else target)
        for module, targets in lazy.items()
        for target in targets
        if not module.startswith("optimi.distributed")
    }
    assert found == ALLOWED_LAZY_IMPORTS


def test_the_single_process_modules_never_import_distributed_at_import_time():
    eager, _ = import_graph()
    single = {name: targets for name, targets in eager.items() if not name.startswith("optimi.distributed")}
    offenders = {name: t for name, targets in single.items() for t in targets if t.startswith("optimi.distributed")}
    assert offenders == {}


# -- ops conformance ------------------------------------------------------------------------------

PROTOCOL_METHODS = sorted(
    name for name, value in vars(UpdateOps).items() if callable(value) and not name.startswith("_")
)
OPS_CLASSES = [TensorOps, ForeachOps, FusedOps, PackedOps]


def test_the_protocol_lists_every_primitive():
    assert len(PROTOCOL_METHODS) == 22 and "sum_into_" in PROTOCOL_METHODS


@pytest.mark.parametrize("ops_class", OPS_CLASSES, ids=lambda c: c.__name__)
def test_every_ops_class_has_the_protocols_methods_and_parameters(ops_class):
    for name in PROTOCOL_METHODS:
        method = getattr(ops_class, name, None)
        assert method is not None, f"{ops_class.__name__} lacks {name}"
        expected = [p for p in inspect.signature(getattr(UpdateOps, name)).parameters if p != "self"]
        actual = [p for p in inspect.signature(method).parameters if p != "self"]
        assert actual == expected, f"{ops_class.__name__}.{name}{actual} != UpdateOps.{name}{expected}"


def test_every_ops_instance_satisfies_the_protocol():
    instances = [TENSOR_OPS, FOREACH_OPS, FusedOps(False, dict(SPLIT)), PackedOps([], dict(SPLIT))]
    assert all(isinstance(ops, UpdateOps) for ops in instances)


def values(seed: int) -> torch.Tensor:
    return torch.rand(33, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) + 0.5


#: each primitive with its arguments: tensors by seed, scalars as floats; the first tensor is written
CALLS = [
    ("copy_", [0, 1], {}),
    ("add_", [0, 1], {"alpha": -0.3}),
    ("add_scalar_", [0], {"value": 0.25}),
    ("sub_", [0, 1], {}),
    ("mul_", [0], {"value": 0.9}),
    ("div_", [0], {"value": 1.7}),
    ("mul_tensor_", [0, 1], {}),
    ("div_tensor_", [0, 1], {}),
    ("lerp_", [0, 1], {"weight": 0.1}),
    ("addcmul_", [0, 1, 2], {"value": 0.01}),
    ("addcdiv_", [0, 1, 2], {"value": -0.5}),
    ("sqrt_", [0], {}),
    ("sqrt_into_", [0, 1], {}),
    ("sign_", [0], {}),
    ("abs_", [0], {}),
    ("clamp_min_", [0], {"value": 1.0}),
    ("clamp_min", [0], {"value": 1.0}),
    ("copy_of", [0], {}),
]


@pytest.mark.parametrize("name, seeds, scalars", CALLS, ids=[c[0] for c in CALLS])
def test_every_ops_class_computes_the_same_values(name, seeds, scalars):
    """The for-loop, foreach and fused primitives agree on float32 tensors (the fused ones run eagerly here)."""
    expected = None
    for ops in (TENSOR_OPS, FOREACH_OPS, FusedOps(False, dict(SPLIT))):
        tensors = [values(seed) for seed in seeds]
        arguments = [[t] for t in tensors] if ops is FOREACH_OPS else tensors
        result = getattr(ops, name)(*arguments, **scalars)
        written = result[0] if isinstance(result, (list, tuple)) else result
        if expected is None:
            expected = written
        torch.testing.assert_close(written, expected, rtol=1e-6, atol=0)


def test_every_ops_class_sums_alike():
    for ops in (TENSOR_OPS, FOREACH_OPS, FusedOps(False, dict(SPLIT))):
        x = values(3)
        total = torch.zeros(())
        foreach = ops is FOREACH_OPS
        ops.sum_into_([total] if foreach else total, [x] if foreach else x)
        torch.testing.assert_close(total, x.sum(), rtol=1e-6, atol=0)
        assert (ops.numel([x]) if foreach else ops.numel(x)) in ([33], 33)
        assert (ops.scratch([x])[0] if foreach else ops.scratch(x)) is x


# -- documentation ----------------------------------------------------------------------------------


def public_modules() -> list[str]:
    return [name for name in modules() if not any(part.startswith("_") for part in name.split("."))]


@pytest.mark.parametrize("module", public_modules())
def test_every_public_name_is_in_the_api_reference(module):
    """Each name in a public module's ``__all__`` appears in ``docs/api.md`` (as `name` or `name(...)`)."""
    import importlib
    import re

    api = (PACKAGE.parent / "docs" / "api.md").read_text()
    exported = getattr(importlib.import_module(module), "__all__", [])
    missing = [name for name in exported if name != "__version__" and not re.search(rf"`(\w+\.)*{name}[`(]", api)]
    assert missing == [], f"{module}: {missing} not in docs/api.md"
