"""Weight conversion: PyTorch checkpoints -> our Flax NNX parameter trees.

Owns: reading PyTorch weight files lazily (safetensors, sharded safetensors with an index,
`.pt`/`.pth` state dicts, Self-Forcing/LongLive training checkpoints) and checking them for
truncation; stripping framework prefixes and wrapper names; merging PEFT LoRA adapters (inside the
checkpoint, or LongLive's separate `generator_lora` file) and recognising a LongLive base saved
without its LoRA; the generic rule engine (`Rule` tables: torch key regex -> our parameter path +
transform), one error that reports every missing / unexpected / mis-shaped key at once, and
placement of each converted leaf straight into its sharding (no whole-model host copy).

Must not know: the models themselves. Each model module contributes a declarative table
(`adastate_jax.models.wan_params.conversion_rules`, `...vae.conversion_rules`, ...), and the
caller passes the abstract target state.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
            tensors = {name: info for name, info in header.items() if name != "__metadata__"}
            _check_safetensors_extents(f, tensors, offset)
            for name, info in tensors.items():
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


def _check_safetensors_extents(path: str, tensors: Mapping[str, dict], data_start: int) -> None:
    """Every tensor's byte range must lie inside the file and match its shape and dtype.

    A file cut short (an interrupted download or copy) is caught here, when it is opened, with
    the file and the first tensor it cuts named, instead of as a numpy view error on load.
    """
    size = os.path.getsize(path)
    past_end, bad = [], []
    for name, info in tensors.items():
        try:
            start, end = (int(o) for o in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
        except (KeyError, TypeError, ValueError):
            bad.append(f"tensor {name!r} has no valid 'data_offsets' / 'shape' in the header")
            continue
        if not 0 <= start <= end:
            bad.append(f"tensor {name!r} has data_offsets [{start}, {end}]")
            continue
        if data_start + end > size:
            past_end.append((data_start + end, name))
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is not None and end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            bad.append(
                f"tensor {name!r} ({info['dtype']} {tuple(shape)}) needs "
                f"{int(np.prod(shape)) * np.dtype(dtype).itemsize} bytes, its data_offsets give {end - start}"
            )
    if past_end:
        end, name = min(past_end)
        others = f" ({len(past_end) - 1} more tensors lie past the end)" if len(past_end) > 1 else ""
        raise ValueError(
            f"{path}: truncated: the file has {size} bytes but tensor {name!r} ends at byte {end}"
            f"{others}; the download or copy is incomplete"
        )
    if bad:
        raise ValueError(f"{path}: corrupt safetensors header: " + "; ".join(bad[:5]))


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


# Names that training frameworks insert into parameter names, anywhere in a key: FSDP's
# `_fsdp_wrapped_module.`, activation checkpointing's `_checkpoint_wrapped_module.`, torch.compile's
# `_orig_mod.`. LongLive's EMA weights carry them (`model.blocks.0._fsdp_wrapped_module.self_attn...`);
# LongLive's own loader strips the first two the same way.
WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
# Prefixes of whole-model wrappers, stripped in this order: DDP's `module.`, PEFT's
# `base_model.model.`, Self-Forcing's / LongLive's `model.` (their WanDiffusionWrapper).
FRAMEWORK_PREFIXES = ("module.", "base_model.model.", "model.")


class RenamedSource(TensorSource):
    """A view of another source with wrapper names and key prefixes stripped (e.g. `model.`)."""

    def __init__(
        self,
        base: TensorSource,
        strip_prefixes: Sequence[str] = (),
        drop: Sequence[str] = (),
        strip_names: Sequence[str] = (),
    ):
        self._base = base
        self._map: dict[str, str] = {}
        drop_re = [re.compile(d) for d in drop]
        # a whole dotted component (at the start or after a dot), repeated ones included
        names_re = (
            re.compile(r"(?<![^.])(?:" + "|".join(re.escape(n) for n in strip_names) + r")\.")
            if strip_names
            else None
        )
        for k in base.keys():
            if any(r.fullmatch(k) for r in drop_re):
                continue
            new = names_re.sub("", k) if names_re is not None else k
            for p in strip_prefixes:
                if new.startswith(p):
                    new = new[len(p) :]
            if new in self._map:
                raise ValueError(
                    f"{base.describe()}: keys {self._map[new]!r} and {k!r} collide after stripping "
                    f"{[*strip_names, *strip_prefixes]}"
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


def _strip_framework_names(source: TensorSource) -> TensorSource:
    return RenamedSource(source, strip_prefixes=FRAMEWORK_PREFIXES, strip_names=WRAPPER_NAMES)


# --------------------------------------------------------------------------------------------
# LoRA: W' = W + scale * B @ A, merged on load
# --------------------------------------------------------------------------------------------

# PEFT's adapter tensors of a Linear `<name>`: `<name>.lora_A[.<adapter>].weight` [r, in] and
# `<name>.lora_B[.<adapter>].weight` [out, r] (`get_peft_model_state_dict` drops the adapter name).
_LORA_A = re.compile(r"(.*)\.lora_A(?:\.[^.]+)?\.weight")
_LORA_B = re.compile(r"(.*)\.lora_B(?:\.[^.]+)?\.weight")
_LORA_FILE = re.compile(r".*lora.*\.(?:pt|pth|bin|safetensors)", re.IGNORECASE)


def _is_lora_key(key: str) -> bool:
    return bool(_LORA_A.fullmatch(key) or _LORA_B.fullmatch(key))


@dataclasses.dataclass(frozen=True)
class LoraScaling:
    """How an adapter's product is scaled: W' = W + scale * B @ A (PEFT's `scaling`).

    scale: a fixed scale (wins over alpha). alpha: PEFT's `lora_alpha`; scale = alpha / rank, the
    rank read from each adapter's lora_A ([rank, in]), or alpha / sqrt(rank) with `use_rslora`.
    Neither: alpha = rank, scale 1, LongLive's setting (its configs train rank 256 with alpha 256,
    and its code falls back to alpha = rank). rank: if given, every adapter must have it (a check).
    origin: where the numbers came from, for logs and info.json.
    """

    scale: float | None = None
    alpha: float | None = None
    rank: int | None = None
    use_rslora: bool = False
    origin: str = "default: alpha = rank"

    def scale_for(self, rank: int) -> float:
        if self.scale is not None:
            return float(self.scale)
        alpha = float(self.alpha) if self.alpha is not None else float(rank)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def lora_scaling(
    path: str, *, scale: float | None = None, alpha: float | None = None, rank: int | None = None
) -> LoraScaling:
    """The scaling of the LoRA at `path`: given numbers first, then PEFT's `adapter_config.json`
    (in the directory `path` names or holds it), then alpha = rank. LongLive's `generator_lora`
    files carry no alpha: their run's config does (`adapter.rank`, `adapter.alpha`)."""
    if scale is not None:
        return LoraScaling(scale=scale, rank=rank, origin="given scale")
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config_path = os.path.join(folder, "adapter_config.json")
    if alpha is None and os.path.exists(config_path):
        with open(config_path) as fh:
            peft_config = json.load(fh)
        if peft_config.get("rank_pattern") or peft_config.get("alpha_pattern"):
            raise ValueError(
                f"{config_path}: per-module rank_pattern / alpha_pattern are not supported; give the "
                "scale explicitly (launch/convert.py --lora_scale)"
            )
        if "lora_alpha" not in peft_config:
            raise ValueError(f"{config_path}: no 'lora_alpha'; give --lora_alpha or --lora_scale")
        return LoraScaling(
            alpha=float(peft_config["lora_alpha"]),
            rank=rank if rank is not None else peft_config.get("r"),
            use_rslora=bool(peft_config.get("use_rslora", False)),
            origin=config_path,
        )
    if alpha is not None:
        return LoraScaling(alpha=alpha, rank=rank, origin="given alpha")
    return LoraScaling(rank=rank)


class LoraMergedSource(TensorSource):
    """Base weights with PEFT LoRA adapters merged on load: `<name>.weight` = W + scale * B @ A.

    `lora`: a separate source of adapters (LongLive's `generator_lora` file, keys
    `<name>.lora_A.weight` / `<name>.lora_B.weight` after prefix stripping), or None when the
    adapters sit in `base` itself beside PEFT's `<name>.base_layer.weight`. Each adapter needs a
    base weight `<name>.weight` or `<name>.base_layer.weight` of shape [out, in]. Every problem
    (a lone lora_A, no base weight, shapes that disagree, a rank other than the given one, tensors
    in the LoRA source that are not adapters) is reported together in one ConversionError.
    The merge is computed in float64 and returned in float32 (float64 for a float64 base), so the
    rule engine rounds once to the target dtype.
    """

    def __init__(
        self, base: TensorSource, lora: TensorSource | None = None, scaling: LoraScaling = LoraScaling()
    ):
        self._base = base
        self._lora = lora if lora is not None else base
        self._scaling = scaling
        problems = []
        pairs: dict[str, dict[str, str]] = {}
        for k in self._lora.keys():
            if m := _LORA_A.fullmatch(k):
                pairs.setdefault(m.group(1), {})["A"] = k
            elif m := _LORA_B.fullmatch(k):
                pairs.setdefault(m.group(1), {})["B"] = k
            elif lora is not None:
                problems.append(
                    f"{k}: not a LoRA tensor (only '<name>.lora_A.weight' / '<name>.lora_B.weight' merge)"
                )
        self._map: dict[str, str] = {}
        for k in base.keys():
            if _is_lora_key(k):
                continue
            new = k.replace(".base_layer.", ".")
            if new in self._map:
                problems.append(f"base weights {self._map[new]!r} and {k!r} are the same weight")
            self._map[new] = k
        self._adapters: dict[str, tuple[str, str, int, float]] = {}
        for name, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                have = "lora_A" if "A" in ab else "lora_B"
                problems.append(f"adapter {name!r} has {have} only (needs lora_A and lora_B)")
                continue
            a_shape, b_shape = self._lora.shape(ab["A"]), self._lora.shape(ab["B"])
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                problems.append(
                    f"adapter {name!r}: lora_A {a_shape} and lora_B {b_shape} are not [rank, in] and "
                    "[out, rank] of a Linear"
                )
                continue
            rank = a_shape[0]
            if scaling.rank is not None and rank != scaling.rank:
                problems.append(
                    f"adapter {name!r} has rank {rank} (lora_A {a_shape}); expected rank {scaling.rank}"
                )
            if f"{name}.weight" not in self._map:
                problems.append(
                    f"adapter {name!r} has no base weight: looked for {name}.weight (a plain state "
                    f"dict, e.g. LongLive's base generator) or {name}.base_layer.weight (a PEFT model)"
                )
                continue
            w_shape = base.shape(self._map[f"{name}.weight"])
            if tuple(w_shape) != (b_shape[0], a_shape[1]):
                problems.append(
                    f"adapter {name!r}: lora_B @ lora_A is {(b_shape[0], a_shape[1])}, "
                    f"the base weight {w_shape}"
                )
                continue
            self._adapters[name] = (ab["A"], ab["B"], rank, scaling.scale_for(rank))
        if problems:
            problems.append(
                "(key prefixes "
                + ", ".join(repr(p) for p in FRAMEWORK_PREFIXES)
                + " and wrapper names "
                + ", ".join(repr(n + ".") for n in WRAPPER_NAMES)
                + " are ignored in both files)"
            )
            where = (
                self._lora.describe() if lora is None else f"{base.describe()} + LoRA {self._lora.describe()}"
            )
            raise ConversionError(where, other=problems)

    def keys(self):
        return list(self._map)

    def shape(self, key):
        return self._base.shape(self._map[key])

    def load(self, key):
        w = self._base.load(self._map[key])
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        if name not in self._adapters:
            return w
        a_key, b_key, _, scale = self._adapters[name]
        a = self._lora.load(a_key).astype(np.float64)  # [r, in]
        b = self._lora.load(b_key).astype(np.float64)  # [out, r]
        merged = w.astype(np.float64) + scale * (b @ a)  # [out, in]
        return merged.astype(np.promote_types(w.dtype, np.float32))

    def summary(self) -> dict:
        """What was merged, for logs and info.json."""
        ranks = sorted({r for _, _, r, _ in self._adapters.values()})
        scales = sorted({s for _, _, _, s in self._adapters.values()})
        return dict(
            lora=self._lora.describe(),
            lora_adapters=len(self._adapters),
            lora_ranks=ranks,
            lora_scales=scales,
            lora_scale_origin=self._scaling.origin,
        )

    def describe(self):
        if self._lora is self._base:
            return self._base.describe() + " (LoRA merged)"
        return f"{self._base.describe()} + LoRA {self._lora.describe()}"


def longlive_base_evidence(path: str) -> str | None:
    """Why the weights file `path` looks like the base generator of a LongLive run, or None.

    LongLive (v1) trains its long-video model as a LoRA (rank 256, alpha 256) on a base generator
    and saves the LoRA in a separate file (`{'generator_lora': ..., 'critic_lora': ..., 'step'}`);
    its release ships `models/longlive_base.pt` beside `models/lora.pt`, and its inference applies
    `lora_ckpt` on top of `generator_ckpt`. The base alone is a different model. Evidence, first
    found wins: a LoRA-named weights file (`*lora*.pt|.pth|.bin|.safetensors`) in the same
    directory; 'longlive' in the file name (`longlive_base.pt`, `longlive_init.pt`).
    """
    if os.path.isdir(path):
        return None
    folder, own = os.path.split(os.path.abspath(path))
    siblings = sorted(f for f in os.listdir(folder) if _LORA_FILE.fullmatch(f) and f != own)
    if siblings:
        return f"a LoRA file lies beside it: {os.path.join(folder, siblings[0])}"
    if "longlive" in own.lower():
        return f"its file name {own!r} says LongLive"
    return None


# --------------------------------------------------------------------------------------------
# Opening checkpoints
# --------------------------------------------------------------------------------------------


def open_torch_checkpoint(
    path: str,
    *,
    use_ema: bool = False,
    lora: str | None = None,
    lora_scale: float | None = None,
    lora_alpha: float | None = None,
    lora_rank: int | None = None,
) -> TensorSource:
    """Open PyTorch weights lazily, LoRA merged.

    Accepts: a `.safetensors` file; a directory with `*.safetensors.index.json` (sharded) or
    `*.safetensors` files; a `.pt`/`.pth`/`.bin` state dict; a Self-Forcing / LongLive training
    checkpoint (a dict with `generator` / `generator_ema` / `model`, keys prefixed `model.`).
    Framework prefixes (`module.`, `base_model.model.`, `model.`) and wrapper names
    (`_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`, `_orig_mod.`) are stripped.

    LoRA: adapters inside the checkpoint (PEFT's `base_layer` layout) are merged; `lora` names a
    separate adapter file to merge into it (LongLive's `{'generator_lora': <PEFT state dict>}`, a
    bare PEFT state dict, or a PEFT adapter directory). Scaling: see `lora_scaling`.
    """
    base = _strip_framework_names(_open_tensors(path, use_ema=use_ema))
    in_file = [k for k in base.keys() if _is_lora_key(k)]
    if in_file and len(in_file) == len(base.keys()):
        raise ValueError(
            f"{path}: holds only LoRA adapters ({len(in_file)} lora_A / lora_B tensors), no base "
            "weights: convert the base checkpoint and give this file as its LoRA (launch/convert.py "
            "--source=BASE --lora=THIS)"
        )
    scaling = dict(scale=lora_scale, alpha=lora_alpha, rank=lora_rank)
    if lora is not None:
        if in_file:
            raise ValueError(
                f"{path} already holds LoRA adapters ({len(in_file)} tensors) and a separate LoRA "
                f"{lora} was given too; merge one at a time"
            )
        return LoraMergedSource(base, open_lora_checkpoint(lora), lora_scaling(lora, **scaling))
    if in_file:
        return LoraMergedSource(base, None, lora_scaling(path, **scaling))
    return base


def open_lora_checkpoint(path: str) -> TensorSource:
    """LoRA adapters alone: LongLive's `{'generator_lora': <PEFT state dict>, ...}` file, a bare
    PEFT state dict (`.pt` / `.bin` / `.safetensors`), or a PEFT adapter directory."""
    src = _strip_framework_names(_open_tensors(path, use_ema=False, lora=True))
    if not any(_is_lora_key(k) for k in src.keys()):
        raise ValueError(
            f"{path}: holds no LoRA adapters (no '<name>.lora_A.weight' / '<name>.lora_B.weight' "
            f"keys; first keys: {sorted(src.keys())[:5]})"
        )
    return src


def _open_tensors(path: str, *, use_ema: bool, lora: bool = False) -> TensorSource:
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
            return SafetensorsSource(files)
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"directory {path!r} holds no .safetensors files or index")
        return SafetensorsSource(files)
    if path.endswith(".safetensors"):
        return SafetensorsSource([path])
    return DictSource(_torch_load_state_dict(path, use_ema=use_ema, lora=lora), name=path)


def _torch_load_state_dict(path: str, use_ema: bool, lora: bool = False) -> dict:
    """The tensors of a torch pickle: a state dict, or the generator's of a training checkpoint
    (`generator`, or `generator_ema` with `use_ema`; `generator_lora` for a LoRA)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"reading {path!r} (a torch pickle) needs torch: pip install torch") from e
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    top = sorted(map(str, obj))
    if lora:
        obj = obj["generator_lora"] if isinstance(obj.get("generator_lora"), dict) else obj
    elif use_ema:
        if not isinstance(obj.get("generator_ema"), dict):
            raise ValueError(
                f"{path}: use_ema asks for 'generator_ema', which it lacks (top-level keys: {top[:10]})"
            )
        obj = obj["generator_ema"]
    else:
        for key in ("generator", "generator_ema", "state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            if "generator_lora" in obj:
                raise ValueError(
                    f"{path}: a LongLive LoRA file ('generator_lora'), not a model: convert the base "
                    f"generator and merge this file into it (launch/convert.py --source=BASE --lora={path})"
                )
    tensors = {k: v for k, v in obj.items() if hasattr(v, "shape")}
    if not tensors and lora:
        raise ValueError(
            f"{path}: holds no LoRA adapters (no 'generator_lora' entry and no tensors at the top "
            f"level; top-level keys: {top[:10]})"
        )
    if not tensors:
        raise ValueError(
            f"{path}: holds no tensors (top-level keys: {top[:10]}); expected a state dict or a "
            "training checkpoint with 'generator' / 'generator_ema' / 'model' / 'state_dict'"
        )
    return tensors


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
