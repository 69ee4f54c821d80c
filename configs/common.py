"""Shared structure of every experiment config (a helper, not a config: it has no `get_config`).

Each file of `configs/` builds its ConfigDict with `base_config(model_section(...), ...)` and then
`apply_arg(config, arg)`, so all configs carry the same sections and field names, which the rest of
the project reads (validated by `adastate_jax.config.validate`):

  model           every field of `adastate_jax.models.wan.WanConfig`
  mesh            data / fsdp / tensor sizes (one may be -1: fill the devices left)
  sharding_rules  ((logical_name, mesh_axes), ...) ; mesh_axes a string, a tuple of strings or None
  stream          anchor policy and cache layout of chunked generation
  sampler         flow-matching schedule and few-step denoising list
  vae, text       how latents become pixels and prompts become embeddings
  checkpoint      converted params to load (`launch/convert.py --out`)
  seed

Sequences are tuples (not lists) so that `--config.sampler.denoising_steps='(1000, 500)'` style
overrides work with `config_flags`.

Config files load this module by path (`load_common` in each file), since `configs/` is not an
installed package and launch scripts run with `launch/` first on `sys.path`.
"""

from __future__ import annotations

import ml_collections

from adastate_jax import sharding
from adastate_jax.config import ANCHOR_POLICIES, TIME_LAYOUTS


def model_section(**fields) -> ml_collections.ConfigDict:
    """`config.model`: every WanConfig field, Wan2.1-T2V-1.3B values unless overridden."""
    model = dict(
        dim=1536,
        num_heads=12,
        num_layers=30,
        ffn_dim=8960,
        in_channels=16,
        out_channels=16,
        patch_size=(1, 2, 2),
        freq_dim=256,
        text_dim=4096,  # UMT5-XXL features
        text_len=512,  # zero-padded prompt length; padded tokens are attended (no mask)
        eps=1e-6,
        rope_theta=10000.0,
        cross_attn_norm=True,
        param_dtype="float32",
        dtype="float32",  # compute dtype: bfloat16 on accelerators, float32 for CPU tests
        remat="none",  # none | full | dots | dots_no_batch | save_attention_out
        attention="xla",  # xla | cudnn | reference | splash (Pallas TPU kernel)
        attention_blocks="auto",  # auto (static training masks run block-sparse) | dense
        # splash tiles in tokens (multiples of 128): forward q x kv (kv in kv_compute steps), backward
        splash_block_q=512,
        splash_block_kv=512,
        splash_block_kv_compute=512,
        splash_block_q_bwd=512,
        splash_block_kv_bwd=512,
        splash_fused_bwd=False,
        zero_init_head=True,  # Wan's init (zero output); False gives a non-trivial random model
    )
    unknown = sorted(set(fields) - set(model))
    if unknown:
        raise ValueError(f"model_section: unknown model field(s) {unknown}")
    model.update(fields)
    return ml_collections.ConfigDict(model)


def base_config(
    model: ml_collections.ConfigDict,
    *,
    latent_h: int,
    latent_w: int,
    vae_kind: str = "wan",
    text_kind: str = "umt5",
) -> ml_collections.ConfigDict:
    """The whole config around a model section; every section and field the project reads."""
    c = ml_collections.ConfigDict()
    c.model = model

    # --- distribution ---------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # logical axis name -> mesh axes, one table for params, activations and caches
    c.sharding_rules = tuple((name, axes) for name, axes in sharding.DEFAULT_RULES)

    # --- streaming generation -------------------------------------------------------------
    c.stream = ml_collections.ConfigDict(
        dict(
            anchor="adastate",  # window | full | sink | ema_sink | adastate
            chunk_frames=3,  # latent frames generated per step
            window_frames=3,  # previous latent frames visible besides the anchor
            state_frames=1,  # adastate: state slots denoised with every chunk
            sink_frames=3,  # sink / ema_sink: pinned slots (the first chunk)
            max_frames=21,  # capacity of the 'full' policy (within-horizon reference)
            time_layout="relative",  # relative: RoPE by cache slot; absolute: by frame index
            ema_decay=0.99,  # ema_sink: weight of the old sink when an evicted frame is merged
            first_chunk="mask",  # adastate before any state exists: mask the slot | pure noise
            sink_refresh_every=0,  # chunks between sink re-encodes (0: never)
            recache_on_switch=False,  # prompt switch: re-run the visible frames under the new prompt
            latent_h=latent_h,
            latent_w=latent_w,
            batch_size=1,
        )
    )

    # --- sampler (flow matching, few-step) -------------------------------------------------
    c.sampler = ml_collections.ConfigDict(
        dict(
            num_train_timesteps=1000,
            shift=5.0,  # sigma' = shift*sigma / (1 + (shift-1)*sigma)
            denoising_steps=(1000, 750, 500, 250),
            warp_denoising_steps=True,  # map the list through the shifted schedule
            context_noise=0,  # timestep at which the clean chunk is re-run to write the cache
            guidance_scale=1.0,  # classifier-free guidance (1: off)
        )
    )

    # --- pixels and prompts ----------------------------------------------------------------
    c.vae = ml_collections.ConfigDict(
        dict(kind=vae_kind, config=ml_collections.ConfigDict())  # none | patch | wan
    )
    c.text = ml_collections.ConfigDict(
        dict(kind=text_kind, tokenizer_path="", embeddings_path="", cache_dir="")  # embeddings | umt5 | words
    )

    c.checkpoint = ml_collections.ConfigDict(dict(path=""))  # converted params (launch/convert.py --out)
    c.seed = 0
    return c


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply the `:arg` of `--config=configs/x.py:arg`: comma-separated variant names.

    An anchor policy name (window, full, sink, ema_sink, adastate) sets `stream.anchor`;
    `relative` / `absolute` set `stream.time_layout`. E.g. `configs/tiny.py:sink,absolute`.
    """
    if not arg:
        return config
    for token in (t.strip() for t in arg.split(",")):
        if not token:
            continue
        if token in ANCHOR_POLICIES:
            config.stream.anchor = token
        elif token in TIME_LAYOUTS:
            config.stream.time_layout = token
        else:
            raise ValueError(
                f"config arg {token!r}: unknown variant; choose anchor policies {list(ANCHOR_POLICIES)} "
                f"or time layouts {list(TIME_LAYOUTS)}"
            )
    return config
