"""Experiment configs: reading and validating the `ml_collections` ConfigDicts of `configs/`.

Owns: the names every config section must carry (`model`, `mesh`, `sharding_rules`, `stream`,
`sampler`, `vae`, `text`, `checkpoint`, `seed`), the lists of valid policy / kind names, turning
`config.model` into a `WanConfig`, validation with one `ValueError` naming the offending field
(`config.<section>.<field>: ...`), and JSON round trips of a config.

Must not know: streaming, training, samplers' internals or files. It imports only the model's
static config and the sharding rules, so any launch script can validate a config before it builds
anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping

import ml_collections
from flax import nnx

from adastate_jax import sharding as shd
from adastate_jax.models import wan

ANCHOR_POLICIES = ("window", "full", "sink", "ema_sink", "adastate")
TIME_LAYOUTS = ("relative", "absolute")
FIRST_CHUNK_MODES = ("mask", "noise")
VAE_KINDS = ("none", "patch", "wan")
TEXT_KINDS = ("embeddings", "umt5", "words")
SECTIONS = ("model", "mesh", "sharding_rules", "stream", "sampler", "vae", "text", "checkpoint", "seed")


def _field(cfg, dotted: str):
    """cfg.<dotted>, or a ValueError naming the missing field."""
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            raise ValueError(f"config.{dotted}: missing") from None
    return node


def _bad(dotted: str, msg: str) -> ValueError:
    return ValueError(f"config.{dotted}: {msg}")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _coerce(name: str, kind, value):
    """Convert a config value to the WanConfig field's type, naming the field on failure."""
    try:
        if name == "patch_size":
            out = tuple(int(p) for p in value)
            if any(float(p) != q for p, q in zip(value, out)):
                raise ValueError
            return out
        if kind in ("int", int):
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            return int(value)
        if kind in ("float", float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind in ("bool", bool):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind in ("str", str):
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise _bad(f"model.{name}", f"expected {kind}, got {value!r}") from None
    return value


def model_config(cfg) -> wan.WanConfig:
    """`config.model` -> WanConfig. Every WanConfig field must be present; errors name the field."""
    section = _field(cfg, "model")
    given = dict(section.items()) if hasattr(section, "items") else None
    if given is None:
        raise _bad("model", f"must be a ConfigDict, got {type(section).__name__}")
    fields = {f.name: f for f in dataclasses.fields(wan.WanConfig)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise _bad(f"model.{unknown[0]}", f"unknown field(s) {unknown}; WanConfig has {sorted(fields)}")
    missing = sorted(set(fields) - set(given))
    if missing:
        raise _bad(f"model.{missing[0]}", f"missing field(s) {missing}")
    kwargs = {name: _coerce(name, f.type, given[name]) for name, f in fields.items()}
    return wan.WanConfig(**kwargs)  # __post_init__ validates, naming config.model.<field>


# --------------------------------------------------------------------------------------------
# Mesh and sharding
# --------------------------------------------------------------------------------------------


def sharding_rules(cfg) -> tuple[tuple[str, object], ...]:
    """`config.sharding_rules` normalised (see `sharding.rules_from_config`), errors naming the field.

    Every logical axis of the default table must have a rule, and no unknown logical name may
    appear (a typo would otherwise leave the intended axis unsharded without a word).
    """
    raw = _field(cfg, "sharding_rules")
    try:
        rules = shd.rules_from_config(raw)
    except (ValueError, TypeError) as e:
        raise _bad("sharding_rules", str(e)) from None
    known = {name for name, _ in shd.DEFAULT_RULES}
    names = [name for name, _ in rules]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise _bad("sharding_rules", f"unknown logical axis name(s) {unknown}; known: {sorted(known)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _bad("sharding_rules", f"logical axis name(s) {dup} have more than one rule")
    absent = sorted(known - set(names))
    if absent:
        raise _bad("sharding_rules", f"no rule for logical axis name(s) {absent}")
    return rules


def mesh_sizes(cfg, mesh=None, device_count: int | None = None) -> dict[str, int]:
    """Sizes of the mesh axes: from `mesh` (a jax Mesh or a dict) or from `config.mesh`.

    A -1 in `config.mesh` fills the devices left (`device_count`, default `jax.device_count()`).
    """
    if mesh is not None:
        shape = dict(mesh.shape) if hasattr(mesh, "shape") and not isinstance(mesh, Mapping) else dict(mesh)
        return {a: int(shape.get(a, 1)) for a in shd.MESH_AXES}
    sizes = {}
    for a in shd.MESH_AXES:
        v = _field(cfg, f"mesh.{a}")
        if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and v != -1):
            raise _bad(f"mesh.{a}", f"must be a positive int or -1 (fill), got {v!r}")
        sizes[a] = v
    fill = [a for a, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise _bad(f"mesh.{fill[1]}", f"at most one mesh axis may be -1, got {fill}")
    if fill:
        if device_count is None:
            import jax

            device_count = jax.device_count()
        known = math.prod(v for v in sizes.values() if v != -1)
        if device_count % known:
            raise _bad(
                f"mesh.{fill[0]}", f"-1 cannot fill {device_count} devices with the other axes {sizes}"
            )
        sizes[fill[0]] = device_count // known
    return sizes


def _axes_size(axes, sizes: dict[str, int]) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(sizes[a] for a in axes)


def validate_mesh(cfg, model: wan.WanConfig, sizes: dict[str, int], rules) -> None:
    """The model dims and the batch divide the mesh axes the rules shard them over."""
    wan.validate_mesh_divisibility(model, sizes)  # names config.model.<field>
    batch = _field(cfg, "stream.batch_size")
    batch_axes = dict(rules).get("batch")
    n = _axes_size(batch_axes, sizes)
    if batch % n:
        raise _bad(
            "stream.batch_size",
            f"{batch} is not divisible by the mesh axes {batch_axes} the batch is sharded over "
            f"(size {n}; mesh {sizes})",
        )
    # every parameter dim against the axes its logical name maps to (covers custom rules tables)
    _, abstract = wan.abstract_model(model)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
    shapes = nnx.to_pure_dict(abstract)
    flat_specs = dict(_flatten(specs))
    for path, leaf in _flatten(shapes):
        logical = flat_specs.get(path)
        if logical is None:
            continue
        mesh_spec = shd.logical_to_mesh_spec(tuple(logical), rules)
        for dim, (size, axes) in enumerate(zip(leaf.shape, tuple(mesh_spec))):
            n = _axes_size(axes, sizes)
            if size % n:
                raise _bad(
                    "sharding_rules",
                    f"parameter {path} dim {dim} (logical {logical[dim]!r}, size {size}) is not "
                    f"divisible by mesh axes {axes} (size {n}; mesh {sizes})",
                )


def _flatten(tree, prefix=""):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}/{k}" if prefix else str(k))
    else:
        yield prefix, tree


# --------------------------------------------------------------------------------------------
# Stream, sampler, vae, text
# --------------------------------------------------------------------------------------------


def _check_choice(cfg, dotted: str, choices, what: str) -> None:
    v = _field(cfg, dotted)
    if v not in choices:
        raise _bad(dotted, f"unknown {what} {v!r}; choose from {list(choices)}")


def _check_int(cfg, dotted: str, minimum: int) -> int:
    v = _field(cfg, dotted)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(dotted, f"must be an int, got {v!r}")
    if v < minimum:
        raise _bad(dotted, f"must be >= {minimum}, got {v}")
    return v


def validate_stream(cfg, model: wan.WanConfig) -> None:
    _check_choice(cfg, "stream.anchor", ANCHOR_POLICIES, "policy")
    _check_choice(cfg, "stream.time_layout", TIME_LAYOUTS, "time layout")
    _check_choice(cfg, "stream.first_chunk", FIRST_CHUNK_MODES, "first-chunk mode")
    chunk = _check_int(cfg, "stream.chunk_frames", 1)
    _check_int(cfg, "stream.window_frames", 0)
    state = _check_int(cfg, "stream.state_frames", 0)
    sink = _check_int(cfg, "stream.sink_frames", 0)
    max_frames = _check_int(cfg, "stream.max_frames", 1)
    _check_int(cfg, "stream.sink_refresh_every", 0)
    _check_int(cfg, "stream.batch_size", 1)
    anchor = _field(cfg, "stream.anchor")
    if anchor == "adastate" and state < 1:
        raise _bad("stream.state_frames", f"the adastate policy needs at least one state frame, got {state}")
    if anchor in ("sink", "ema_sink") and sink < 1:
        raise _bad("stream.sink_frames", f"the {anchor} policy needs at least one sink frame, got {sink}")
    if max_frames < chunk:
        raise _bad("stream.max_frames", f"{max_frames} is smaller than one chunk (chunk_frames={chunk})")
    decay = _field(cfg, "stream.ema_decay")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise _bad("stream.ema_decay", f"must be in [0, 1), got {decay!r}")
    if not isinstance(_field(cfg, "stream.recache_on_switch"), bool):
        raise _bad("stream.recache_on_switch", "must be a bool")
    _, ph, pw = model.patch_size
    for dotted, p in (("stream.latent_h", ph), ("stream.latent_w", pw)):
        v = _check_int(cfg, dotted, 1)
        if v % p:
            raise _bad(dotted, f"{v} is not divisible by the patch size {p} (config.model.patch_size)")


def validate_sampler(cfg) -> None:
    n = _check_int(cfg, "sampler.num_train_timesteps", 1)
    shift = _field(cfg, "sampler.shift")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise _bad("sampler.shift", f"must be > 0, got {shift!r}")
    steps = _field(cfg, "sampler.denoising_steps")
    if isinstance(steps, (str, bytes)) or not hasattr(steps, "__len__") or len(steps) == 0:
        raise _bad("sampler.denoising_steps", f"must be a non-empty sequence of timesteps, got {steps!r}")
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= n:
            raise _bad(
                "sampler.denoising_steps",
                f"timestep {s!r} is outside (0, {n}] (config.sampler.num_train_timesteps={n})",
            )
    if any(b >= a for a, b in zip(steps, steps[1:])):
        raise _bad("sampler.denoising_steps", f"must be strictly decreasing, got {list(steps)}")
    if not isinstance(_field(cfg, "sampler.warp_denoising_steps"), bool):
        raise _bad("sampler.warp_denoising_steps", "must be a bool")
    ctx = _field(cfg, "sampler.context_noise")
    if isinstance(ctx, bool) or not isinstance(ctx, (int, float)) or not 0 <= ctx < n:
        raise _bad("sampler.context_noise", f"must be in [0, {n}), got {ctx!r}")
    g = _field(cfg, "sampler.guidance_scale")
    if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0:
        raise _bad("sampler.guidance_scale", f"must be >= 0, got {g!r}")


def validate(cfg, mesh=None, *, check_mesh: bool = True) -> wan.WanConfig:
    """Validate a whole config; return its WanConfig.

    mesh: a jax Mesh or {axis: size} to check divisibility against; None uses `config.mesh` with
    -1 resolved against `jax.device_count()`. check_mesh=False skips the mesh checks (for tools
    that do not shard, e.g. converting on the host). Raises ValueError naming the first bad field.
    """
    missing = [s for s in SECTIONS if s not in cfg]
    if missing:
        raise _bad(missing[0], f"missing section(s) {missing}")
    model = model_config(cfg)
    rules = sharding_rules(cfg)
    validate_stream(cfg, model)
    validate_sampler(cfg)
    _check_choice(cfg, "vae.kind", VAE_KINDS, "VAE kind")
    _check_choice(cfg, "text.kind", TEXT_KINDS, "text conditioning kind")
    for f in ("tokenizer_path", "embeddings_path", "cache_dir"):
        if not isinstance(_field(cfg, f"text.{f}"), str):
            raise _bad(f"text.{f}", "must be a string path ('' for none)")
    if not isinstance(_field(cfg, "checkpoint.path"), str):
        raise _bad("checkpoint.path", "must be a string path ('' for none)")
    _check_int(cfg, "seed", 0)
    if check_mesh:
        validate_mesh(cfg, model, mesh_sizes(cfg, mesh), rules)
    return model


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def vae_config(cfg):
    """`config.vae.config` fields (empty: Wan2.1's VAE) as a `WanVAEConfig`."""
    from adastate_jax.models import vae

    extra = dict(cfg.vae.config) if "config" in cfg.vae else {}
    try:
        return vae.WanVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.vae.config: {e}") from None


def umt5_config(cfg):
    """`config.text.umt5` fields if present, else umt5-xxl (Wan's text encoder), as a `UMT5Config`."""
    from adastate_jax.models import umt5

    extra = dict(cfg.text.umt5) if "umt5" in cfg.text else {}
    try:
        return umt5.UMT5Config(**extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.text.umt5: {e}") from None


def config_to_json(cfg) -> str:
    """A ConfigDict (or dict) as indented JSON (tuples become lists)."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return json.dumps(d, indent=2, sort_keys=True)


def _tuples(x):
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return x


def config_from_json(s: str) -> ml_collections.ConfigDict:
    """Inverse of `config_to_json`: JSON lists come back as tuples (as the config files write them,
    so `--config.x=...` overrides and type-safe assignment keep working)."""
    return ml_collections.ConfigDict(_tuples(json.loads(s)))
