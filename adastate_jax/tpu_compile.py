"""Ahead-of-time compilation for TPU slices on a machine without a TPU.

With `libtpu` importable (the `jax[tpu]` extra at the installed jax version), jax describes the
devices of a named TPU topology (`v5e:2x2`, `v5p:4x4x8`, ...) and compiles for them: the compiled
program reports its per-chip memory and FLOPs, and one that cannot fit fails at compile.

Owns: topology name -> devices -> (data, fsdp, tensor) mesh; abstract sharded arguments; compiling
a function (or an already jitted one, with its own shardings and donation) for them under the mesh
(so `shard_map`-wrapped kernels such as splash attention see the TPU mesh and lower for Mosaic
rather than the interpreter); the chips' HBM and peak bf16 FLOP/s; the per-chip report (arguments,
temporaries, outputs, total vs the chip's HBM, model FLOPs of the step and its time at a given MFU,
compile time) and the error naming stage, topology and memory when a program does not fit.

Must not know: models, training stages, configs, files. Whoever assembles a stage hands in the
function and its abstract arguments.
"""

from __future__ import annotations

import dataclasses
import functools
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

# Peak dense bf16 FLOP/s per chip (Google Cloud's published TPU specifications), for step-time
# estimates at a stated MFU.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p
    "TPU v6 lite": 918e12,  # v6e
}


class DoesNotFit(RuntimeError):
    """A stage's program needs more memory per chip than the topology's chips have."""


def libtpu_available() -> bool:
    """Whether libtpu can be imported (needed to describe and compile for TPU topologies)."""
    return importlib.util.find_spec("libtpu") is not None


def parse_topology(topology: str) -> tuple[str, int]:
    """'v5p:4x4x4' -> ('v5p:4x4x4', 1); 'v5e:16x16*2' -> ('v5e:16x16', 2): a slice name, and
    optionally `*N` for N such slices joined over the data-center network (multi-slice)."""
    name, _, count = topology.partition("*")
    try:
        slices = int(count) if count else 1
    except ValueError:
        slices = 0
    if slices < 1 or ":" not in name:
        raise ValueError(
            f"TPU topology {topology!r}: expected 'KIND:AxB[xC]' optionally followed by '*SLICES', "
            "e.g. 'v5e:2x2', 'v5p:4x4x4', 'v5e:16x16*2'"
        )
    return name, slices


@functools.cache
def topology_devices(topology: str) -> tuple:
    """The devices of a named TPU topology, e.g. 'v5e:2x2' (4 chips), 'v5p:4x4x8' (128), or
    'v5e:16x16*2' (two 256-chip slices, 512 devices with `slice_index` 0 and 1)."""
    if not libtpu_available():
        raise RuntimeError(
            f"compiling for TPU topology {topology!r} needs libtpu: "
            "pip install 'jax[tpu]==<the installed jax version>'"
        )
    from jax.experimental import topologies

    name, slices = parse_topology(topology)
    kw = {"num_slices": slices} if slices > 1 else {}
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, **kw)
    except Exception as e:
        if "lockfile" in str(e):  # libtpu serves one process at a time unless told otherwise
            raise RuntimeError(
                f"TPU topology {topology!r}: libtpu is held by another process ({e}); for "
                "compile-only processes running side by side set ALLOW_MULTIPLE_LIBTPU_LOAD=1"
            ) from e
        raise ValueError(f"TPU topology {topology!r} is not known to libtpu: {e}") from e
    return tuple(desc.devices)


def _fill(sizes: list[int], n: int) -> list[int]:
    if sizes.count(-1) == 1:
        known = math.prod(s for s in sizes if s != -1)
        sizes = [n // max(known, 1) if s == -1 else s for s in sizes]
    return sizes


def topology_mesh(topology: str, data: int = -1, fsdp: int = 1, tensor: int = 1) -> Mesh:
    """A (data, fsdp, tensor) mesh over a topology's chips; one size may be -1 (the rest).

    Devices are laid out by jax's mesh utilities (ICI neighbours share the inner axes) when the
    shape allows it, else in the topology's order. Over several slices the slices split the
    outermost of data / fsdp that they divide (only its gradient all-reduce or parameter gathers
    cross the data-center network), each slice laid out as one.
    """
    devices = topology_devices(topology)
    sizes = _fill([data, fsdp, tensor], len(devices))
    if math.prod(sizes) != len(devices) or min(sizes) <= 0:
        raise ValueError(
            f"mesh data={data} fsdp={fsdp} tensor={tensor} does not cover the {len(devices)} chips "
            f"of TPU topology {topology!r}"
        )
    from jax.experimental import mesh_utils

    slices = parse_topology(topology)[1]
    if slices > 1:
        axis = next((i for i in (0, 1) if sizes[i] % slices == 0), None)
        if axis is None:
            raise ValueError(
                f"mesh {dict(zip(shd.MESH_AXES, sizes))}: neither data nor fsdp is divisible by the "
                f"{slices} slices of TPU topology {topology!r}"
            )
        dcn = [1, 1, 1]
        dcn[axis] = slices
        ici = [s // d for s, d in zip(sizes, dcn)]
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
        return Mesh(grid, shd.MESH_AXES)
    try:
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
    mesh: str  # 'data x fsdp x tensor'
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
    # model FLOPs of one call of the whole program (all chips), from the architecture (None: not
    # counted); use these, not `flops`, for step times and MFU
    model_flops: float | None = None

    @property
    def peak_flops(self) -> float | None:
        return PEAK_BF16_FLOPS.get(self.device_kind)

    def step_seconds(self, mfu: float) -> float | None:
        """Time of one call at model-FLOPs utilisation `mfu` of the chips' peak bf16 FLOP/s."""
        if not self.model_flops or not self.peak_flops:
            return None
        return self.model_flops / (self.chips * self.peak_flops * mfu)

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.hbm_bytes is None or self.total_bytes <= self.hbm_bytes

    def row(self, mfu: float = 0.4) -> dict[str, str]:
        gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
        step = self.step_seconds(mfu)
        return {
            "stage": self.stage,
            "topology": self.topology,
            "chips": str(self.chips),
            "mesh d x f x t": self.mesh,
            "args GB": gb(self.argument_bytes),
            "temp GB": gb(self.temp_bytes),
            "out GB": gb(self.output_bytes),
            "total GB": gb(self.total_bytes),
            "HBM GB": "?" if self.hbm_bytes is None else gb(self.hbm_bytes),
            "model TFLOP": "n/a" if self.model_flops is None else f"{self.model_flops / 1e12:.4g}",
            f"s @{mfu:.0%} MFU": "n/a" if step is None else f"{step:.3g}",
            "compile s": f"{self.compile_s:.0f}",
        }

    def to_json(self, mfu: float = 0.4) -> dict:
        """Every field, the derived totals and the estimate at `mfu` (for `--json`)."""
        return {
            **dataclasses.asdict(self),
            "total_bytes": self.total_bytes,
            "fits": self.fits,
            "peak_flops": self.peak_flops,
            "mfu": mfu,
            "step_seconds": self.step_seconds(mfu),
        }


def format_table(reports: Sequence[CompileReport], mfu: float = 0.4) -> str:
    """A plain-text table, one row per report (memory per chip; model TFLOP per call, all chips)."""
    rows = [r.row(mfu) for r in reports]
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
    model_flops: float | None = None,
):
    """Compile `fn(*args)` ahead of time for the mesh's TPU chips; returns (compiled, report).

    fn: a function (jitted here with `donate_argnums` / `out_shardings`) or an already jitted one
    (anything with `.lower`, e.g. `loop.jit_train_step(run)`: compiled as it is).
    args: abstract arguments (`jax.ShapeDtypeStruct` with shardings on `mesh`, see `abstract`).
    model_flops: the program's model FLOPs (all chips) for the report's FLOPs and time columns.
    The trace runs under `jax.set_mesh(mesh)`. Raises DoesNotFit naming the stage, topology and
    memory when the compiler runs out of HBM or the reported total exceeds the chip's HBM.
    """
    kind = mesh.devices.flat[0].device_kind
    hbm = HBM_BYTES.get(kind)
    if hasattr(fn, "lower"):
        if donate_argnums or out_shardings is not None:
            raise ValueError("compile_for: an already jitted fn carries its own donation and shardings")
        jitted = fn
    else:
        jit_kw = {} if out_shardings is None else dict(out_shardings=out_shardings)
        jitted = jax.jit(fn, donate_argnums=donate_argnums, **jit_kw)
    shape = " x ".join(str(mesh.shape.get(a, 1)) for a in shd.MESH_AXES)
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = jitted.lower(*args).compile()
    except Exception as e:
        if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
            raise DoesNotFit(
                f"stage {stage!r} does not fit on TPU topology {topology!r} ({mesh.size} x {kind}, "
                f"{_gb(hbm)} GB HBM per chip, mesh {dict(mesh.shape)}): {_oom_line(e)}"
            ) from e
        raise
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    report = CompileReport(
        stage=stage,
        topology=topology,
        chips=mesh.size,
        device_kind=kind,
        mesh=shape,
        argument_bytes=int(mem.argument_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        hbm_bytes=hbm,
        flops=_flops(compiled),
        compile_s=seconds,
        model_flops=model_flops,
    )
    if check_fits and not report.fits:
        raise DoesNotFit(
            f"stage {stage!r} does not fit on TPU topology {topology!r} ({mesh.size} x {kind}, mesh "
            f"{dict(mesh.shape)}): {_gb(report.total_bytes)} GB per chip (arguments "
            f"{_gb(report.argument_bytes)}, temporaries {_gb(report.temp_bytes)}, outputs "
            f"{_gb(report.output_bytes)}) > {_gb(hbm)} GB HBM"
        )
    return compiled, report


def _oom_line(e: Exception) -> str:
    """The line of a compiler out-of-memory error that states the sizes."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    sized = [ln for ln in lines if "exceed" in ln or "Ran out of memory" in ln or "GB" in ln or "G " in ln]
    return (sized or lines or [type(e).__name__])[0][:500]


def _gb(b) -> str:
    return "?" if b is None else f"{b / 1e9:.2f}"


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, jax.sharding.PartitionSpec())
