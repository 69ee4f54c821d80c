"""ODE init: regress the causal student onto the teacher's few-step ODE trajectories.

Owns: sampling the teacher's probability-flow ODE over a clip (Euler, `ode_substeps` steps
between consecutive student timesteps, classifier-free guidance `teacher_guidance`) while recording
the states at the student's (warped) denoising timesteps, and the regression loss of the student:
for every chunk a random student step k, the student sees the recorded x_{t_k} of that chunk and
the teacher's clean result for the earlier chunks as context (teacher forcing), and predicts x0;
loss = MSE to the teacher's x0.

Layouts: the student attends exactly as it will stream, `config.stream`'s policy replayed by
`anchors.clip_layout` (who sees whom and at which temporal index, relative time included; a sink
at relative time gets per-query key positions). A policy no parallel pass can express is refused
with an error naming `config.stream.anchor`, never replaced: `adastate` (its state slot holds the
model's own output; ODE-init a `window` student and start the adastate DMD from its export), and
`ema_sink` over a clip long enough to evict a frame (use `sink`, equal until the first eviction).
The teacher's trajectories use the teacher's layout (`config.train.teacher_attention` with
`tf_window` / `tf_sink`, `flow_matching.teacher_layout`): 'diffusion_forcing' / 'bidirectional'
solve one ODE over the whole clip (every chunk at the same sigma); 'teacher_forcing' solves it
chunk by chunk with the teacher's own finished chunks as clean context, the way the teacher streams
(K chunks x the grid's passes of the [clean; noisy] clip: ~2K x the cost). On PanWorld the
difference decides whether the targets are videos at all: the shipped teacher's whole-clip
trajectories have code confidence 0.60-0.77 and camera paths unrelated to the prompts, its
chunk-by-chunk ones are what it streams (README "Training").

Two sources of trajectories, one student loss (`OdeInit.student_loss`):
  on the fly  (any prompt source) the trajectory is generated inside the train step (the teacher is
              frozen in the state; 4 student steps x `ode_substeps` teacher passes per step), a fresh
              one per clip; the data only supplies prompts (and the clip shape);
  stored      (`config.data.source='ode_trajectories'`) `launch/make_ode_trajectories.py` generated
              them once with `teacher_trajectory` from per-clip seeded noise (`clip_noise`); the batch
              carries `trajectory` [B, n, F, h, w, C] and the teacher's x0 as `latents`, the state
              holds no teacher and a step is one student forward + backward. `teacher_path`,
              `ode_substeps`, `teacher_guidance` and `teacher_attention` are then unused: the
              trajectories' `metadata.json` records what generated them (`data/trajectories.py`
              checks the sampler timesteps, shapes and text format against the run).

Must not know: data pipelines, files, meshes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adastate_jax.streaming import anchors
from adastate_jax.training.objectives import flow_matching as fm
from adastate_jax.training.objectives.flow_matching import ClipLayout, SingleModelObjective


def streaming_layout(exp) -> ClipLayout:
    """Teacher forcing with the context the streaming student will have: its own policy
    (`config.stream`: anchor, window, sink, time layout), replayed by `anchors.clip_layout`.

    Refuses (ValueError naming config.stream.anchor) a policy no parallel pass can express:
    `adastate` always, `ema_sink` when the training clip (`config.data`) evicts a frame."""
    layout = ClipLayout(
        "teacher_forcing",
        exp.stream.chunk_frames,
        context_noise=float(exp.sampler.context_noise),
        policy=exp.stream,
    )
    anchors.expressible(exp.stream)
    frames = None if exp.data is None else exp.data.clip_frames
    if frames is not None:
        layout.frames(frames)  # raises now for a clip the policy cannot be replayed over
    return layout


def guided_clip_velocity(graphdef, params, x, t, text, layout: ClipLayout, scale: float, clean=None):
    """Teacher velocity on a clip with classifier-free guidance (unconditional = zero text).

    clean: the clean clip a 'teacher_forcing' layout reads as context (DMD: the student's sample)."""
    if scale == 1.0:
        return fm.clip_forward(graphdef, params, x, t, text, layout, clean=clean)
    both = fm.clip_forward(
        graphdef,
        params,
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        jnp.concatenate([text, jnp.zeros_like(text)]),
        layout,
        clean=None if clean is None else jnp.concatenate([clean, clean]),
    )
    v_c, v_u = jnp.split(both, 2)
    return v_u + scale * (v_c - v_u)


def ode_grid(timesteps: np.ndarray, substeps: int) -> tuple[np.ndarray, np.ndarray]:
    """Sigma grid from the first student timestep to 0 with `substeps` Euler steps per student
    interval; returns (sigmas [G + 1], indices of the student timesteps in the grid [n])."""
    sig = np.asarray(timesteps, np.float64) / 1000.0
    ends = np.concatenate([sig, [0.0]])
    grid = np.concatenate(
        [np.linspace(ends[i], ends[i + 1], substeps, endpoint=False) for i in range(len(sig))] + [[0.0]]
    )
    return grid.astype(np.float32), np.arange(len(sig)) * substeps


def clip_noise(noise_seed: int, indices: jax.Array, clip_shape) -> jax.Array:
    """[B, F, h, w, C] starting noise of the stored trajectories: clip i's noise is
    `normal(fold_in(key(noise_seed), i), clip_shape)`, independent of the batch it was made in."""
    base = jax.random.key(int(noise_seed))
    draw = lambda i: jax.random.normal(jax.random.fold_in(base, i), tuple(clip_shape), jnp.float32)  # noqa: E731
    return jax.vmap(draw)(jnp.asarray(indices))


def teacher_trajectory(graphdef, params, text, key, shape, layout, timesteps, substeps, scale, noise=None):
    """(x at each student timestep [n, B, F, h, w, C], clean x0 [B, F, h, w, C]) from pure noise
    (`noise` [B, F, h, w, C] if given, else drawn from `key`).

    'diffusion_forcing' / 'bidirectional' layouts: one ODE over the whole clip, every chunk at the
    same sigma. 'teacher_forcing': chunk by chunk, as the teacher streams (`_forced_trajectory`)."""
    grid, record = ode_grid(timesteps, substeps)
    b, f = shape[:2]
    x = jax.random.normal(key, shape, jnp.float32) if noise is None else noise.astype(jnp.float32)
    if layout.attention == "teacher_forcing":
        return _forced_trajectory(graphdef, params, text, x, layout, grid, record, scale)

    def euler(x, sig_pair):
        s, s_next = sig_pair
        t = jnp.full((b, f), s * 1000.0)
        v = guided_clip_velocity(graphdef, params, x, t, text, layout, scale)
        return x + (s_next - s) * v, x

    x0, xs = jax.lax.scan(euler, x, (jnp.asarray(grid[:-1]), jnp.asarray(grid[1:])))
    return xs[jnp.asarray(record)], x0


def _forced_trajectory(graphdef, params, text, x, layout, grid, record, scale):
    """The teacher's ODE chunk by chunk (a scan over chunks): chunk k runs its whole Euler grid
    with the teacher's finished clean chunks < k as the teacher-forcing context, as the teacher
    streams; the other chunks' noisy inputs are not visible to chunk k under the layout (its noisy
    frames see the clean ones before it and themselves), so the clip's own noise stands there."""
    b, f = x.shape[:2]
    c = layout.chunk_frames
    sig = (jnp.asarray(grid[:-1]), jnp.asarray(grid[1:]))

    def chunk_ode(clean, k):
        start = k * c

        def euler(xk, sig_pair):
            s, s_next = sig_pair
            xs = jax.lax.dynamic_update_slice_in_dim(x, xk, start, axis=1)
            t = jnp.full((b, f), s * 1000.0)
            v = guided_clip_velocity(graphdef, params, xs, t, text, layout, scale, clean=clean)
            return xk + (s_next - s) * jax.lax.dynamic_slice_in_dim(v, start, c, axis=1), xk

        xk0, xks = jax.lax.scan(euler, jax.lax.dynamic_slice_in_dim(x, start, c, axis=1), sig)
        return jax.lax.dynamic_update_slice_in_dim(clean, xk0, start, axis=1), xks[jnp.asarray(record)]

    x0, states = jax.lax.scan(chunk_ode, jnp.zeros_like(x), jnp.arange(f // c))  # [K, n, B, c, ...]
    states = jnp.moveaxis(states, 0, 2)  # [n, B, K, c, h, w, C]
    return states.reshape(states.shape[:2] + (f,) + states.shape[4:]), x0


class OdeInit(SingleModelObjective):
    name = "ode_init"

    def __init__(self, exp):
        super().__init__(exp)
        tc = exp.train
        self.teacher_cfg = exp.teacher
        from adastate_jax.models import wan

        self.teacher_graphdef = wan.abstract_model(self.teacher_cfg)[0]
        self.teacher_layout = fm.teacher_layout(exp, tc.teacher_attention)
        self.student_layout = streaming_layout(exp)
        self.timesteps = np.asarray(exp.sampler.timesteps, np.float32)
        self.substeps = tc.ode_substeps
        self.guidance = tc.teacher_guidance
        self.stored = exp.data is not None and exp.data.source == "ode_trajectories"

    def pretrained(self):
        out = super().pretrained()
        if self.stored:  # the trajectories are on disk: no teacher in the state
            return out
        path = self.train_cfg.teacher_path
        if not path:
            raise ValueError(
                "config.train.teacher_path: ode_init needs the teacher's params (a WORKDIR/export), "
                "or stored trajectories (config.data.source='ode_trajectories')"
            )
        out["teacher"] = (self.teacher_cfg, path)
        return out

    def frozen_extra(self, loaded):
        return {} if self.stored else {"teacher": loaded["teacher"]}

    def loss(self, params, frozen, batch, key):
        text = fm.batch_text(self.text_graphdef, frozen, batch)
        k_traj, k_step = jax.random.split(key)
        if "trajectory" in batch:  # stored: [B, n, F, h, w, C] and the teacher's x0 as 'latents'
            traj = jnp.moveaxis(batch["trajectory"].astype(jnp.float32), 1, 0)
            x0 = batch["latents"].astype(jnp.float32)
        else:
            if frozen is None or "teacher" not in frozen:
                raise ValueError(
                    "ode_init: the batch has no stored 'trajectory' and the state no teacher "
                    "(config.data.source='ode_trajectories' needs the trajectories' records)"
                )
            traj, x0 = teacher_trajectory(
                self.teacher_graphdef,
                frozen["teacher"],
                text,
                k_traj,
                batch["latents"].shape,  # [B, F, h, w, C]; the data supplies prompts and shape
                self.teacher_layout,
                self.timesteps,
                self.substeps,
                self.guidance,
            )
        return self.student_loss(params, text, traj, x0, k_step)

    def student_loss(self, params, text, traj, x0, key):
        """Regression of the student on one trajectory (both paths): traj [n, B, F, h, w, C] at the
        student timesteps, x0 [B, F, h, w, C] the teacher's clean result."""
        traj, x0 = jax.lax.stop_gradient(traj), jax.lax.stop_gradient(x0)
        b, f = x0.shape[:2]
        chunk = self.student_layout.chunk_frames
        n = traj.shape[0]
        if n != len(self.timesteps):
            raise ValueError(
                f"trajectory has {n} states but config.sampler gives {len(self.timesteps)} student timesteps"
            )
        k = jnp.repeat(jax.random.randint(key, (b, f // chunk), 0, n), chunk, axis=1)  # [B, F]
        x_t = jnp.take_along_axis(traj, k[None, :, :, None, None, None], axis=0)[0]  # [B, F, h, w, C]
        t = jnp.asarray(self.timesteps)[k]  # [B, F]
        v = fm.clip_forward(self.graphdef, params, x_t, t, text, self.student_layout, clean=x0)
        x0_pred = x_t - (t / 1000.0)[:, :, None, None, None] * v
        loss = jnp.mean(jnp.square(x0_pred - x0))
        return loss, dict(teacher_x0_std=jnp.std(x0))
