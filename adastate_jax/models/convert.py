"""Weight conversion: PyTorch checkpoints -> our Flax NNX parameter trees.

Owns: reading PyTorch weight files lazily (safetensors, sharded safetensors with an index,
`.pt`/`.pth` state dicts, Self-Forcing/LongLive training checkpoints with LoRA merged), the generic
rule engine (`Rule` tables: torch key regex -> our parameter path + transform), one error that
reports every missing / unexpected / mis-shaped key at once, and placement of each converted leaf
straight into its sharding (no whole-model host copy).

Must not know: the models themselves. Each model module contributes a declarative table
(`adastate_jax.models.wan_params.conversion_rules`, `...vae.conversion_rules`, ...), and the caller passes
the abstract target state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import nnx

# --------------------------------------------------------------------------------------------
# Tensor sources: name -> (shape, lazy loader)
# --------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


class TensorSource:
    """A read-only mapping of tensor names to lazily loaded numpy arrays."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def load(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class DictSource(TensorSource):
    """Tensors already in memory (numpy arrays or torch tensors)."""

    def __init__(self, tensors: Mapping[str, object], name: str = "state dict"):
        self._t = dict(tensors)
        self._name = name

    def keys(self):
        return list(self._t)

    def shape(self, key):
        return tuple(self._t[key].shape)

    def load(self, key):
        return _to_numpy(self._t[key])

    def describe(self):
        return self._name


class SafetensorsSource(TensorSource):
    """One or several `.safetensors` files, memory-mapped; nothing is read until `load`."""

    def __init__(self, files: Sequence[str]):
        self._files = list(files)
        self._index: dict[str, tuple[str, dict, int]] = {}
        for f in self._files:
            header, offset = _read_safetensors_header(f)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self._index:
                    raise ValueError(f"tensor {name!r} appears in both {self._index[name][0]} and {f}")
                self._index[name] = (f, info, offset)
        self._maps: dict[str, np.memmap] = {}

    def keys(self):
        return list(self._index)

    def shape(self, key):
        return tuple(self._index[key][1]["shape"])

    def load(self, key):
        f, info, offset = self._index[key]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{f}: tensor {key!r} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        if f not in self._maps:
            self._maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        raw = self._maps[f][offset + start : offset + end]
        return np.asarray(raw.view(dtype).reshape(info["shape"]))

    def describe(self):
        return ", ".join(self._files) if len(self._files) < 4 else f"{len(self._files)} safetensors files"


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n} is implausible)")
        header = fh.read(n)
        if len(header) != n:
            raise ValueError(f"{path}: truncated safetensors header")
    try:
        return json.loads(header), 8 + n
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None


def _to_numpy(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    if hasattr(t, "detach"):  # torch tensor
        import torch

        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(t)


class RenamedSource(TensorSource):
    """A view of another source with key prefixes stripped (e.g. Self-Forcing's `model.`)."""

    def __init__(self, base: TensorSource, strip_prefixes: Sequence[str] = (), drop: Sequence[str] = ()):
        self._base = base
        self._map: dict[str, str] = {}
        drop_re = [re.compile(d) for d in drop]
        for k in base.keys():
            if any(r.fullmatch(k) for r in drop_re):
                continue
            new = k
            for p in strip_prefixes:
                if new.startswith(p):
                    new = new[len(p) :]
            if new in self._map:
                raise ValueError(
                    f"keys {self._map[new]!r} and {k!r} collide after stripping {strip_prefixes}"
                )
            self._map[new] = k

    def keys(self):
        return list(self._map)

    def shape(self, key):
        return self._base.shape(self._map[key])

    def load(self, key):
        return self._base.load(self._map[key])

    def describe(self):
        return self._base.describe()


class LoraMergedSource(TensorSource):
    """Merges PEFT-style LoRA into base weights on load: W + scale * B @ A.

    Recognises `<name>.base_layer.weight` with `<name>.lora_A[.adapter].weight` and
    `<name>.lora_B[.adapter].weight` (LongLive's layout) and presents `<name>.weight`.
    `scale` is lora_alpha / rank; LongLive trains rank 256 with alpha 256 (scale 1).
    """

    _A = re.compile(r"(.*)\.lora_A(?:\.[^.]+)?\.weight")
    _B = re.compile(r"(.*)\.lora_B(?:\.[^.]+)?\.weight")

    def __init__(self, base: TensorSource, scale: float | None = None, alpha: float | None = None):
        self._base = base
        self._scale, self._alpha = scale, alpha
        self._lora: dict[str, dict[str, str]] = {}
        self._map: dict[str, str] = {}
        for k in base.keys():
            if m := self._A.fullmatch(k):
                self._lora.setdefault(m.group(1), {})["A"] = k
            elif m := self._B.fullmatch(k):
                self._lora.setdefault(m.group(1), {})["B"] = k
        for k in base.keys():
            if self._A.fullmatch(k) or self._B.fullmatch(k):
                continue
            new = k.replace(".base_layer.", ".")
            self._map[new] = k
        for name, ab in self._lora.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"LoRA for {name!r} has only {sorted(ab)} (needs lora_A and lora_B)")
            if f"{name}.weight" not in self._map:
                raise ValueError(f"LoRA for {name!r} has no base weight {name}.base_layer.weight")

    def keys(self):
        return list(self._map)

    def shape(self, key):
        return self._base.shape(self._map[key])

    def load(self, key):
        w = self._base.load(self._map[key])
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        if name in self._lora:
            a = self._base.load(self._lora[name]["A"]).astype(np.float32)  # [r, in]
            b = self._base.load(self._lora[name]["B"]).astype(np.float32)  # [out, r]
            rank = a.shape[0]
            scale = self._scale if self._scale is not None else (self._alpha or rank) / rank
            w = (w.astype(np.float32) + scale * (b @ a)).astype(w.dtype)
        return w

    def describe(self):
        return self._base.describe() + " (LoRA merged)"


def open_torch_checkpoint(
    path: str,
    *,
    use_ema: bool = False,
    lora_scale: float | None = None,
    lora_alpha: float | None = None,
) -> TensorSource:
    """Open PyTorch weights lazily.

    Accepts: a `.safetensors` file; a directory with `*.safetensors.index.json` (sharded) or
    `*.safetensors` files; a `.pt`/`.pth`/`.bin` state dict; a Self-Forcing / LongLive training
    checkpoint (a dict with `generator` / `generator_ema`, keys prefixed `model.`). LoRA adapters
    (LongLive) are merged. Framework prefixes (`model.`, `_orig_mod.`, `module.`,
    `base_model.model.`) are stripped.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    if os.path.isdir(path):
        idx = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
        if idx:
            with open(os.path.join(path, idx[0])) as fh:
                weight_map = json.load(fh).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{os.path.join(path, idx[0])}: no 'weight_map' in index")
            files = sorted({os.path.join(path, f) for f in weight_map.values()})
            missing = [f for f in files if not os.path.exists(f)]
            if missing:
                raise FileNotFoundError(f"index {idx[0]} names shards that do not exist: {missing}")
            base: TensorSource = SafetensorsSource(files)
        else:
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"directory {path!r} holds no .safetensors files or index")
            base = SafetensorsSource(files)
    elif path.endswith(".safetensors"):
        base = SafetensorsSource([path])
    else:
        base = DictSource(_torch_load_state_dict(path, use_ema=use_ema), name=path)
    prefixes = ("_orig_mod.", "module.", "base_model.model.", "model.")
    base = RenamedSource(base, strip_prefixes=prefixes)
    if any(".lora_A" in k for k in base.keys()):
        base = LoraMergedSource(base, scale=lora_scale, alpha=lora_alpha)
    return base


def _torch_load_state_dict(path: str, use_ema: bool) -> dict:
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"reading {path!r} (a torch pickle) needs torch: pip install torch") from e
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict):
        for key in ("generator_ema", "generator") if use_ema else ("generator", "generator_ema"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        for key in ("state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], dict) and not hasattr(obj[key], "shape"):
                return obj[key]
        return obj
    raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")


# --------------------------------------------------------------------------------------------
# The rule engine
# --------------------------------------------------------------------------------------------


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear_kernel(x: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> our kernel [in, out]."""
    return x.T


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a conversion table.

    source: regex that must match the whole torch key.
    target: our parameter path, '/'-separated; may use `\\1`-style references to regex groups.
    transform: numpy function applied to the torch tensor (transpose, reshape, ...).
    stack_group: index of the regex group that holds a layer number; the converted tensor goes to
      that index of the target's leading (stacked-layers) axis.
    """

    source: str
    target: str
    transform: Callable[[np.ndarray], np.ndarray] = identity
    stack_group: int | None = None


class ConversionError(ValueError):
    """Every problem of one conversion, reported together."""

    def __init__(self, source: str, missing=(), unexpected=(), mismatched=(), other=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        self.other = list(other)
        lines = [f"cannot convert {source}:"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing (our parameter <- expected torch key):")
            lines += [f"    {m}" for m in self.missing]
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected torch keys (no rule maps them):")
            lines += [f"    {u}" for u in self.unexpected]
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} wrong shapes:")
            lines += [f"    {m}" for m in self.mismatched]
        if self.other:
            lines += [f"  {o}" for o in self.other]
        super().__init__("\n".join(lines))


def flatten_target(state: nnx.State | Mapping) -> dict[str, jax.ShapeDtypeStruct]:
    """Our parameter paths ('a/b/c') -> ShapeDtypeStruct, from an (abstract) nnx.State or dict."""
    pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        flat[key] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    return flat


def _proxy(shape) -> np.ndarray:
    # zero-stride array: transforms that only transpose/reshape compute shapes without memory.
    return np.broadcast_to(np.zeros((), np.uint8), shape)


@dataclasses.dataclass
class _Plan:
    rule: Rule
    target: str
    index: int | None


def plan_conversion(
    source: TensorSource,
    rules: Sequence[Rule],
    target: Mapping[str, jax.ShapeDtypeStruct],
    ignore: Sequence[str] = (),
) -> dict[str, list[tuple[str, _Plan]]]:
    """Match every source key to a rule and check names and shapes; raise one ConversionError.

    Returns target path -> [(source key, plan)] (several for stacked targets, ordered by index).
    Reads no tensor data.
    """
    compiled = [(re.compile(r.source), r) for r in rules]
    ignore_re = [re.compile(p) for p in ignore]
    by_target: dict[str, list[tuple[str, _Plan]]] = {}
    unexpected, mismatched, other = [], [], []
    for key in sorted(source.keys()):
        if any(p.fullmatch(key) for p in ignore_re):
            continue
        for pat, rule in compiled:
            m = pat.fullmatch(key)
            if m is None:
                continue
            path = m.expand(rule.target)
            index = int(m.group(rule.stack_group)) if rule.stack_group is not None else None
            by_target.setdefault(path, []).append((key, _Plan(rule, path, index)))
            break
        else:
            unexpected.append(key)
    missing = []
    for path, spec in target.items():
        entries = by_target.get(path, [])
        stacked = entries and entries[0][1].index is not None
        if not entries:
            missing.append(f"{path} <- {_expected_keys(path, rules)}")
            continue
        if stacked:
            n = spec.shape[0]
            have = {e[1].index: e[0] for e in entries}
            for i in range(n):
                if i not in have:
                    missing.append(f"{path}[{i}] <- {_expected_keys(path, rules, layer=i)}")
            for i, k in have.items():
                if i >= n:
                    unexpected.append(f"{k} (layer {i} >= {n} layers)")
            want = tuple(spec.shape[1:])
        else:
            shapes = {source.shape(e[0]) for e in entries}
            if len(entries) > 1 and len(shapes) > 1:
                other.append(
                    f"{path} is mapped from several torch keys of different shapes: {[e[0] for e in entries]}"
                )
            want = tuple(spec.shape)
        for key, plan in entries:
            try:
                got = tuple(plan.rule.transform(_proxy(source.shape(key))).shape)
            except Exception as e:  # a transform that cannot take this shape
                mismatched.append(f"{key} {source.shape(key)} -> {path}: transform failed ({e})")
                continue
            if got != want:
                mismatched.append(
                    f"{key} {source.shape(key)} -> {path}{'[i]' if stacked else ''}: "
                    f"converted shape {got}, expected {want}"
                )
    for path in by_target:
        if path not in target:
            unexpected.extend(
                f"{k} (maps to {path}, which the model does not have)" for k, _ in by_target[path]
            )
    if missing or unexpected or mismatched or other:
        raise ConversionError(source.describe(), missing, unexpected, mismatched, other)
    for entries in by_target.values():
        entries.sort(key=lambda e: -1 if e[1].index is None else e[1].index)
    return by_target


def _expected_keys(path: str, rules: Sequence[Rule], layer: int | None = None) -> str:
    """A readable guess at the torch key a missing target wanted, from the rule that targets it.

    Group references (`\\1`) in a target are matched against the path and the captured values are
    substituted into the source pattern's groups; stacked targets get the layer number.
    """
    for r in rules:
        refs = [int(g) for g in re.findall(r"\\(\d)", r.target)]
        pattern = re.escape(r.target)
        for g in refs:
            pattern = pattern.replace(re.escape(f"\\{g}"), f"(?P<g{g}>[^/]+)", 1)
        m = re.fullmatch(pattern, path)
        if m is None:
            continue
        values = {g: m.group(f"g{g}") for g in refs}
        if r.stack_group is not None:
            values[r.stack_group] = str(layer) if layer is not None else "N"
        out, depth, group, i = [], 0, 0, 0
        src = r.source
        while i < len(src):  # replace top-level capture groups by their values
            ch = src[i]
            if ch == "\\" and i + 1 < len(src):
                if depth == 0:
                    out.append(src[i + 1] if src[i + 1] == "." else src[i : i + 2])
                i += 2
                continue
            if ch == "(" and not src.startswith("(?", i):
                if depth == 0:
                    group += 1
                    start = len(out)
                depth += 1
            elif ch == ")" and depth:
                depth -= 1
                if depth == 0:
                    del out[start:]
                    out.append(values.get(group, "<" + str(group) + ">"))
                i += 1
                continue
            if depth == 0:
                out.append(ch)
            i += 1
        return "".join(out)
    return "(no rule)"


def iter_converted(
    source: TensorSource,
    rules: Sequence[Rule],
    target: Mapping[str, jax.ShapeDtypeStruct],
    ignore: Sequence[str] = (),
) -> Iterable[tuple[str, np.ndarray]]:
    """Yield (our path, host array in the target dtype), one leaf at a time."""
    plan = plan_conversion(source, rules, target, ignore)
    for path, spec in target.items():
        entries = plan[path]
        if entries[0][1].index is None:
            key, p = entries[0]
            host = np.asarray(p.rule.transform(source.load(key)), dtype=spec.dtype)
            for alias, pa in entries[1:]:  # tied weights saved under several names must agree
                if not np.array_equal(
                    np.asarray(pa.rule.transform(source.load(alias)), dtype=spec.dtype), host
                ):
                    raise ConversionError(
                        source.describe(),
                        other=[f"{key} and {alias} both map to {path} but hold different values"],
                    )
            yield path, host
        else:
            out = np.empty(spec.shape, dtype=spec.dtype)
            for key, p in entries:
                out[p.index] = p.rule.transform(source.load(key))
            yield path, out


def convert_to_state(
    source: TensorSource,
    rules: Sequence[Rule],
    abstract_state: nnx.State,
    shardings=None,
    ignore: Sequence[str] = (),
) -> nnx.State:
    """Convert into an nnx.State shaped like `abstract_state`, each leaf placed into its sharding.

    `shardings`: a pytree like `abstract_state` of `jax.sharding.Sharding` (or None: default device).
    Only one converted leaf is held on the host at a time.
    """
    target = flatten_target(abstract_state)
    flat_shard = None
    if shardings is not None:
        flat_shard = {
            k: s
            for k, s in zip(
                target,
                jax.tree.leaves(
                    nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings
                ),
            )
        }
    values: dict[str, jax.Array] = {}
    for path, host in iter_converted(source, rules, target, ignore):
        if flat_shard is None:
            values[path] = jax.device_put(host)
        else:
            sh = flat_shard[path]
            values[path] = jax.make_array_from_callback(host.shape, sh, lambda idx, h=host: h[idx])
        del host
    pure = nnx.to_pure_dict(abstract_state)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(pure)
    new_leaves = []
    for path, _ in leaves_with_path:
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        new_leaves.append(values[key])
    new_pure = jax.tree_util.tree_unflatten(treedef, new_leaves)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, new_pure)
    return state
