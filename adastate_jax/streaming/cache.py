"""The streaming carry: a fixed-shape KV buffer organised in frame slots.

Owns: the `Carry` pytree (per-layer key/value slots, slot validity and frame indices, the adaptive
state latent, window latents for re-caching, the history ring of recent clean latents for the
longlive re-cache, prompt keys/values, counters, PRNG key), its logical axis names, and the generic
slot writes. Which slot a frame goes to, and which temporal index a
slot shows the model, is decided by the anchor policies (`anchors.py`).

Must not know: the model internals, the sampler, optimisers.

Slot order: anchor slots first (`sink`/`ema_sink` sink, `adastate` state), then the window ring.
Keys are stored un-roped; RoPE is applied at attention time from the slot's temporal index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from adastate_jax import sharding as shd
from adastate_jax.models.wan import TextKV

EMPTY = -1  # frame index of an empty slot


@struct.dataclass
class Carry:
    k: jax.Array  # [L, B, S, P, N, H]   un-roped keys of cached frames
    v: jax.Array  # [L, B, S, P, N, H]
    valid: jax.Array  # [S] bool
    frame_idx: jax.Array  # [S] int32: global index of the frame in the slot (EMPTY if none)
    latents: jax.Array  # [B, S, h, w, C] clean latents of cached frames (for re-cache)
    state: jax.Array  # [B, F_s, h, w, C] last clean adaptive state (adastate; F_s = 0 otherwise)
    text: TextKV  # cross-attention k/v of the current prompt, [L, B', T, N, H]
    prompt_id: jax.Array  # [] int32, index of the current prompt in the prompt table
    num_frames: jax.Array  # [] int32, content frames emitted so far
    chunk: jax.Array  # [] int32, chunks emitted so far
    key: jax.Array  # PRNG key (raw uint32[2])
    # [B, M, h, w, C] clean latents of the last M content frames, frame g at g % M
    # (M = StreamConfig.history_frames: A + W + F for recache='longlive', else 0)
    history: jax.Array | None = None
    decoder: object = None  # streaming decoder cache (VAE / codec), or None


def carry_logical_axes(carry: Carry) -> Carry:
    """Logical axis names for every leaf (batch over `data`, heads over `tensor`)."""
    kv = ("layers", "batch", "slots", "act_tokens", "heads", "head_dim")
    lat = ("batch", "slots", None, None, None)
    dec = jax.tree.map(lambda x: ("batch",) + (None,) * (x.ndim - 1) if x.ndim else (), carry.decoder)
    return Carry(
        k=kv,
        v=kv,
        valid=("slots",),
        frame_idx=("slots",),
        latents=lat,
        state=lat,
        text=TextKV(
            ("layers", "batch", None, "heads", "head_dim"), ("layers", "batch", None, "heads", "head_dim")
        ),
        prompt_id=(),
        num_frames=(),
        chunk=(),
        key=(None,),
        history=None if carry.history is None else ("batch", None, None, None, None),
        decoder=dec,
    )


def carry_shardings(carry: Carry, mesh, rules=shd.DEFAULT_RULES):
    axes = carry_logical_axes(carry)
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)  # noqa: E731
    return jax.tree.map(lambda a: shd.named_sharding(mesh, a, rules), axes, is_leaf=is_axes)


def write_slots(
    carry: Carry, slots: jax.Array, k: jax.Array, v: jax.Array, latents: jax.Array, frame_idx: jax.Array
) -> Carry:
    """Write frames into slots (scatter on the slot axis).

    slots [F] int32 destination slot of each frame; k/v [L, B, F, P, N, H]; latents [B, F, h, w, C];
    frame_idx [F] global frame index recorded for each slot.
    """
    return carry.replace(
        k=carry.k.at[:, :, slots].set(k.astype(carry.k.dtype)),
        v=carry.v.at[:, :, slots].set(v.astype(carry.v.dtype)),
        latents=carry.latents.at[:, slots].set(latents.astype(carry.latents.dtype)),
        valid=carry.valid.at[slots].set(True),
        frame_idx=carry.frame_idx.at[slots].set(frame_idx.astype(jnp.int32)),
    )
