"""One `step`, three uses: scan rollout, live streaming, and (later) training through the recurrence.

Owns: `Streamer`, which binds a DiT graph, the stream/sampler configs and an optional streaming
decoder, and provides
  * `init_carry(params, prompts, key)`              -> Carry
  * `step(params, carry, prompt_id, prompts, key=None, exit_step=None)`
                                                    -> (Carry, ChunkOut)   denoise + commit
  * `rollout(params, carry, prompt_ids, prompts)`   -> (Carry, ChunkOut[N])  `lax.scan(step)`
  * `stream(params, carry, prompt_ids, prompts)`    -> generator of ChunkOut (same jitted step)
  * `rollout_segments(params, carry, prompt_ids, prompts, segment_chunks=K)`
                                                    -> generator of Segment (ChunkOut[<=K] each):
    K chunks per compiled scan, carry donated between segments (bounded device memory)
`exit_step` (traced, optional) stops the few-step denoising early: the chunk's output and the
committed cache are the x0 estimate of that step (Self-Forcing's random exit, one program for
every exit; see `step`).
A prompt schedule is data: `prompt_ids[c]` indexes the prompt table `prompts [P, B, T, text_dim]`;
a change of id between chunks is a prompt switch (`switch_prompt`: new cross-attention keys/values,
and the re-cache chosen by `stream.recache`: 'window_causal' re-encodes the window block-causally
behind the kept anchors, 'longlive' is LongLive's bidirectional re-cache of the last A + W + F
frames with `stream.recache_global_sink`; see `anchors.py`).

`step` is a pure function of its arguments (the PRNG key lives in the carry and is folded with the
chunk counter unless a key is passed), so it is differentiable and scan/generator agree bit for bit.

Must not know: optimisers, files, metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from adastate_jax.models import wan
from adastate_jax.streaming import anchors, sampler
from adastate_jax.streaming.anchors import StreamConfig
from adastate_jax.streaming.cache import EMPTY, Carry
from adastate_jax.streaming.sampler import SamplerConfig


@struct.dataclass
class ChunkOut:
    latents: jax.Array  # [B, F, h, w, C] clean content latents of this chunk (the video)
    state: jax.Array  # [B, F_s, h, w, C] clean adaptive state (never part of the video)
    positions: jax.Array  # [S + F_s + F] temporal index of every key frame the model saw
    key_valid: jax.Array  # [S + F_s + F] which key frames were visible
    key_mass: Any = None  # [L, S + F_s + F] attention share per key frame (instrumentation)
    frames: Any = None  # [B, T, H, W, 3] decoded pixels when a decoder is configured


@dataclasses.dataclass(frozen=True)
class Segment:
    """Consecutive chunks of a segmented rollout: `outs` is a ChunkOut whose leaves lead with [n]."""

    start: int  # index of the segment's first chunk in the stream
    outs: ChunkOut  # ChunkOut[n] on the device

    @property
    def num_chunks(self) -> int:
        return int(self.outs.latents.shape[0])


class Decoder:
    """Protocol of a streaming decoder in the carry (VAE or a codec).

    init_cache(decoder_params, batch, latent_h, latent_w) -> cache (fixed shapes)
    decode_chunk(decoder_params, cache, z [B, F, h, w, C]) -> (cache, frames [B, T, H, W, 3])
    """

    def init_cache(self, decoder_params, batch: int, latent_h: int, latent_w: int):
        raise NotImplementedError

    def decode_chunk(self, decoder_params, cache, z):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Streamer:
    graphdef: Any
    model_cfg: wan.WanConfig
    stream_cfg: StreamConfig
    sampler_cfg: SamplerConfig = SamplerConfig()
    decoder: Decoder | None = None
    instrument: bool = False  # return attention share per key frame (reference attention path)
    # XLA options for the programs `jit_step` / `jit_rollout` / `jit_segment` compile (`jax.jit`'s
    # compiler_options, as (name, value) pairs; a dict is accepted): e.g. a backend's debug option
    compiler_options: tuple = ()

    def __post_init__(self):
        opts = self.compiler_options
        try:
            pairs = dict(opts or ())
        except (TypeError, ValueError):
            raise TypeError(
                f"Streamer.compiler_options: a mapping of XLA option names to values (or (name, value) "
                f"pairs), got {opts!r}"
            ) from None
        object.__setattr__(self, "compiler_options", tuple(sorted(pairs.items())))

    # ------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------
    @property
    def branches(self) -> int:
        """2 with classifier-free guidance (cond and uncond caches side by side in the batch)."""
        return 1 if self.sampler_cfg.guidance_scale == 1.0 else 2

    def _model(self, params) -> wan.WanDiT:
        return nnx.merge(self.graphdef, params)

    def _text_kv(self, params, prompts, prompt_id, negative):
        text = jnp.take(prompts, prompt_id, axis=0)  # [B, T, Dt]
        if self.branches == 2:
            text = jnp.concatenate([text, negative], axis=0)
        return self._model(params).encode_text(text)

    def init_carry(
        self,
        params,
        prompts: jax.Array,
        key: jax.Array,
        prompt_id: int = 0,
        negative=None,
        decoder_params=None,
    ) -> Carry:
        """An empty carry for `prompts [P, B, T, text_dim]`, starting with prompt `prompt_id`.

        `negative`: [B, T, text_dim] unconditional embeddings for guidance (zeros if None).
        """
        sc, mc = self.stream_cfg, self.model_cfg
        prompts = jnp.asarray(prompts)
        if prompts.ndim != 4:
            raise ValueError(f"prompts must be [P, B, T, text_dim], got shape {prompts.shape}")
        b = prompts.shape[1]
        if not (0 <= int(prompt_id) < prompts.shape[0]):
            raise ValueError(f"prompt_id {prompt_id} out of range for {prompts.shape[0]} prompts")
        h, w = sc.latent_h, sc.latent_w
        p = mc.tokens_per_frame(h, w)
        s = sc.num_slots
        bb = b * self.branches
        kv_dtype = jnp.dtype(mc.dtype)
        negative = self._negative(prompts, negative)
        text = self._text_kv(params, prompts, jnp.int32(prompt_id), negative)
        key = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        carry = Carry(
            k=jnp.zeros((mc.num_layers, bb, s, p, mc.num_heads, mc.head_dim), kv_dtype),
            v=jnp.zeros((mc.num_layers, bb, s, p, mc.num_heads, mc.head_dim), kv_dtype),
            valid=jnp.zeros((s,), bool),
            frame_idx=jnp.full((s,), EMPTY, jnp.int32),
            latents=jnp.zeros((b, s, h, w, mc.in_channels), jnp.float32),
            state=jnp.zeros((b, sc.query_state_frames, h, w, mc.in_channels), jnp.float32),
            text=text,
            prompt_id=jnp.int32(prompt_id),
            num_frames=jnp.int32(0),
            chunk=jnp.int32(0),
            key=jnp.array(key, jnp.uint32, copy=True),  # the carry is donated: never alias the input
            history=jnp.zeros((b, sc.history_frames, h, w, mc.in_channels), jnp.float32),
            decoder=None if self.decoder is None else self.decoder.init_cache(decoder_params, b, h, w),
        )
        if sc.anchor == "adastate" and sc.first_chunk == "noise":
            carry = self._noise_state(params, carry)
        return carry

    def _negative(self, prompts, negative):
        if self.branches == 1:
            return None
        if negative is None:
            return jnp.zeros(prompts.shape[1:], prompts.dtype)
        return jnp.asarray(negative)

    def _noise_state(self, params, carry: Carry) -> Carry:
        """first_chunk='noise': the state slot starts as the K/V of a pure-noise state at t_max."""
        sc, mc = self.stream_cfg, self.model_cfg
        b = carry.latents.shape[0]
        fs = sc.query_state_frames
        key = jax.random.fold_in(jax.random.wrap_key_data(carry.key), 0x7FFFFFFF)
        z = jax.random.normal(key, (b, fs, sc.latent_h, sc.latent_w, mc.in_channels))
        t = jnp.full((b * self.branches, fs), float(self.sampler_cfg.num_train_timesteps))
        out = self._model(params)(self._dup(z), t, carry.text, jnp.arange(fs))
        slots = jnp.arange(fs)
        from adastate_jax.streaming.cache import write_slots

        return write_slots(carry, slots, out.k, out.v, z, jnp.full((fs,), -1))

    def _dup(self, x):
        return x if self.branches == 1 else jnp.concatenate([x, x], axis=0)

    # ------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------
    def step(
        self,
        params,
        carry: Carry,
        prompt_id,
        prompts,
        key=None,
        negative=None,
        decoder_params=None,
        exit_step=None,
    ):
        """Denoise one chunk (with the adaptive state for `adastate`) and commit it.

        prompt_id: [] int32 index into `prompts [P, B, T, text_dim]` for this chunk.
        key: optional PRNG key for this chunk's noise (default: the carry's key folded with the
        chunk counter).
        exit_step: optional [] int32 (may be traced) in [0, n): stop after denoising step
        `exit_step` and output / commit its x0 estimate; the steps after it are skipped at run time
        (`lax.cond`). Equal to a Streamer whose denoising list is truncated to its first
        `exit_step + 1` entries (same noise per step). None: all n steps.
        Returns (carry, ChunkOut).
        """
        sc, smp = self.stream_cfg, self.sampler_cfg
        model = self._model(params)
        prompt_id = jnp.asarray(prompt_id, jnp.int32)
        negative = self._negative(prompts, negative)

        # --- prompt switch ---------------------------------------------------------------
        carry = self.switch_prompt(params, carry, prompt_id, prompts, negative)

        # --- context as the model sees it --------------------------------------------------
        b = carry.latents.shape[0]
        bb = b * self.branches
        slot_pos = anchors.slot_positions(sc, carry)  # [S]
        q_pos = anchors.query_positions(sc, carry)  # [F_s + F]
        ctx = wan.Context(
            carry.k,
            carry.v,
            jnp.broadcast_to(slot_pos, (bb, slot_pos.shape[0])),
            jnp.broadcast_to(carry.valid, (bb, slot_pos.shape[0])),
        )

        # --- noise -------------------------------------------------------------------------
        # keys[0]: the initial noise; keys[i + 1]: the re-noising after step i, or the context
        # noise when step i is the last one run. `split` draws key i independently of the count
        # (threefry_partitionable, JAX's default), so a truncated denoising list sees the same
        # noise per step as the full one.
        if key is None:
            key = jax.random.fold_in(jax.random.wrap_key_data(carry.key), carry.chunk)
        n_steps = len(smp.denoising_steps)
        keys = jax.random.split(key, n_steps + 1)
        shape = (b, sc.frames_per_call, sc.latent_h, sc.latent_w, self.model_cfg.in_channels)
        noises = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)  # [n+1, B, F_s+F, h, w, C]

        # --- few-step denoising (scan over steps) ------------------------------------------
        ts = jnp.asarray(smp.timesteps, jnp.float32)  # [n]
        sig = ts / smp.num_train_timesteps
        sig_next = jnp.concatenate([sig[1:], jnp.zeros((1,), jnp.float32)])
        if exit_step is None:
            last_step = jnp.int32(n_steps - 1)
            is_last = jnp.arange(n_steps) == n_steps - 1
        else:
            last_step = jnp.clip(jnp.asarray(exit_step, jnp.int32), 0, n_steps - 1)
            is_last = jnp.arange(n_steps) == last_step

        def denoise(x_t, xs):
            t_i, s_i, s_next, noise, last = xs
            v, mass = self._velocity(model, x_t, t_i, carry.text, q_pos, ctx)
            x0 = sampler.x0_from_velocity(x_t, v, s_i)
            x_next = jnp.where(last, x0, sampler.add_noise(x0, noise, s_next))
            return x_next, mass

        xs = (ts, sig, sig_next, noises[1:], is_last)
        if exit_step is None:
            x0, masses = jax.lax.scan(denoise, noises[0], xs)
        else:
            mass_like = jax.eval_shape(denoise, noises[0], jax.tree.map(lambda a: a[0], xs))[1]

            def skip(x_t, xs):  # after the exit step: carry the exit's x0 through unchanged
                return x_t, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), mass_like)

            # Under differentiation a cond returns the residuals of both branches (zeros from the
            # skipped one) and the scan stacks them for every step: rematerialising the step keeps
            # its residuals to its inputs (measured: without it a backward pass through exit 0 of 4
            # took ~1.6x the truncated list's; with it the same time, for exit 0 and exit 3 alike).
            run = jax.checkpoint(denoise)

            def maybe_denoise(x_t, xs_i):
                i, rest = xs_i
                return jax.lax.cond(i <= last_step, run, skip, x_t, rest)

            x0, masses = jax.lax.scan(maybe_denoise, noises[0], (jnp.arange(n_steps), xs))

        # --- cache refresh at context_noise, then commit -----------------------------------
        # refresh_noise='none' (inference, Self-Forcing / LongLive): the clean x0 at timestep
        # t_ctx; 'add' (their training): x0 re-noised to t_ctx with the next unused noise.
        t_ctx = smp.context_noise
        if t_ctx != 0 and smp.refresh_noise == "add":
            ctx_noise = noises[-1] if exit_step is None else jnp.take(noises, last_step + 1, axis=0)
            x_ctx = sampler.add_noise(x0, ctx_noise, t_ctx / smp.num_train_timesteps)
        else:
            x_ctx = x0
        t_arr = jnp.full((bb, sc.frames_per_call), t_ctx, jnp.float32)
        refresh = model(self._dup(x_ctx), t_arr, carry.text, q_pos, ctx)
        fs = sc.query_state_frames
        out = ChunkOut(
            latents=x0[:, fs:],
            state=x0[:, :fs],
            positions=jnp.concatenate([slot_pos, q_pos]),
            key_valid=jnp.concatenate([carry.valid, jnp.ones((sc.frames_per_call,), bool)]),
            key_mass=None if masses is None else jnp.take(masses, last_step, axis=0),
        )
        carry = anchors.commit(sc, carry, refresh.k, refresh.v, x0)

        if self.decoder is not None:
            dec_cache, frames = self.decoder.decode_chunk(decoder_params, carry.decoder, out.latents)
            carry = carry.replace(decoder=dec_cache)
            out = out.replace(frames=frames)
        return carry, out

    def _velocity(self, model, x_t, t_i, text, q_pos, ctx):
        """Model velocity for the chunk (with guidance when configured) and the key mass."""
        bb = x_t.shape[0] * self.branches
        t = jnp.full((bb, x_t.shape[1]), t_i, jnp.float32)
        res = model(self._dup(x_t), t, text, q_pos, ctx, return_key_mass=self.instrument)
        v = res.velocity
        if self.branches == 2:
            v_c, v_u = jnp.split(v, 2, axis=0)
            v = sampler.guided_velocity(v_c, v_u, self.sampler_cfg.guidance_scale)
        mass = None
        if self.instrument:
            mass = res.key_mass[:, : x_t.shape[0]].mean(axis=1)  # [L, S + F_s + F] (cond branch)
        return v, mass

    def switch_prompt(self, params, carry: Carry, prompt_id, prompts, negative=None) -> Carry:
        """What `step` does before denoising: if `prompt_id` ([] int32, may be traced) differs from
        the carry's, the new prompt's cross-attention keys/values and the `stream.recache` re-cache
        (skipped while nothing is cached); else the carry unchanged.
        """
        sc = self.stream_cfg
        prompt_id = jnp.asarray(prompt_id, jnp.int32)
        negative = self._negative(prompts, negative)
        switch = prompt_id != carry.prompt_id
        text = jax.lax.cond(
            switch, lambda: self._text_kv(params, prompts, prompt_id, negative), lambda: carry.text
        )
        carry = carry.replace(text=text, prompt_id=prompt_id)
        if sc.recache != "none":
            model = self._model(params)
            carry = jax.lax.cond(
                switch & (carry.num_frames > 0), lambda c: self._recache(model, c), lambda c: c, carry
            )
        return carry

    def _recache(self, model: wan.WanDiT, carry: Carry) -> Carry:
        """Re-run cached clean frames at t = context_noise under the carry's (new) prompt."""
        if self.stream_cfg.recache == "longlive":
            return self._recache_longlive(model, carry)
        return self._recache_window_causal(model, carry)

    def _recache_longlive(self, model: wan.WanDiT, carry: Carry) -> Carry:
        """LongLive v1: the last min(A + W + F, S) clean frames in one bidirectional pass, with the
        kept sink as context (`recache_global_sink`, once past the first A + W + F frames)."""
        sc = self.stream_cfg
        a, n = sc.anchor_slots, sc.local_attention_frames
        bb = carry.latents.shape[0] * self.branches
        plan = anchors.longlive_recache_plan(sc, carry)
        lat = jnp.take(carry.history, plan.frame_idx % n, axis=1)  # [B, n, h, w, C]
        keys_seen = plan.rerun  # [n] a re-run frame sees every re-run frame (no block mask)
        ctx = None
        if a:
            sink_pos = anchors.slot_positions(sc, carry)[:a]
            ctx = wan.Context(
                carry.k[:, :, :a],
                carry.v[:, :, :a],
                jnp.broadcast_to(sink_pos, (bb, a)),
                jnp.broadcast_to(carry.valid[:a] & plan.sink_kept, (bb, a)),
            )
            keys_seen = jnp.concatenate([jnp.ones((a,), bool), keys_seen])  # sink: by ctx.valid
        frame_mask = jnp.broadcast_to(keys_seen, (n, keys_seen.shape[0]))  # [n, A + n]
        t = jnp.full((bb, n), self.sampler_cfg.context_noise, jnp.float32)
        out = model(self._dup(lat), t, carry.text, plan.positions, ctx, frame_mask)
        return anchors.write_recached(sc, carry, plan, out.k, out.v, lat)

    def _recache_window_causal(self, model: wan.WanDiT, carry: Carry) -> Carry:
        """Re-run the window's clean frames block-causally under the new prompt, the anchors kept
        and read as context (our rule before the LongLive one; the only one for adastate/ema_sink)."""
        sc = self.stream_cfg
        a, w = sc.anchor_slots, sc.window_slots
        b = carry.latents.shape[0]
        bb = b * self.branches
        pos = anchors.slot_positions(sc, carry)
        val = carry.valid[a:]
        chunk_id = jnp.where(val, carry.frame_idx[a:] // sc.chunk_frames, -1)
        own = (chunk_id[None, :] <= chunk_id[:, None]) & val[None, :]  # [W, W]
        ctx = None
        frame_mask = own
        if a:
            ctx = wan.Context(
                carry.k[:, :, :a],
                carry.v[:, :, :a],
                jnp.broadcast_to(pos[:a], (bb, a)),
                jnp.broadcast_to(carry.valid[:a], (bb, a)),
            )
            frame_mask = jnp.concatenate([jnp.ones((w, a), bool), own], axis=1)
        t = jnp.full((bb, w), self.sampler_cfg.context_noise, jnp.float32)
        out = model(self._dup(carry.latents[:, a:]), t, carry.text, pos[a:], ctx, frame_mask)
        keep = val[None, None, :, None, None, None]
        k = carry.k.at[:, :, a:].set(jnp.where(keep, out.k.astype(carry.k.dtype), carry.k[:, :, a:]))
        v = carry.v.at[:, :, a:].set(jnp.where(keep, out.v.astype(carry.v.dtype), carry.v[:, :, a:]))
        return carry.replace(k=k, v=v)

    # ------------------------------------------------------------------------------------
    # three uses
    # ------------------------------------------------------------------------------------
    def rollout(
        self,
        params,
        carry: Carry,
        prompt_ids: jax.Array,
        prompts,
        negative=None,
        decoder_params=None,
        exit_step=None,
    ):
        """`lax.scan` of `step` over chunks; `prompt_ids [N]` is the prompt schedule.

        exit_step: optional [] int32 exit step shared by every chunk (see `step`)."""

        def body(c, pid):
            return self.step(
                params,
                c,
                pid,
                prompts,
                negative=negative,
                decoder_params=decoder_params,
                exit_step=exit_step,
            )

        return jax.lax.scan(body, carry, jnp.asarray(prompt_ids, jnp.int32))

    @functools.cached_property
    def jit_step(self):
        """Jitted `step`, carry donated: (params, carry, prompt_id, prompts, negative, decoder_params).

        Compiled as a one-chunk `rollout`, so XLA sees the same loop body as the scan: the live
        generator and the offline scan then agree bit for bit (a top-level compilation of the same
        function may fuse differently and differ at float round-off).
        """

        def f(params, carry, prompt_id, prompts, negative=None, decoder_params=None):
            ids = jnp.reshape(jnp.asarray(prompt_id, jnp.int32), (1,))
            carry, outs = self.rollout(params, carry, ids, prompts, negative, decoder_params)
            return carry, jax.tree.map(lambda x: x[0], outs)

        return self._jit(f)

    def _jit(self, fn):
        return jax.jit(fn, donate_argnums=(1,), compiler_options=dict(self.compiler_options) or None)

    @functools.cached_property
    def jit_rollout(self):
        """Jitted `rollout`, carry donated: (params, carry, prompt_ids, prompts, negative, decoder_params)."""
        return self._jit(self.rollout)

    def stream(
        self, params, carry: Carry, prompt_ids: Iterable[int], prompts, negative=None, decoder_params=None
    ) -> Iterator[ChunkOut]:
        """Live streaming: yields each chunk as soon as it is ready (unbounded if `prompt_ids` is).

        Calls the same jitted `step`; the final carry is available as `self.last_carry` is not kept
        (the generator's return value is the carry: `carry = yield from ...`).
        """
        n_prompts = int(np.shape(prompts)[0])
        for c, pid in enumerate(prompt_ids):
            if not (0 <= int(pid) < n_prompts):
                raise ValueError(f"prompt schedule entry {c} is {pid}, out of range for {n_prompts} prompts")
            carry, out = self.jit_step(params, carry, jnp.int32(pid), prompts, negative, decoder_params)
            yield out
        return carry

    # ------------------------------------------------------------------------------------
    # segmented scan: bounded device memory for any length
    # ------------------------------------------------------------------------------------
    def segment(
        self, params, carry: Carry, prompt_ids, num_live, prompts, negative=None, decoder_params=None
    ):
        """`rollout` over a fixed-length schedule `prompt_ids [K]` whose chunks at index >= `num_live`
        ([] int32, may be traced) are skipped at run time (`lax.cond`): the carry passes through them
        unchanged and their outputs are zeros. A final partial segment thus reuses the program of
        the full ones. Returns (Carry, ChunkOut[K])."""
        prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
        live = jnp.arange(prompt_ids.shape[0]) < num_live  # [K]

        def run(c, pid):
            return self.step(params, c, pid, prompts, negative=negative, decoder_params=decoder_params)

        def body(c, xs):
            pid, on = xs
            out_like = jax.eval_shape(run, c, pid)[1]

            def skip(c, pid):
                return c, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), out_like)

            return jax.lax.cond(on, run, skip, c, pid)

        return jax.lax.scan(body, carry, (prompt_ids, live))

    @functools.cached_property
    def jit_segment(self):
        """Jitted `segment`, carry donated: (params, carry, prompt_ids [K], num_live, prompts,
        negative, decoder_params). One compilation per segment length K."""
        return self._jit(self.segment)

    def rollout_segments(
        self,
        params,
        carry: Carry,
        prompt_ids: Iterable[int],
        prompts,
        segment_chunks: int,
        negative=None,
        decoder_params=None,
    ) -> Iterator[Segment]:
        """Scan rollout in segments of `segment_chunks` chunks: yields a `Segment` (its first chunk's
        index and its `ChunkOut[n]` on the device, n <= K) per compiled scan; the generator's return
        value is the final carry (`carry = yield from ...`).

        Device memory holds the carry and at most two segments of outputs, whatever the length;
        `prompt_ids` may be unbounded (an iterator). The carry is donated from segment to segment.
        Segment i + 1 is dispatched before segment i is yielded, so the device computes while the
        caller writes (the schedule is read up to one segment ahead; a caller that stops early
        discards the segment in flight). A final partial segment runs the same compiled program
        with its tail skipped (`segment`): one compilation for any number of chunks. Bits equal
        `rollout` and `stream` over the same schedule.
        """
        k = int(segment_chunks)
        if k < 1:
            raise ValueError(f"segment_chunks must be >= 1, got {segment_chunks}")
        n_prompts = int(np.shape(prompts)[0])
        ids_iter = iter(prompt_ids)
        start, pending = 0, None
        while True:
            ids = [int(p) for p in itertools.islice(ids_iter, k)]
            bad = [(start + i, pid) for i, pid in enumerate(ids) if not (0 <= pid < n_prompts)]
            if bad:
                if pending is not None:  # the chunks before the bad entry are still delivered
                    yield pending
                raise ValueError(
                    f"prompt schedule entry {bad[0][0]} is {bad[0][1]}, out of range for {n_prompts} prompts"
                )
            if ids:
                n = len(ids)
                padded = np.asarray(ids + [ids[-1]] * (k - n), np.int32)  # [K]
                carry, outs = self.jit_segment(
                    params, carry, padded, jnp.int32(n), prompts, negative, decoder_params
                )
                if n < k:
                    outs = jax.tree.map(lambda x, n=n: x[:n], outs)
            if pending is not None:
                yield pending
            if not ids:
                return carry
            pending = Segment(start, outs)
            start += len(ids)


def prompt_schedule(
    num_chunks: int, switches: dict[int, int] | Iterable[tuple[int, int]] | None, num_prompts: int
) -> np.ndarray:
    """[num_chunks] prompt ids from {chunk: prompt_id} switch points (prompt 0 until the first).

    Raises naming the entry when a chunk or prompt id is out of range.
    """
    ids = np.zeros((num_chunks,), np.int32)
    items = sorted(dict(switches or {}).items())
    for chunk, pid in items:
        if not (0 <= chunk < num_chunks):
            raise ValueError(f"prompt switch at chunk {chunk} is outside the rollout's {num_chunks} chunks")
        if not (0 <= pid < num_prompts):
            raise ValueError(
                f"prompt switch at chunk {chunk} names prompt {pid}; there are {num_prompts} prompts"
            )
        ids[chunk:] = pid
    return ids


def attention_shares(
    sc: StreamConfig, key_mass: np.ndarray, key_valid: np.ndarray | None = None
) -> np.ndarray:
    """Sum per-key-frame attention mass into groups (anchor/state, window, current).

    key_mass: [..., S + F_s + F]. Returns [..., 3] (fractions; sum to 1).
    """
    groups = anchors.slot_groups(sc)
    km = np.asarray(key_mass)
    return np.stack([km[..., groups == g].sum(-1) for g in range(3)], axis=-1)
