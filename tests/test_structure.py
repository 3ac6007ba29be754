"""The package's shape, checked: a one-way import graph, fenced private names, a public surface.

These are the rules the design rests on (README, "Design"): the optimizer drives its layouts
and never the reverse, the checkpoint package imports one way, and private names of torch
and DeepSpeed live in one fenced module each.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import lion_sf_dist
from lion_sf_dist import _torch_private

ROOT = Path(lion_sf_dist.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (at any depth of its code)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lion_sf_dist"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("lion_sf_dist"))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_import_graph_has_no_cycle() -> None:
    graph = _imports()
    assert graph["lion_sf_dist.checkpoint.api"], "the graph sees imports"
    assert _cycle(graph) == []


def test_a_cycle_would_be_found() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("lower,upper", [
    ("lion_sf_dist.layouts", "lion_sf_dist.optimizer"),
    ("lion_sf_dist.layouts", "lion_sf_dist.checkpoint"),
    ("lion_sf_dist.layouts", "lion_sf_dist.deepspeed"),
    ("lion_sf_dist.kernel", "lion_sf_dist.optimizer"),
    ("lion_sf_dist.optimizer", "lion_sf_dist.checkpoint"),
    ("lion_sf_dist.optimizer", "lion_sf_dist.deepspeed"),
])
def test_lower_layers_do_not_import_upper_ones(lower: str, upper: str) -> None:
    graph = _imports()
    offenders = [m for m, deps in graph.items() if m.startswith(lower)
                 for d in deps if d.startswith(upper)]
    assert offenders == []


_PRIVATE_TORCH = re.compile(r"torch(\.\w+)*\._\w+|from torch[\w.]* import .*\b_[A-Za-z]\w*|"
                            r"\._(orig_mod|buffers|non_persistent_buffers_set|base|fsdp_flattened|"
                            r"init_from_local_shards\w*|MEM_FORMAT_ENCODING)\b")


def test_private_torch_names_live_in_the_fence() -> None:
    outside = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
               for p in ROOT.rglob("*.py") if p.name != "_torch_private.py"
               for i, line in enumerate(p.read_text().splitlines(), 1)
               if _PRIVATE_TORCH.search(line) and "_torch_private" not in line and "_foreach" not in line]
    assert outside == []


def test_the_fence_check_would_see_a_private_name() -> None:
    assert _PRIVATE_TORCH.search("with torch._dynamo.config.patch(x=1):")
    assert _PRIVATE_TORCH.search("model._orig_mod")
    assert _PRIVATE_TORCH.search("from torch.serialization import _get_layout")
    assert not _PRIVATE_TORCH.search("from torch.distributed.tensor import DTensor")


def test_private_torch_names_still_exist() -> None:
    missing = [name for name, present in _torch_private.names().items() if not present]
    version = __import__("torch").__version__
    assert missing == [], f"torch {version} lacks {missing}; update lion_sf_dist/_torch_private.py"


def test_public_surface() -> None:
    assert lion_sf_dist.__all__ == ["LionSF", "Coordinator"]
    from lion_sf_dist import checkpoint, deepspeed

    assert set(deepspeed.__all__) == {"initialize", "attach", "OPTIMIZER_TYPE"}
    assert {"save", "save_async", "load", "latest"} <= set(checkpoint.__all__)
