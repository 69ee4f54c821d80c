"""Ahead-of-time compilation for TPU slices on a machine without a TPU.

With `libtpu` importable (the `jax[tpu]` extra at the installed jax version), jax describes the
devices of a named TPU topology (`v5e:2x2`, `v5p:4x4x8`, ...) and compiles for them: the compiled
program reports its per-chip memory and FLOPs, and one that cannot fit fails at compile.

Owns: topology name -> devices -> (data, fsdp, tensor) mesh; abstract sharded arguments; compiling
a jitted function for them under the mesh (so `shard_map`-wrapped kernels such as splash attention
see the TPU mesh and lower for Mosaic rather than the interpreter); the per-chip report (arguments,
temporaries, outputs, total vs the chip's HBM, FLOPs, compile time) and the error naming stage,
topology and memory when a program does not fit.

Must not know: models, training stages, configs, files. Whoever assembles a stage hands in the
function and its abstract arguments.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from adastate_jax import sharding as shd

GIB = 1024**3

# HBM per chip by jax `device_kind` (the topology's devices report no memory stats).
HBM_BYTES = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5": 95 * GIB,  # v5p
    "TPU v6 lite": 32 * GIB,  # v6e (Trillium)
}


class DoesNotFit(RuntimeError):
    """A stage's program needs more memory per chip than the topology's chips have."""


def libtpu_available() -> bool:
    """Whether libtpu can be imported (needed to describe and compile for TPU topologies)."""
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str) -> list:
    """The devices of a named TPU topology, e.g. 'v5e:2x2' (4 chips) or 'v5p:4x4x8' (128)."""
    if not libtpu_available():
        raise RuntimeError(
            f"compiling for TPU topology {topology!r} needs libtpu: "
            "pip install 'jax[tpu]==<the installed jax version>'"
        )
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:
        if "lockfile" in str(e):  # libtpu serves one process at a time unless told otherwise
            raise RuntimeError(
                f"TPU topology {topology!r}: libtpu is held by another process ({e}); for "
                "compile-only processes running side by side set ALLOW_MULTIPLE_LIBTPU_LOAD=1"
            ) from e
        raise ValueError(f"TPU topology {topology!r} is not known to libtpu: {e}") from e
    return list(desc.devices)


def topology_mesh(topology: str, data: int = -1, fsdp: int = 1, tensor: int = 1) -> Mesh:
    """A (data, fsdp, tensor) mesh over a topology's chips; one size may be -1 (the rest).

    Devices are laid out by jax's mesh utilities (ICI neighbours share the inner axes) when the
    shape allows it, else in the topology's order.
    """
    devices = topology_devices(topology)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) == 1:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = len(devices) // max(known, 1)
    if math.prod(sizes) != len(devices) or min(sizes) <= 0:
        raise ValueError(
            f"mesh data={data} fsdp={fsdp} tensor={tensor} does not cover the {len(devices)} chips "
            f"of TPU topology {topology!r}"
        )
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # shapes the ICI-aware layout does not handle
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, shd.MESH_AXES)


def abstract(tree, shardings):
    """ShapeDtypeStructs carrying shardings, from arrays (or abstract values) and a shardings tree
    whose leaves may stand for whole subtrees (e.g. `sharding.state_shardings` of an nnx.State)."""

    def attach(sharding, sub):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), sub)

    return jax.tree.map(attach, shardings, tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def abstract_array(shape: Sequence[int], dtype, mesh: Mesh, logical: Sequence[str | None], rules=None):
    """One abstract argument sharded by logical axis names (the rules table)."""
    sharding = shd.named_sharding(mesh, logical, rules or shd.DEFAULT_RULES)
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Per-chip memory and FLOPs of one compiled program (bytes, FLOPs, seconds)."""

    stage: str
    topology: str
    chips: int
    device_kind: str
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written in place of donated arguments (counted once)
    code_bytes: int
    hbm_bytes: int | None
    # per chip, as XLA's cost analysis counts them: rematerialised recomputation included, but the
    # body of a loop counted ONCE (a model scanned over L layers shows about one layer's FLOPs)
    flops: float
    compile_s: float

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.hbm_bytes is None or self.total_bytes <= self.hbm_bytes

    def row(self) -> dict[str, str]:
        gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
        return {
            "stage": self.stage,
            "topology": self.topology,
            "chips": str(self.chips),
            "args GB": gb(self.argument_bytes),
            "temp GB": gb(self.temp_bytes),
            "out GB": gb(self.output_bytes),
            "total GB": gb(self.total_bytes),
            "HBM GB": "?" if self.hbm_bytes is None else gb(self.hbm_bytes),
            "TFLOP/chip (loops once)": f"{self.flops / 1e12:.2f}",
            "compile s": f"{self.compile_s:.1f}",
        }


def format_table(reports: Sequence[CompileReport]) -> str:
    """A plain-text table, one row per report."""
    rows = [r.row() for r in reports]
    if not rows:
        return ""
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    line = lambda r: "  ".join(r[c].rjust(width[c]) for c in cols)  # noqa: E731
    return "\n".join([line({c: c for c in cols}), *(line(r) for r in rows)])


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def compile_for(
    fn: Callable,
    args: Sequence,
    *,
    stage: str,
    topology: str,
    mesh: Mesh,
    donate_argnums: tuple[int, ...] = (),
    out_shardings=None,
    check_fits: bool = True,
):
    """Compile `fn(*args)` ahead of time for the mesh's TPU chips; returns (compiled, report).

    args: abstract arguments (`jax.ShapeDtypeStruct` with shardings on `mesh`, see `abstract`).
    The trace runs under `jax.set_mesh(mesh)`. Raises DoesNotFit naming the stage, topology and
    memory when the compiler runs out of HBM or the reported total exceeds the chip's HBM.
    """
    kind = mesh.devices.flat[0].device_kind
    hbm = HBM_BYTES.get(kind)
    jit_kw = {} if out_shardings is None else dict(out_shardings=out_shardings)
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            lowered = jax.jit(fn, donate_argnums=donate_argnums, **jit_kw).lower(*args)
            compiled = lowered.compile()
    except Exception as e:
        if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
            raise DoesNotFit(
                f"stage {stage!r} does not fit on TPU topology {topology!r} ({mesh.size} x {kind}, "
                f"{_gb(hbm)} GB HBM per chip, mesh {dict(mesh.shape)}): {str(e).strip().splitlines()[0]}"
            ) from e
        raise
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    report = CompileReport(
        stage=stage,
        topology=topology,
        chips=mesh.size,
        device_kind=kind,
        argument_bytes=int(mem.argument_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        hbm_bytes=hbm,
        flops=_flops(compiled),
        compile_s=seconds,
    )
    if check_fits and not report.fits:
        raise DoesNotFit(
            f"stage {stage!r} does not fit on TPU topology {topology!r} ({mesh.size} x {kind}, mesh "
            f"{dict(mesh.shape)}): {_gb(report.total_bytes)} GB per chip (arguments "
            f"{_gb(report.argument_bytes)}, temporaries {_gb(report.temp_bytes)}, outputs "
            f"{_gb(report.output_bytes)}) > {_gb(hbm)} GB HBM"
        )
    return compiled, report


def _gb(b) -> str:
    return "?" if b is None else f"{b / 1e9:.2f}"


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, jax.sharding.PartitionSpec())
