"""Attention primitives: Wan's 3D RoPE applied at attention time, frame-level masks, attention.

Owns: the RoPE frequency split of a head (t/h/w), rotation of un-roped keys/queries from temporal
indices given as data, the frame-level masks that training and streaming need (block-causal,
windowed with sinks, teacher forcing), and the attention call with an implementation switch.

Also owns the static block-sparse plan of a frame mask: training masks are known at trace time
(numpy) and block-structured, so instead of a [T, K] token mask the attention runs, per group of
query frames with identical mask rows, unmasked over the key frames that group may see. A plan may
also carry per-group key positions (`plan_frame_mask(mask, key_positions)`): when the temporal
index a key frame shows depends on the query (a streaming layout replayed in one training pass,
e.g. a sink at relative time), the keys are gathered un-roped and each group rotates its own.

Also owns the TPU path: `splash_attention` runs JAX's Pallas splash-attention kernel with the static
frame mask as a lazily evaluated token mask (never a [T, K] array), traced key validity as segment
ids, and batch / head sharding through `shard_map` (Pallas interpret mode off TPU).

Must not know: caches, anchor policies, layouts of a KV buffer. A "frame" here is a group of
`tokens_per_frame` consecutive tokens sharing one temporal index.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_IMPLS = ("xla", "cudnn", "reference", "splash")
ATTENTION_BLOCKS = ("auto", "dense")  # static frame masks: block-sparse plan when possible, or dense


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of a head into temporal / height / width rotary dims: d-4(d//6), 2(d//6), 2(d//6)."""
    hw = 2 * (head_dim // 6)
    t = head_dim - 2 * hw
    return t, hw, hw


def validate_rope_head_dim(head_dim: int) -> None:
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} is odd; RoPE rotates pairs of channels")
    t, h, w = rope_split(head_dim)
    if min(t, h, w) <= 0 or t % 2 or h % 2:
        raise ValueError(
            f"head_dim={head_dim} cannot be split into temporal/height/width RoPE parts "
            f"({t}/{h}/{w}); it needs head_dim >= 12 and even parts (e.g. 64, 128)"
        )


def _inv_freq(dim: int, theta: float) -> np.ndarray:
    # [dim/2] float64: theta ** (-2i/dim)
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


ROPE_TABLE_POSITIONS = 1024  # Wan's table size; positions beyond it are computed analytically


def rope_angles(
    temporal_pos: jax.Array, grid_hw: tuple[int, int], head_dim: int, theta: float = 10000.0
) -> tuple[jax.Array, jax.Array]:
    """cos/sin of the rotation angles for every token of some frames.

    temporal_pos: [B, F] integer temporal index of each frame.
    Returns (cos, sin), each [B, F * h * w, head_dim // 2] float32, tokens ordered (frame, h, w) and
    the channels ordered (t-part, h-part, w-part) as in Wan.

    Like Wan, the tables are computed in float64 (numpy, at trace time) and gathered by position,
    so the values do not depend on how XLA fuses the surrounding computation; temporal positions
    outside [0, 1024) fall back to float32 cos/sin (there is no position cap).
    """
    h, w = grid_hw
    dt, dh, dw = rope_split(head_dim)
    inv_t = _inv_freq(dt, theta)
    ang_h = np.arange(h, dtype=np.float64)[:, None] * _inv_freq(dh, theta)[None]  # [h, dh/2]
    ang_w = np.arange(w, dtype=np.float64)[:, None] * _inv_freq(dw, theta)[None]  # [w, dw/2]
    spatial = np.concatenate(
        [
            np.broadcast_to(ang_h[:, None, :], (h, w, dh // 2)),
            np.broadcast_to(ang_w[None, :, :], (h, w, dw // 2)),
        ],
        axis=-1,
    ).reshape(h * w, (dh + dw) // 2)  # [P, (dh+dw)/2]
    table = np.arange(ROPE_TABLE_POSITIONS, dtype=np.float64)[:, None] * inv_t[None]  # [R, dt/2]
    pos = jnp.asarray(temporal_pos)
    b, f = pos.shape
    in_table = (pos >= 0) & (pos < ROPE_TABLE_POSITIONS)
    idx = jnp.clip(pos, 0, ROPE_TABLE_POSITIONS - 1).astype(jnp.int32)
    far = pos.astype(jnp.float32)[..., None] * jnp.asarray(inv_t, jnp.float32)  # [B, F, dt/2]

    def part(fn):
        t_part = jnp.where(
            in_table[..., None], jnp.take(jnp.asarray(fn(table), jnp.float32), idx, axis=0), fn(far)
        )
        t_part = jnp.broadcast_to(t_part[:, :, None, :], (b, f, h * w, dt // 2))
        s_part = jnp.broadcast_to(jnp.asarray(fn(spatial), jnp.float32), (b, f, h * w, spatial.shape[-1]))
        return jnp.concatenate([t_part, s_part], axis=-1).reshape(b, f * h * w, head_dim // 2)

    return part(_cos), part(_sin)


def _cos(x):
    return np.cos(x) if isinstance(x, np.ndarray) else jnp.cos(x)


def _sin(x):
    return np.sin(x) if isinstance(x, np.ndarray) else jnp.sin(x)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) by the angles whose (cos, sin) are given.

    x: [B, T, N, H]; cos, sin: [B, T, H/2]. Computed in float32, returned in x's dtype.
    """
    cos, sin = rope
    dtype = x.dtype
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x1, x2 = xf[..., 0], xf[..., 1]  # [B, T, N, H/2]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape).astype(dtype)


# --------------------------------------------------------------------------------------------
# Frame-level masks (query frame x key frame); True = may attend
# --------------------------------------------------------------------------------------------


def block_causal_mask(num_frames: int, chunk: int) -> np.ndarray:
    """[F, F]: frame i sees frame j iff chunk(j) <= chunk(i) (bidirectional inside a chunk)."""
    c = np.arange(num_frames) // chunk
    return c[None, :] <= c[:, None]


def windowed_block_causal_mask(num_frames: int, chunk: int, window: int, sink: int = 0) -> np.ndarray:
    """[F, F]: block-causal, limited to the `window` frames before the query's chunk, plus its own
    chunk, plus the first `sink` frames (always visible once generated)."""
    if window < 0 or sink < 0:
        raise ValueError(f"window={window} and sink={sink} must be >= 0")
    i = np.arange(num_frames)
    start = (i // chunk) * chunk  # first frame of the query's chunk
    causal = block_causal_mask(num_frames, chunk)
    in_window = i[None, :] >= (start[:, None] - window)
    is_sink = i[None, :] < sink
    return causal & (in_window | is_sink)


def teacher_forcing_mask(num_frames: int, chunk: int, window: int | None = None, sink: int = 0) -> np.ndarray:
    """[2F, 2F] mask over the sequence [clean frames (F); noisy frames (F)].

    Clean frames attend block-causally among themselves (they write the context). Noisy chunk c
    attends to the clean frames of earlier chunks (optionally only the last `window` of them plus
    `sink` first frames) and to its own noisy chunk: exactly what it would see when generated
    chunk by chunk with a cache of clean frames.
    """
    f = num_frames
    if window is None:
        clean = block_causal_mask(f, chunk)
    else:
        clean = windowed_block_causal_mask(f, chunk, window, sink)
    i = np.arange(f)
    qc, kc = i[:, None] // chunk, i[None, :] // chunk
    noisy_to_clean = kc < qc
    if window is not None:
        start = (i // chunk) * chunk
        noisy_to_clean &= (i[None, :] >= start[:, None] - window) | (i[None, :] < sink)
    noisy_to_noisy = kc == qc
    top = np.concatenate([clean, np.zeros((f, f), bool)], axis=1)
    bottom = np.concatenate([noisy_to_clean, noisy_to_noisy], axis=1)
    return np.concatenate([top, bottom], axis=0)


def expand_frame_mask(frame_mask: jax.Array, q_tokens_per_frame: int, k_tokens_per_frame: int) -> jax.Array:
    """[B, Fq, Fk] frame mask -> [B, 1, Fq*Pq, Fk*Pk] token mask (head axis broadcast)."""
    m = jnp.repeat(frame_mask, q_tokens_per_frame, axis=1)
    m = jnp.repeat(m, k_tokens_per_frame, axis=2)
    return m[:, None]


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    implementation: str = "xla",
    return_key_mass: bool = False,
):
    """Softmax attention. q [B, T, N, H], k/v [B, S, N, H], mask [B, 1, T or 1, S] bool (True = attend).

    implementation: 'xla' / 'cudnn' go through `jax.nn.dot_product_attention`; 'reference' is an
    explicit einsum (used when the attention mass per key is requested); 'splash' runs the Pallas
    splash kernel (`splash_attention`, default block sizes) when the mask is None or key-only
    ([B, 1, 1, S]: key validity), and the 'xla' path for a full [B, 1, T, S] token mask (a traced
    training mask; static ones reach `splash_attention` directly from the model).
    Returns out [B, T, N, H] (and, with return_key_mass, [B, S]: attention probability summed over
    the queries' heads and averaged over queries and heads, i.e. the share of attention each key
    receives; sums to 1 over S).
    """
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {implementation!r} not in {ATTENTION_IMPLS}")
    if return_key_mass or implementation == "reference":
        scale = q.shape[-1] ** -0.5
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)  # fp32
        out = jnp.einsum("BNTS,BSNH->BTNH", probs.astype(v.dtype), v)
        if return_key_mass:
            return out, probs.mean(axis=(1, 2))  # [B, S]
        return out
    if implementation == "splash":
        if mask is None or mask.shape[-2] == 1:
            key_valid = None if mask is None else mask.reshape(mask.shape[0], mask.shape[-1])
            return splash_attention(q, k, v, key_valid=key_valid)
        implementation = "xla"
    impl = None if implementation == "xla" and jax.default_backend() == "cpu" else implementation
    if impl == "cudnn" and mask is not None and mask.shape[-2] == 1 and q.shape[1] > 1:
        # cuDNN's fused attention takes a mask only at full query length (it becomes a bias of
        # shape [B, 1, T, K]); the streaming key-only mask [B, 1, 1, K] is broadcast for it
        mask = jnp.broadcast_to(mask, (*mask.shape[:-2], q.shape[1], mask.shape[-1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


# --------------------------------------------------------------------------------------------
# Static block-sparse attention (frame masks known at trace time)
# --------------------------------------------------------------------------------------------

Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint, non-adjacent [start, stop) frame ranges


def _runs(indices: np.ndarray) -> Ranges:
    """Sorted int indices -> maximal contiguous [start, stop) runs."""
    runs: list[tuple[int, int]] = []
    for i in (int(j) for j in indices):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return tuple(runs)


@dataclasses.dataclass(frozen=True)
class AttentionGroup:
    """Query frames that share one mask row, and the key frames they may all attend to."""

    q_ranges: Ranges
    k_ranges: Ranges
    # temporal index of each gathered key frame (in k_ranges order) for this group's queries, when
    # the plan has query-dependent key positions; None: the keys carry their own (already roped)
    k_pos: tuple[int, ...] | None = None

    @property
    def q_frames(self) -> int:
        return sum(b - a for a, b in self.q_ranges)

    @property
    def k_frames(self) -> int:
        return sum(b - a for a, b in self.k_ranges)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Static plan of a [Fq, Fk] frame mask: groups partition the query frames; within a group,
    every query frame sees exactly the group's key ranges. Hashable (plain tuples), so it can be
    closed over by scanned / rematerialised layer bodies and used as a static jit argument."""

    q_frames: int
    k_frames: int
    groups: tuple[AttentionGroup, ...]

    def to_mask(self) -> np.ndarray:
        """The boolean [Fq, Fk] frame mask this plan computes (inverse of `plan_frame_mask`)."""
        m = np.zeros((self.q_frames, self.k_frames), bool)
        for g in self.groups:
            cols = np.zeros(self.k_frames, bool)
            for a, b in g.k_ranges:
                cols[a:b] = True
            for a, b in g.q_ranges:
                m[a:b] = cols
        return m

    @property
    def key_positions(self) -> bool:
        """Whether the groups rotate their keys themselves (query-dependent key positions)."""
        return any(g.k_pos is not None for g in self.groups)

    @property
    def density(self) -> float:
        """Share of the (query frame, key frame) pairs computed: the cost relative to dense."""
        pairs = sum(g.q_frames * g.k_frames for g in self.groups)
        return pairs / float(self.q_frames * self.k_frames)


def plan_frame_mask(frame_mask, key_positions=None) -> BlockPlan:
    """Analyse a static boolean frame mask [Fq, Fk] (True = may attend) into a BlockPlan.

    Query frames with identical rows form one group (ordered by first appearance); each group's
    allowed key frames become contiguous ranges. Raises ValueError when a query frame may attend
    to no key (softmax over an empty set: not something the dense path computes meaningfully).

    key_positions: optional static int [Fq, Fk], the temporal index of key frame k as seen from
    query frame q (read where the mask is True). Query frames are then grouped by identical mask
    rows *and* identical visible key positions, and each group records its keys' positions
    (`AttentionGroup.k_pos`) for `block_attention(..., key_rope=...)`.
    """
    m = np.asarray(frame_mask)
    if m.ndim != 2:
        raise ValueError(f"plan_frame_mask needs a [Fq, Fk] frame mask, got shape {m.shape}")
    m = m.astype(bool)
    empty = np.flatnonzero(~m.any(axis=1))
    if empty.size:
        raise ValueError(
            f"frame mask: query frame(s) {empty.tolist()} may attend to no key frame; a block plan "
            "(and softmax attention) needs at least one visible key per query"
        )
    kp = None
    if key_positions is not None:
        kp = np.asarray(key_positions)
        if kp.shape != m.shape or not np.issubdtype(kp.dtype, np.integer):
            raise ValueError(
                f"key_positions must be an int array of the mask's shape {m.shape}, got {kp.dtype} {kp.shape}"
            )
        kp = np.where(m, kp, 0).astype(np.int64)
    rows: dict[bytes, list[int]] = {}
    for i in range(m.shape[0]):
        sig = m[i].tobytes() + (b"" if kp is None else kp[i].tobytes())
        rows.setdefault(sig, []).append(i)
    groups = tuple(
        AttentionGroup(
            _runs(np.asarray(q)),
            _runs(np.flatnonzero(m[q[0]])),
            None if kp is None else tuple(int(x) for x in kp[q[0]][m[q[0]]]),
        )
        for q in rows.values()
    )
    return BlockPlan(int(m.shape[0]), int(m.shape[1]), groups)


def _take_frames(x: jax.Array, ranges: Ranges, tokens_per_frame: int) -> jax.Array:
    """Static gather of frame ranges along the token axis (axis 1) of x [B, T, ...]."""
    parts = [x[:, a * tokens_per_frame : b * tokens_per_frame] for a, b in ranges]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def block_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    plan: BlockPlan,
    q_tokens_per_frame: int,
    k_tokens_per_frame: int,
    implementation: str = "xla",
    constrain: Callable[[jax.Array], jax.Array] | None = None,
    key_rope: tuple[tuple[jax.Array, jax.Array], ...] | None = None,
) -> jax.Array:
    """Attention under the static frame mask that `plan` describes, without any mask tensor.

    q [B, Fq*Pq, N, H]; k, v [B, Fk*Pk, N, H] (RoPE already applied: slicing keeps positions), or,
    with `key_rope` (one (cos, sin) [B, Kg*Pk, H/2] per plan group, from the group's `k_pos`),
    un-roped keys that each group rotates after gathering (query-dependent key positions).
    For each group: its queries and allowed keys/values are gathered by static slices, attention
    runs unmasked (so 'cudnn' is flash attention, 'xla' the plain XLA kernel), and the outputs
    are put back in query order by a static concatenation. Same math as `attention` with the
    expanded token mask; masked-out blocks are never computed.
    constrain: optional sharding constraint applied to every per-group q/k/v/out and the result.
    Returns out [B, Fq*Pq, N, H].
    """
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {implementation!r} not in {ATTENTION_IMPLS}")
    if q.shape[1] != plan.q_frames * q_tokens_per_frame:
        raise ValueError(
            f"block_attention: q has {q.shape[1]} tokens, plan has {plan.q_frames} query frames "
            f"of {q_tokens_per_frame} tokens"
        )
    if k.shape[1] != plan.k_frames * k_tokens_per_frame or v.shape[1] != k.shape[1]:
        raise ValueError(
            f"block_attention: k/v have {k.shape[1]}/{v.shape[1]} tokens, plan has {plan.k_frames} "
            f"key frames of {k_tokens_per_frame} tokens"
        )
    if key_rope is not None and len(key_rope) != len(plan.groups):
        raise ValueError(f"block_attention: {len(key_rope)} key RoPE tables for {len(plan.groups)} groups")
    cons = constrain or (lambda z: z)
    pieces: list[tuple[int, jax.Array]] = []
    for i, g in enumerate(plan.groups):
        if not g.k_ranges:
            raise ValueError(f"block plan group {g} has no key frames")
        qg = cons(_take_frames(q, g.q_ranges, q_tokens_per_frame))
        kg = _take_frames(k, g.k_ranges, k_tokens_per_frame)
        if key_rope is not None:
            kg = apply_rope(kg, key_rope[i])  # this group's view of the keys' temporal positions
        kg = cons(kg)
        vg = cons(_take_frames(v, g.k_ranges, k_tokens_per_frame))
        og = cons(attention(qg, kg, vg, None, implementation))
        off = 0
        for a, b in g.q_ranges:
            n = (b - a) * q_tokens_per_frame
            pieces.append((a, og[:, off : off + n]))
            off += n
    pieces.sort(key=lambda pc: pc[0])
    out = pieces[0][1] if len(pieces) == 1 else jnp.concatenate([pc[1] for pc in pieces], axis=1)
    return cons(out)


# --------------------------------------------------------------------------------------------
# Splash attention (JAX's Pallas TPU kernel; Pallas interpret mode on other backends)
# --------------------------------------------------------------------------------------------

SPLASH_LANES = 128  # the kernel's lane width: every tile size is a multiple of it


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
    """Tile sizes (tokens) of the splash kernel; they change speed, not numerics.

    Forward: `q` x `kv` tiles, each kv tile processed in `kv_compute` steps. Backward: `q_bwd` x
    `kv_bwd` tiles for the dq and dkv kernels (one fused kernel with `fused_bwd`). All multiples of
    128; `kv_compute` divides `kv`. A sequence is zero-padded to a multiple of its tiles; a tile
    longer than the sequence (rounded up to 128) shrinks to it.
    """

    q: int = 512
    kv: int = 512
    kv_compute: int = 512
    q_bwd: int = 512
    kv_bwd: int = 512
    fused_bwd: bool = False

    def problems(self) -> list[tuple[str, str]]:
        """(attribute, message) for every size the kernel cannot take; empty when valid."""
        out = []
        for name in ("q", "kv", "kv_compute", "q_bwd", "kv_bwd"):
            size = getattr(self, name)
            if size <= 0 or size % SPLASH_LANES:
                out.append((name, f"must be a positive multiple of {SPLASH_LANES}, got {size}"))
        if not out and self.kv % self.kv_compute:
            out.append(("kv_compute", f"{self.kv_compute} must divide the kv tile {self.kv}"))
        return out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _fit_tiles(length: int, fwd: int, bwd: int) -> tuple[int, int, int]:
    """(forward tile, backward tile, padded length) of one sequence: tiles no longer than the
    sequence rounded up to the lane width, and a padded length that both divide."""
    lanes = _round_up(max(length, 1), SPLASH_LANES)
    fwd, bwd = min(fwd, lanes), min(bwd, lanes)
    return fwd, bwd, _round_up(length, math.lcm(fwd, bwd))


@dataclasses.dataclass(frozen=True)
class StaticMask:
    """A boolean numpy mask kept as bytes: hashable, so it can key a cache or be a static arg."""

    shape: tuple[int, ...]
    bits: bytes

    @classmethod
    def of(cls, mask) -> StaticMask:
        m = np.ascontiguousarray(np.asarray(mask, dtype=bool))
        return cls(tuple(int(d) for d in m.shape), m.tobytes())

    @property
    def array(self) -> np.ndarray:
        return np.frombuffer(self.bits, dtype=bool).reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class SplashLayout:
    """The token grid a splash kernel is built for (everything static about one call)."""

    frame_mask: StaticMask  # [Fq, Fk] True = may attend
    q_tokens_per_frame: int
    k_tokens_per_frame: int
    q_padded: int  # query length after padding (>= Fq * Pq)
    k_padded: int  # key length after padding (>= Fk * Pk)

    @functools.cached_property
    def _padded_frame_mask(self) -> np.ndarray:
        """[Fq + 1, Fk + 1]: the frame mask with a padding frame on each axis (padded keys are
        invisible to real queries; padded queries see every key: their outputs are dropped, and a
        non-empty row keeps the kernel's softmax finite)."""
        fm = self.frame_mask.array
        out = np.zeros((fm.shape[0] + 1, fm.shape[1] + 1), bool)
        out[:-1, :-1] = fm
        out[-1, :] = True
        return out

    def token_mask(self, rows: slice, cols: slice) -> np.ndarray:
        """The [len(rows), len(cols)] block of the token mask, computed from the frame mask:
        token (i, j) follows frame (i // Pq, j // Pk), padding tokens the padding frames."""
        fm = self._padded_frame_mask
        q_frames = _frame_runs(rows, self.q_tokens_per_frame, fm.shape[0] - 1)
        k_frames = _frame_runs(cols, self.k_tokens_per_frame, fm.shape[1] - 1)
        block = fm[np.ix_(q_frames[0], k_frames[0])]  # one entry per (row run, column run)
        return np.repeat(np.repeat(block, q_frames[1], axis=0), k_frames[1], axis=1)


def _frame_runs(tokens: slice, tokens_per_frame: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(frame index, run length) of the consecutive tokens of a slice; tokens past the last frame
    belong to the padding frame `frames`."""
    idx = np.minimum(np.arange(tokens.start, tokens.stop) // tokens_per_frame, frames)
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    return idx[starts], np.diff(np.r_[starts, idx.size])


@functools.cache
def _splash_lib():
    """The splash modules, imported on first use (the Pallas import costs ~0.5 s)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask

    class LazyTokenMask(mask.Mask):
        """A splash mask whose blocks are computed from a SplashLayout when the kernel's mask
        analysis asks for them: the [T, K] token mask is never materialised."""

        def __init__(self, layout: SplashLayout):
            self.layout = layout

        @property
        def shape(self) -> tuple[int, int]:
            return (self.layout.q_padded, self.layout.k_padded)

        def __getitem__(self, idx) -> np.ndarray:
            if not (isinstance(idx, tuple) and len(idx) == 2 and all(isinstance(s, slice) for s in idx)):
                raise NotImplementedError(f"LazyTokenMask takes a pair of slices, got {idx!r}")
            rows, cols = (slice(*s.indices(n)[:2]) for s, n in zip(idx, self.shape))
            return self.layout.token_mask(rows, cols)

        def __eq__(self, other) -> bool:
            return isinstance(other, LazyTokenMask) and self.layout == other.layout

        def __hash__(self) -> int:
            return hash(self.layout)

    return kernel, mask, LazyTokenMask


@functools.lru_cache(maxsize=64)
def _splash_kernel(layout: SplashLayout, q_heads: int, blocks: SplashBlocks, interpret: bool):
    """A splash kernel for `q_heads` heads on one device, its mask tables as numpy constants.

    The kernel factory analyses the mask (numpy, cached here) and turns its tables into jax
    arrays. It runs in a worker thread: outside any trace and mesh context of the caller (under a
    mesh of compile-only TPU devices no array can be created), and the tables are then kept as
    numpy so that every trace embeds them as constants.
    """
    kernel_lib, mask_lib, lazy_mask = _splash_lib()
    sizes = kernel_lib.BlockSizes(
        block_q=blocks.q,
        block_kv=blocks.kv,
        block_kv_compute=blocks.kv_compute,
        block_q_dkv=blocks.q_bwd,
        block_kv_dkv=blocks.kv_bwd,
        block_kv_dkv_compute=blocks.kv_bwd,
        block_q_dq=None if blocks.fused_bwd else blocks.q_bwd,
        block_kv_dq=None if blocks.fused_bwd else blocks.kv_bwd,
        use_fused_bwd_kernel=blocks.fused_bwd,
    )
    mask = mask_lib.MultiHeadMask([lazy_mask(layout)] * q_heads)

    def make():
        kernel = kernel_lib.make_splash_mha(
            mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )
        return jax.tree.map(np.asarray, kernel)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(make).result()


def splash_interpret_default() -> bool:
    """Interpret mode unless the computation targets TPUs: the platform of the mesh in context
    (so an ahead-of-time compile for a TPU topology gets the real kernel), else the default
    backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return platform != "tpu"


def _fitting_axes(size: int, logical: str, mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """The mesh axes the rules table maps `logical` to, kept while their product divides `size`
    (shard_map needs even shards; the rest of the mesh sees the dim replicated)."""
    from adastate_jax import sharding as shd

    axes = dict(shd.DEFAULT_RULES).get(logical)
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    kept, prod = [], 1
    for a in axes:
        n = mesh_shape.get(a, 1)
        if size % (prod * n) == 0:
            kept.append(a)
            prod *= n
    return tuple(kept)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    frame_mask=None,
    q_tokens_per_frame: int | None = None,
    k_tokens_per_frame: int | None = None,
    key_valid: jax.Array | None = None,
    blocks: SplashBlocks = SplashBlocks(),
    interpret: bool | None = None,
) -> jax.Array:
    """Softmax attention with JAX's Pallas splash kernel (flash attention with block sparsity).

    q [B, T, N, H]; k, v [B, S, Nk, H] with N % Nk == 0 (query head n uses key head n // (N / Nk)).
    frame_mask: static [Fq, Fk] bool (numpy; T = Fq * Pq, S = Fk * Pk with the tokens per frame
      given), or None: every query sees every key. Blocks of the token grid that it masks out are
      skipped, partly masked ones read their mask tile; no [T, S] array is built at any size.
    key_valid: [B, S] bool, may be traced (streaming cache slots): invalid keys get another segment
      id than the queries. Every query must keep at least one visible key (own frames are valid).
    blocks: tile sizes (config `model.splash_block_*`). interpret: Pallas interpret mode; None
      chooses it from the platform (`splash_interpret_default`).
    On TPU, 16-bit q/k/v need the default matmul precision: Mosaic refuses a float32 contract
    precision (e.g. `jax_default_matmul_precision='highest'`) for bfloat16 operands.
    Under a mesh in context (`jax.set_mesh`), runs inside `shard_map`: batch over the mesh axes of
    the logical 'batch' axis, heads over those of 'heads' (rules table), kept where they divide.
    Returns out [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    s, nk = k.shape[1], k.shape[2]
    if k.shape != (b, s, nk, h) or v.shape != k.shape:
        raise ValueError(f"splash_attention: q {q.shape}, k {k.shape}, v {v.shape} do not match")
    if n % nk:
        raise ValueError(f"splash_attention: {n} query heads are not a multiple of {nk} key heads")
    if bad := blocks.problems():
        raise ValueError(f"splash_attention: block sizes {blocks}: " + "; ".join(f"{a} {m}" for a, m in bad))
    if frame_mask is None:
        fm, pq, pk = np.ones((1, 1), bool), t, s
    else:
        fm, pq, pk = np.asarray(frame_mask, bool), q_tokens_per_frame, k_tokens_per_frame
        if fm.ndim != 2 or pq is None or pk is None or fm.shape[0] * pq != t or fm.shape[1] * pk != s:
            raise ValueError(
                f"splash_attention: frame mask {fm.shape} with {pq} / {pk} tokens per query / key "
                f"frame does not tile q ({t} tokens) x k ({s} tokens)"
            )
        empty = np.flatnonzero(~fm.any(axis=1))
        if empty.size:
            raise ValueError(f"splash_attention: query frame(s) {empty.tolist()} may attend to no key frame")
    if key_valid is not None:
        key_valid = jnp.broadcast_to(jnp.asarray(key_valid, bool), (b, s))
    bq, bq_bwd, t_pad = _fit_tiles(t, blocks.q, blocks.q_bwd)
    bkv, bkv_bwd, s_pad = _fit_tiles(s, blocks.kv, blocks.kv_bwd)
    kv_compute = (
        bkv if blocks.kv_compute >= bkv else math.gcd(bkv, blocks.kv_compute)
    )  # divides a shrunk tile
    tiles = SplashBlocks(bq, bkv, kv_compute, bq_bwd, bkv_bwd, blocks.fused_bwd)
    layout = SplashLayout(StaticMask.of(fm), int(pq), int(pk), t_pad, s_pad)
    if interpret is None:
        interpret = splash_interpret_default()

    def local(q, k, v, key_valid):
        # q [b, T, n, H], k/v [b, S, nk, H], key_valid [b, S] or None (one shard's part)
        kernel_lib = _splash_lib()[0]
        kernel = _splash_kernel(layout, q.shape[2], tiles, bool(interpret))
        scale = h**-0.5
        qs = (q.astype(jnp.float32) * scale).astype(q.dtype)

        def heads_first(x, length):  # [b, L, heads, H] -> [b, heads, L_pad, H]
            return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, 0)))

        qh, kh, vh = heads_first(qs, t_pad), heads_first(k, s_pad), heads_first(v, s_pad)
        segments = None
        if key_valid is not None:
            kv_ids = jnp.pad(
                jnp.where(key_valid, 0, 1).astype(jnp.int32), ((0, 0), (0, s_pad - s)), constant_values=1
            )
            segments = kernel_lib.SegmentIds(jnp.zeros((q.shape[0], t_pad), jnp.int32), kv_ids)
        out = jax.vmap(kernel)(qh, kh, vh) if segments is None else jax.vmap(kernel)(qh, kh, vh, segments)
        return jnp.swapaxes(out[:, :, :t], 1, 2).astype(q.dtype)  # [b, T, n, H]

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return local(q, k, v, key_valid)
    from jax.sharding import PartitionSpec as P

    shape = dict(mesh.shape)
    batch_axes = _fitting_axes(b, "batch", shape) or None
    head_axes = _fitting_axes(math.gcd(n, nk), "heads", shape) or None
    qkv_spec = P(batch_axes, None, head_axes, None)
    valid_spec = P(batch_axes, None)
    if key_valid is None:
        fn = jax.shard_map(
            lambda q, k, v: local(q, k, v, None),
            in_specs=(qkv_spec, qkv_spec, qkv_spec),
            out_specs=qkv_spec,
            check_vma=False,
        )
        return fn(q, k, v)
    fn = jax.shard_map(
        local, in_specs=(qkv_spec, qkv_spec, qkv_spec, valid_spec), out_specs=qkv_spec, check_vma=False
    )
    return fn(q, k, v, key_valid)
