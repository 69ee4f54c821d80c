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

Random exit step: for exit step j the chunk's output is the x0 estimate of denoising step j, i.e.
the same `step` with the denoising list truncated to its first j + 1 entries; one Streamer per
truncation and a `lax.switch` on j (drawn per rollout, shared by all chunks and devices). Unlike
Self-Forcing, gradient flows through every denoising step of the exit path (not only the last).

Gradient through the cache: `adastate` keeps the carry's K/V, latents and state differentiable for
`truncation_chunks` chunks (stop_gradient every K chunks); the other policies detach the cache
after every chunk (Self-Forcing's behaviour). The prompt's cross-attention K/V are never cut.

Must not know: data pipelines, files, meshes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from einops import rearrange

from adastate_jax.models import wan
from adastate_jax.streaming import sampler as smp_lib
from adastate_jax.streaming.anchors import StreamConfig
from adastate_jax.streaming.rollout import Streamer
from adastate_jax.streaming.sampler import SamplerConfig
from adastate_jax.training import state as state_lib
from adastate_jax.training.objectives import flow_matching as fm
from adastate_jax.training.objectives.flow_matching import ClipLayout, SingleModelObjective
from adastate_jax.training.objectives.ode_init import guided_clip_velocity, teacher_model_config
from adastate_jax.training.state import TrainState

CACHE_FIELDS = ("k", "v", "latents", "state")  # carry fields cut every K chunks (not text, not counters)


def horizon_weights(num_frames: int, alpha: float) -> np.ndarray:
    """[N] w_i = 1 + alpha * i / (N - 1), normalised to mean 1 (all ones for alpha = 0 or N = 1)."""
    if num_frames <= 1:
        return np.ones((max(num_frames, 1),), np.float32)
    w = 1.0 + alpha * np.arange(num_frames) / (num_frames - 1)
    return (w / w.mean()).astype(np.float32)


def cut_cache(carry, cut):
    """stop_gradient on the carry's cache fields where `cut` (a traced bool)."""
    upd = {}
    for name in CACHE_FIELDS:
        x = getattr(carry, name)
        upd[name] = jnp.where(cut, jax.lax.stop_gradient(x), x)
    return carry.replace(**upd)


class SelfForcingDMD(SingleModelObjective):
    name = "self_forcing_dmd"

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        tc = cfg.train
        self.teacher_cfg = teacher_model_config(cfg, model_cfg)
        self.teacher_graphdef = wan.abstract_model(self.teacher_cfg)[0]  # the critic has the teacher's shape
        self.layout = ClipLayout(str(tc.teacher_attention), int(cfg.stream.chunk_frames))
        self.t_sampling = str(tc.t_sampling)
        self.stream_cfg = StreamConfig.from_dict(cfg.stream.to_dict())
        base = SamplerConfig.from_dict(cfg.sampler.to_dict())
        steps = base.denoising_steps
        self.streamers = [
            Streamer(
                self.graphdef,
                model_cfg,
                self.stream_cfg,
                dataclasses.replace(base, denoising_steps=steps[: j + 1], guidance_scale=1.0),
            )
            for j in range(len(steps))
        ]
        self.tx = state_lib.make_optimizer(tc, b1=float(tc.get("dmd_b1", tc.b1)))
        self.critic_tx = state_lib.make_optimizer(tc, lr=float(tc.critic_lr), b1=float(tc.critic_b1))
        self.critic_schedule = state_lib._scaled(tc, float(tc.critic_lr))
        k = int(tc.truncation_chunks)
        if k < 1:
            raise ValueError(f"config.train.truncation_chunks must be >= 1, got {k}")
        self.truncation = k if self.stream_cfg.anchor == "adastate" else 1
        self.remat = bool(tc.get("remat_chunks", True))
        self.alpha = float(tc.alpha)
        self.critic_steps = int(tc.critic_steps)
        if self.critic_steps < 1:
            raise ValueError(f"config.train.critic_steps must be >= 1, got {self.critic_steps}")
        self.guidance = float(tc.teacher_guidance)
        lo, hi = int(tc.dmd_min_t), int(tc.dmd_max_t)
        if not 0 <= lo < hi <= int(cfg.sampler.num_train_timesteps):
            raise ValueError(
                f"config.train.dmd_min_t / dmd_max_t: need 0 <= {lo} < {hi} <= num_train_timesteps"
            )
        self.t_range = (lo, hi)
        self.shift = float(cfg.sampler.shift)

    # --- state ----------------------------------------------------------------------------
    def pretrained(self):
        path = str(self.train_cfg.get("teacher_path", ""))
        if not path:
            raise ValueError("config.train.teacher_path: self_forcing_dmd needs the teacher's params")
        out = super().pretrained()
        out["teacher"] = (self.teacher_cfg, path)
        return out

    def frozen_extra(self, loaded):
        return {"teacher": loaded["teacher"]}

    def init_state(self, rng, loaded) -> TrainState:
        state = super().init_state(rng, loaded)
        critic = state_lib.copy_tree(loaded["teacher"])  # the fake score starts as the real one
        return state.replace(critic_params=critic, critic_opt_state=self.critic_tx.init(critic))

    # --- the student's rollout -----------------------------------------------------------------
    def rollout(self, params, text, key, exit_idx, num_chunks: int) -> jax.Array:
        """Student video [B, N * F, h, w, C] streamed chunk by chunk with its own cache."""
        prompts = text[None]  # [1, B, T, D]: a one-prompt table
        key_raw = jax.random.key_data(key)
        k_trunc = self.truncation

        def with_streamer(streamer):
            def go(params, prompts, key_raw):
                carry = streamer.init_carry(params, prompts, key_raw)

                def one_chunk(p, carry):
                    return streamer.step(p, carry, jnp.int32(0), prompts)

                if self.remat:
                    one_chunk = jax.checkpoint(one_chunk)

                def body(carry, c):
                    carry = cut_cache(carry, (c % k_trunc == 0) & (c > 0))
                    carry, out = one_chunk(params, carry)
                    return carry, out.latents  # [B, F, h, w, C]

                _, lat = jax.lax.scan(body, carry, jnp.arange(num_chunks))
                return lat  # [N, B, F, h, w, C]

            return go

        lat = jax.lax.switch(exit_idx, [with_streamer(s) for s in self.streamers], params, prompts, key_raw)
        return rearrange(lat, "n b f h w c -> b (n f) h w c")

    def _num_chunks(self, batch) -> int:
        f = batch["latents"].shape[1]
        return f // self.stream_cfg.chunk_frames

    def _exit(self, key):
        return jax.random.randint(key, (), 0, len(self.streamers))

    # --- losses ------------------------------------------------------------------------------
    def dmd_loss(self, params, critic_params, teacher_params, text, key, num_chunks):
        k_exit, k_roll, k_t, k_eps = jax.random.split(key, 4)
        exit_idx = self._exit(k_exit)
        x = self.rollout(params, text, k_roll, exit_idx, num_chunks)  # [B, N, h, w, C]
        b, n = x.shape[:2]
        lo, hi = self.t_range
        t_raw = jax.random.randint(k_t, (b, 1), lo, hi).astype(jnp.float32)
        t = jnp.broadcast_to(smp_lib.shift_sigma(t_raw / 1000.0, self.shift) * 1000.0, (b, n))  # [B, N]
        sigma = (t / 1000.0)[:, :, None, None, None]
        x_s = jax.lax.stop_gradient(x)
        x_t = smp_lib.add_noise(x_s, jax.random.normal(k_eps, x.shape), sigma)
        v_real = guided_clip_velocity(
            self.teacher_graphdef, teacher_params, x_t, t, text, self.layout, self.guidance
        )
        v_fake = fm.clip_forward(self.teacher_graphdef, critic_params, x_t, t, text, self.layout)
        x0_real = jax.lax.stop_gradient(x_t - sigma * v_real)
        x0_fake = jax.lax.stop_gradient(x_t - sigma * v_fake)
        normalizer = jnp.mean(jnp.abs(x_s - x0_real), axis=(1, 2, 3, 4), keepdims=True)
        grad = jnp.nan_to_num((x0_fake - x0_real) / normalizer)
        per_frame = jnp.mean(jnp.square(x - jax.lax.stop_gradient(x - grad)), axis=(2, 3, 4))  # [B, N]
        w = jnp.asarray(horizon_weights(n, self.alpha))
        loss = 0.5 * jnp.mean(per_frame * w[None])
        aux = dict(
            dmd_gap=jnp.mean(jnp.abs(x0_fake - x0_real)),
            exit_step=exit_idx.astype(jnp.float32),
            sample_std=jnp.std(x_s),
        )
        return loss, aux

    def critic_loss(self, critic_params, x_fake, text, key):
        return fm.flow_matching_loss(
            self.teacher_graphdef,
            critic_params,
            x_fake,
            text,
            key,
            self.layout,
            self.t_sampling,
            jnp.asarray(self.table),
        )

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
            x_fake = jax.lax.stop_gradient(
                self.rollout(student, text, k_roll, self._exit(k_exit), num_chunks)
            )
            (loss, _), g = jax.value_and_grad(self.critic_loss, has_aux=True)(cp, x_fake, text, k_loss)
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
