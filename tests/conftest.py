"""Test set-up: 8 fake CPU devices for sharding tests, fast-compiling XLA flags
(`tests/subproc.py`), offline hubs, absl flags parsed (grain), a persistent compilation cache, and
libtpu kept quiet. Programs the tests start get the same through `subproc.child_env`.

- `JAX_PLATFORMS=cpu`: with libtpu installed (the `tpu` extra, for ahead-of-time TPU compiles) jax
  would otherwise try to open a TPU at start-up; topologies for AOT compiles work without it.
  `ALLOW_MULTIPLE_LIBTPU_LOAD=1` lets several test processes (pytest-xdist workers) load libtpu.
- The persistent compilation cache (`.jax_compilation_cache/` in the repository, git-ignored) is
  shared by the xdist workers: a program compiled by one test (or an earlier run) is read back by
  the others. It never changes results, only compile time; delete the folder to start cold.
"""

import os

from tests import subproc

REPO = subproc.REPO

os.environ.setdefault("XLA_FLAGS", subproc.xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", subproc.CACHE_DIR)

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# --------------------------------------------------------------------------------------------
# where a test's time goes: `ADASTATE_COMPILE_REPORT=FILE pytest ...` appends one JSON line per
# test (per xdist worker) with its wall time and, in this process, the seconds spent tracing,
# lowering and XLA-compiling, the number of backend compiles and of persistent-cache hits.
# Subprocesses a test starts are not counted (their time shows as wall time only).
# --------------------------------------------------------------------------------------------

_REPORT = os.environ.get("ADASTATE_COMPILE_REPORT")
if _REPORT:
    import json
    import time

    import pytest
    from jax import monitoring

    _EVENTS = {
        "/jax/core/compile/backend_compile_duration": "compile_s",
        "/jax/core/compile/jaxpr_trace_duration": "trace_s",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    }
    _acc: dict = {}

    def _on_duration(event, duration, **kwargs):
        key = _EVENTS.get(event)
        if key:
            _acc[key] = _acc.get(key, 0.0) + duration
            if key == "compile_s":
                _acc["compiles"] = _acc.get("compiles", 0) + 1

    def _on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            _acc["cache_hits"] = _acc.get("cache_hits", 0) + 1

    monitoring.register_event_duration_secs_listener(_on_duration)
    monitoring.register_event_listener(_on_event)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        _acc.clear()
        t0 = time.perf_counter()
        yield
        row = {"test": item.nodeid, "wall_s": round(time.perf_counter() - t0, 2)}
        row.update({k: round(v, 2) if isinstance(v, float) else v for k, v in _acc.items()})
        with open(_REPORT, "a") as fh:
            fh.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------------
# the order xdist hands modules out (`--dist loadscope`; its reorder by test count is turned off
# in `pytest_configure`): the slowest first, so that no worker starts a long module while the
# other runs out of work (the reorder by test count put test_resume.py's single 35-s test last:
# ~30 s of one idle worker at the end). Module times in s, measured with `ADASTATE_COMPILE_REPORT`
# on 2 cores on 2026-12-02; only their order matters, and a module missing here runs after these,
# in collection order.
# --------------------------------------------------------------------------------------------
MODULE_SECONDS = {
    "tests/streaming/test_rollout.py": 53,
    "tests/training/test_resume.py": 37,
    "tests/training/test_objectives.py": 36,
    "tests/streaming/test_exit_step.py": 33,
    "tests/models/test_wan.py": 29,
    "tests/training/test_dmd.py": 27,
    "tests/test_tpu_compile.py": 26,
    "tests/training/test_ode_trajectories.py": 25,
    "tests/training/test_state_learning.py": 22,
    "tests/test_rollout_cli.py": 21,
    "tests/training/test_sharding_and_checkpoints.py": 20,
    "tests/models/test_vae.py": 18,
    "tests/training/test_vae_objective.py": 17,
    "tests/models/test_block_attention.py": 17,
    "tests/training/test_layouts.py": 17,
    "tests/test_notebook.py": 14,
}


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: `--no-loadscope-reorder`
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    def module_seconds(item):
        return -MODULE_SECONDS.get(item.nodeid.split("::")[0], 0)

    items.sort(key=module_seconds)  # stable: tests keep their order inside a module
