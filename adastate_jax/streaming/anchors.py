"""Anchor policies: layouts of the one slot buffer plus a commit rule.

Owns: `StreamConfig` (the `config.stream` section) and, for every policy, how many anchor and
window slots the buffer has, which temporal index each slot and each frame of the current call
shows the model (absolute or relative time), where a finished chunk is committed, and the
training layouts derived from that bookkeeping (below).

| policy     | anchor slots          | window slots   | commit                                              |
|------------|-----------------------|----------------|-----------------------------------------------------|
| window     | 0                     | window_frames  | ring buffer of the most recent frames               |
| full       | 0                     | max_frames     | every frame (a ring only once max_frames is passed)  |
| sink       | sink_frames           | window_frames  | first frames pinned; optional periodic refresh      |
| ema_sink   | sink_frames           | window_frames  | sink = decay * sink + (1 - decay) * evicted frame   |
| adastate   | state_frames (t = 0)  | window_frames  | clean state replaces the state slot every chunk     |

`window_frames` counts the *previous* frames a chunk sees besides its anchor (W_p in the paper);
the current chunk adds `chunk_frames`. LongLive's "local attention 12 = sink 3 + 9" is
sink_frames=3, window_frames=6, chunk_frames=3.

Relative time (`time_layout='relative'`): anchor slots at 0..A-1, the window's most recent frame
at A+W-1 counting back, the current chunk at A+W..A+W+F-1, whatever the chunk number. For
`adastate` the state query being denoised sits at the state slot's indices (0..F_s-1). Absolute
time: every frame keeps its global index (anchors keep theirs), as Self-Forcing/LongLive do.

Our readings (method.md): the `ema_sink` update of sink slot `e % A` by each evicted frame `e`;
`first_chunk='noise'` fills the state slot before chunk 0 with the keys/values of a pure-noise
state at the maximum timestep (`'mask'`, the default, leaves it empty at chunk 0).

Prompt-switch re-cache (`recache`; the clean frames are re-run at t = context_noise under the new
prompt and their keys/values replace the old ones; `Streamer` runs the model):

| recache        | frames re-run                           | attention among them | anchors                 |
|----------------|-----------------------------------------|----------------------|-------------------------|
| none           | -                                       | -                    | kept                    |
| window_causal  | the window's frames                     | block-causal         | kept, read as context   |
| longlive       | the last min(A + W + F, S) frames       | bidirectional        | see below               |

`longlive` is LongLive v1's interactive re-cache (policies window / sink / full; A + W + F is its
local attention size, 12 = sink 3 + window 6 + chunk 3; S = frames emitted so far). With
`recache_global_sink` (LongLive's shipped setting) and S > A + W + F, the sink keeps its old
keys/values and is read as context; only the last W + F frames matter (the A oldest of the re-run
frames are neither stored nor read in LongLive: we skip them). Without it, or while
S <= A + W + F (LongLive protects the sink only when the re-cache does not start at frame 0),
every re-run frame is rebuilt and the A oldest become the sink, keeping their own temporal index.
The F re-run frames older than the window are read as keys during the re-cache and then dropped,
as LongLive's next chunk evicts them. The carry keeps the clean latents of the last A + W + F
frames for this (`Carry.history`, a ring by frame index). Temporal index of the re-run frames:
their global index (absolute), or the slot formula A + W - (S - g) extended past the window
(relative; LongLive has no relative layout).

Training layouts (the one description of the context): `context_schedule(sc, N)` replays this
bookkeeping (`slot_positions`, `query_positions`, `commit`) on the host over N chunks and says, per
chunk, which frame (or state, or blend) each slot holds, its validity and temporal index, and the
query indices; `clip_layout(sc, F, context)` turns that into the frame mask and temporal positions
of one parallel training pass over a clip (teacher forcing: [clean; noisy]; diffusion forcing: one
copy), with per-query key positions where no single assignment reproduces the streamed offsets
(a sink at relative time). It refuses, naming config.stream.anchor, what a pass cannot express:
the `adastate` state slot (the model's own output, no clean target) and an `ema_sink` merge (a
blend of keys/values); and a frame visible twice (`sink_refresh_every`). `clip_policy` is the
absolute-time policy (full / window / sink) a clip-trained teacher attends with.

Must not know: the model internals, sampler or optimisers.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adastate_jax.dataclass_config import dataclass_from_dict
from adastate_jax.streaming.cache import EMPTY, Carry, write_slots

POLICIES = ("window", "full", "sink", "ema_sink", "adastate")
TIME_LAYOUTS = ("relative", "absolute")
FIRST_CHUNK = ("mask", "noise")
RECACHE = ("none", "window_causal", "longlive")
LONGLIVE_RECACHE_POLICIES = ("window", "sink", "full")  # layouts LongLive's rule is defined on


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    anchor: str = "adastate"
    chunk_frames: int = 3
    window_frames: int = 3
    state_frames: int = 1
    sink_frames: int = 3
    max_frames: int = 21
    time_layout: str = "relative"
    ema_decay: float = 0.99
    first_chunk: str = "mask"
    sink_refresh_every: int = 0
    recache: str = "none"  # prompt-switch re-cache: none | window_causal | longlive (module doc)
    recache_global_sink: bool = True  # longlive: keep the sink (True, LongLive's default) or rebuild it
    latent_h: int = 8
    latent_w: int = 8
    batch_size: int = 1

    def __post_init__(self):
        def bad(field, msg):
            raise ValueError(f"config.stream.{field}: {msg}")

        if self.anchor not in POLICIES:
            bad("anchor", f"unknown policy {self.anchor!r}; choose from {POLICIES}")
        if self.time_layout not in TIME_LAYOUTS:
            bad("time_layout", f"{self.time_layout!r} not in {TIME_LAYOUTS}")
        if self.first_chunk not in FIRST_CHUNK:
            bad("first_chunk", f"{self.first_chunk!r} not in {FIRST_CHUNK}")
        for f in ("chunk_frames", "latent_h", "latent_w", "batch_size"):
            if getattr(self, f) <= 0:
                bad(f, f"must be positive, got {getattr(self, f)}")
        if self.anchor == "full":
            if self.max_frames < self.chunk_frames:
                bad("max_frames", f"{self.max_frames} is shorter than a chunk ({self.chunk_frames} frames)")
        elif self.window_frames < self.chunk_frames:
            bad(
                "window_frames",
                f"window of {self.window_frames} frames is shorter than a chunk "
                f"(chunk_frames={self.chunk_frames}); a committed chunk would overwrite itself",
            )
        if self.anchor in ("sink", "ema_sink") and self.sink_frames <= 0:
            bad("sink_frames", f"policy {self.anchor!r} needs sink_frames > 0, got {self.sink_frames}")
        if self.anchor == "adastate" and self.state_frames <= 0:
            bad("state_frames", f"policy 'adastate' needs state_frames > 0, got {self.state_frames}")
        if not (0.0 <= self.ema_decay <= 1.0):
            bad("ema_decay", f"must be in [0, 1], got {self.ema_decay}")
        if self.sink_refresh_every < 0:
            bad("sink_refresh_every", f"must be >= 0, got {self.sink_refresh_every}")
        if self.recache not in RECACHE:
            bad("recache", f"{self.recache!r} not in {RECACHE}")
        if self.recache == "longlive" and self.anchor not in LONGLIVE_RECACHE_POLICIES:
            bad(
                "recache",
                f"'longlive' is defined for the policies {LONGLIVE_RECACHE_POLICIES} (LongLive's "
                f"cache), not {self.anchor!r}; use recache='window_causal' (anchors kept)",
            )

    @classmethod
    def from_dict(cls, d) -> StreamConfig:
        return dataclass_from_dict(cls, d, "stream", None)

    # --- layout ---------------------------------------------------------------------------
    @property
    def anchor_slots(self) -> int:
        return {"window": 0, "full": 0, "sink": self.sink_frames, "ema_sink": self.sink_frames}.get(
            self.anchor, self.state_frames
        )

    @property
    def window_slots(self) -> int:
        return self.max_frames if self.anchor == "full" else self.window_frames

    @property
    def num_slots(self) -> int:
        return self.anchor_slots + self.window_slots

    @property
    def query_state_frames(self) -> int:
        """Frames of adaptive state denoised with every chunk (0 unless adastate)."""
        return self.state_frames if self.anchor == "adastate" else 0

    @property
    def frames_per_call(self) -> int:
        return self.query_state_frames + self.chunk_frames

    @property
    def local_attention_frames(self) -> int:
        """A + W + F: the frames one chunk attends to (LongLive's `local_attn_size`)."""
        return self.anchor_slots + self.window_slots + self.chunk_frames

    @property
    def history_frames(self) -> int:
        """Frames of clean latents kept in `Carry.history` (the longlive re-cache's input), else 0."""
        return self.local_attention_frames if self.recache == "longlive" else 0


def slot_positions(sc: StreamConfig, carry: Carry) -> jax.Array:
    """[S] temporal index each slot shows the model."""
    a, w = sc.anchor_slots, sc.window_slots
    fi = carry.frame_idx
    if sc.time_layout == "absolute":
        if sc.anchor == "adastate":
            anchor_pos = jnp.arange(a, dtype=jnp.int32)
        else:
            anchor_pos = fi[:a]
        window_pos = fi[a:]
    else:
        anchor_pos = jnp.arange(a, dtype=jnp.int32)
        window_pos = a + w - (carry.num_frames - fi[a:])  # most recent frame at a + w - 1
    pos = jnp.concatenate([anchor_pos, window_pos]).astype(jnp.int32)
    return jnp.where(carry.valid, pos, 0)


def query_positions(sc: StreamConfig, carry: Carry) -> jax.Array:
    """[F_s + F] temporal index of the frames denoised in this call (state first, then content)."""
    fs, f = sc.query_state_frames, sc.chunk_frames
    state_pos = jnp.arange(fs, dtype=jnp.int32)
    if sc.time_layout == "absolute":
        content = carry.num_frames + jnp.arange(f, dtype=jnp.int32)
    else:
        content = sc.anchor_slots + sc.window_slots + jnp.arange(f, dtype=jnp.int32)
    return jnp.concatenate([state_pos, content])


def content_slots(sc: StreamConfig, frame_idx: jax.Array) -> jax.Array:
    """Destination slot of each content frame (by its global index)."""
    a, w = sc.anchor_slots, sc.window_slots
    ring = a + (frame_idx - (a if sc.anchor in ("sink", "ema_sink") else 0)) % w
    if sc.anchor in ("sink", "ema_sink"):
        return jnp.where(frame_idx < a, frame_idx, ring)
    return ring


def commit(sc: StreamConfig, carry: Carry, k: jax.Array, v: jax.Array, latents: jax.Array) -> Carry:
    """Commit a finished chunk.

    k, v: [L, B, F_s + F, P, N, H] from the cache-refresh pass (state frames first);
    latents: [B, F_s + F, h, w, C] clean state + content.
    """
    fs, f = sc.query_state_frames, sc.chunk_frames
    g = carry.num_frames + jnp.arange(f, dtype=jnp.int32)  # global indices of the content frames
    kc, vc, lc = k[:, :, fs:], v[:, :, fs:], latents[:, fs:]

    if sc.anchor == "adastate":
        state_slots = jnp.arange(fs)
        carry = write_slots(
            carry, state_slots, k[:, :, :fs], v[:, :, :fs], latents[:, :fs], jnp.full((fs,), carry.chunk)
        )
        carry = carry.replace(state=latents[:, :fs].astype(carry.state.dtype))

    dest = content_slots(sc, g)
    if sc.anchor == "ema_sink":
        carry = _ema_evicted_into_sink(sc, carry, dest)
    carry = write_slots(carry, dest, kc, vc, lc, g)
    if sc.history_frames:
        carry = carry.replace(
            history=carry.history.at[:, g % sc.history_frames].set(lc.astype(carry.history.dtype))
        )

    if sc.anchor == "sink" and sc.sink_refresh_every > 0:
        carry = _refresh_sink(sc, carry, kc, vc, lc, g)
    return carry.replace(num_frames=carry.num_frames + f, chunk=carry.chunk + 1)


def _ema_evicted_into_sink(sc: StreamConfig, carry: Carry, dest: jax.Array) -> Carry:
    """Before overwriting window slots, fold each evicted frame e into sink slot e % A."""
    a, d = sc.anchor_slots, sc.ema_decay
    k, v, lat = carry.k, carry.v, carry.latents
    for j in range(sc.chunk_frames):  # static: a few frames
        slot = dest[j]
        evicted = carry.frame_idx[slot]
        do = (slot >= a) & carry.valid[slot] & (evicted != EMPTY)
        sink = jnp.maximum(evicted, 0) % a

        k, v, lat = (_ema_slot(buf, ax, sink, slot, do, d) for buf, ax in ((k, 2), (v, 2), (lat, 1)))
    return carry.replace(k=k, v=v, latents=lat)


def _ema_slot(buf, axis, sink, slot, do, decay):
    """buf[sink] <- decay * buf[sink] + (1 - decay) * buf[slot] along `axis`, where `do`."""
    sink_val = jnp.take(buf, sink, axis=axis)
    blended = jnp.where(do, decay * sink_val + (1 - decay) * jnp.take(buf, slot, axis=axis), sink_val)
    return buf.at[(slice(None),) * axis + (sink,)].set(blended.astype(buf.dtype))


def _refresh_sink(sc: StreamConfig, carry: Carry, kc, vc, lc, g) -> Carry:
    """Rolling-Sink heuristic: every R chunks, the sink is replaced by the last A frames just made."""
    a = sc.anchor_slots
    take = min(a, sc.chunk_frames)
    refresh = ((carry.chunk + 1) % sc.sink_refresh_every == 0) & (carry.chunk > 0)
    slots = jnp.arange(a - take, a)
    new = write_slots(carry, slots, kc[:, :, -take:], vc[:, :, -take:], lc[:, -take:], g[-take:])
    return jax.tree.map(lambda n, o: jnp.where(refresh, n, o), new, carry)


class RecachePlan(NamedTuple):
    """The frames the longlive re-cache runs (static count n = A + W + F, oldest first)."""

    frame_idx: jax.Array  # [n] global index S - n + j of re-run frame j (negative: no such frame)
    rerun: jax.Array  # [n] bool: rebuilt under the new prompt, and a key for the other re-run frames
    positions: jax.Array  # [n] temporal index shown to the model
    sink_kept: jax.Array  # [] bool: the anchor slots keep their keys/values and are read as context


def longlive_recache_plan(sc: StreamConfig, carry: Carry) -> RecachePlan:
    """Which frames LongLive re-runs at a prompt switch before the chunk starting at S (module doc)."""
    a, w, n = sc.anchor_slots, sc.window_slots, sc.local_attention_frames
    s = carry.num_frames
    g = s - n + jnp.arange(n, dtype=jnp.int32)
    sink_kept = jnp.asarray(bool(sc.recache_global_sink and a > 0)) & (s > n)
    rerun = (g >= 0) & ~(sink_kept & (g < s - (n - a)))
    if sc.time_layout == "absolute":
        pos = g
    else:
        pos = a + w - (s - g)  # the window's rule, continued past its oldest slot
    return RecachePlan(g, rerun, jnp.where(rerun, pos, 0).astype(jnp.int32), sink_kept)


def write_recached(
    sc: StreamConfig, carry: Carry, plan: RecachePlan, k: jax.Array, v: jax.Array, latents: jax.Array
) -> Carry:
    """Store the re-cached frames: every valid slot whose frame was re-run takes its new keys/values;
    when the sink is rebuilt after the first A + W + F frames, sink slot i holds re-run frame i.

    k, v: [L, B, n, P, N, H] and latents [B, n, h, w, C] of the plan's frames.
    """
    a, n = sc.anchor_slots, sc.local_attention_frames
    first = carry.num_frames - n  # global index of re-run frame 0
    new_sink = ~plan.sink_kept & (first > 0)
    sink_frames = jnp.where(new_sink, first + jnp.arange(a, dtype=jnp.int32), carry.frame_idx[:a])
    frames = jnp.concatenate([sink_frames, carry.frame_idx[a:]])  # [S] frame each slot holds after
    j = frames - first
    jc = jnp.clip(j, 0, n - 1)
    take = carry.valid & (j >= 0) & (j < n) & plan.rerun[jc]  # [S]

    def pick(new, old, axis):
        new = jnp.take(new, jc, axis=axis).astype(old.dtype)
        shape = [1] * old.ndim
        shape[axis] = take.shape[0]
        return jnp.where(take.reshape(shape), new, old)

    return carry.replace(
        k=pick(k, carry.k, 2),
        v=pick(v, carry.v, 2),
        latents=pick(latents, carry.latents, 1),
        frame_idx=jnp.where(take, frames, carry.frame_idx),
    )


def describe_layout(sc: StreamConfig) -> str:
    a, w = sc.anchor_slots, sc.window_slots
    name = {"adastate": "state", "sink": "sink", "ema_sink": "ema-sink"}.get(sc.anchor, "")
    parts = ([f"{name} {a}"] if a else []) + [f"window {w}", f"chunk {sc.chunk_frames}"]
    if sc.query_state_frames:
        parts.append(f"state query {sc.query_state_frames}")
    return f"{sc.anchor} ({sc.time_layout} time): " + " + ".join(parts)


def slot_groups(sc: StreamConfig) -> np.ndarray:
    """[S + F_s + F] group id of every key frame of a call: 0 anchor/state, 1 window, 2 current."""
    a, w = sc.anchor_slots, sc.window_slots
    return np.asarray([0] * a + [1] * w + [2] * sc.frames_per_call)


GROUP_NAMES = ("anchor", "window", "current")


# --------------------------------------------------------------------------------------------
# One description of the context for streaming and training
# --------------------------------------------------------------------------------------------
# `context_schedule` replays the commit bookkeeping of a StreamConfig on the host with the very
# functions `Streamer.step` uses (`slot_positions`, `query_positions`, `commit`, hence
# `content_slots`, the ema_sink merge and the sink refresh), on a carry whose slot latents are
# identity vectors: after N chunks every slot's latent says which content frame (or adaptive
# state, or blend of frames) it holds. `clip_layout` turns that into the frame mask and temporal
# positions of one parallel training pass over a clip; every training layout (ODE init's student,
# DMD's teacher / critic scores, flow matching with teacher or diffusion forcing) comes from it.


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkContext:
    """What chunk `chunk` attends to when streamed: the slots as `Streamer.step` sees them.

    `weights[s]` is the composition of slot s: columns [0, M) are the clip's content frames
    (M = N * chunk_frames), then F_s columns per adaptive state, the first F_s for the noise state
    of `first_chunk='noise'` and F_s more for the state of each chunk c (at 1 + c). A slot holding
    a copy of one frame has a one-hot row; an ema_sink merge gives a blend.
    """

    chunk: int
    weights: np.ndarray  # [S, M + (N + 1) * F_s] float32
    valid: np.ndarray  # [S] bool: the slot is visible (Carry.valid)
    frame_idx: np.ndarray  # [S] int32: Carry.frame_idx (EMPTY, or -1 for the noise state)
    slot_pos: np.ndarray  # [S] int32: `slot_positions` (0 where invalid)
    query_pos: np.ndarray  # [F_s + F] int32: `query_positions` (state first, then content)
    num_content: int  # M

    def content_frame(self, slot: int) -> int:
        """The content frame slot `slot` holds a copy of, or -1 (empty, a state, a blend)."""
        w = self.weights[slot]
        j = int(np.argmax(w))
        exact = w[j] == 1.0 and np.count_nonzero(w) == 1
        return j if self.valid[slot] and exact and j < self.num_content else -1

    def holds_state(self, slot: int) -> bool:
        """Whether the slot holds (only) an adaptive state: the model's own output."""
        w = self.weights[slot]
        return bool(self.valid[slot] and w[self.num_content :].any() and not w[: self.num_content].any())

    def blended(self, slot: int) -> bool:
        """Whether the slot holds a blend (an ema_sink merge of evicted frames into a sink)."""
        w = self.weights[slot]
        return bool(self.valid[slot] and np.count_nonzero(w) > 1)


def context_schedule(sc: StreamConfig, num_chunks: int) -> tuple[ChunkContext, ...]:
    """Per chunk c < num_chunks, what `Streamer.step` attends to (host-side, pure, a few ms).

    Replays `commit` on a carry of identity latents (1 layer, 1 token, zero keys/values), with the
    first_chunk='noise' state written as `Streamer.init_carry` writes it.
    """
    return _schedule(sc, int(num_chunks))


@functools.lru_cache(maxsize=256)
def _schedule(sc: StreamConfig, n: int) -> tuple[ChunkContext, ...]:
    """The replay, eager on the host CPU in a worker thread: jax's trace state and ambient mesh are
    per thread, so a caller tracing under `jax.jit` and a mesh of other devices (an abstract TPU
    slice's, `tpu_compile`) gets the same host-side answer. Cached: a pure function of its inputs."""

    def run():
        with jax.default_device(jax.devices("cpu")[0]):
            return _replay(sc, n)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


def _replay(sc: StreamConfig, n: int) -> tuple[ChunkContext, ...]:
    f, fs, s = sc.chunk_frames, sc.query_state_frames, sc.num_slots
    m = n * f
    eye = jnp.eye(m + (n + 1) * fs, dtype=jnp.float32)

    def ident(rows):  # [R] identity columns -> latents [1, R, 1, 1, width]
        return eye[jnp.asarray(rows, jnp.int32)][None, :, None, None, :]

    kv = lambda r: jnp.zeros((1, 1, r, 1, 1, 1), jnp.float32)  # noqa: E731
    carry = Carry(
        k=kv(s),
        v=kv(s),
        valid=jnp.zeros((s,), bool),
        frame_idx=jnp.full((s,), EMPTY, jnp.int32),
        latents=jnp.zeros((1, s, 1, 1, eye.shape[0]), jnp.float32),
        state=jnp.zeros((1, fs, 1, 1, eye.shape[0]), jnp.float32),
        text=None,
        prompt_id=jnp.int32(0),
        num_frames=jnp.int32(0),
        chunk=jnp.int32(0),
        key=jnp.zeros((2,), jnp.uint32),
    )
    history = sc.history_frames  # the longlive re-cache keeps recent clean latents in the carry
    if history:
        carry = carry.replace(history=jnp.zeros((1, history, 1, 1, eye.shape[0]), jnp.float32))
    if sc.anchor == "adastate" and sc.first_chunk == "noise":  # as Streamer.init_carry
        noise_state = range(m, m + fs)
        carry = write_slots(carry, jnp.arange(fs), kv(fs), kv(fs), ident(noise_state), jnp.full((fs,), -1))
    out = []
    for c in range(n):
        out.append(
            ChunkContext(
                chunk=c,
                weights=np.asarray(carry.latents[0, :, 0, 0]),
                valid=np.asarray(carry.valid),
                frame_idx=np.asarray(carry.frame_idx),
                slot_pos=np.asarray(slot_positions(sc, carry)),
                query_pos=np.asarray(query_positions(sc, carry)),
                num_content=m,
            )
        )
        state_cols = range(m + (c + 1) * fs, m + (c + 2) * fs)
        rows = [*state_cols, *range(c * f, (c + 1) * f)]  # state first, then content (commit's order)
        carry = commit(sc, carry, kv(fs + f), kv(fs + f), ident(rows))
    return tuple(out)


CONTEXTS = ("clean", "noisy")


@dataclasses.dataclass(frozen=True, eq=False)
class ClipAttention:
    """One parallel forward over a clip of F frames that reproduces streamed chunks' attention.

    context='clean' (teacher forcing): the sequence [clean frames (F); noisy frames (F)]; the clean
    rows write the context (each clean chunk attends as its cache-refresh pass did), noisy chunk c
    attends to the clean frames chunk c's slots hold and to itself. context='noisy' (diffusion
    forcing): one copy; chunk c attends to the frames its slots hold, themselves being denoised.
    `key_positions` is None when every key frame shows one temporal index to all its queries (then
    `positions` holds it); else [T, T], the index of key frame k as seen from query frame q.
    """

    num_frames: int  # F
    context: str  # clean | noisy
    mask: np.ndarray  # [T, T] bool, T = 2F (clean) or F (noisy); query frame x key frame
    positions: np.ndarray  # [T] int32 temporal index of every frame (as a query; and as a key
    #                        when key_positions is None)
    key_positions: np.ndarray | None  # [T, T] int32, or None


def clip_policy(
    chunk_frames: int, window_frames: int | None, sink_frames: int, num_frames: int
) -> StreamConfig:
    """The streaming policy a clip-trained (teacher) model attends with, absolute time:
    `full` (window None: every earlier frame), `window`, or `sink` (window + first frames)."""
    if window_frames is None:
        return StreamConfig(
            anchor="full", chunk_frames=chunk_frames, max_frames=num_frames, time_layout="absolute"
        )
    anchor = "sink" if sink_frames > 0 else "window"
    return StreamConfig(
        anchor=anchor,
        chunk_frames=chunk_frames,
        window_frames=window_frames,
        sink_frames=max(sink_frames, 1) if anchor == "sink" else StreamConfig.sink_frames,
        time_layout="absolute",
    )


def expressible(sc: StreamConfig) -> None:
    """Raise (naming config.stream.anchor) for a policy no parallel training pass can reproduce
    whatever the clip length: `adastate` (its state slot holds the model's own output)."""
    if sc.anchor == "adastate":
        raise ValueError(
            "config.stream.anchor='adastate': the state slot holds the model's own output (the clean "
            "state it denoised with the previous chunk), which has no clean target, so no parallel "
            "teacher-forcing pass over a clip can reproduce what a streamed adastate chunk attends to. "
            "Train this stage with a policy it can express instead, e.g. ODE-init a 'window' student "
            "(config.stream.anchor='window', the same window_frames) and start the adastate DMD from "
            "its export (config.train.init_from); DMD rolls adastate out through Streamer.step"
        )


@functools.lru_cache(maxsize=64)
def clip_layout(sc: StreamConfig, num_frames: int, context: str = "clean") -> ClipAttention:
    """The attention of one training pass over a clip of `num_frames` frames streamed under `sc`.

    Raises ValueError naming config.stream.anchor for a state slot (`adastate`), a blended slot
    (an `ema_sink` merge, i.e. any clip long enough to evict a frame), and a frame visible twice
    (`sink_refresh_every` copying window frames into the sink).
    """
    if context not in CONTEXTS:
        raise ValueError(f"clip_layout: context {context!r} not in {CONTEXTS}")
    f_chunk = sc.chunk_frames
    if num_frames <= 0 or num_frames % f_chunk:
        raise ValueError(
            f"a clip of {num_frames} frames is not a whole number of chunks "
            f"(config.stream.chunk_frames={f_chunk})"
        )
    expressible(sc)
    n = num_frames // f_chunk
    fs = sc.query_state_frames
    clean = context == "clean"
    off = num_frames if clean else 0  # row of noisy frame j: off + j
    t = num_frames + off
    mask = np.zeros((t, t), bool)
    kpos = np.zeros((t, t), np.int64)
    qpos = np.zeros((t,), np.int64)
    for ctx in context_schedule(sc, n):
        c = ctx.chunk
        own = np.arange(c * f_chunk, (c + 1) * f_chunk)
        seen: dict[int, int] = {}  # content frame -> position
        for s in np.flatnonzero(ctx.valid):
            if ctx.blended(s):
                raise ValueError(
                    f"config.stream.anchor={sc.anchor!r}: at chunk {c} slot {s} holds a blend of frames "
                    f"(the ema_sink merge of an evicted frame into the sink; a blend of keys/values, not a "
                    f"visibility pattern), which a parallel pass over a {num_frames}-frame clip cannot "
                    "reproduce. Use anchor='sink' for this stage (it equals ema_sink until the first "
                    "eviction) and train ema_sink with DMD, whose rollout streams through Streamer.step"
                )
            j = ctx.content_frame(s)
            if j < 0:  # a state slot: adastate is refused above
                raise ValueError(f"config.stream.anchor={sc.anchor!r}: slot {s} holds no content frame")
            if j in seen:
                raise ValueError(
                    f"config.stream.sink_refresh_every={sc.sink_refresh_every}: at chunk {c} frame {j} is "
                    "visible twice (sink and window), which a frame mask cannot express"
                )
            seen[j] = int(ctx.slot_pos[s])
        ctx_frames = np.asarray(sorted(seen), np.int64)
        ctx_pos = np.asarray([seen[j] for j in ctx_frames], np.int64)
        own_pos = ctx.query_pos[fs:]
        ctx_rows = ctx_frames if clean else ctx_frames + off  # the context is the clean copy, or itself
        queries = [(own + off, own + off)]  # noisy chunk c: its own noisy frames
        if clean:
            queries.append((own, own))  # clean chunk c: as its cache-refresh pass
        for q_rows, own_rows in queries:
            for q in q_rows:
                mask[q, ctx_rows] = True
                kpos[q, ctx_rows] = ctx_pos
                mask[q, own_rows] = True
                kpos[q, own_rows] = own_pos
                qpos[q] = own_pos[q - own_rows[0]]
    return _canonical(ClipAttention(num_frames, context, mask, qpos, kpos))


def _canonical(layout: ClipAttention) -> ClipAttention:
    """Drop `key_positions` when every key shows one index to all its queries up to a shift per
    query (RoPE sees offsets only): then positions = the frame's index in the clip (absolute time),
    which is what a `window`/`full` layout at relative time reduces to. Otherwise keep them (a
    sink at relative time sits at offsets that no single assignment reproduces)."""
    f = layout.num_frames
    t = layout.mask.shape[0]
    frame = np.arange(t) % f  # index in the clip of every row (clean and noisy copies alike)
    shift = layout.positions - frame  # per query
    q, k = np.nonzero(layout.mask)
    if np.array_equal(layout.key_positions[q, k] - frame[k], shift[q]):
        positions, key_positions = frame.astype(np.int32), None
    else:
        positions = layout.positions.astype(np.int32)
        key_positions = np.where(layout.mask, layout.key_positions, 0).astype(np.int32)
    for a in (layout.mask, positions, key_positions):  # shared by the lru_cache: read-only
        if a is not None:
            a.setflags(write=False)
    return dataclasses.replace(layout, positions=positions, key_positions=key_positions)
