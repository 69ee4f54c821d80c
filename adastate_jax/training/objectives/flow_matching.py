"""Flow-matching objective: teacher / base training of the Wan DiT on clips.

Owns: the flow-matching loss on a clip of latents (x_t = (1 - s) x0 + s eps, target v = eps - x0,
shifted training timesteps), the attention layouts it trains under, and the single-model train
step shared with `ode_init` (grad, clip, AdamW, EMA, non-finite guard).

Layouts (`config.train.attention`):
  bidirectional      every frame sees every frame, one timestep per clip (Wan's base training);
  diffusion_forcing  block-causal over chunks, a timestep per chunk (or frame / clip, see
                     `config.train.t_sampling`): each chunk denoises given noisier/cleaner past;
  teacher_forcing    the sequence [clean clip; noisy clip] with `teacher_forcing_mask`: noisy chunk
                     c sees the clean frames of earlier chunks (optionally only a window + sink, the
                     streaming layout of `config.stream`) and itself. Loss on the noisy half only.

Prompt dropout (`config.train.text_dropout`, default 0): each example's prompt embeddings are
replaced by zeros with that probability, the unconditional input that classifier-free guidance
contrasts with (`Streamer`'s default `negative`, the ODE-init / DMD teacher with
`teacher_guidance` > 1).

Must not know: data pipelines, files, meshes, checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adastate_jax.models import attention as attn
from adastate_jax.models import text as text_lib
from adastate_jax.models import wan
from adastate_jax.streaming import sampler as smp_lib
from adastate_jax.training import state as state_lib
from adastate_jax.training.state import TrainState

ATTENTION_LAYOUTS = ("bidirectional", "diffusion_forcing", "teacher_forcing")
T_SAMPLING = ("clip", "chunk", "frame")


@dataclasses.dataclass(frozen=True)
class ClipLayout:
    """How a clip of F latent frames is presented to the model (static)."""

    attention: str = "diffusion_forcing"
    chunk_frames: int = 3
    window_frames: int | None = None  # teacher forcing: clean frames visible before the chunk
    sink_frames: int = 0
    context_noise: float = 0.0

    def __post_init__(self):
        if self.attention not in ATTENTION_LAYOUTS:
            raise ValueError(
                f"config.train.attention: unknown layout {self.attention!r}; choose from {ATTENTION_LAYOUTS}"
            )


def sample_timesteps(key, batch: int, frames: int, chunk: int, how: str, table: jax.Array, lo=0, hi=None):
    """[B, F] model timesteps drawn from the shifted training table (indices in [lo, hi))."""
    if how not in T_SAMPLING:
        raise ValueError(f"config.train.t_sampling: unknown mode {how!r}; choose from {T_SAMPLING}")
    hi = table.shape[0] if hi is None else hi
    if how == "clip":
        idx = jax.random.randint(key, (batch, 1), lo, hi)
        idx = jnp.broadcast_to(idx, (batch, frames))
    elif how == "chunk":
        idx = jax.random.randint(key, (batch, frames // chunk), lo, hi)
        idx = jnp.repeat(idx, chunk, axis=1)
    else:
        idx = jax.random.randint(key, (batch, frames), lo, hi)
    return table[idx]  # [B, F]


def clip_forward(graphdef, params, x, t, text, layout: ClipLayout, clean=None) -> jax.Array:
    """Velocity of the model on a whole clip under `layout`.

    x [B, F, h, w, C] noisy latents, t [B, F], text [B, T, text_dim] (or TextKV);
    clean [B, F, h, w, C]: the clean context (teacher forcing only). Returns v [B, F, h, w, C].
    """
    f = x.shape[1]
    pos = jnp.arange(f, dtype=jnp.int32)
    if layout.attention == "bidirectional":
        return wan.forward(graphdef, params, x, t, text, pos).velocity
    if layout.attention == "diffusion_forcing":
        mask = attn.block_causal_mask(f, layout.chunk_frames)
        return wan.forward(graphdef, params, x, t, text, pos, None, mask).velocity
    if clean is None:
        raise ValueError("teacher_forcing needs the clean clip as context")
    mask = attn.teacher_forcing_mask(f, layout.chunk_frames, layout.window_frames, layout.sink_frames)
    x_in = jnp.concatenate([clean.astype(x.dtype), x], axis=1)  # [B, 2F, h, w, C]
    t_in = jnp.concatenate([jnp.full_like(t, layout.context_noise), t], axis=1)  # [B, 2F]
    out = wan.forward(graphdef, params, x_in, t_in, text, jnp.concatenate([pos, pos]), None, mask)
    return out.velocity[:, f:]


def drop_text(key, text: jax.Array, rate: float) -> jax.Array:
    """text [B, T, D] with each example's embeddings zeroed with probability `rate` (0: unchanged)."""
    if rate <= 0.0:
        return text
    keep = jax.random.bernoulli(key, 1.0 - rate, (text.shape[0],))  # [B]
    return jnp.where(keep[:, None, None], text, jnp.zeros_like(text))


def flow_matching_loss(
    graphdef, params, x0, text, key, layout: ClipLayout, t_sampling: str, table, frame_weights=None
):
    """Mean squared error between the predicted velocity and eps - x0 (per-frame weights optional)."""
    b, f = x0.shape[:2]
    k_t, k_eps = jax.random.split(key)
    t = sample_timesteps(k_t, b, f, layout.chunk_frames, t_sampling, table)  # [B, F]
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    sigma = (t / 1000.0)[:, :, None, None, None]
    x_t = smp_lib.add_noise(x0, eps, sigma)
    v = clip_forward(graphdef, params, x_t, t, text, layout, clean=x0)
    err = jnp.mean(jnp.square(v.astype(jnp.float32) - (eps - x0)), axis=(2, 3, 4))  # [B, F]
    if frame_weights is not None:
        err = err * frame_weights[None]
    return jnp.mean(err), dict(t_mean=jnp.mean(t))


# --------------------------------------------------------------------------------------------
# Shared pieces of every objective
# --------------------------------------------------------------------------------------------


def text_encoder(train_cfg, model_cfg: wan.WanConfig, seed: int):
    """The frozen PanWorld word encoder, built exactly as `launch/rollout.py` builds it (same seed),
    so a trained DiT sees the same prompt embeddings when streamed."""
    from adastate_jax.data.panworld import prompt_vocabulary

    return text_lib.WordEmbeddingEncoder(
        text_lib.WordEmbeddingConfig(
            vocab=tuple(prompt_vocabulary()), text_len=model_cfg.text_len, text_dim=model_cfg.text_dim
        ),
        rngs=nnx.Rngs(seed),
    )


def batch_text(text_graphdef, frozen, batch) -> jax.Array:
    """[B, T, text_dim] prompt embeddings: `batch['text']` if the data carries them, else the frozen
    word encoder applied to `batch['prompt_ids']`."""
    if "text" in batch:
        return batch["text"].astype(jnp.float32)
    if text_graphdef is None or frozen is None or "text" not in frozen:
        raise ValueError(
            "batch has no 'text' embeddings and no text encoder is configured (config.text.kind)"
        )
    return nnx.merge(text_graphdef, frozen["text"])(batch["prompt_ids"])


def guarded_update(old: TrainState, new: TrainState, ok: jax.Array) -> TrainState:
    """`new` when `ok`, else `old` (a non-finite step leaves the last good state in place)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def apply_gradients(objective, state: TrainState, loss, aux: dict, grads) -> tuple[TrainState, dict]:
    """One optimiser + EMA update of `state.params` from `grads`, kept only if loss and grad norm
    are finite (`objective` provides `tx`, `ema_decay` and `schedule`). Returns (state, metrics)."""
    grad_norm = optax.global_norm(grads)
    updates, opt_state = objective.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        ema = state_lib.ema_update(ema, params, objective.ema_decay, state.step.astype(jnp.float32))
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=objective.schedule(state.step), finite=ok, **aux)
    return guarded_update(state, new, ok), metrics


def step_key(state: TrainState) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


class SingleModelObjective:
    """Base of `flow_matching` and `ode_init`: one trained DiT, AdamW, EMA, frozen extras.

    Subclasses implement `loss(params, frozen, batch, key) -> (loss, aux)`.
    """

    name = "base"

    def __init__(self, cfg, model_cfg: wan.WanConfig):
        self.cfg = cfg
        self.train_cfg = cfg.train
        self.model_cfg = model_cfg
        self.graphdef, _ = wan.abstract_model(model_cfg)
        self.tx = state_lib.make_optimizer(cfg.train)
        self.schedule = state_lib.make_schedule(cfg.train)
        self.ema_decay = float(cfg.train.ema)
        self.seed = int(cfg.seed)
        if cfg.text.kind == "words":
            enc = text_encoder(cfg.train, model_cfg, self.seed)
            self.text_graphdef = nnx.split(enc)[0]
        else:
            self.text_graphdef = None
        table = smp_lib.training_timestep_table(
            int(cfg.sampler.num_train_timesteps), float(cfg.sampler.shift)
        )
        self.table = np.asarray(table, np.float32)

    # --- what gets loaded from disk before init (name -> (graphdef-config, path)) ---------
    def pretrained(self) -> dict[str, tuple[wan.WanConfig, str]]:
        path = str(self.train_cfg.get("init_from", "")) or str(self.cfg.checkpoint.path)
        return {"params": (self.model_cfg, path)} if path else {}

    def frozen_extra(self, loaded: dict[str, Any]) -> dict[str, Any]:
        return {}

    def init_state(self, rng: jax.Array, loaded: dict[str, Any]) -> TrainState:
        """Pure: build the whole state (traced under jit with out_shardings)."""
        params = loaded.get("params")
        if params is None:
            params = nnx.split(wan.create_model(self.model_cfg, seed=self.seed))[1]
        frozen = dict(self.frozen_extra(loaded))
        if self.text_graphdef is not None:
            frozen["text"] = nnx.split(text_encoder(self.train_cfg, self.model_cfg, self.seed))[1]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=state_lib.copy_tree(params) if self.ema_decay > 0 else None,
            rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
            frozen=frozen or None,
        )

    def loss(self, params, frozen, batch, key):
        raise NotImplementedError

    def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        key = step_key(state)
        (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(
            state.params, state.frozen, batch, key
        )
        return apply_gradients(self, state, loss, aux, grads)

    def frames_per_example(self, batch_shapes) -> int:
        return int(batch_shapes["latents"][1])


class FlowMatching(SingleModelObjective):
    """Teacher / base training: flow matching on clips (see the module docstring)."""

    name = "flow_matching"

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        tc = cfg.train
        window = tc.get("tf_window", -1)
        self.layout = ClipLayout(
            attention=str(tc.attention),
            chunk_frames=int(cfg.stream.chunk_frames),
            window_frames=None if window is None or int(window) < 0 else int(window),
            sink_frames=int(tc.get("tf_sink", 0)),
            context_noise=float(cfg.sampler.context_noise),
        )
        self.t_sampling = str(tc.t_sampling)
        self.text_dropout = float(tc.get("text_dropout", 0.0))
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ValueError(f"config.train.text_dropout={self.text_dropout} must be in [0, 1]")

    def loss(self, params, frozen, batch, key):
        x0 = batch["latents"].astype(jnp.float32)  # [B, F, h, w, C]
        text = batch_text(self.text_graphdef, frozen, batch)  # [B, T, D]
        if self.text_dropout > 0.0:  # split only then: runs without dropout keep their noise draws
            key, k_drop = jax.random.split(key)
            text = drop_text(k_drop, text, self.text_dropout)
        return flow_matching_loss(
            self.graphdef, params, x0, text, key, self.layout, self.t_sampling, jnp.asarray(self.table)
        )


def export_params(state: TrainState):
    """The params to stream from: the EMA when kept, else the raw params."""
    return state.ema_params if state.ema_params is not None else state.params
