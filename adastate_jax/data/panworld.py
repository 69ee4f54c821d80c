"""PanWorld: procedural pan-the-camera videos with a known ground truth.

Owns: the world generator (a periodic strip much wider than the frame: low-frequency background,
a position code band, digit sprites, some moving on their own), the camera paths and their text
prompts / integer labels / prompt vocabulary, clip rendering at any length, reading the camera
position back from frames (`decode_position` per frame, `track_positions` per video), and a grain
`RandomAccessDataSource`.
Must not know: models, latents, the streaming cache, training or metrics (it must not import
`adastate_jax.models`, `.streaming`, `.training` or `.eval`).

Geometry (one place for these facts)
- The world is an image `[H, world_width, 3]`, periodic in x (a cylinder), so clips of any length
  exist. World pixel column `i` has its centre at world coordinate `i`.
- A view at camera position `x` (a float, unwrapped: it may leave [0, world_width)) is the crop
  whose pixel column `j` shows world coordinate `x + j`, linearly interpolated between columns.
- Values are float32 in [-1, 1]; `to_uint8` / `to_float` convert.

Position code (rows `[0, 2 * code_rows)` of every frame, i.e. the top 4 rows by default)
- Coarse band, rows `[0, code_rows)`:          R = A cos(2 pi u / Ww), G = A sin(2 pi u / Ww), B = +A
- Fine band, rows `[code_rows, 2 code_rows)`:  R = A cos(2 pi u / P),  G = A sin(2 pi u / P),  B = -A
  where `u` is the world coordinate, `P = code_period`, `Ww = world_width`, `A = code_amplitude`.
- Decoding a frame at `x`: `sum_j (R + iG)[j] * exp(-2 pi i j / P) = n A exp(2 pi i x / P)`, exactly,
  for any frame width; its phase gives `x mod P` to sub-pixel accuracy and the same sum with period
  `Ww` gives `x mod Ww` coarsely (to a few px), which picks the period. Every pixel of the band
  votes, so noise averages out; a symmetric blur scales the sums but keeps their phase. The coarse
  band is on top (away from the scene): its sum is not blind to a constant offset, the fine one's is
  (a whole period fits in the default frame), so the fine band is the one that borders the scene.
- Tracking a video (`track_positions`): on generated frames the coarse reading errs by 5-15 px and
  drifts (measured on teacher rollouts), so picking the period frame by frame makes the position jump
  by P between frames that moved by half a pixel. A video's motion is therefore read from the fine
  band frame to frame (steps below P/2 = 16 px per frame, 8x PanWorld's fastest pan), with the
  coarse band deciding only whole periods of a step and, once per video, the track's period.

Camera paths and prompts (labels in this order)
  0 "static"; then for direction in (left, right), for each speed (slow, medium, fast by default
  = 0.5, 1, 2 px/frame): "pan <direction> <speed word>"; last "back and forth" (a triangle wave,
  starting rightwards). "pan left" moves the camera towards smaller x (content moves right).

Record of `PanWorldSource[i]` (all numpy, so grain can batch it with `np.stack`):
  video      float32 [T, H, W, 3] in [-1, 1] (channels-last)
  camera_x   float32 [T]  ground-truth camera position (unwrapped)
  label      int32   []   camera-path label, `index % num_labels` (balanced)
  prompt     bytes_  []   UTF-8 prompt, numpy dtype `S{max_prompt_bytes}` (decode with `.decode()`)
  prompt_ids int32   [max_prompt_words]  word ids into `prompt_vocabulary()`, 0-padded ("<pad>")
  index      int64   []   the clip index (with `config.seed` it regenerates the clip)
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

PAD_WORD = "<pad>"
_STATIC_PROMPT = "static"
_BACK_AND_FORTH_PROMPT = "back and forth"


@dataclasses.dataclass(frozen=True)
class PanWorldConfig:
    """Static configuration of a PanWorld dataset (hashable; safe as a jit static argument)."""

    frame_height: int = 32
    frame_width: int = 32
    world_width: int = 1024
    num_frames: int = 21  # clip length of the grain source; `make_clip` takes any length
    speeds: tuple[float, ...] = (0.5, 1.0, 2.0)  # px/frame of the pan prompts
    speed_words: tuple[str, ...] = ("slow", "medium", "fast")  # one word per speed
    back_and_forth_speed: float = 1.0  # px/frame
    back_and_forth_half_period: int = 12  # frames per leg of the triangle wave
    code_rows: int = 2  # rows per code band (coarse band, then fine band)
    sprite_margin: int = 1  # background rows kept free of sprites below the code band
    code_period: int = 32  # px, period of the fine code; must divide world_width
    code_amplitude: float = 0.9
    num_static_sprites: int = 32
    num_moving_sprites: int = 8
    sprite_size: int = 12  # px; sklearn 8x8 digits are resized to this
    max_sprite_speed: float = 0.75  # px/frame of the self-moving sprites (uniform in +-[0.25, max])
    background_components: int = 6  # random low-frequency sinusoids per channel
    max_background_cycles: int = 16  # highest horizontal frequency, cycles per world width
    num_clips: int = 100_000  # length of the grain source
    seed: int = 0
    max_prompt_words: int = 4
    max_prompt_bytes: int = 32

    def __post_init__(self):
        if self.frame_height <= 2 * self.code_rows + 1:
            raise ValueError(
                f"frame_height={self.frame_height} must exceed the code band (2 * code_rows="
                f"{2 * self.code_rows}) by at least 2 rows"
            )
        if self.sprite_size > self.frame_height - 2 * self.code_rows - self.sprite_margin:
            raise ValueError(
                f"sprite_size={self.sprite_size} does not fit below the code band "
                f"(frame_height={self.frame_height}, code_rows={self.code_rows}, "
                f"sprite_margin={self.sprite_margin})"
            )
        if self.world_width < 4 * self.frame_width:
            raise ValueError(
                f"world_width={self.world_width} must be at least 4 * frame_width={self.frame_width}"
            )
        if self.code_period < 4 or self.world_width % self.code_period:
            raise ValueError(
                f"code_period={self.code_period} must be >= 4 and divide world_width={self.world_width}"
            )
        if len(self.speeds) != len(self.speed_words):
            raise ValueError(f"speeds={self.speeds} and speed_words={self.speed_words} differ in length")
        if any(s <= 0 for s in self.speeds):
            raise ValueError(f"speeds={self.speeds} must be positive")
        if self.num_frames < 1 or self.num_clips < 1:
            raise ValueError(f"num_frames={self.num_frames} and num_clips={self.num_clips} must be >= 1")

    @property
    def num_labels(self) -> int:
        return 2 + 2 * len(self.speeds)

    @property
    def code_band_height(self) -> int:
        return 2 * self.code_rows

    @property
    def sprite_top(self) -> int:
        """First row sprites may cover: a margin below the code band keeps their edges (blurred by
        a model or a filter) out of the band."""
        return 2 * self.code_rows + self.sprite_margin


# ----------------------------------------------------------------------------------------------
# Camera paths, prompts, vocabulary
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CameraPath:
    """A camera path: `kind` in {"static", "pan", "back_and_forth"}; `velocity` in px/frame
    (signed for pans, the leg speed for back-and-forth); `half_period` in frames (back-and-forth)."""

    kind: str
    velocity: float = 0.0
    half_period: int = 0


def camera_prompts(config: PanWorldConfig = PanWorldConfig()) -> list[str]:
    """The prompt of every label, indexed by label."""
    prompts = [_STATIC_PROMPT]
    for direction in ("left", "right"):
        prompts += [f"pan {direction} {word}" for word in config.speed_words]
    return prompts + [_BACK_AND_FORTH_PROMPT]


def camera_path(label: int, config: PanWorldConfig = PanWorldConfig()) -> CameraPath:
    """The camera path of an integer label (see `camera_prompts` for the order)."""
    label = int(label)
    if not 0 <= label < config.num_labels:
        raise ValueError(f"label={label} outside [0, {config.num_labels})")
    if label == 0:
        return CameraPath("static")
    if label == config.num_labels - 1:
        return CameraPath("back_and_forth", config.back_and_forth_speed, config.back_and_forth_half_period)
    n = len(config.speeds)
    direction = -1.0 if label <= n else 1.0
    return CameraPath("pan", direction * config.speeds[(label - 1) % n])


def prompt_to_label(prompt: str, config: PanWorldConfig = PanWorldConfig()) -> int:
    """Inverse of `camera_prompts`."""
    prompts = camera_prompts(config)
    normalised = " ".join(prompt.lower().split())
    if normalised not in prompts:
        raise ValueError(f"prompt={prompt!r} is not one of {prompts}")
    return prompts.index(normalised)


def prompt_vocabulary(config: PanWorldConfig = PanWorldConfig()) -> list[str]:
    """Every word of every prompt, in a fixed order; index 0 is the padding word "<pad>"."""
    words = [PAD_WORD]
    for prompt in camera_prompts(config):
        words += [w for w in prompt.split() if w not in words]
    return words


def prompt_to_ids(prompt: str, config: PanWorldConfig = PanWorldConfig()) -> np.ndarray:
    """Word ids of a prompt, 0-padded to `config.max_prompt_words`.  -> int32 [max_prompt_words]"""
    vocab = prompt_vocabulary(config)
    words = prompt.lower().split()
    if len(words) > config.max_prompt_words:
        raise ValueError(f"prompt={prompt!r} has more than max_prompt_words={config.max_prompt_words}")
    unknown = [w for w in words if w not in vocab]
    if unknown:
        raise ValueError(f"prompt={prompt!r} has words {unknown} outside the vocabulary {vocab}")
    ids = np.zeros((config.max_prompt_words,), np.int32)
    ids[: len(words)] = [vocab.index(w) for w in words]
    return ids


def camera_positions(path: CameraPath, start_x: float, num_frames: int) -> np.ndarray:
    """Ground-truth camera position of every frame (unwrapped).  -> float32 [num_frames]"""
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1")
    t = np.arange(num_frames, dtype=np.float64)
    if path.kind == "static":
        offset = np.zeros_like(t)
    elif path.kind == "pan":
        offset = path.velocity * t
    elif path.kind == "back_and_forth":
        if path.half_period < 1:
            raise ValueError(f"half_period={path.half_period} must be >= 1 for back_and_forth")
        phase = np.mod(t, 2 * path.half_period)
        offset = path.velocity * np.minimum(phase, 2 * path.half_period - phase)
    else:
        raise ValueError(f"path.kind={path.kind!r} is not static, pan or back_and_forth")
    return (start_x + offset).astype(np.float32)


def requested_direction(label: int, config: PanWorldConfig = PanWorldConfig()) -> int:
    """+1 / -1 for pans to the right / left, 0 for static and back-and-forth."""
    path = camera_path(label, config)
    return int(np.sign(path.velocity)) if path.kind == "pan" else 0


# ----------------------------------------------------------------------------------------------
# World generation
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class World:
    """A generated world. `background` has the code band but no sprites; `static_image` adds the
    static sprites. Moving sprite `k` is at world (x, y) = (x0 + vx t, y0 + bob_amp sin(2 pi bob_freq
    t + bob_phase)) at frame t (top-left corner of its `sprite_size` box)."""

    config: PanWorldConfig
    background: np.ndarray  # float32 [H, Ww, 3]
    static_image: np.ndarray  # float32 [H, Ww, 3]
    static_sprite_xy: np.ndarray  # float32 [Ns, 2] top-left (x, y) in world coordinates
    moving_rgba: np.ndarray  # float32 [Nm, s, s, 4] colour in [-1, 1], alpha in [0, 1]
    moving_x0: np.ndarray  # float32 [Nm]
    moving_y0: np.ndarray  # float32 [Nm]
    moving_vx: np.ndarray  # float32 [Nm] px/frame
    moving_bob_amp: np.ndarray  # float32 [Nm] px
    moving_bob_freq: np.ndarray  # float32 [Nm] cycles/frame
    moving_bob_phase: np.ndarray  # float32 [Nm] radians


@functools.lru_cache(maxsize=1)
def _digit_images() -> np.ndarray:
    """The sklearn digits as float32 [N, 8, 8] in [0, 1] (shipped with scikit-learn, no download)."""
    from sklearn.datasets import load_digits

    return (load_digits().images / 16.0).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _code_band(config: PanWorldConfig) -> np.ndarray:
    """The position code over the whole world.  -> float32 [2 * code_rows, Ww, 3]"""
    u = np.arange(config.world_width, dtype=np.float64)
    a = config.code_amplitude
    rows = []
    for period, blue in ((config.world_width, a), (config.code_period, -a)):
        theta = 2 * np.pi * u / period
        band = np.stack([a * np.cos(theta), a * np.sin(theta), np.full_like(u, blue)], axis=-1)
        rows += [band] * config.code_rows
    return np.stack(rows).astype(np.float32)


def _background(config: PanWorldConfig, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency texture, periodic in x.  -> float32 [H, Ww, 3] in about [-0.75, 0.35]"""
    h, ww = config.frame_height, config.world_width
    y = np.arange(h, dtype=np.float64)[:, None] / h
    x = np.arange(ww, dtype=np.float64)[None, :] / ww
    base = rng.uniform(-0.45, 0.05, size=3)
    channels = []
    for c in range(3):
        field = np.zeros((h, ww))
        for _ in range(config.background_components):
            kx = rng.integers(1, config.max_background_cycles + 1)
            ky = rng.uniform(-1.0, 1.0)
            phase = rng.uniform(0, 2 * np.pi)
            field += np.cos(2 * np.pi * (kx * x + ky * y) + phase)
        field *= 0.3 / np.sqrt(config.background_components)
        channels.append(base[c] + np.clip(field, -0.3, 0.3))
    return np.stack(channels, axis=-1).astype(np.float32)


def _random_sprite(config: PanWorldConfig, rng: np.random.Generator) -> np.ndarray:
    """A scaled sklearn digit in a bright random colour.  -> float32 [s, s, 4] (rgb in [-1,1], alpha)"""
    import cv2

    digits = _digit_images()
    digit = digits[rng.integers(len(digits))]
    s = config.sprite_size
    alpha = np.clip(1.5 * cv2.resize(digit, (s, s), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    colour = rng.uniform(0.2, 1.0, size=3)
    colour[rng.integers(3)] = 1.0  # at least one saturated channel: stands out on the background
    rgb = np.broadcast_to(colour, (s, s, 3))
    return np.concatenate([rgb, alpha[..., None]], axis=-1).astype(np.float32)


def _composite_at_integer(image: np.ndarray, rgba: np.ndarray, x: int, y: int) -> None:
    """Alpha-blends `rgba` [s, s, 4] into `image` [H, Ww, 3] in place at (x, y), wrapping in x."""
    s = rgba.shape[0]
    cols = np.mod(np.arange(x, x + s), image.shape[1])
    region = image[y : y + s, cols]
    alpha = rgba[..., 3:]
    image[y : y + s, cols] = region * (1 - alpha) + rgba[..., :3] * alpha


def make_world(config: PanWorldConfig, world_seed: int | np.random.SeedSequence) -> World:
    """Generates a world deterministically from `world_seed`."""
    rng = np.random.default_rng(world_seed)
    band, top = config.code_band_height, config.sprite_top
    s = config.sprite_size
    background = _background(config, rng)
    background[:band] = _code_band(config)
    static_image = background.copy()

    spacing = config.world_width / max(config.num_static_sprites, 1)
    xy = []
    for i in range(config.num_static_sprites):
        x = int((i + rng.uniform(0.0, 1.0)) * spacing)
        y = int(rng.integers(top, config.frame_height - s + 1))
        _composite_at_integer(static_image, _random_sprite(config, rng), x, y)
        xy.append((x, y))

    m = config.num_moving_sprites
    rgba = np.stack([_random_sprite(config, rng) for _ in range(m)]) if m else np.zeros((0, s, s, 4))
    free_rows = max(config.frame_height - s - top - 1, 0)  # - 1: sub-pixel sprites span s + 1 rows
    amp = rng.uniform(0.0, 0.5, size=m) * free_rows / 2
    y_centre = top + free_rows / 2
    speed = rng.uniform(0.25, max(config.max_sprite_speed, 0.25), size=m)
    return World(
        config=config,
        background=background,
        static_image=static_image,
        static_sprite_xy=np.asarray(xy, np.float32).reshape(-1, 2),
        moving_rgba=rgba.astype(np.float32),
        moving_x0=rng.uniform(0, config.world_width, size=m).astype(np.float32),
        moving_y0=np.full((m,), y_centre, np.float32),
        moving_vx=(speed * rng.choice([-1.0, 1.0], size=m)).astype(np.float32),
        moving_bob_amp=amp.astype(np.float32),
        moving_bob_freq=rng.uniform(0.01, 0.05, size=m).astype(np.float32),
        moving_bob_phase=rng.uniform(0, 2 * np.pi, size=m).astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _crop_periodic(image: np.ndarray, x: float, width: int) -> np.ndarray:
    """Columns `x + j`, j < width, of a periodic image, linearly interpolated.  -> [H, width, C]"""
    x0 = int(np.floor(x))
    frac = np.float32(x - x0)
    cols = np.mod(np.arange(x0, x0 + width + 1), image.shape[1])
    strip = image[:, cols]
    return (1 - frac) * strip[:, :-1] + frac * strip[:, 1:]


def _shift_sprite(rgba: np.ndarray, frac_x: float, frac_y: float) -> np.ndarray:
    """Translates a premultiplied sprite by (frac_x, frac_y) in [0, 1) with linear interpolation:
    output pixel (r, c) samples the sprite at (r - frac_y, c - frac_x).
    `rgba` [s, s, 4] premultiplied -> [s + 1, s + 1, 4]"""
    padded = np.pad(rgba, ((1, 1), (1, 1), (0, 0)))
    out = (1 - frac_x) * padded[:, 1:] + frac_x * padded[:, :-1]
    out = (1 - frac_y) * out[1:] + frac_y * out[:-1]
    return out


def _moving_sprite_positions(world: World, t: float) -> tuple[np.ndarray, np.ndarray]:
    """World (x, y) of every moving sprite's top-left corner at frame t.  -> ([Nm], [Nm]) float64"""
    ww = world.config.world_width
    x = np.mod(world.moving_x0 + world.moving_vx * t, ww).astype(np.float64)
    bob = np.sin(2 * np.pi * world.moving_bob_freq * t + world.moving_bob_phase)
    y = (world.moving_y0 + world.moving_bob_amp * bob).astype(np.float64)
    return x, y


def render_view(world: World, x: float, t: float = 0.0) -> np.ndarray:
    """Ground-truth frame at camera position `x` (any float) and frame time `t` (moving sprites).

    -> float32 [H, W, 3] in [-1, 1]
    """
    config = world.config
    w, ww = config.frame_width, config.world_width
    frame = _crop_periodic(world.static_image, float(x), w)
    sx, sy = _moving_sprite_positions(world, t)
    s = config.sprite_size
    for k in range(len(sx)):
        rel_x = float(np.mod(sx[k] - x, ww))
        if rel_x > ww - s - 1:  # sprite straddles the left edge of the view
            rel_x -= ww
        if rel_x >= w or rel_x <= -s - 1:
            continue
        ix, iy = int(np.floor(rel_x)), int(np.floor(sy[k]))
        rgba = world.moving_rgba[k].copy()
        rgba[..., :3] *= rgba[..., 3:]  # premultiply so that interpolation does not bleed colour
        shifted = _shift_sprite(rgba, rel_x - ix, sy[k] - iy)  # [s + 1, s + 1, 4]
        _blend_premultiplied(frame, shifted, ix, iy, config.sprite_top)
    return np.clip(frame, -1.0, 1.0).astype(np.float32)


def _blend_premultiplied(frame: np.ndarray, rgba: np.ndarray, left: int, top: int, min_row: int) -> None:
    """Blends premultiplied `rgba` [k, k, 4] with its (0, 0) pixel at view (row `top`, column
    `left`) into `frame` [H, W, 3] in place, clipped to the frame and to rows >= `min_row`."""
    h, w, _ = frame.shape
    k = rgba.shape[0]
    r0, c0 = max(top, min_row), max(left, 0)
    r1, c1 = min(top + k, h), min(left + k, w)
    if r0 >= r1 or c0 >= c1:
        return
    patch = rgba[r0 - top : r1 - top, c0 - left : c1 - left]
    alpha = patch[..., 3:]
    frame[r0:r1, c0:c1] = frame[r0:r1, c0:c1] * (1 - alpha) + patch[..., :3]


def render_clip(world: World, camera_x: np.ndarray, start_time: float = 0.0) -> np.ndarray:
    """Frames of `world` along `camera_x` [T]; frame t is at time `start_time + t`.

    -> float32 [T, H, W, 3] in [-1, 1]
    """
    camera_x = np.asarray(camera_x, np.float64)
    if camera_x.ndim != 1:
        raise ValueError(f"camera_x must be 1-D [T], got shape {camera_x.shape}")
    return np.stack([render_view(world, x, start_time + t) for t, x in enumerate(camera_x)])


def sprites_in_view(world: World, x: float, t: float = 0.0) -> list[tuple[str, int]]:
    """Sprites at least partly inside the view at (x, t): ("static", i) / ("moving", k) pairs."""
    config = world.config
    ww, w, s = config.world_width, config.frame_width, config.sprite_size
    xs = [("static", i, float(px)) for i, px in enumerate(world.static_sprite_xy[:, 0])]
    mx, _ = _moving_sprite_positions(world, t)
    xs += [("moving", k, float(px)) for k, px in enumerate(mx)]
    visible = []
    for kind, i, px in xs:
        rel = np.mod(px - x, ww)
        if rel < w or rel > ww - s:
            visible.append((kind, i))
    return visible


# ----------------------------------------------------------------------------------------------
# Clips and the grain source
# ----------------------------------------------------------------------------------------------


def clip_seed(config: PanWorldConfig, index: int) -> np.random.SeedSequence:
    """The seed of clip `index` (a function of (config.seed, index) only)."""
    if index < 0:
        raise ValueError(f"index={index} must be >= 0")
    return np.random.SeedSequence([int(config.seed), int(index)])


def make_clip(
    config: PanWorldConfig,
    index: int,
    num_frames: int | None = None,
    label: int | None = None,
) -> dict:
    """Clip `index`: its world, path and frames. `num_frames` defaults to `config.num_frames`;
    `label` defaults to `index % num_labels`. The world and start position depend only on
    (config.seed, index), so the same index at a longer length extends the same clip.

    -> dict(world=World, label=int, prompt=str, camera_x=float32 [T], video=float32 [T, H, W, 3])
    """
    num_frames = config.num_frames if num_frames is None else int(num_frames)
    label = index % config.num_labels if label is None else int(label)
    world_seq, start_seq = clip_seed(config, index).spawn(2)
    world = make_world(config, world_seq)
    start_x = float(np.random.default_rng(start_seq).uniform(0, config.world_width))
    camera_x = camera_positions(camera_path(label, config), start_x, num_frames)
    return dict(
        world=world,
        label=label,
        prompt=camera_prompts(config)[label],
        camera_x=camera_x,
        video=render_clip(world, camera_x),
    )


class PanWorldSource:
    """grain `RandomAccessDataSource` of PanWorld clips (picklable; no state but the config).

    Record format: see the module docstring. Use with `grain.MapDataset.source(PanWorldSource(c))`
    or `grain.DataLoader(data_source=PanWorldSource(c), ...)`.
    """

    def __init__(self, config: PanWorldConfig = PanWorldConfig()):
        self.config = config

    def __len__(self) -> int:
        return self.config.num_clips

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index={index} outside [0, {len(self)})")
        clip = make_clip(self.config, index)
        prompt = clip["prompt"].encode("utf-8")
        if len(prompt) > self.config.max_prompt_bytes:
            raise ValueError(f"prompt {prompt!r} exceeds max_prompt_bytes={self.config.max_prompt_bytes}")
        return {
            "video": clip["video"],  # float32 [T, H, W, 3]
            "camera_x": clip["camera_x"],  # float32 [T]
            "label": np.int32(clip["label"]),
            "prompt": np.array(prompt, dtype=f"S{self.config.max_prompt_bytes}"),
            "prompt_ids": prompt_to_ids(clip["prompt"], self.config),  # int32 [max_prompt_words]
            "index": np.int64(index),
        }

    def __repr__(self) -> str:
        return f"PanWorldSource({self.config!r})"


# ----------------------------------------------------------------------------------------------
# Reading the position back
# ----------------------------------------------------------------------------------------------


def _demodulate(band: np.ndarray, period: float) -> np.ndarray:
    """sum over rows and columns j of (R + iG) * exp(-2 pi i j / period).
    `band` [..., rows, W, 3] -> complex128 [...]"""
    j = np.arange(band.shape[-2])
    carrier = np.exp(-2j * np.pi * j / period)
    signal = band[..., 0].astype(np.float64) + 1j * band[..., 1].astype(np.float64)
    return np.einsum("...rw,w->...", signal, carrier)


def decode_bands(frames: np.ndarray, config: PanWorldConfig = PanWorldConfig()):
    """What each frame's two code bands say, before they are combined into a position.

    `frames`: [..., H, W, 3], float in [-1, 1] or uint8 (converted with `to_float`).
    -> (x_fine [...] in [0, code_period): the camera position modulo the fine period, sub-pixel;
        x_coarse [...] in [0, world_width): the position read from the coarse band alone, good to
        a few pixels on rendered frames and to ~5-15 px on generated ones (its period is the whole
        world, so a small colour error is a large position error);
        confidence [...]: the smaller of the two bands' demodulated amplitudes relative to a clean
        frame, ~1 for a valid frame, near 0 when the band is gone), all float64.
    """
    frames = np.asarray(frames)
    if frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [..., H, W, 3], got shape {frames.shape}")
    if frames.shape[-3] < config.code_band_height:
        raise ValueError(f"frames height {frames.shape[-3]} < code band {config.code_band_height}")
    if frames.dtype == np.uint8:
        frames = to_float(frames)
    rows = config.code_rows
    p, ww = config.code_period, config.world_width
    coarse = _demodulate(frames[..., :rows, :, :], ww)
    fine = _demodulate(frames[..., rows : 2 * rows, :, :], p)
    x_fine = np.mod(np.angle(fine) * p / (2 * np.pi), p)
    x_coarse = np.mod(np.angle(coarse) * ww / (2 * np.pi), ww)
    full = config.code_amplitude * rows * frames.shape[-2]
    return x_fine, x_coarse, np.minimum(np.abs(fine), np.abs(coarse)) / full


def decode_position(
    frames: np.ndarray,
    config: PanWorldConfig = PanWorldConfig(),
    *,
    return_confidence: bool = False,
):
    """Camera position of each frame on its own, read from its code band: the fine band's phase
    placed in the period the coarse band points to. Exact on rendered frames; on generated frames
    the coarse reading can point to a neighbouring period (a jump of `code_period` px between two
    frames that moved by less than a pixel), so videos are tracked with `track_positions`.

    `frames`: [..., H, W, 3], float in [-1, 1] or uint8 (converted with `to_float`).
    -> float64 [...] in [0, world_width) (wrapped; see `unwrap_positions`), and with
    `return_confidence` also float64 [...] (`decode_bands`' confidence).
    """
    x_fine, x_coarse, confidence = decode_bands(frames, config)
    x = position_from_bands(x_fine, x_coarse, config)
    return (x, confidence) if return_confidence else x


def position_from_bands(x_fine, x_coarse, config: PanWorldConfig = PanWorldConfig()) -> np.ndarray:
    """Each frame's own position from its band readings (`decode_bands`): the fine reading placed
    in the period the coarse reading points to.  -> float64 [...] in [0, world_width)"""
    p, ww = config.code_period, config.world_width
    periods = np.round((np.asarray(x_coarse) - np.asarray(x_fine)) / p)
    return np.mod(x_fine + periods * p, ww)


def _wrap(d: np.ndarray, period: float) -> np.ndarray:
    """d modulo `period`, into [-period / 2, period / 2)."""
    return np.mod(d + period / 2, period) - period / 2


def camera_steps(
    x_fine: np.ndarray, x_coarse: np.ndarray, config: PanWorldConfig = PanWorldConfig()
) -> np.ndarray:
    """Camera steps between consecutive frames from their band readings (`decode_bands`).

    A step is the fine band's step (modulo `code_period`, taken in [-P/2, P/2): sub-pixel exact)
    plus the whole number of periods by which the coarse band's step differs from it:
        step_t = f_t + P * round((c_t - f_t) / P),
        f_t = wrap_P(xf_t - xf_{t-1}),  c_t = wrap_Ww(xc_t - xc_{t-1})
    So a jump of more than P/2 (a snap back, a cut) is still measured, while the coarse reading's
    error has to exceed P/2 = 16 px *between two consecutive frames* to corrupt a step (the
    per-frame combination of `decode_position` fails whenever it drifts across a period boundary).
    x_fine, x_coarse: [..., T] -> float64 [..., T - 1]
    """
    p, ww = config.code_period, config.world_width
    f = _wrap(np.diff(np.asarray(x_fine, np.float64), axis=-1), p)
    c = _wrap(np.diff(np.asarray(x_coarse, np.float64), axis=-1), ww)
    return f + p * np.round((c - f) / p)


def track_positions(
    frames: np.ndarray,
    config: PanWorldConfig = PanWorldConfig(),
    *,
    return_confidence: bool = False,
):
    """Camera track of a video: positions of its frames, unwrapped (they may leave [0, world_width)).

    Motion comes from `camera_steps` (fine band, coarse band only for whole periods); the track's
    absolute place is the period that the coarse readings of all frames agree with most (the median
    of their offsets from the relative track), one choice per video; the first position lies in
    [0, world_width). On rendered frames this equals `unwrap_positions(decode_position(...))`.

    `frames`: [..., T, H, W, 3] -> float64 [..., T] (and `decode_bands`' confidence [..., T]).
    """
    x_fine, x_coarse, confidence = decode_bands(frames, config)
    if x_fine.ndim < 1 or x_fine.shape[-1] < 1:
        raise ValueError(f"frames must be [..., T, H, W, 3] with T >= 1, got {np.shape(frames)}")
    p, ww = config.code_period, config.world_width
    steps = camera_steps(x_fine, x_coarse, config)
    rel = np.concatenate([np.zeros_like(x_fine[..., :1]), np.cumsum(steps, axis=-1)], axis=-1)
    rel = rel + x_fine[..., :1]  # the fine band's first reading, in period 0
    offset = _wrap(x_coarse - rel, ww)  # [..., T]: period * k + the coarse band's error
    ref = offset[..., :1]
    agreed = ref + np.median(_wrap(offset - ref, ww), axis=-1, keepdims=True)
    x = rel + p * np.round(agreed / p)
    x = x - ww * np.floor(x[..., :1] / ww)
    return (x, confidence) if return_confidence else x


def unwrap_positions(x: np.ndarray, world_width: float) -> np.ndarray:
    """Unwraps positions taken modulo `world_width` along the last axis (steps < world_width / 2).
    [..., T] -> float64 [..., T], starting at x[..., 0]."""
    x = np.asarray(x, np.float64)
    steps = np.diff(x, axis=-1)
    steps = np.mod(steps + world_width / 2, world_width) - world_width / 2
    return np.concatenate([x[..., :1], x[..., :1] + np.cumsum(steps, axis=-1)], axis=-1)


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 [0, 255] (rounded, clipped); any shape."""
    return np.clip(np.round((np.asarray(video, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_float(video: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]; any shape."""
    video = np.asarray(video)
    if video.dtype != np.uint8:
        raise ValueError(f"to_float expects uint8, got {video.dtype}")
    return video.astype(np.float32) / 127.5 - 1.0
