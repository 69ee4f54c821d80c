"""The demo's library: what the main job, `launch/compare.py` and the Colab notebook do with a
PanWorld model, as functions.

Owns:
- PanWorld camera prompts for a model (`camera_prompts`, `check_prompt` with an error listing the
  valid prompts, `prompt_table`);
- students to show (`load_student`: a shipped model, or with none shipped a random tiny one with a
  warning; `random_students` for tests);
- a finished rollout on the host (`roll_out` -> `Rollout`: frames, the decoded adaptive state,
  the prompt of every frame, attention shares);
- the decoded camera position and progression of a rollout (`CameraTracker`, fed chunk by chunk
  in O(1) memory, and `camera_summary` for whole videos), through `eval.metrics` and PanWorld's
  position code;
- the five-policy comparison (`compare` -> `Comparison`: running progression / anchor pull per
  frame against a held-out reference clip of the prompt, the labelled side-by-side video, a plot);
- pictures: `viewable` (uint8, upscaled), `with_state` (a chunk's frames with its decoded state
  beside them), `frame_strip` / `write_frame_strip` (a row of frames every k frames, upscaled,
  with the frame index under each).

Must not know: command lines, training, how params are stored (`build` and `shipped` load them).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from adastate_jax import build, shipped
from adastate_jax import video as video_lib
from adastate_jax.config import Experiment
from adastate_jax.data import panworld
from adastate_jax.eval import harness, report
from adastate_jax.streaming.anchors import GROUP_NAMES, POLICIES

LOW_CONFIDENCE = 0.5  # mean code confidence below which decoded positions are not trusted

# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def panworld_of(exp: Experiment | None) -> panworld.PanWorldConfig:
    """The PanWorld a model was trained on (`config.data.panworld`; the default without one)."""
    if exp is not None and exp.data is not None:
        return exp.data.panworld
    return panworld.PanWorldConfig()


def camera_prompts(exp: Experiment | None = None) -> list[str]:
    """The PanWorld camera prompts of a model, in label order."""
    return panworld.camera_prompts(panworld_of(exp))


def check_prompt(prompt: str, exp: Experiment | None = None, flag: str = "--prompt") -> str:
    """`prompt` normalised (lower case, single spaces) if it is a PanWorld camera prompt, else a
    ValueError naming `flag` and listing the valid prompts."""
    valid = camera_prompts(exp)
    normalised = " ".join(str(prompt).lower().split())
    if normalised not in valid:
        raise ValueError(
            f"{flag}={prompt!r} is not a PanWorld camera prompt; valid prompts: "
            + ", ".join(repr(p) for p in valid)
        )
    return normalised


def prompt_table(exp: Experiment, prompts: str | Sequence[str], batch: int | None = None) -> np.ndarray:
    """[P, B, text_len, text_dim] embeddings of PanWorld camera prompts for the model of `exp`
    (each checked with `check_prompt`; B = `batch`, default `config.stream.batch_size`)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompt_table: no prompts")
    if exp.text.kind != "words":
        raise ValueError(
            f"config.text.kind={exp.text.kind!r}: PanWorld camera prompts are embedded by the 'words' encoder"
        )
    return build.prompt_table(exp, [check_prompt(p, exp) for p in prompts], batch=batch)


# --------------------------------------------------------------------------------------------
# Models to show
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Student:
    name: str  # shipped name, or 'random <policy>'
    exp: Experiment
    dit: build.DiT

    @property
    def anchor(self) -> str:
        return self.exp.stream.anchor


def with_anchor(exp: Experiment, anchor: str) -> Experiment:
    return dataclasses.replace(exp, stream=dataclasses.replace(exp.stream, anchor=anchor))


def tiny_experiment(config: str = "configs/tiny.py") -> Experiment:
    """The Experiment of a config file in the repository (`FILE[:variants]`)."""
    from adastate_jax import config as config_lib
    from adastate_jax.config import cli

    path, sep, arg = config.partition(":")
    path = path if os.path.isabs(path) else os.path.join(cli.REPO, path)
    return config_lib.parse(cli.load_file(path + sep + arg))


def random_students(exp: Experiment, policies: Sequence[str] = POLICIES, seed: int = 0) -> list[Student]:
    """One randomly initialised DiT of `exp` shared by every policy (untrained: for tests)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dit = build.dit(exp, seed=seed)
    return [Student(f"random {p}", with_anchor(exp, p), dit) for p in policies]


def load_student(anchor: str = "adastate", root: str | None = None, allow_random: bool = True) -> Student:
    """The shipped student for `anchor` (hash-verified). With no shipped model at all and
    `allow_random`, a random `configs/tiny.py` model instead, with a warning."""
    if not shipped.available(root) and allow_random:
        warnings.warn(
            f"no shipped models in {shipped.root_dir(root)}: using an untrained random tiny model (noise)",
            stacklevel=2,
        )
        return random_students(tiny_experiment(), [anchor])[0]
    name = shipped.default_for(anchor, root)
    exp, dit = shipped.load(name, root)
    return Student(name, exp, dit)


def shipped_policies(root: str | None = None) -> list[str]:
    """The anchor policies with a shipped student, in `POLICIES` order."""
    students = {m["anchor"] for m in shipped.manifests(root).values() if m["role"] == "student"}
    return [p for p in POLICIES if p in students]


def load_students(
    policies: Sequence[str] | None = None, root: str | None = None, allow_random: bool = True
) -> list[Student]:
    """The shipped student of every policy in `policies` (default: every policy with one), or, with
    none shipped, random tiny ones (default: all five policies)."""
    if not shipped.available(root) and allow_random:
        warnings.warn(
            f"no shipped models in {shipped.root_dir(root)}: using untrained random tiny models (noise)",
            stacklevel=2,
        )
        return random_students(tiny_experiment(), list(policies or POLICIES))
    return [load_student(p, root, allow_random=False) for p in (policies or shipped_policies(root))]


# --------------------------------------------------------------------------------------------
# A rollout on the host
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Rollout:
    anchor: str
    prompts: list[str]
    frames: np.ndarray  # [T, H, W, 3] in [-1, 1], the decoder's lead frames dropped
    frame_prompt: np.ndarray  # [T] int: the prompt id of each frame
    frames_per_chunk: int
    state: np.ndarray | None = None  # [T_s, H, W, 3] the decoded adaptive state (adastate only)
    attention: np.ndarray | None = None  # [chunk, layer, group] attention share (GROUP_NAMES)


_ENGINES: dict = {}  # (exp, graphdef, instrument) -> (streamer, decoder params, state decode)


def _engine(exp: Experiment, graphdef, instrument: bool):
    """A `Streamer` with its decoder, kept per (config, model graph, instrumentation): rollouts of
    models of one config with the same shapes reuse one compilation."""
    import jax

    key = (exp, graphdef, instrument)
    if key not in _ENGINES:
        decoder, decoder_params = build.decoder(exp)
        if decoder is None:
            raise ValueError("config.vae.kind='none': a demo rollout needs pixels ('patch' or 'wan')")
        streamer = build.streamer(exp, graphdef, decoder_=decoder, instrument=instrument)
        _ENGINES[key] = (streamer, decoder_params, jax.jit(decoder.decode_chunk))
    return _ENGINES[key]


def roll_out(
    student: Student,
    prompts: str | Sequence[str],
    num_chunks: int,
    *,
    switches: Mapping[int, int] | None = None,
    seed: int = 0,
    instrument: bool = False,
) -> Rollout:
    """Stream `num_chunks` chunks of `student` (batch 1) from prompt 0, switching to prompt p at
    chunk c for every `switches[c] = p`; frames and the adaptive state decoded. -> Rollout"""
    import jax
    import jax.numpy as jnp

    from adastate_jax.streaming.rollout import attention_shares, prompt_schedule

    if num_chunks < 1:
        raise ValueError(f"num_chunks={num_chunks}: must be >= 1")
    prompts = [check_prompt(p, student.exp) for p in ([prompts] if isinstance(prompts, str) else prompts)]
    exp = dataclasses.replace(student.exp, stream=dataclasses.replace(student.exp.stream, batch_size=1))
    # the table holds every camera prompt (one shape, one compilation for any prompts); the
    # schedule of requested prompts maps onto its rows
    every = camera_prompts(exp)
    table = jnp.asarray(prompt_table(exp, every, batch=1))  # [8, 1, T, D]
    schedule = prompt_schedule(num_chunks, switches, len(prompts))  # [N] into `prompts`
    rows = np.asarray([every.index(p) for p in prompts], np.int32)[schedule]  # [N] into the table
    streamer, decoder_params, decode_state = _engine(exp, student.dit.graphdef, instrument)
    decoder = streamer.decoder
    carry = streamer.init_carry(
        student.dit.params,
        table,
        jax.random.key(seed),
        prompt_id=int(rows[0]),
        decoder_params=decoder_params,
    )
    _, out = streamer.jit_rollout(student.dit.params, carry, jnp.asarray(rows), table, None, decoder_params)
    chunks = np.asarray(out.frames)[:, 0]  # [N, Tc, H, W, 3]
    per_chunk = chunks.shape[1]
    lead = decoder.lead_frames
    frames = chunks.reshape(-1, *chunks.shape[2:])[lead:]
    frame_prompt = np.repeat(schedule, per_chunk)[lead:]
    state = None
    if exp.stream.query_state_frames:
        z = np.asarray(out.state)[:, 0]  # [N, F_s, h, w, C]
        z = z.reshape(-1, *z.shape[2:])
        cache = decoder.init_cache(decoder_params, 1, exp.stream.latent_h, exp.stream.latent_w)
        _, decoded = decode_state(decoder_params, cache, jnp.asarray(z)[None])
        state = np.asarray(decoded)[0, lead:]
    attention = None
    if out.key_mass is not None:
        attention = attention_shares(exp.stream, np.asarray(out.key_mass))  # [N, L, 3]
    return Rollout(exp.stream.anchor, prompts, frames, frame_prompt, per_chunk, state, attention)


# --------------------------------------------------------------------------------------------
# Decoded camera position and progression
# --------------------------------------------------------------------------------------------


def view_config(pw: panworld.PanWorldConfig, height: int, width: int) -> panworld.PanWorldConfig:
    """`pw` at a frame size of `height` x `width` (sprites scaled as the harness does)."""
    if (pw.frame_height, pw.frame_width) == (height, width):
        return pw
    sized = harness.panworld_config(height, width, pw.seed)
    return dataclasses.replace(pw, frame_height=height, frame_width=width, sprite_size=sized.sprite_size)


def requested_steps(path: panworld.CameraPath, first_step: int, count: int) -> np.ndarray:
    """The camera steps a path requests at its steps first_step .. first_step + count - 1 (step k
    goes from the path's frame k - 1 to frame k, k >= 1), from `panworld.camera_positions`; paths
    are periodic, so the cost does not grow with k.  -> float64 [count]"""
    period = 2 * path.half_period if path.kind == "back_and_forth" else 1
    offsets = panworld.camera_positions(path, 0.0, period + 1).astype(np.float64)  # [period + 1]
    k = (np.arange(first_step, first_step + count) - 1) % period
    return offsets[k + 1] - offsets[k]


@dataclasses.dataclass
class Segment:
    """Frames under one prompt: `requested` = sum |g_t|, `along` = sum sign(g_t) d_t, `moved` =
    sum d_t over its steps (g requested, d decoded camera steps, in px)."""

    prompt: str
    first_frame: int
    frames: int = 0
    steps: int = 0
    requested: float = 0.0
    along: float = 0.0
    moved: float = 0.0

    @property
    def progression(self) -> float:
        return self.along / self.requested if self.requested > 1e-9 else float("nan")


class CameraTracker:
    """The decoded camera position and progression of a stream, fed chunk by chunk.

    `add(frames [T, H, W, 3], prompt)` reads each frame's code bands and tracks the camera across
    chunks as `panworld.track_positions` tracks a whole video (each step from the fine band, whole
    periods from the coarse band: `panworld.camera_steps`), and compares every camera step d_t with
    the step g_t the frame's prompt requests (its path restarted where the prompt starts). The
    progression is `metrics.progression_ratio`'s: sum sign(g_t) d_t / sum |g_t|, per prompt
    segment and overall. `first_x` is the first frame's own reading (`panworld.position_from_bands`).
    Memory: O(number of prompt segments)."""

    def __init__(self, pw: panworld.PanWorldConfig | None = None, exp: Experiment | None = None):
        self.pw = pw or panworld_of(exp)
        self.segments: list[Segment] = []
        self.frames = 0
        self.first_x = self.last_x = float("nan")
        self._last_bands: tuple[float, float] | None = None  # (fine, coarse) reading of the last frame
        self._confidence = 0.0

    def add(self, frames: np.ndarray, prompt: str) -> None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
        if frames.shape[0] == 0:
            return
        pw = view_config(self.pw, *frames.shape[1:3])
        prompt = check_prompt(prompt, flag="prompt")
        fine, coarse, confidence = panworld.decode_bands(frames, pw)  # [T] each
        if self._last_bands is None:
            self.first_x = self.last_x = float(panworld.position_from_bands(fine[0], coarse[0], pw))
        else:
            fine = np.concatenate([[self._last_bands[0]], fine])
            coarse = np.concatenate([[self._last_bands[1]], coarse])
        steps = panworld.camera_steps(fine, coarse, pw)
        self._last_bands = (float(fine[-1]), float(coarse[-1]))
        if not self.segments or self.segments[-1].prompt != prompt:
            self.segments.append(Segment(prompt, self.frames))
        seg = self.segments[-1]
        path = panworld.camera_path(panworld.prompt_to_label(prompt, pw), pw)
        g = requested_steps(path, seg.steps + 1, steps.size)
        seg.frames += frames.shape[0]
        seg.steps += steps.size
        seg.requested += float(np.abs(g).sum())
        seg.along += float((np.sign(g) * steps).sum())
        seg.moved += float(steps.sum())
        self.frames += frames.shape[0]
        self.last_x += float(steps.sum())
        self._confidence += float(confidence.sum())

    @property
    def code_confidence(self) -> float:
        return self._confidence / self.frames if self.frames else float("nan")

    @property
    def progression(self) -> float:
        requested = sum(s.requested for s in self.segments)
        along = sum(s.along for s in self.segments)
        return along / requested if requested > 1e-9 else float("nan")

    def summary(self) -> dict:
        """JSON-ready: frames, first / last decoded x, moved, code confidence, progression, segments."""
        return dict(
            frames=self.frames,
            first_x=self.first_x,
            last_x=self.last_x,
            moved_px=self.last_x - self.first_x,
            code_confidence=self.code_confidence,
            progression=self.progression,
            segments=[dict(dataclasses.asdict(s), progression=s.progression) for s in self.segments],
        )

    def text(self) -> str:
        """The printed summary: decoded camera position, then progression per prompt and overall."""
        if not self.frames:
            return "decoded camera: no frames"
        lines = [
            f"decoded camera position: x {self.first_x:.1f} -> {self.last_x:.1f} px over {self.frames} "
            f"frames (moved {self.last_x - self.first_x:+.1f} px); code confidence "
            f"{self.code_confidence:.2f}"
        ]
        if self.code_confidence < LOW_CONFIDENCE:
            lines.append(
                "  (low code confidence: the frames carry no clear position code, positions are noise)"
            )
        for s in self.segments:
            last = s.first_frame + s.frames - 1
            what = f"progression {s.progression:.2f}" if s.requested > 1e-9 else "no motion requested"
            lines.append(
                f"  frames {s.first_frame}-{last} {s.prompt!r}: requested {s.requested:.1f} px, "
                f"moved {s.along:+.1f} px along it ({s.moved:+.1f} px net): {what}"
            )
        p = self.progression
        lines.append(
            f"progression {p:.2f} (decoded camera motion along the requested direction / requested motion; "
            "1 follows the prompt, 0 frozen)"
            if np.isfinite(p)
            else "progression n/a (no camera motion requested)"
        )
        return "\n".join(lines)


def camera_summary(
    frames: np.ndarray,
    prompts: str | Sequence[str],
    frame_prompt: np.ndarray | None = None,
    exp: Experiment | None = None,
) -> CameraTracker:
    """The `CameraTracker` of a whole video [T, H, W, 3] whose frame t shows `prompts[frame_prompt[t]]`
    (one prompt: every frame). Print `.text()`; `.summary()` for JSON."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    frames = np.asarray(frames)
    ids = np.zeros(frames.shape[0], int) if frame_prompt is None else np.asarray(frame_prompt)
    if ids.shape != frames.shape[:1]:
        raise ValueError(f"frame_prompt {ids.shape} must be [T] with T = {frames.shape[0]}")
    tracker = CameraTracker(exp=exp)
    bounds = np.flatnonzero(np.diff(ids)) + 1
    for lo, hi in zip([0, *bounds], [*bounds, ids.size]):
        tracker.add(frames[lo:hi], prompts[int(ids[lo])])
    return tracker


# --------------------------------------------------------------------------------------------
# Five policies side by side
# --------------------------------------------------------------------------------------------


def reference_clip(prompt: str, frames: int, height: int, width: int, exp: Experiment | None = None):
    """A held-out ground-truth PanWorld clip of `prompt` (anchor pull's reference), at the frame size."""
    pw = view_config(dataclasses.replace(panworld_of(exp), seed=harness.Settings().world_seed), height, width)
    label = panworld.prompt_to_label(check_prompt(prompt, exp), pw)
    return harness.held_out_clips(pw, [label], 1, frames)[0]


@dataclasses.dataclass
class Comparison:
    prompt: str
    seed: int
    names: list[str]
    rollouts: list[Rollout]
    scores: list[dict]  # harness.running_scores per rollout: {progression, pull, code_conf} [T]
    horizon_chunks: int

    def captions(self) -> list[list[str]]:
        return [report.progress_captions(s) for s in self.scores]

    def labels(self) -> list[str]:
        return [f"{n} ({r.anchor})" if r.anchor not in n else n for n, r in zip(self.names, self.rollouts)]

    def write(
        self, path: str, fps: float = 8.0, formats: Sequence[str] = (".gif", ".mp4"), **grid_kw
    ) -> list[str]:
        """The labelled side-by-side video with running progression / pull under each policy."""
        videos = [r.frames for r in self.rollouts]
        return report.write_side_by_side(
            path, videos, self.labels(), self.captions(), fps=fps, formats=formats, **grid_kw
        )

    def grid(self, **grid_kw) -> np.ndarray:
        """The side-by-side frames [T, H, W, 3] uint8 (to show inline)."""
        return report.side_by_side(
            [r.frames for r in self.rollouts], self.labels(), self.captions(), **grid_kw
        ).frames

    def table(self) -> str:
        """Final running progression, anchor pull and mean code confidence per policy."""
        lines = [f"prompt {self.prompt!r}, seed {self.seed}, {self.rollouts[0].frames.shape[0]} frames", ""]
        lines.append(f"{'model':<24} {'progression':>11} {'pull':>7} {'code conf':>9}")
        for label, s in zip(self.labels(), self.scores):
            prog, pull, conf = s["progression"][-1], s["pull"][-1], np.nanmean(s["code_conf"])
            lines.append(f"{label:<24} {prog:>11.2f} {pull:>+7.2f} {conf:>9.2f}")
        return "\n".join(lines)

    def plot(self, path: str | None = None):
        """Running progression and anchor pull per frame, and the attention share of the anchor /
        state slots per chunk, one line per policy. -> matplotlib Figure (saved to `path` if given)"""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
        per_chunk = self.rollouts[0].frames_per_chunk
        for label, r, s in zip(self.labels(), self.rollouts, self.scores):
            axes[0].plot(s["progression"], label=label)
            axes[1].plot(s["pull"], label=label)
            if r.attention is not None:
                axes[2].plot(r.attention.mean(axis=1)[:, 0], label=label)
        for ax, title in zip(
            axes, ("progression so far", "anchor pull so far", f"attention share: {GROUP_NAMES[0]}/state")
        ):
            ax.set_title(title)
        for ax in axes[:2]:
            ax.axvline(self.horizon_chunks * per_chunk, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("frame")
        axes[0].set_ylim(*report.PROGRESSION_YLIM)  # untrained models leave it: clipped as in eval plots
        axes[2].axvline(self.horizon_chunks - 0.5, color="grey", lw=0.8, ls=":")
        axes[2].set_xlabel("chunk")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        if path:
            fig.savefig(path, dpi=80)
        return fig


def compare(
    students: Sequence[Student],
    prompt: str,
    num_chunks: int,
    *,
    seed: int = 0,
    horizon_chunks: int = 7,
    instrument: bool = True,
) -> Comparison:
    """Every student on the same prompt and sampling seed, scored frame by frame (running
    progression and anchor pull against a held-out ground-truth clip of the prompt)."""
    if not students:
        raise ValueError("compare: no students")
    prompt = check_prompt(prompt, students[0].exp)
    rollouts = [roll_out(s, prompt, num_chunks, seed=seed, instrument=instrument) for s in students]
    t, h, w = rollouts[0].frames.shape[:3]
    clip = reference_clip(prompt, t, h, w, students[0].exp)
    scores = [harness.running_scores(r.frames, clip) for r in rollouts]
    return Comparison(prompt, seed, [s.name for s in students], rollouts, scores, horizon_chunks)


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------


def viewable(frames: np.ndarray, min_size: int = 128) -> np.ndarray:
    """[T, H, W, 3] floats in [-1, 1] (or uint8) -> uint8, upscaled (nearest) to a short side >= min_size."""
    frames = np.asarray(frames)
    frames = frames if frames.dtype == np.uint8 else video_lib.to_uint8(frames)
    return video_lib.upscale(frames, min_size)


def with_state(frames: np.ndarray, state: np.ndarray, gap: int = 2) -> np.ndarray:
    """A chunk's frames [T, H, W, 3] with its decoded state [S, H, W, 3] beside them (video frame t
    shows state frame t * S // T), `gap` dark columns between: the main job's "state beside the
    video".  -> [T, H, 2W + gap, 3], uint8 if either input is, else float in [-1, 1]"""
    frames, state = np.asarray(frames), np.asarray(state)
    if frames.ndim != 4 or state.ndim != 4 or frames.shape[1:] != state.shape[1:] or not state.shape[0]:
        raise ValueError(f"with_state: frames {frames.shape} and state {state.shape} must be [T|S, H, W, 3]")
    if frames.dtype == np.uint8 or state.dtype == np.uint8:
        frames, state = viewable(frames, 1), viewable(state, 1)
        fill = np.asarray(report.STRIP_BACKGROUND, np.uint8)
    else:
        fill = np.asarray(report.STRIP_BACKGROUND, np.float32) / 127.5 - 1.0
    t = frames.shape[0]
    held = state[np.arange(t) * state.shape[0] // t]  # [T, H, W, 3]
    sep = np.broadcast_to(fill, (t, frames.shape[1], gap, 3)).astype(frames.dtype)
    return np.concatenate([frames, sep, held.astype(frames.dtype)], axis=2)


def frame_strip(
    frames: np.ndarray,
    every: int = 8,
    *,
    min_size: int = 96,
    gap: int = 2,
    first: int = 0,
    label: bool = True,
) -> np.ndarray:
    """A row of frames first, first + every, ... of [T, H, W, 3], each upscaled (nearest) to a short
    side >= `min_size`, `gap` dark pixels apart, with "t=N" under each when `label`.
    -> uint8 [H', W', 3]"""
    if every < 1:
        raise ValueError(f"every={every}: must be >= 1")
    picks = np.arange(first, np.asarray(frames).shape[0], every)
    if picks.size == 0:
        raise ValueError(f"frame_strip: no frame at {first}, {first}+{every}, ... of {np.shape(frames)[0]}")
    tiles = viewable(np.asarray(frames)[picks], min_size)  # [N, h, w, 3]
    n, h, w, _ = tiles.shape
    label_h = 16 if label else 0
    out = np.full((h + label_h, n * w + (n - 1) * gap, 3), report.STRIP_BACKGROUND, np.uint8)
    for i, (t, tile) in enumerate(zip(picks, tiles)):
        x0 = i * (w + gap)
        out[:h, x0 : x0 + w] = tile
        if label:
            import cv2

            cv2.putText(out, f"t={t}", (x0 + 2, h + 12), report.FONT, 0.4, report.TEXT_COLOUR, 1, cv2.LINE_AA)
    return out


def write_frame_strip(path: str, frames: np.ndarray, every: int = 8, **kw) -> str:
    """`frame_strip` written as a PNG (atomically). -> path"""
    import cv2

    from adastate_jax import files

    image = frame_strip(frames, every, **kw)
    ok, data = cv2.imencode(".png", image[..., ::-1])
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return files.write_bytes_atomic(path, data.tobytes())


__all__ = [
    "CameraTracker",
    "Comparison",
    "Rollout",
    "Student",
    "camera_prompts",
    "camera_summary",
    "check_prompt",
    "compare",
    "frame_strip",
    "load_student",
    "load_students",
    "prompt_table",
    "random_students",
    "roll_out",
    "tiny_experiment",
    "viewable",
    "with_anchor",
    "with_state",
    "write_frame_strip",
]
