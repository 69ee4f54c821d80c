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
