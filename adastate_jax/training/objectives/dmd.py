"""Self forcing + DMD: the student streams with its own cache; teacher and critic score the result.

Owns: the student rollout for training (the streaming `Streamer.step` of any anchor policy, scanned
over chunks, one `jax.checkpoint` per chunk, a random exit step per rollout, and for `adastate`
back-propagation through the committed carry truncated every `truncation_chunks` chunks), the DMD
generator loss with horizon-weighted frames, the critic's flow-matching loss on detached student
samples, and the combined train step (`critic_steps` critic updates, then one generator update and
its EMA).

DMD (Self-Forcing / DMD2 conventions, see reference-facts.md):
  t ~ U[dmd_min_t, dmd_max_t] per sample, shifted;  x_t = (1 - s) sg(x) + s eps;
  x0_real from the frozen teacher with CFG (`teacher_guidance`, unconditional = zero text),
  x0_fake from the critic (conditional only);
  grad = (x0_fake - x0_real) / mean|x - x0_real|   (per sample);
  loss = 0.5 * mean_i w_i * mean((x_i - sg(x_i - grad_i))^2),
  w_i = 1 + alpha * i / (N - 1) over the N latent frames of the rollout, normalised to mean 1.

Random exit step: for exit step j the chunk's output (and the cache it commits) is the x0 estimate
of denoising step j, i.e. the same `step` with the denoising list truncated to its first j + 1
entries; j is drawn per rollout (shared by all chunks and devices) and passed traced to
`Streamer.step(exit_step=j)`, one Streamer and one compiled rollout for every j (the steps after j
are skipped at run time by a `lax.cond`). Unlike Self-Forcing, gradient flows through every
denoising step of the exit path (not only the last).

Three models, three sizes: the student (`config.model`), the frozen teacher (`config.teacher_model`,
default the student's config; params from `config.train.teacher_path`) and the critic
(`config.critic_model`, default the teacher's config; params from `config.train.critic_path`, else
a copy of the teacher when the shapes match (DMD2), else random only with
`config.train.critic_init='random'`). Each runs with its own graphdef; the student's params, the
critic's params and optimiser state and the frozen teacher live in one `TrainState` and are
checkpointed together.

Gradient through the cache: `adastate` keeps the carry's K/V, latents and state differentiable for
`truncation_chunks` chunks (stop_gradient every K chunks); the other policies detach the cache
after every chunk (Self-Forcing's behaviour). The prompt's cross-attention K/V are never cut.

How the adaptive state learns (switches; the study measures them, method.md):
  (a) through the chunks that read it: `config.train.truncation_chunks` K (int >= 1, default 2):
      chunk c + 1's loss reaches the state chunk c committed iff (c + 1) % K != 0;
  (b) a direct signal on every chunk's clean state, `config.train.state_loss` (default 'none')
      times `config.train.state_loss_weight` (float >= 0, default 1), adastate only:
        'none'     nothing besides (a);
        'regress'  mean squared distance of each state frame to the mean of its chunk's content
                   frames, stop-gradient: the content the state was denoised with and summarises
                   (the mean is the least-squares one-frame summary; the stop-gradient keeps the
                   content from being pulled toward the state);
        'dmd'      DMD on the state as F_s frames at the temporal index of the state slot the next
                   chunk reads it at (`anchors.context_schedule`; 0 in both time layouts), with no
                   context (it is the oldest entry the next chunk sees, so a causal teacher gives
                   it none): real score = teacher with CFG, fake = critic, which then also fits
                   the detached states by flow matching (the fake score must model the states'
                   distribution, not only the content's);
  (c) the start: `config.train.init_from` a trained `window` student's export (the paper's path;
      same params, the state slot is only a layout) or an ODE init; `config.train.init_policy`
      checks the export's policy and the export's info.json records the chain and its steps
      (`training/loop.py`).
The teacher's and the critic's scoring layout is the teacher's own policy (`flow_matching.
teacher_layout`: `teacher_attention` with `tf_window` / `tf_sink`), derived by
`anchors.clip_layout` like every training layout; the student always streams through
`Streamer.step` (every policy, adastate's state slot and ema_sink's merge included).

Must not know: data pipelines, files, meshes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from einops import rearrange
from flax import nnx

from adastate_jax.models import wan
from adastate_jax.streaming import anchors
from adastate_jax.streaming import sampler as smp_lib
from adastate_jax.streaming.rollout import Streamer
from adastate_jax.training import state as state_lib
from adastate_jax.training.objectives import flow_matching as fm
from adastate_jax.training.objectives.flow_matching import SingleModelObjective
from adastate_jax.training.objectives.ode_init import guided_clip_velocity
from adastate_jax.training.state import TrainState

CACHE_FIELDS = ("k", "v", "latents", "state")  # carry fields cut every K chunks (not text, not counters)
STATE_KEY = 0x57A7E  # folded into a step's key for the state term's noise and timesteps


def horizon_weights(num_frames: int, alpha: float) -> np.ndarray:
    """[N] w_i = 1 + alpha * i / (N - 1), normalised to mean 1 (all ones for alpha = 0 or N = 1)."""
    if num_frames <= 1:
        return np.ones((max(num_frames, 1),), np.float32)
    w = 1.0 + alpha * np.arange(num_frames) / (num_frames - 1)
    return (w / w.mean()).astype(np.float32)


def same_param_shapes(a: wan.WanConfig, b: wan.WanConfig) -> bool:
    """Whether two DiT configs have params of the same tree structure, shapes and dtypes."""
    sa, sb = wan.abstract_model(a)[1], wan.abstract_model(b)[1]
    leaves_a, tree_a = jax.tree.flatten(sa)
    leaves_b, tree_b = jax.tree.flatten(sb)
    if tree_a != tree_b:
        return False
    return all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(leaves_a, leaves_b))


def frames_velocity(graphdef, params, x, t, text, pos, scale: float) -> jax.Array:
    """Velocity of frames x [B, F, h, w, C] that attend only to each other, at temporal indices
    pos [F], with classifier-free guidance `scale` (unconditional = zero text) when != 1."""
    if scale == 1.0:
        return wan.forward(graphdef, params, x, t, text, pos).velocity
    both = wan.forward(
        graphdef,
        params,
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        jnp.concatenate([text, jnp.zeros_like(text)]),
        pos,
    ).velocity
    v_c, v_u = jnp.split(both, 2)
    return v_u + scale * (v_c - v_u)


def cut_cache(carry, cut):
    """stop_gradient on the carry's cache fields where `cut` (a traced bool)."""
    upd = {}
    for name in CACHE_FIELDS:
        x = getattr(carry, name)
        upd[name] = jnp.where(cut, jax.lax.stop_gradient(x), x)
    return carry.replace(**upd)


class SelfForcingDMD(SingleModelObjective):
    name = "self_forcing_dmd"

    def __init__(self, exp):
        super().__init__(exp)
        tc = exp.train
        self.teacher_cfg = exp.teacher
        self.teacher_graphdef = wan.abstract_model(self.teacher_cfg)[0]
        self.critic_cfg = exp.critic
        self.critic_graphdef = wan.abstract_model(self.critic_cfg)[0]
        self.critic_path = tc.critic_path
        self.critic_init = tc.critic_init
        if (
            not self.critic_path
            and self.critic_init == "teacher"
            and not same_param_shapes(self.critic_cfg, self.teacher_cfg)
        ):
            raise ValueError(
                "config.critic_model differs in shape from the teacher (config.teacher_model / "
                "config.model), so the critic cannot start as a copy of the teacher: set "
                "config.train.critic_path to a params dir of the critic's shape, or "
                "config.train.critic_init='random' to start it from random params"
            )
        # the teacher's and the critic's scoring layout: the teacher's own policy (a streaming
        # policy replayed by anchors.clip_layout, like every training layout)
        self.layout = fm.teacher_layout(exp, tc.teacher_attention)
        self.t_sampling = tc.t_sampling
        self.stream_cfg = exp.stream
        self.state_loss_kind = tc.state_loss  # none | dmd | regress (the module docstring)
        self.state_loss_weight = tc.state_loss_weight
        if tc.state_loss != "none" and not exp.stream.query_state_frames:
            raise ValueError(
                f"config.train.state_loss={tc.state_loss!r} needs an adaptive state "
                f"(config.stream.anchor='adastate'), got config.stream.anchor={exp.stream.anchor!r}"
            )
        # where the state sits for the chunk that reads it: the state slot's temporal indices
        # at chunk 1 (the same at every chunk), from the policy's own bookkeeping
        fs = exp.stream.query_state_frames
        self.state_positions = np.zeros((0,), np.int32)
        if fs:
            self.state_positions = np.asarray(
                anchors.context_schedule(exp.stream, 2)[1].slot_pos[:fs], np.int32
            )
        base = exp.sampler
        self.num_exits = len(base.denoising_steps)
        self.streamer = Streamer(  # refresh_noise='add': the cache refresh of Self-Forcing's training
            self.graphdef,
            exp.model,
            self.stream_cfg,
            dataclasses.replace(base, guidance_scale=1.0, refresh_noise="add"),
        )
        self.tx = state_lib.make_optimizer(tc, b1=tc.dmd_b1)
        self.critic_tx = state_lib.make_optimizer(tc, lr=tc.critic_lr, b1=tc.critic_b1)
        self.critic_schedule = state_lib._scaled(tc, tc.critic_lr)
        self.truncation = tc.truncation_chunks if self.stream_cfg.anchor == "adastate" else 1
        self.remat = tc.remat_chunks
        self.alpha = tc.alpha
        self.critic_steps = tc.critic_steps
        self.guidance = tc.teacher_guidance
        lo, hi = tc.dmd_min_t, tc.dmd_max_t
        if hi > exp.sampler.num_train_timesteps:
            raise ValueError(
                f"config.train.dmd_max_t: {hi} exceeds config.sampler.num_train_timesteps="
                f"{exp.sampler.num_train_timesteps}"
            )
        self.t_range = (lo, hi)
        self.shift = exp.sampler.shift

    # --- state ----------------------------------------------------------------------------
    def pretrained(self):
        path = self.train_cfg.teacher_path
        if not path:
            raise ValueError("config.train.teacher_path: self_forcing_dmd needs the teacher's params")
        out = super().pretrained()
        out["teacher"] = (self.teacher_cfg, path)
        if self.critic_path:
            out["critic"] = (self.critic_cfg, self.critic_path)
        return out

    def frozen_extra(self, loaded):
        return {"teacher": loaded["teacher"]}

    def init_state(self, rng, loaded) -> TrainState:
        state = super().init_state(rng, loaded)
        if self.critic_path:
            critic = state_lib.copy_tree(loaded["critic"])
        elif self.critic_init == "random":
            critic = nnx.split(wan.create_model(self.critic_cfg, seed=self.seed + 1))[1]
        else:
            critic = state_lib.copy_tree(loaded["teacher"])  # the fake score starts as the real one
        return state.replace(critic_params=critic, critic_opt_state=self.critic_tx.init(critic))

    # --- the student's rollout -----------------------------------------------------------------
    def chunk_body(self, params, prompts, exit_idx):
        """The rollout's scan body `(carry, c) -> (carry, (latents [B, F, h, w, C], state [B, F_s, h, w,
        C]))`: cut the cache's gradient before chunk c when c is a multiple of the truncation K (only
        `adastate` keeps K > 1), then stream chunk c with `Streamer.step`."""
        streamer = self.streamer
        k_trunc = self.truncation

        def one_chunk(p, carry):
            return streamer.step(p, carry, jnp.int32(0), prompts, exit_step=exit_idx)

        if self.remat:
            one_chunk = jax.checkpoint(one_chunk)

        def body(carry, c):
            carry = cut_cache(carry, (c % k_trunc == 0) & (c > 0))
            carry, out = one_chunk(params, carry)
            return carry, (out.latents, out.state)

        return body

    def rollout(self, params, text, key, exit_idx, num_chunks: int):
        """Student video [B, N * F, h, w, C] streamed chunk by chunk with its own cache, and the clean
        adaptive state of every chunk [B, N, F_s, h, w, C] (F_s = 0 unless adastate); every chunk
        exits at denoising step `exit_idx` ([] int32, traced)."""
        prompts = text[None]  # [1, B, T, D]: a one-prompt table
        carry = self.streamer.init_carry(params, prompts, jax.random.key_data(key))
        body = self.chunk_body(params, prompts, exit_idx)
        _, (lat, states) = jax.lax.scan(body, carry, jnp.arange(num_chunks))  # [N, B, F(_s), h, w, C]
        return rearrange(lat, "n b f h w c -> b (n f) h w c"), jnp.moveaxis(states, 0, 1)

    def _num_chunks(self, batch) -> int:
        f = batch["latents"].shape[1]
        return f // self.stream_cfg.chunk_frames

    def _exit(self, key):
        return jax.random.randint(key, (), 0, self.num_exits)

    # --- losses ------------------------------------------------------------------------------
    def _dmd_per_frame(self, x, key, real, fake):
        """DMD surrogate per frame [B, F] for samples x [B, F, h, w, C] (one t per sample) and the
        mean |x0_fake - x0_real|; `real` / `fake`: (x_t, t, sg(x)) -> velocity."""
        k_t, k_eps = key
        b, n = x.shape[:2]
        lo, hi = self.t_range
        t_raw = jax.random.randint(k_t, (b, 1), lo, hi).astype(jnp.float32)
        t = jnp.broadcast_to(smp_lib.shift_sigma(t_raw / 1000.0, self.shift) * 1000.0, (b, n))  # [B, N]
        sigma = (t / 1000.0)[:, :, None, None, None]
        x_s = jax.lax.stop_gradient(x)
        x_t = smp_lib.add_noise(x_s, jax.random.normal(k_eps, x.shape), sigma)
        x0_real = jax.lax.stop_gradient(x_t - sigma * real(x_t, t, x_s))
        x0_fake = jax.lax.stop_gradient(x_t - sigma * fake(x_t, t, x_s))
        normalizer = jnp.mean(jnp.abs(x_s - x0_real), axis=(1, 2, 3, 4), keepdims=True)
        grad = jnp.nan_to_num((x0_fake - x0_real) / normalizer)
        per_frame = jnp.mean(jnp.square(x - jax.lax.stop_gradient(x - grad)), axis=(2, 3, 4))  # [B, N]
        return per_frame, jnp.mean(jnp.abs(x0_fake - x0_real))

    def dmd_loss(self, params, critic_params, teacher_params, text, key, num_chunks):
        k_exit, k_roll, k_t, k_eps = jax.random.split(key, 4)
        exit_idx = self._exit(k_exit)
        x, states = self.rollout(params, text, k_roll, exit_idx, num_chunks)  # [B, N, h, w, C]

        # a 'teacher_forcing' layout scores each noisy chunk with the student's clean earlier chunks
        # as context, as the teacher is trained and streams (the other layouts ignore `clean`)
        def real(x_t, t, x_s):
            return guided_clip_velocity(
                self.teacher_graphdef, teacher_params, x_t, t, text, self.layout, self.guidance, clean=x_s
            )

        def fake(x_t, t, x_s):
            return fm.clip_forward(self.critic_graphdef, critic_params, x_t, t, text, self.layout, clean=x_s)

        per_frame, gap = self._dmd_per_frame(x, (k_t, k_eps), real, fake)
        w = jnp.asarray(horizon_weights(x.shape[1], self.alpha))
        content = 0.5 * jnp.mean(per_frame * w[None])
        state_term = self.state_loss(
            states, x, teacher_params, critic_params, text, jax.random.fold_in(key, STATE_KEY)
        )
        loss = content + self.state_loss_weight * state_term
        aux = dict(
            dmd_gap=gap,
            exit_step=exit_idx.astype(jnp.float32),
            sample_std=jnp.std(jax.lax.stop_gradient(x)),
            state_loss=state_term,
        )
        return loss, aux

    # --- the direct signal on the adaptive state (config.train.state_loss) ---------------------
    def state_loss(self, states, video, teacher_params, critic_params, text, key):
        """[] the state term (before `state_loss_weight`): 0 for 'none' (and without a state).

        states [B, N, F_s, h, w, C] clean states of the rollout; video [B, N * F, h, w, C] its content.
        'regress': mean squared distance of every state frame to the mean of its chunk's content
          frames (stop-gradient): the chunk the state was denoised with and summarises.
        'dmd': each chunk's state is scored as F_s frames at the temporal indices of the state slot
          that the next chunk reads it at (`state_positions`), attending to each other only (the
          state is the oldest entry the next chunk sees: a causal teacher gives it no earlier
          context), real score = teacher with CFG, fake = critic (which also trains on the states)."""
        b, n, fs = states.shape[:3]
        if self.state_loss_kind == "none" or fs == 0:
            return jnp.zeros((), jnp.float32)
        if self.state_loss_kind == "regress":
            chunks = video.reshape(b, n, -1, *video.shape[2:])  # [B, N, F, h, w, C]
            target = jax.lax.stop_gradient(jnp.mean(chunks, axis=2, keepdims=True))  # [B, N, 1, h, w, C]
            return jnp.mean(jnp.square(states - target))
        x = states.reshape(b * n, fs, *states.shape[3:])  # one F_s-frame clip per (sample, chunk)
        text_n = jnp.repeat(text, n, axis=0)  # [B * N, T, D] (sample-major, as the reshape)
        pos = jnp.asarray(self.state_positions)

        def real(x_t, t, _):
            return frames_velocity(self.teacher_graphdef, teacher_params, x_t, t, text_n, pos, self.guidance)

        def fake(x_t, t, _):
            return frames_velocity(self.critic_graphdef, critic_params, x_t, t, text_n, pos, 1.0)

        per_frame, _ = self._dmd_per_frame(x, tuple(jax.random.split(key)), real, fake)
        return 0.5 * jnp.mean(per_frame)

    def critic_loss(self, critic_params, x_fake, text, key, states=None):
        """Flow matching of the critic on the student's detached content (the teacher's layout)
        and, with state_loss='dmd', on its detached states (the frames the state term scores)."""
        loss, aux = fm.flow_matching_loss(
            self.critic_graphdef,
            critic_params,
            x_fake,
            text,
            key,
            self.layout,
            self.t_sampling,
            jnp.asarray(self.table),
        )
        if self.state_loss_kind == "dmd" and states is not None:
            loss = loss + self._state_flow_matching(
                critic_params, states, text, jax.random.fold_in(key, STATE_KEY)
            )
        return loss, aux

    def _state_flow_matching(self, critic_params, states, text, key):
        b, n, fs = states.shape[:3]
        x0 = states.reshape(b * n, fs, *states.shape[3:])
        k_t, k_eps = jax.random.split(key)
        t = fm.sample_timesteps(k_t, b * n, fs, fs, "clip", jnp.asarray(self.table))  # [B * N, F_s]
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        x_t = smp_lib.add_noise(x0, eps, (t / 1000.0)[:, :, None, None, None])
        text_n = jnp.repeat(text, n, axis=0)
        v = frames_velocity(self.critic_graphdef, critic_params, x_t, t, text_n, self.state_positions, 1.0)
        return jnp.mean(jnp.square(v - (eps - x0)))

    # --- the step ------------------------------------------------------------------------------
    def train_step(self, state: TrainState, batch):
        key = fm.step_key(state)
        text = fm.batch_text(self.text_graphdef, state.frozen, batch)  # [B, T, D]
        num_chunks = self._num_chunks(batch)
        k_critic, k_gen = jax.random.split(key)
        student = jax.lax.stop_gradient(state.params)

        def critic_update(carry, k):
            cp, copt = carry
            k_exit, k_roll, k_loss = jax.random.split(k, 3)
            x_fake, s_fake = jax.lax.stop_gradient(
                self.rollout(student, text, k_roll, self._exit(k_exit), num_chunks)
            )
            (loss, _), g = jax.value_and_grad(self.critic_loss, has_aux=True)(
                cp, x_fake, text, k_loss, s_fake
            )
            upd, copt = self.critic_tx.update(g, copt, cp)
            return (optax.apply_updates(cp, upd), copt), (loss, optax.global_norm(g))

        (critic, critic_opt), (c_loss, c_gnorm) = jax.lax.scan(
            critic_update,
            (state.critic_params, state.critic_opt_state),
            jax.random.split(k_critic, self.critic_steps),
        )
        (loss, aux), grads = jax.value_and_grad(self.dmd_loss, has_aux=True)(
            state.params, jax.lax.stop_gradient(critic), state.frozen["teacher"], text, k_gen, num_chunks
        )
        grad_norm = optax.global_norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = state_lib.ema_update(ema, params, self.ema_decay, state.step.astype(jnp.float32))
        new = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema,
            critic_params=critic,
            critic_opt_state=critic_opt,
        )
        ok = (
            jnp.isfinite(loss)
            & jnp.isfinite(grad_norm)
            & jnp.all(jnp.isfinite(c_loss))
            & jnp.all(jnp.isfinite(c_gnorm))
        )
        metrics = dict(
            loss=loss,
            grad_norm=grad_norm,
            critic_loss=jnp.mean(c_loss),
            critic_grad_norm=jnp.mean(c_gnorm),
            lr=self.schedule(state.step),
            critic_lr=self.critic_schedule(state.step),
            finite=ok,
            **aux,
        )
        return fm.guarded_update(state, new, ok), metrics
