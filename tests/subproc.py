"""The environment of the tests and of the programs they start.

`COMPILE_FLAGS`: XLA:CPU compile settings for the test suite only (this process, its xdist workers
and every program a test starts). The suite's time is mostly XLA compiling small programs that
then run for milliseconds, so it compiles them the fast way:
  * `--xla_backend_optimization_level=0`: LLVM at -O0, about twice as fast (the exit-step gradient
    program of `tests/streaming/test_exit_step.py`: 23.3 s -> 12.1 s, same run time). It changes
    how LLVM lowers XLA's code, not XLA's program or its round-off.
  * `--xla_cpu_use_fusion_emitters=false`: XLA:CPU's older loop emitters instead of the fusion
    emitters users get: the whole default suite 383 s -> 303 s on 2 cores. They compute the same
    math with other float round-off: every tolerance-based check holds under either.
Users' jobs never see these flags (set by `tests/conftest.py` and `child_env` only).

`USER_NUMERICS`: per-program compile options (`jax.jit(..., compiler_options=USER_NUMERICS)`,
`Streamer(..., compiler_options=USER_NUMERICS)`) that restore XLA:CPU's default emitters, for the
tests whose claim is bit-for-bit equality between programs (scan == generator == segments, a
committed slot == the state the step emitted): that property is one of the emitters users get
(under the loop emitters the scan and the generator differ at round-off), so it is checked there.

`FAST_COMPILE`: `USER_NUMERICS` with LLVM's expensive passes off, for large programs whose test
compares bits. `TOLERANT_COMPILE`: the suite's default emitters with LLVM's expensive passes off,
for the largest programs compared within a tolerance.

`child_env`: a copy of this process's environment for a subprocess (a launch script under test):
CPU only, `devices` fake CPU devices, the same compile flags and the suite's persistent
compilation cache, the repository importable.
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
CACHE_DIR = os.path.join(REPO, ".jax_compilation_cache")
USER_NUMERICS = {"xla_cpu_use_fusion_emitters": True}
_LLVM_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAST_COMPILE = {**_LLVM_FAST, **USER_NUMERICS}
TOLERANT_COMPILE = {**_LLVM_FAST, "xla_cpu_use_fusion_emitters": False}


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS with `devices` fake CPU devices and the suite's compile flags."""
    return f"--xla_force_host_platform_device_count={devices} {COMPILE_FLAGS}"


def child_env(devices: int = 1, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(devices),
        JAX_COMPILATION_CACHE_DIR=env.get("JAX_COMPILATION_CACHE_DIR", CACHE_DIR),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env
