"""Mesh construction and logical-axis sharding rules.

Owns: the mesh axis names (`data`, `fsdp`, `tensor`), the default logical-axis rules table, and the
functions that turn logical axis names (carried as metadata on every parameter, and used for
activations and caches) into `NamedSharding`s on a mesh.

Must not know: models, anchors, optimisers or files. Everything above it imports it, it imports
nothing of the project.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """`config.mesh`: the size of each mesh axis; at most one may be -1 (fill the devices left)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = dataclasses.asdict(self)
        for axis, v in sizes.items():
            if v <= 0 and v != -1:
                raise ValueError(f"config.mesh.{axis}: must be a positive int or -1 (fill), got {v!r}")
        fill = [a for a, v in sizes.items() if v == -1]
        if len(fill) > 1:
            raise ValueError(f"config.mesh.{fill[1]}: at most one mesh axis may be -1, got {fill}")

    def sizes(self, device_count: int | None = None) -> dict[str, int]:
        """{axis: size} with a -1 resolved against `device_count` (default `jax.device_count()`)."""
        sizes = dataclasses.asdict(self)
        fill = [a for a, v in sizes.items() if v == -1]
        if fill:
            n = jax.device_count() if device_count is None else int(device_count)
            known = math.prod(v for v in sizes.values() if v != -1)
            if n % known:
                raise ValueError(
                    f"config.mesh.{fill[0]}: -1 cannot fill {n} devices with the other axes {sizes}"
                )
            sizes[fill[0]] = n // known
        return sizes


# logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated).
# One table for parameters, activations and the KV cache (MaxText habit).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),  # model dim of weights: FSDP-sharded
    ("heads", "tensor"),  # attention heads (q/k/v/o projections, cache heads)
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),  # FFN hidden dim
    ("text_embed", None),  # 4096 text features in
    ("freq", None),  # sinusoid features of the time embedding
    ("patch", None),  # flattened patch features in / out
    ("modulation", None),  # the 6 (or 2) modulation vectors
    ("act_embed", None),  # model dim of activations (replicated, heads carry the split)
    ("act_tokens", None),
    ("act_frames", None),
    ("slots", None),
    ("head_dim", None),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("vocab", "tensor"),
)


def rules_from_config(rules: Sequence[Sequence] | Mapping | None) -> tuple[tuple[str, object], ...]:
    """Normalise a rules table from a config (list of pairs, or dict) into a tuple of pairs."""
    if rules is None:
        return DEFAULT_RULES
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for item in items:
        if len(item) != 2:
            raise ValueError(f"sharding rule {item!r} must be a (logical_name, mesh_axes) pair")
        name, axes = item
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in axes if isinstance(axes, tuple) else (axes,):
            if a is not None and a not in MESH_AXES:
                raise ValueError(
                    f"sharding rule for logical axis {name!r} names mesh axis {a!r}; "
                    f"mesh axes are {MESH_AXES}"
                )
        out.append((str(name), axes))
    return tuple(out)


def logical_to_mesh_spec(logical: Sequence[str | None] | None, rules=DEFAULT_RULES) -> PartitionSpec:
    """Map a tuple of logical axis names to a PartitionSpec of mesh axes.

    Unknown logical names raise (a typo in a module's axis names must not silently replicate).
    A mesh axis is used at most once per spec; a later dim that maps to an already used axis is
    replicated instead.
    """
    if logical is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules table")
        axes = table[name]
        if axes is None:
            out.append(None)
            continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        free = tuple(a for a in axes if a not in used)
        used.update(free)
        out.append(free if len(free) > 1 else (free[0] if free else None))
    return PartitionSpec(*out)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all). One size may be -1 (fill)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive or -1")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {len(devices)} devices"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}"
        )
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the mesh from a `MeshConfig` (or any object with fields data/fsdp/tensor)."""
    return make_mesh(int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor), devices)


def state_logical_specs(state: nnx.State):
    """The logical PartitionSpec of every variable in an nnx.State (from its `out_sharding`)."""
    return nnx.get_partition_spec(state)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for every leaf of an nnx.State, from the logical names it carries."""
    specs = nnx.get_partition_spec(state)

    def to_sharding(x):
        spec = x.get_value() if isinstance(x, nnx.Variable) else x
        if not isinstance(spec, PartitionSpec):
            spec = PartitionSpec()
        return NamedSharding(mesh, logical_to_mesh_spec(tuple(spec), rules))

    return jax.tree.map(to_sharding, specs, is_leaf=lambda x: isinstance(x, (nnx.Variable, PartitionSpec)))


def named_sharding(mesh: Mesh, logical: Sequence[str | None], rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh_spec(logical, rules))


def constrain(x: jax.Array, logical: Sequence[str | None], rules=DEFAULT_RULES, mesh: Mesh | None = None):
    """`with_sharding_constraint` by logical names; a no-op outside a mesh context."""
    if mesh is None:
        mesh = _current_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_mesh_spec(logical, rules)))


def _current_mesh():
    try:
        m = jax.sharding.get_abstract_mesh()
        if m is not None and not m.empty:
            return m
    except Exception:  # pragma: no cover - older jax
        pass
    return None
