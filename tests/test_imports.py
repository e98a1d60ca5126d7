"""No import cycle in onestory_jax/: every import (top level or inside a function) of every module, read with ast."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = "onestory_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted((ROOT / PACKAGE).rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _resolve(name: str, modules: dict) -> str | None:
  """The module that importing ``name`` runs last: itself, or the package that holds the name."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def import_graph() -> dict[str, set[str]]:
  """Module -> the onestory_jax modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        targets = [f"{base}.{alias.name}" for alias in node.names]
      else:
        continue
      for target in targets:
        if target.split(".")[0] == PACKAGE:
          resolved = _resolve(target, modules)
          if resolved and resolved != name:
            edges.add(resolved)
    graph[name] = edges
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_checker_finds_a_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_package_imports():
  graph = import_graph()
  assert "onestory_jax.objective" in graph["onestory_jax.trainer"]
  assert "onestory_jax.models.wan.dit" in graph["onestory_jax.models.onestory"]
  assert "onestory_jax.sampler" in graph["onestory_jax.trainer"]  # imported inside train_and_evaluate


def test_no_import_cycles():
  found = cycles(import_graph())
  assert not found, "import cycles in onestory_jax/: " + "; ".join(" <-> ".join(c) for c in found)


def test_entry_modules_import_together():
  """A test process imports several command modules; their absl flags must not clash (DuplicateFlagError). (`train`
  and `sample` run only as programs of their own, in subprocesses.)"""
  modules = [
      "plan",
      "benchmark",
      "reference_benchmark",
      "evaluate",
      "memory_ablation",
      "ablation",
      "studio",
      "story",
      "checkpoints",
      "data.build",
      "data.build_cost",
      "data.curate",
      "data.curate_benchmark",
      "data.records_benchmark",
      "sampling_benchmark",
      "step_profile",
  ]
  code = "\n".join(f"import onestory_jax.{m}" for m in modules) + "\nprint('ok')"
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
