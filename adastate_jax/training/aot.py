"""A run's train step without data or weights: for benchmarking and ahead-of-time compilation.

Owns: the batch a run's data pipeline would give, as synthetic numpy arrays (`synthetic_batch`) or
as abstract sharded shapes (`abstract_batch`); every pretrained model an objective names, randomly
initialised straight into its shardings (`random_pretrained`) or left abstract (`abstract_state`);
and the model FLOPs of a flow-matching step from the architecture (`model_flops`, `step_flops`).
`launch/benchmark_train.py` times the real step with these; `launch/compile_tpu.py` compiles the
same step for TPU topologies it does not have. Both go through `loop.setup` and
`loop.jit_train_step`, the code `launch/train.py` runs.

Must not know: files, command lines, devices beyond the run's mesh.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from adastate_jax.models import attention as attn
from adastate_jax.models import wan


def clip_frames(run, frames: int | None = None) -> int:
    """Latent frames per example: `frames`, else the PanWorld / video clip length, else 21."""
    if frames:
        return int(frames)
    return run.exp.data.clip_frames or 21


def _batch_fields(run, frames: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    exp = run.exp
    b, sc, mc = exp.train.batch_size, exp.stream, exp.model
    if exp.train.objective == "vae":
        pw = exp.data.panworld
        return {"video": ((b, frames, pw.frame_height, pw.frame_width, 3), np.float32)}
    out = {"latents": ((b, frames, sc.latent_h, sc.latent_w, mc.in_channels), np.float32)}
    if exp.text.kind == "words":
        out["prompt_ids"] = ((b, mc.text_len), np.int32)
    else:
        out["text"] = ((b, mc.text_len, mc.text_dim), np.float32)
    return out


def synthetic_batch(run, frames: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A global batch of random arrays with the shapes and dtypes the pipeline gives."""
    from adastate_jax.data.panworld import prompt_vocabulary

    rng = np.random.default_rng(seed)
    out = {}
    for k, (shape, dtype) in _batch_fields(run, clip_frames(run, frames)).items():
        if k == "prompt_ids":
            out[k] = rng.integers(0, len(prompt_vocabulary()), shape).astype(dtype)
        else:
            out[k] = rng.standard_normal(shape).astype(dtype)
    return out


def abstract_batch(run, frames: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as ShapeDtypeStructs sharded over the run's batch axes."""
    out = {}
    for k, (shape, dtype) in _batch_fields(run, clip_frames(run, frames)).items():
        spec = jax.sharding.PartitionSpec(run.batch_sharding.spec[0], *([None] * (len(shape) - 1)))
        out[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(run.mesh, spec))
    return out


def random_pretrained(run) -> dict:
    """Every pretrained model of the objective, randomly initialised straight into its shardings."""
    out = {}
    for i, (name, (_, shardings, _)) in enumerate(run.pretrained.items()):
        mcfg = run.objective.pretrained()[name][0]

        def make(mcfg=mcfg, seed=i):
            return nnx.split(wan.create_model(mcfg, seed=seed))[1]

        out[name] = jax.jit(make, out_shardings=shardings)()
    return out


def init_random_state(run):
    """The run's real train state, created sharded, with random pretrained models."""
    rng = jax.random.key_data(jax.random.key(run.exp.train_seed))
    init = jax.jit(run.objective.init_state, out_shardings=run.state_shardings)
    return init(rng, random_pretrained(run))


def abstract_state(run):
    """The train state as ShapeDtypeStructs carrying their shardings (nothing allocated)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        run.abstract_state,
        run.state_shardings,
    )


def model_flops(model_cfg: wan.WanConfig, batch: int, frames: int, tokens_per_frame: int, mask=None) -> float:
    """FLOPs of one forward of the DiT on [batch, frames] (2 per multiply-add).

    Matmuls per video token and layer: self-attention q/k/v/o (4 d^2), cross-attention q/o (2 d^2),
    FFN (2 d f); per text token and layer the cross-attention k/v (2 d^2). Attention: QK^T and AV,
    2 d multiply-adds per (query, allowed key) pair, i.e. 4 d FLOPs (`mask`: [F, F] frame mask of
    the allowed key frames; None = all), plus 4 d per (query, text token). Embeddings, norms,
    modulation and the head are left out (< 1% at Wan sizes).
    """
    d, f_dim, n_layers = model_cfg.dim, model_cfg.ffn_dim, model_cfg.num_layers
    t = batch * frames * tokens_per_frame
    dense = 2 * t * n_layers * (4 * d * d + 2 * d * d + 2 * d * f_dim)
    text = 2 * batch * model_cfg.text_len * n_layers * 2 * d * d
    pairs = (frames * frames if mask is None else int(np.asarray(mask, bool).sum())) * tokens_per_frame**2
    attention = 4 * d * batch * n_layers * pairs + 4 * d * t * n_layers * model_cfg.text_len
    return float(dense + text + attention)


def step_flops(run, frames: int | None = None) -> float | None:
    """Model FLOPs of one flow-matching train step (3x the forward: forward + backward), or None
    for objectives whose step mixes rollouts, teacher and critic passes."""
    exp = run.exp
    if exp.train.objective != "flow_matching":
        return None
    frames = clip_frames(run, frames)
    p = exp.model.tokens_per_frame(exp.stream.latent_h, exp.stream.latent_w)
    chunk, kind, tc = exp.stream.chunk_frames, exp.train.attention, exp.train
    if kind == "bidirectional":
        mask, f_seq = None, frames
    elif kind == "diffusion_forcing":
        mask, f_seq = attn.block_causal_mask(frames, chunk), frames
    else:
        window = None if tc.tf_window < 0 else tc.tf_window
        mask, f_seq = attn.teacher_forcing_mask(frames, chunk, window, tc.tf_sink), 2 * frames
    return 3 * model_flops(exp.model, exp.train.batch_size, f_seq, p, mask)
