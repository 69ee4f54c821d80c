"""Flow-matching schedule and few-step sampling arithmetic (Self-Forcing conventions).

Owns: the shifted sigma schedule, the warping of a denoising list through the shift, x0 from a
velocity, re-noising, and classifier-free guidance arithmetic. Timesteps are model timesteps in
[0, num_train_timesteps]; sigma = t / num_train_timesteps.

Cache refresh (`context_noise`, `refresh_noise`): after a chunk is denoised, its clean prediction
is run once more at timestep `context_noise` and that pass writes the cache. What goes in:
  * 'none' (default): the clean prediction itself, labelled with timestep `context_noise`, as the
    inference pipelines of Self-Forcing and LongLive do;
  * 'add': the clean prediction re-noised to `context_noise` with fresh noise, as their training
    pipelines do (used by DMD training, `training/objectives/dmd.py`).
The two agree when `context_noise` is 0.

Must not know: models, caches, anchors.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from adastate_jax.dataclass_config import dataclass_from_dict

REFRESH_NOISE = ("none", "add")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    num_train_timesteps: int = 1000
    shift: float = 5.0
    denoising_steps: tuple[float, ...] = (1000, 750, 500, 250)
    warp_denoising_steps: bool = True
    context_noise: float = 0.0
    refresh_noise: str = "none"  # cache refresh input at context_noise: none (clean) | add (module doc)
    guidance_scale: float = 1.0

    def __post_init__(self):
        n = self.num_train_timesteps
        if self.shift <= 0:
            raise ValueError(f"config.sampler.shift must be > 0, got {self.shift}")
        steps = tuple(float(s) for s in self.denoising_steps)
        if not steps:
            raise ValueError("config.sampler.denoising_steps is empty")
        if any(not (0 < s <= n) for s in steps):
            raise ValueError(f"config.sampler.denoising_steps {steps} must lie in (0, {n}]")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"config.sampler.denoising_steps {steps} must be strictly decreasing")
        if not (0 <= self.context_noise < n):
            raise ValueError(f"config.sampler.context_noise must be in [0, {n}), got {self.context_noise}")
        if self.refresh_noise not in REFRESH_NOISE:
            raise ValueError(f"config.sampler.refresh_noise: {self.refresh_noise!r} not in {REFRESH_NOISE}")
        object.__setattr__(self, "denoising_steps", steps)

    @classmethod
    def from_dict(cls, d) -> SamplerConfig:
        return dataclass_from_dict(cls, d, "sampler", {"denoising_steps": float})

    @property
    def timesteps(self) -> np.ndarray:
        """The model timesteps of the denoising list, warped through the shift when configured."""
        steps = np.asarray(self.denoising_steps, np.float64)
        if not self.warp_denoising_steps:
            return steps
        return shift_sigma(steps / self.num_train_timesteps, self.shift) * self.num_train_timesteps

    def sigma(self, t):
        return t / self.num_train_timesteps


def shift_sigma(sigma, shift: float):
    """sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def training_timestep_table(num_train_timesteps: int = 1000, shift: float = 5.0) -> np.ndarray:
    """The shifted training timesteps (Self-Forcing's table): sigma_k = 1 - k/N, k = 0..N-1, shifted."""
    sig = np.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
    return shift_sigma(sig, shift) * num_train_timesteps


def x0_from_velocity(x_t: jax.Array, v: jax.Array, sigma) -> jax.Array:
    """Rectified flow x_t = (1 - s) x0 + s eps, v = eps - x0  =>  x0 = x_t - s v."""
    return x_t - sigma * v


def add_noise(x0: jax.Array, noise: jax.Array, sigma) -> jax.Array:
    return (1 - sigma) * x0 + sigma * noise


def guided_velocity(v_cond: jax.Array, v_uncond: jax.Array, scale: float) -> jax.Array:
    """Classifier-free guidance: v_u + g (v_c - v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)
