"""Experiment configs: one typed schema (`schema`), config-file defaults (`defaults`), and the CLI glue.

  from adastate_jax import config
  exp = config.parse(config_dict)   # ml_collections ConfigDict -> Experiment (the only validator)
  exp.model, exp.stream, exp.sampler, exp.train, exp.data, ...   # typed, frozen sections

Owns: the package map and JSON round trips of a ConfigDict (`to_json` / `from_json`, the format of
every `config.json` a run or export writes). Must not know: how sections are used.
"""

from __future__ import annotations

import json

import ml_collections

from adastate_jax.config.schema import (  # noqa: F401
    DATA_SOURCES,
    OBJECTIVES,
    CheckpointConfig,
    DataConfig,
    Experiment,
    TextConfig,
    TrainConfig,
    VAEConfig,
    check_batch,
    check_mesh,
    mesh_sizes,
    parse,
)


def to_json(cfg) -> str:
    """A ConfigDict (or dict) as indented JSON (tuples become lists)."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return json.dumps(d, indent=2, sort_keys=True)


def _tuples(x):
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return x


def from_json(s: str) -> ml_collections.ConfigDict:
    """Inverse of `to_json`: JSON lists come back as tuples (as the config files write them, so
    `--config.x=...` overrides and type-safe assignment keep working)."""
    return ml_collections.ConfigDict(_tuples(json.loads(s)))


def load_json(path: str) -> tuple[ml_collections.ConfigDict, Experiment]:
    """A `config.json` file -> (ConfigDict, Experiment); errors name the file."""
    try:
        with open(path) as fh:
            cfg = from_json(fh.read())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a config JSON: {e}") from None
    try:
        return cfg, parse(cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
