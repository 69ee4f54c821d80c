"""The environment of the tests and of the programs they start.

`COMPILE_FLAGS`: XLA:CPU compile settings for the test suite only. The suite's time is mostly XLA
compiling small programs that then run for milliseconds; LLVM at -O0 compiles them about twice as
fast (measured on the exit-step gradient program of `tests/streaming/test_exit_step.py`: 23.3 s ->
12.1 s, same run time). It changes how LLVM lowers XLA's code, not XLA's program: the suite's
bit-for-bit equalities between different programs (scan vs generator vs segments) hold under it.
Not used: `--xla_cpu_use_fusion_emitters=false` on top (4.8 s) breaks those equalities, so it
would test other numerics than users get. Users' jobs never see these flags (set by
`tests/conftest.py` and `child_env` only).

`FAST_COMPILE`: per-program compile options (`jax.jit(..., compiler_options=FAST_COMPILE)` or
`.lower(...).compile(FAST_COMPILE)`) on top of those, for the largest programs of the suite: LLVM's
expensive passes off. `TOLERANT_COMPILE` adds XLA:CPU's older loop emitters instead of the fusion
emitters users get (the exit-step gradient program: 35 s -> 22 s of compile on a loaded machine):
only for programs whose test compares against a tolerance, never for a bit-for-bit equality
between two programs (the emitters change the round-off, not the math).

`child_env`: a copy of this process's environment for a subprocess (a launch script under test):
CPU only, `devices` fake CPU devices, the same compile flags and the suite's persistent
compilation cache, the repository importable.
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_FLAGS = "--xla_backend_optimization_level=0"
CACHE_DIR = os.path.join(REPO, ".jax_compilation_cache")
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOLERANT_COMPILE = {**FAST_COMPILE, "xla_cpu_use_fusion_emitters": False}


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
