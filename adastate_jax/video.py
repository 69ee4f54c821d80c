"""Writing videos people can open (mp4 through the bundled ffmpeg, gif as a fallback).

Owns: conversion of float frames in [-1, 1] to uint8, nearest-neighbour upscaling for tiny frames,
a latent-to-RGB preview for rollouts without a decoder, and the mp4/gif writers.
Must not know: models, streaming, training.
"""

from __future__ import annotations

import os

import numpy as np


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[..., 3] floats in [-1, 1] -> uint8."""
    return np.clip(np.round((np.asarray(frames, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def upscale(frames: np.ndarray, min_size: int = 256) -> np.ndarray:
    """Nearest-neighbour upscale [T, H, W, C] so the short side is at least `min_size`."""
    t, h, w, c = frames.shape
    s = max(1, int(np.ceil(min_size / min(h, w))))
    return np.repeat(np.repeat(frames, s, axis=1), s, axis=2)


def latents_to_rgb(latents: np.ndarray) -> np.ndarray:
    """A viewable preview of latents [T, h, w, C]: the first 3 channels, scaled by the video's
    2nd-98th percentile range to [-1, 1]. Shown when no VAE is configured."""
    x = np.asarray(latents, np.float32)[..., :3]
    lo, hi = np.percentile(x, 2), np.percentile(x, 98)
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
