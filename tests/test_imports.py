"""The import graph of mcti_jax/: no cycles, and no import that points up the layers of LAYERS.

Read with `ast`, so an import inside a function counts: one that dodges a
cycle at import time still ties the two modules together. Cycles are refused
between modules and between the names of LAYERS (a package counted as one), so
names in one layer may import each other one way only. `importlib` calls (the
registries of methods, evaluators, guides) are not seen; they stay inside
their package. A new or moved module fails `test_every_module_is_placed` until
it is placed in LAYERS, the one thing to edit when the package layout changes.

  python tests/test_imports.py   # prints the graph as layers
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "mcti_jax"

# Lowest first. A name is a top-level module or a package of mcti_jax/ (its
# submodules share its layer; "__init__" is mcti_jax/__init__.py). A module may
# import from its own layer and those below it.
LAYERS = [
  ("__init__", "errors", "paths", "config_files", "plots"),  # base utilities
  ("runtime",),  # the mesh, several processes, stopping on a signal
  ("models", "data"),  # the frozen backbones; images and shots
  ("tokens",),  # class tokens: placeholders, conditioning, the subspace, exports
  ("generation",),  # drawing with tokens; CLIP features of images
  ("classify", "guides"),  # classifiers made of tokens; the frozen classifiers DCT learns from
  ("tiny",),  # the tiny world: its models' pretraining, data, captions, guides, judges
  ("methods", "training"),  # one module per method; the trainer, which names none
  ("retrieval",),  # composite retrieval, GAIR, `mcti retrieve`
  ("evaluation",),  # the N-shot x evaluator x seed harness
  ("demos",),  # the experiments of `mcti demo`
  ("configs",),  # the configs that ship: each names what it runs
  ("cli",),
]


def module_files(root: Path = ROOT) -> dict[str, Path]:
  """Dotted module name -> file, for every .py under root (a package's __init__.py is the package)."""
  out = {}
  for path in sorted(root.rglob("*.py")):
    parts = (root.name, *path.relative_to(root).with_suffix("").parts)
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _resolve(name: str, known: Iterable[str]) -> str | None:
  """The longest known module that `name` is or lies in (an attribute of it, a class of it...)."""
  parts = name.split(".")
  for end in range(len(parts), 0, -1):
    if ".".join(parts[:end]) in known:
      return ".".join(parts[:end])
  return None


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
  """Module -> the modules of root's package it imports, at module level or inside functions."""
  files = module_files(root)
  graph = {}
  for module, path in files.items():
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from .x import y, from .. import z
          parts = package.split(".")
          base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{alias.name}" for alias in node.names]  # y may be a submodule or a name in base
      else:
        continue
      targets.update(t for t in (_resolve(n, files) for n in names) if t is not None and t != module)
    graph[module] = targets
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle [a, b, ..., a] of graph, or None."""
  state = {}  # 1: on the current path, 2: done
  path = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    state[node] = 2
    path.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def unit(module: str) -> str:
  """The LAYERS name of a module: mcti_jax.retrieval.gair -> retrieval; mcti_jax -> __init__."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
  """The graph between LAYERS names, without a name's imports of itself."""
  out = {}
  for module, targets in graph.items():
    out.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
  return out


def layer_index(layers=LAYERS) -> dict[str, int]:
  return {name: i for i, names in enumerate(layers) for name in names}


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
  """'a (layer i) -> b (layer j)' for every import of a module from a higher layer."""
  index = layer_index(layers)
  return [f"{m} (layer {index[unit(m)]}) -> {t} (layer {index[unit(t)]})"
          for m, targets in sorted(graph.items()) for t in sorted(targets)
          if unit(m) in index and unit(t) in index and index[unit(t)] > index[unit(m)]]


def report(graph: dict[str, set[str]], layers=LAYERS) -> str:
  """The layers from the top down, each name with what it imports from outside itself."""
  units = unit_graph(graph)
  lines = []
  for i in reversed(range(len(layers))):
    for name in layers[i]:
      lines.append(f"{i:>2}  {name:<16} -> {', '.join(sorted(units.get(name, ()))) or '-'}")
  cycle, up = find_cycle(graph), upward_imports(graph, layers)
  lines.append(f"{len(graph)} modules; cycle: {' -> '.join(cycle) if cycle else 'none'}; "
               f"upward imports: {len(up) or 'none'}")
  return "\n".join(lines + up)


def test_every_module_is_placed():
  names = set(unit_graph(import_graph()))
  listed = [name for names_ in LAYERS for name in names_]
  assert not names - set(listed), f"place these in LAYERS: {sorted(names - set(listed))}"
  assert not set(listed) - names, f"LAYERS names what mcti_jax/ no longer has: {sorted(set(listed) - names)}"
  assert len(listed) == len(set(listed)), "a name is in LAYERS twice"


def test_no_import_cycles():
  graph = import_graph()
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)
  cycle = find_cycle(unit_graph(graph))  # also between packages, e.g. a.x -> b.y and b.z -> a.w
  assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_no_upward_imports():
  up = upward_imports(import_graph())
  assert not up, "imports pointing up LAYERS:\n" + "\n".join(up)


def test_checker_sees_cycles_and_function_level_imports(tmp_path):
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
  package = tmp_path / "pkg"
  (package / "sub").mkdir(parents=True)
  for name, text in {"__init__.py": "", "sub/__init__.py": "", "a.py": "from pkg.sub import b\n",
                     "sub/b.py": "def f():\n  from .. import a\n  return a\n"}.items():
    (package / name).write_text(text)
  graph = import_graph(package)
  assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
  assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
  assert upward_imports(graph, [("a",), ("sub",)]) == ["pkg.a (layer 0) -> pkg.sub.b (layer 1)"]


if __name__ == "__main__":
  print(report(import_graph()))
