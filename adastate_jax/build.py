"""The assembly layer: the parts of a run built from an `Experiment`, the same way everywhere.

Owns: turning a validated config (`adastate_jax.config.Experiment`) into working parts — the mesh,
the DiT (params loaded from a checkpoint into their shardings, or initialised with a warning), the
text encoder and prompt tables, the streaming decoder (PatchCodec / Wan VAE and its weights), and
the `Streamer`. Every launch script, the train loop and the evaluation harness assemble through
these functions (the way maxdiffusion's Wan pipeline assembles its parts), so a model loaded for
training, evaluation, benchmarking or streaming is loaded one way.

Must not know: optimisers and objectives, metrics, command lines. It reads files only through the
checkpoint and weight readers of `models/` and `text`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from adastate_jax import sharding as shd
from adastate_jax.config import Experiment
from adastate_jax.models import checkpoint_io, wan
from adastate_jax.streaming.decoders import Decoder, decoder_from_module
from adastate_jax.streaming.rollout import Streamer

# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------


def mesh(exp: Experiment, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh of `config.mesh` over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = exp.mesh.sizes(len(devices))
    return shd.make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices)


def param_shardings(abstract, mesh_: jax.sharding.Mesh | None, exp: Experiment):
    """NamedShardings of a params state on `mesh_` by the rules table (None without a mesh)."""
    return None if mesh_ is None else shd.state_shardings(abstract, mesh_, exp.sharding_rules)


# --------------------------------------------------------------------------------------------
# The DiT
# --------------------------------------------------------------------------------------------


def load_params(model_cfg: wan.WanConfig, path: str, shardings=None):
    """DiT params of `model_cfg` from a params checkpoint dir (`launch/convert.py --out`, a training
    `WORKDIR/export`, or a shipped model), placed into `shardings` when given."""
    abstract = wan.abstract_model(model_cfg)[1]
    return checkpoint_io.load_params(path, abstract, shardings)


@dataclasses.dataclass(frozen=True)
class DiT:
    graphdef: nnx.GraphDef
    params: nnx.State
    source: str  # the checkpoint dir, or 'random(seed=N)'
    config: wan.WanConfig


def dit(
    exp: Experiment,
    path: str = "",
    *,
    mesh_: jax.sharding.Mesh | None = None,
    model_cfg: wan.WanConfig | None = None,
    seed: int | None = None,
    allow_random: bool = True,
) -> DiT:
    """The DiT of `model_cfg` (default `config.model`): params from `path` (default
    `config.checkpoint.path`), else randomly initialised from `seed` (default `config.seed`) with a
    warning, or an error when `allow_random` is False. With `mesh_`, params are created / read
    straight into their shardings."""
    mc = model_cfg or exp.model
    path = path or exp.checkpoint.path
    graphdef, abstract = wan.abstract_model(mc)
    shardings = param_shardings(abstract, mesh_, exp)
    if path:
        params = checkpoint_io.load_params(path, abstract, shardings)
        return DiT(graphdef, params, path, mc)
    if not allow_random:
        raise ValueError("no DiT params given (a checkpoint dir, or config.checkpoint.path)")
    seed = exp.seed if seed is None else int(seed)
    warnings.warn("no checkpoint: the DiT is randomly initialised (an untrained model)", stacklevel=2)
    # one compiled program, not an eager op per parameter (the tiny model: 1.0 s instead of 1.5-1.8 s
    # in a fresh process); with `mesh_`, created straight into its shardings
    params = jax.jit(lambda: nnx.split(wan.create_model(mc, seed=seed))[1], out_shardings=shardings)()
    return DiT(graphdef, params, f"random(seed={seed})", mc)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def word_encoder(model_cfg: wan.WanConfig, seed: int):
    """The frozen PanWorld word encoder of a model (built from `config.seed`, as in training)."""
    from adastate_jax.text.words import panworld_word_encoder

    return panworld_word_encoder(model_cfg.text_len, model_cfg.text_dim, seed)


def text_encoder(exp: Experiment, text_checkpoint: str = ""):
    """An encoder with `encode(prompts) -> [P, text_len, text_dim]` for `config.text.kind`."""
    from adastate_jax import text as text_lib

    mc, tc = exp.model, exp.text
    if tc.kind == "words":
        return word_encoder(mc, exp.seed)
    if tc.kind == "embeddings":
        if not tc.embeddings_path:
            raise ValueError("config.text.kind='embeddings' needs config.text.embeddings_path")
        enc = text_lib.PrecomputedTextEncoder.from_file(tc.embeddings_path, text_len=mc.text_len)
        if enc.text_dim != mc.text_dim:
            raise ValueError(
                f"{tc.embeddings_path}: embeddings have text_dim {enc.text_dim}, "
                f"config.model.text_dim is {mc.text_dim}"
            )
        return enc
    if not text_checkpoint or not tc.tokenizer_path:
        raise ValueError(
            "config.text.kind='umt5' needs the encoder weights (--text_checkpoint) and "
            "config.text.tokenizer_path"
        )
    if tc.umt5.d_model != mc.text_dim:
        raise ValueError(
            f"config.model.text_dim={mc.text_dim} but the UMT5 encoder gives {tc.umt5.d_model} features "
            "(config.text.umt5.d_model)"
        )
    enc = text_lib.UMT5TextEncoder.from_checkpoint(
        text_checkpoint, tc.tokenizer_path, config=tc.umt5, text_len=mc.text_len
    )
    return text_lib.PromptCache(tc.cache_dir, enc) if tc.cache_dir else enc


def prompt_table(
    exp: Experiment, prompts: Sequence[str], batch: int | None = None, text_checkpoint: str = "", encoder=None
) -> np.ndarray:
    """[P, B, text_len, text_dim] embeddings of `prompts` (B = `batch`, default `stream.batch_size`).

    With `config.text.kind='embeddings'`, prompts that are integers select rows of the file."""
    batch = exp.stream.batch_size if batch is None else int(batch)
    enc = encoder or text_encoder(exp, text_checkpoint)
    prompts = list(prompts)
    if exp.text.kind == "embeddings" and all(str(p).strip().isdigit() for p in prompts):
        from adastate_jax import text as text_lib

        table = text_lib.load_embeddings(
            exp.text.embeddings_path, text_len=exp.model.text_len, text_dim=exp.model.text_dim
        )
        rows = [int(p) for p in prompts]
        bad = [r for r in rows if not 0 <= r < table.shape[0]]
        if bad:
            raise ValueError(
                f"prompt rows {bad} out of range for {exp.text.embeddings_path} ({table.shape[0]} rows)"
            )
        emb = np.asarray(table)[rows]
    else:
        emb = np.asarray(enc.encode(prompts))  # [P, T, D]
    return np.broadcast_to(emb[:, None], (emb.shape[0], batch, *emb.shape[1:])).copy()


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def vae_module(exp: Experiment, vae_checkpoint: str = ""):
    """The codec module of `config.vae` (None for 'none'): the PatchCodec, or the Wan VAE from
    our params dir, PyTorch weights (Wan2.1_VAE.pth / diffusers), or random with a warning."""
    from adastate_jax.models import vae as vae_lib

    kind = exp.vae.kind
    if kind == "none":
        return None
    if kind == "patch":
        return exp.patch_codec()
    cfg = exp.vae.wan
    if not vae_checkpoint:
        warnings.warn("config.vae.kind='wan' without VAE weights: randomly initialised VAE", stacklevel=2)
        return vae_lib.WanVAE(cfg, rngs=nnx.Rngs(exp.seed))
    if os.path.isdir(os.path.join(vae_checkpoint, checkpoint_io.PARAMS_DIR)):
        graphdef, abstract = vae_lib.abstract_model(cfg)  # `convert.py --model=vae` or a vae export
        return nnx.merge(graphdef, checkpoint_io.load_params(vae_checkpoint, abstract))
    return vae_lib.load_wan_vae(vae_checkpoint, cfg)


def decoder(exp: Experiment, vae_checkpoint: str = "") -> tuple[Decoder | None, object]:
    """(streaming decoder for the carry, its params) of `config.vae`; (None, None) for 'none'."""
    module = vae_module(exp, vae_checkpoint)
    return (None, None) if module is None else decoder_from_module(module)


# --------------------------------------------------------------------------------------------
# The streaming engine
# --------------------------------------------------------------------------------------------


def streamer(
    exp: Experiment,
    graphdef: nnx.GraphDef,
    *,
    decoder_: Decoder | None = None,
    instrument: bool = False,
    **stream_overrides,
) -> Streamer:
    """A `Streamer` of `config.stream` (fields overridden by `stream_overrides`, e.g. anchor='sink')
    and `config.sampler`."""
    sc = dataclasses.replace(exp.stream, **stream_overrides) if stream_overrides else exp.stream
    return Streamer(graphdef, exp.model, sc, exp.sampler, decoder=decoder_, instrument=instrument)


__all__ = [
    "DiT",
    "decoder",
    "dit",
    "load_params",
    "mesh",
    "param_shardings",
    "prompt_table",
    "streamer",
    "text_encoder",
    "vae_module",
    "word_encoder",
]
