"""Config files' shared part: ConfigDicts generated from the schema's defaults, and `:variant` args.

Owns: turning the schema's dataclass defaults into the ml_collections ConfigDict a `configs/*.py`
file starts from (`base_config`, `training_sections`, `model_section`), so every field a config can
carry is declared once (in its dataclass) and every config carries all of them, with the types the
`--config.x=y` overrides are checked against; and the `:arg` variants of `--config=FILE:arg`
(anchor policies and time layouts; files add their own words, e.g. training stages).

Must not know: how any section is used.
"""

from __future__ import annotations

import ml_collections

from adastate_jax.config import schema
from adastate_jax.dataclass_config import closest, to_dict
from adastate_jax.models.wan import WanConfig
from adastate_jax.streaming.anchors import POLICIES, TIME_LAYOUTS


def _config_dict(d: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(d)


def model_section(**fields) -> ml_collections.ConfigDict:
    """`config.model`: every WanConfig field, its defaults (Wan2.1-T2V-1.3B) unless overridden."""
    return _config_dict(to_dict(WanConfig(**fields)))


def base_config(
    model: ml_collections.ConfigDict | WanConfig,
    *,
    latent_h: int,
    latent_w: int,
    vae_kind: str = "wan",
    text_kind: str = "umt5",
) -> ml_collections.ConfigDict:
    """A streaming config (every section but `train` / `data`) around a model section."""
    if isinstance(model, WanConfig):
        model = _config_dict(to_dict(model))
    exp = schema.Experiment()
    d = to_dict(exp)
    for name in ("teacher_model", "critic_model", "train", "data"):  # None: absent from the file
        d.pop(name)
    d["model"] = model.to_dict() if hasattr(model, "to_dict") else dict(model)
    d["stream"].update(latent_h=latent_h, latent_w=latent_w)
    d["vae"]["kind"] = vae_kind
    d["text"]["kind"] = text_kind
    d["sharding_rules"] = tuple(tuple(r) for r in exp.sharding_rules)
    return _config_dict(d)


def training_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the `train` and `data` sections with the schema's defaults."""
    config.train = _config_dict(to_dict(schema.TrainConfig()))
    config.data = _config_dict(to_dict(schema.DataConfig()))
    return config


def model_copy(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
    """A copy of `config.model` with fields changed (for `teacher_model` / `critic_model`)."""
    d = config.model.to_dict()
    d.update(fields)
    return model_section(**d)


def split_variants(arg: str | None, own: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """`'dmd,adastate,absolute'` -> (the file's own words, the rest) in order."""
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    return [t for t in tokens if t in own], [t for t in tokens if t not in own]


def apply_variants(
    config: ml_collections.ConfigDict, arg: str | list[str] | None
) -> ml_collections.ConfigDict:
    """Apply anchor-policy names (set `stream.anchor`) and time layouts (`stream.time_layout`)."""
    tokens = arg if isinstance(arg, list) else split_variants(arg)[1]
    for token in tokens:
        if token in POLICIES:
            config.stream.anchor = token
        elif token in TIME_LAYOUTS:
            config.stream.time_layout = token
        else:
            raise ValueError(
                f"config arg {token!r}: unknown variant{closest(token, POLICIES + TIME_LAYOUTS)}; choose "
                f"anchor policies {list(POLICIES)} or time layouts {list(TIME_LAYOUTS)}"
            )
    return config
