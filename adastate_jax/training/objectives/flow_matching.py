"""Flow-matching objective: teacher / base training of the Wan DiT on clips.

Owns: the flow-matching loss on a clip of latents (x_t = (1 - s) x0 + s eps, target v = eps - x0,
shifted training timesteps), `ClipLayout` (which pass a clip runs and under which streaming
policy; `teacher_layout`, the teacher's, shared with the ODE / DMD teacher and critic) and
`clip_forward`, and the single-model train step shared with `ode_init` (grad, clip, AdamW, EMA,
non-finite guard).

Layouts (`config.train.attention`):
  bidirectional      every frame sees every frame, one timestep per clip (Wan's base training);
  diffusion_forcing  block-causal over chunks, a timestep per chunk (or frame / clip, see
                     `config.train.t_sampling`): each chunk denoises given noisier/cleaner past;
  teacher_forcing    the sequence [clean clip; noisy clip]: noisy chunk c sees the clean frames of
                     earlier chunks (optionally only a window of `config.train.tf_window` frames
                     plus the first `tf_sink`) and itself. Loss on the noisy half only.
Which frame sees which, and at which temporal index, is never written here: `ClipLayout` names a
streaming policy (the clip policy of tf_window / tf_sink at absolute time, or a student's
`config.stream`) and `streaming.anchors.clip_layout` derives the mask and positions from the
commit bookkeeping `Streamer.step` runs (see its docstring for the refusals).

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

from adastate_jax import build
from adastate_jax.config.schema import ATTENTION_LAYOUTS, T_SAMPLING  # declared with the fields
from adastate_jax.models import wan
from adastate_jax.streaming import anchors
from adastate_jax.streaming import sampler as smp_lib
from adastate_jax.streaming.anchors import StreamConfig
from adastate_jax.training import state as state_lib
from adastate_jax.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class ClipLayout:
    """How a clip of F latent frames is presented to the model (static).

    `attention` picks the pass: 'bidirectional' (every frame sees every frame), 'diffusion_forcing'
    (one copy of the clip; chunk c attends to the frames its streaming context holds, themselves
    noisy) or 'teacher_forcing' ([clean clip; noisy clip]: noisy chunk c attends to the clean
    frames its streaming context holds). Who sees whom, and at which temporal index, is the
    streaming policy `policy` replayed by `anchors.clip_layout`; without one, the clip policy of
    `window_frames` / `sink_frames` (absolute time: `full` when window_frames is None, else `window`,
    or `sink` with sink_frames > 0), the layout a teacher trains and scores with.
    """

    attention: str = "diffusion_forcing"
    chunk_frames: int = 3
    window_frames: int | None = None  # clean frames visible before the chunk (None: all)
    sink_frames: int = 0  # first frames always visible (with a window)
    context_noise: float = 0.0  # teacher forcing: timestep of the clean copy
    policy: StreamConfig | None = None  # a streaming policy (a student's config.stream) instead

    def __post_init__(self):
        if self.attention not in ATTENTION_LAYOUTS:
            raise ValueError(
                f"config.train.attention: unknown layout {self.attention!r}; choose from {ATTENTION_LAYOUTS}"
            )
        if self.policy is not None and self.policy.chunk_frames != self.chunk_frames:
            raise ValueError(
                f"ClipLayout: chunk_frames={self.chunk_frames} differs from the policy's "
                f"config.stream.chunk_frames={self.policy.chunk_frames}"
            )

    def stream_policy(self, num_frames: int) -> StreamConfig:
        """The streaming policy whose context a clip of `num_frames` frames reproduces."""
        if self.policy is not None:
            return self.policy
        try:
            return anchors.clip_policy(self.chunk_frames, self.window_frames, self.sink_frames, num_frames)
        except ValueError as e:
            raise ValueError(
                f"config.train.tf_window={self.window_frames} / tf_sink={self.sink_frames}: not a "
                f"streaming layout with chunks of {self.chunk_frames} frames ({e})"
            ) from None

    def frames(self, num_frames: int) -> anchors.ClipAttention | None:
        """The frame mask and positions of a clip of `num_frames` frames (None: bidirectional)."""
        if self.attention == "bidirectional":
            return None
        context = "clean" if self.attention == "teacher_forcing" else "noisy"
        return anchors.clip_layout(self.stream_policy(num_frames), int(num_frames), context)


def teacher_layout(exp, attention: str) -> ClipLayout:
    """The layout a clip-trained model of `exp` attends with: `attention` (config.train.attention
    for flow matching, config.train.teacher_attention for the ODE / DMD teacher and critic) with the
    teacher-forcing window and sink `config.train.tf_window` / `tf_sink`, clean context at
    `config.sampler.context_noise`."""
    tc = exp.train
    return ClipLayout(
        attention=attention,
        chunk_frames=exp.stream.chunk_frames,
        window_frames=None if tc.tf_window < 0 else tc.tf_window,
        sink_frames=tc.tf_sink,
        context_noise=float(exp.sampler.context_noise),
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
    frames = layout.frames(f)  # static: from the streaming policy's commit bookkeeping
    if frames is None:
        return wan.forward(graphdef, params, x, t, text, jnp.arange(f, dtype=jnp.int32)).velocity
    if frames.context == "clean":
        if clean is None:
            raise ValueError("teacher_forcing needs the clean clip as context")
        x = jnp.concatenate([clean.astype(x.dtype), x], axis=1)  # [B, 2F, h, w, C]
        t = jnp.concatenate([jnp.full_like(t, layout.context_noise), t], axis=1)  # [B, 2F]
    out = wan.forward(
        graphdef, params, x, t, text, frames.positions, None, frames.mask, key_pos=frames.key_positions
    )
    return out.velocity[:, -f:]


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

    def __init__(self, exp):
        self.exp = exp
        self.train_cfg = exp.train
        self.model_cfg = exp.model
        self.graphdef, _ = wan.abstract_model(exp.model)
        self.tx = state_lib.make_optimizer(exp.train)
        self.schedule = state_lib.make_schedule(exp.train)
        self.ema_decay = exp.train.ema
        self.seed = exp.seed
        if exp.text.kind == "words":
            self.text_graphdef = nnx.split(build.word_encoder(exp.model, self.seed))[0]
        else:
            self.text_graphdef = None
        table = smp_lib.training_timestep_table(exp.sampler.num_train_timesteps, exp.sampler.shift)
        self.table = np.asarray(table, np.float32)

    # --- what gets loaded from disk before init (name -> (graphdef-config, path)) ---------
    def pretrained(self) -> dict[str, tuple[wan.WanConfig, str]]:
        path = self.train_cfg.init_from or self.exp.checkpoint.path
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
            frozen["text"] = nnx.split(build.word_encoder(self.model_cfg, self.seed))[1]
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

    def __init__(self, exp):
        super().__init__(exp)
        tc = exp.train
        self.layout = teacher_layout(exp, tc.attention)
        self.t_sampling = tc.t_sampling
        self.text_dropout = tc.text_dropout

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
