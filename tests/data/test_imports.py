"""The data package has no import circle: `records` is the leaf, the sources import it (never the
pipeline), `pipeline` is the only module that knows every source, nothing in data imports training,
the assembly layer or the launch scripts, and each module imports first in a fresh interpreter."""

import ast
import os
import subprocess
import sys

from tests.training.conftest_helpers import REPO

DATA = os.path.join(REPO, "adastate_jax", "data")
MODULES = sorted(f[:-3] for f in os.listdir(DATA) if f.endswith(".py") and f != "__init__.py")
SOURCES = ("panworld", "video_source", "trajectories")


def _imports(module: str) -> set[str]:
    """Every adastate_jax module `module` imports, at the top or inside a function."""
    with open(os.path.join(DATA, module + ".py"), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("adastate_jax")}


def _data_edges(module: str) -> set[str]:
    prefix = "adastate_jax.data."
    return {m[len(prefix) :] for m in _imports(module) if m.startswith(prefix)} & set(MODULES)


def test_data_import_graph_has_no_cycle_and_records_is_the_leaf():
    graph = {m: _data_edges(m) for m in MODULES}
    assert {"records", "pipeline", "latents", *SOURCES} <= set(MODULES)
    assert graph["records"] == set(), graph["records"]
    for m in (*SOURCES, "latents"):
        assert "pipeline" not in graph[m], f"{m} imports the pipeline"
    assert set(SOURCES) | {"records"} <= graph["pipeline"]

    state = {}  # depth-first search: 1 = on the path, 2 = done

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError(f"import circle: {' -> '.join(path + [m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = 2

    for m in MODULES:
        visit(m, [])


def test_data_imports_nothing_above_it():
    above = (
        "adastate_jax.training",
        "adastate_jax.build",
        "adastate_jax.eval",
        "adastate_jax.config",
        "launch",
    )
    for m in MODULES:
        bad = sorted(i for i in _imports(m) if i.startswith(above))
        assert not bad, f"adastate_jax/data/{m}.py imports {bad}"


def test_each_data_module_imports_first_in_a_fresh_interpreter():
    script = (
        "import importlib, sys\n"
        f"mods = {['adastate_jax.data.' + m for m in MODULES]!r}\n"
        "for first in mods:\n"
        "    for name in [n for n in sys.modules if n.startswith('adastate_jax')]:\n"
        "        del sys.modules[name]\n"
        "    for m in [first] + [x for x in mods if x != first]:\n"
        "        importlib.import_module(m)\n"
        "print('ok', len(mods))\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == f"ok {len(MODULES)}"
