"""Writing videos people can open (mp4 through the bundled ffmpeg, gif as a fallback).

Owns: conversion of float frames in [-1, 1] to uint8, nearest-neighbour upscaling for tiny frames,
a latent-to-RGB preview for rollouts without a decoder, and the whole-video mp4/gif writers. The
per-chunk helpers (`upscale_factor`, `prepare_chunk`, `latents_to_rgb(..., value_range)`) serve the
streaming writer of `streaming/writers.py`, which must see each chunk as the whole video would.
Must not know: models, streaming, training.
"""

from __future__ import annotations

import os

import numpy as np


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[..., 3] floats in [-1, 1] -> uint8."""
    return np.clip(np.round((np.asarray(frames, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def upscale_factor(height: int, width: int, min_size: int = 256) -> int:
    """The integer nearest-neighbour factor that makes the short side of HxW at least `min_size`."""
    return max(1, int(np.ceil(min_size / min(height, width))))


def upscale(frames: np.ndarray, min_size: int = 256, factor: int | None = None) -> np.ndarray:
    """Nearest-neighbour upscale [T, H, W, C] so the short side is at least `min_size` (or by an
    explicit integer `factor`)."""
    t, h, w, c = frames.shape
    s = upscale_factor(h, w, min_size) if factor is None else int(factor)
    if s == 1:
        return frames
    return np.repeat(np.repeat(frames, s, axis=1), s, axis=2)


def prepare_chunk(frames: np.ndarray, factor: int, even: bool = False) -> np.ndarray:
    """One chunk [T, H, W, 3] (uint8, or floats in [-1, 1]) -> uint8 [T, H*factor(+1), W*factor(+1), 3]:
    converted to uint8 first (a quarter of the bytes to repeat), upscaled by `factor`, and with
    `even` padded (edge) to even sizes, as yuv420p needs. The same result per chunk as on the
    whole video."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video frames must be [T, H, W, 3], got {frames.shape}")
    if frames.dtype != np.uint8:
        frames = to_uint8(frames)
    frames = upscale(frames, factor=factor)
    h, w = frames.shape[1:3]
    if even and (h % 2 or w % 2):
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frames


def beside(frames: np.ndarray, still: np.ndarray, gap: int = 1) -> np.ndarray:
    """Frames [T, H, W, 3] with one image `still` [H, W2, 3] beside each (to their right), a dark
    `gap`-pixel column between: a video with what stays fixed over it, e.g. a chunk and its decoded
    state. Both uint8, or both floats in [-1, 1]."""
    frames, still = np.asarray(frames), np.asarray(still)
    if frames.ndim != 4 or still.ndim != 3 or frames.shape[1] != still.shape[0]:
        raise ValueError(
            f"beside: frames [T, H, W, 3] and an image [H, W2, 3], got {frames.shape} and {still.shape}"
        )
    if frames.dtype != still.dtype:
        raise ValueError(f"beside: frames are {frames.dtype} but the image is {still.dtype}")
    t, h = frames.shape[:2]
    dark = np.full((t, h, gap, 3), 0 if frames.dtype == np.uint8 else -1, frames.dtype)
    return np.concatenate([frames, dark, np.broadcast_to(still, (t, *still.shape))], axis=2)


def latent_value_range(latents: np.ndarray) -> tuple[float, float]:
    """The 2nd-98th percentile range of the first 3 channels of latents [..., C]: the preview's scale."""
    x = np.asarray(latents, np.float32)[..., :3]
    return float(np.percentile(x, 2)), float(np.percentile(x, 98))


def latents_to_rgb(latents: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """A viewable preview of latents [T, h, w, C]: the first 3 channels scaled from `value_range`
    (default: this array's `latent_value_range`) to [-1, 1]. Shown when no VAE is configured; a
    stream fixes the range once (e.g. from its first chunk) so every chunk is scaled alike."""
    x = np.asarray(latents, np.float32)[..., :3]
    lo, hi = latent_value_range(latents) if value_range is None else value_range
    return np.clip((x - lo) / max(hi - lo, 1e-6) * 2 - 1, -1, 1)


VIDEO_EXTENSIONS = (".mp4", ".gif")


def write_video(path: str, frames: np.ndarray, fps: float = 16.0) -> str:
    """Write [T, H, W, 3] (uint8, or floats in [-1, 1]) to `path` (.mp4 or .gif). Returns the path
    written (an .mp4 request falls back to .gif beside it if ffmpeg cannot be used)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video frames must be [T, H, W, 3], got {frames.shape}")
    if frames.dtype != np.uint8:
        frames = to_uint8(frames)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".mp4":
        try:
            import imageio_ffmpeg
            import mediapy

            mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())
            h, w = frames.shape[1:3]
            if h % 2 or w % 2:  # yuv420p needs even sizes
                frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            mediapy.write_video(path, frames, fps=fps)
            return path
        except Exception as e:  # noqa: BLE001 - fall back to gif, say why
            gif = os.path.splitext(path)[0] + ".gif"
            print(f"warning: cannot write mp4 ({type(e).__name__}: {e}); writing {gif}")
            path, ext = gif, ".gif"
    if ext == ".gif":
        import imageio.v2 as imageio

        imageio.mimsave(path, list(frames), duration=1.0 / fps, loop=0)
        return path
    raise ValueError(f"unsupported video extension {ext!r} for {path}: use .mp4 or .gif")
