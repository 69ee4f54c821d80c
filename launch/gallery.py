"""Writes a small gallery of PanWorld clips: one clip per camera path, all in the same world.

    python launch/gallery.py --out assets/panworld

Outputs (in --out):
  panworld_gallery.gif / .mp4   every camera path side by side, frames upscaled (nearest); the gif
                                 at --gif_scale with a shared --gif_colors palette (size)
  panworld_contact_sheet.png     one row per path, every --sheet_stride-th frame
  panworld_world.png             the whole world strip (code band on top), upscaled

Owns: turning PanWorld clips into viewable files. Must not know: models, training, metrics.
"""

import os

import cv2
import numpy as np
from absl import app, flags

from adastate_jax.data import panworld

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "assets/panworld", "Output folder.")
flags.DEFINE_integer("num_frames", 48, "Frames per clip (4 legs of back-and-forth by default).")
flags.DEFINE_integer("index", 0, "Clip index: picks the world and the start position.")
flags.DEFINE_integer("seed", 0, "PanWorldConfig.seed.")
flags.DEFINE_integer("scale", 4, "Nearest-neighbour upscaling of each frame (mp4, contact sheet).")
flags.DEFINE_integer("gif_scale", 3, "Upscaling of the gif (kept small for the repo).")
flags.DEFINE_integer("gif_colors", 96, "Colours of the gif's shared palette.")
flags.DEFINE_integer("columns", 4, "Clips per row in the animated gallery.")
flags.DEFINE_integer("sheet_stride", 6, "Frame stride of the contact sheet.")
flags.DEFINE_integer("fps", 8, "Frames per second of the gif / mp4.")

_LABEL_HEIGHT = 16
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """uint8 [..., H, W, 3] -> [..., H * scale, W * scale, 3] (nearest)."""
    return np.repeat(np.repeat(frames, scale, axis=-3), scale, axis=-2)


def caption(width: int, text: str, height: int = _LABEL_HEIGHT) -> np.ndarray:
    """A dark strip with white text.  -> uint8 [height, width, 3]"""
    strip = np.full((height, width, 3), 24, np.uint8)
    cv2.putText(strip, text, (3, height - 5), _FONT, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return strip


def gallery_frames(clips: list[np.ndarray], prompts: list[str], scale: int, columns: int) -> np.ndarray:
    """Tiles the clips (uint8 [T, H, W, 3] each) into a grid with captions.  -> uint8 [T, H', W', 3]"""
    tiles = []
    for clip, prompt in zip(clips, prompts):
        big = upscale(clip, scale)  # [T, sH, sW, 3]
        label = np.broadcast_to(caption(big.shape[2], prompt), (big.shape[0], _LABEL_HEIGHT, big.shape[2], 3))
        tiles.append(np.concatenate([label, big], axis=1))
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i : i + columns], axis=2) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=1)


def contact_sheet(clips: list[np.ndarray], prompts: list[str], scale: int, stride: int) -> np.ndarray:
    """One row per clip: its frames 0, stride, 2 stride, ... with a caption above.  -> uint8 [H', W', 3]"""
    rows = []
    for clip, prompt in zip(clips, prompts):
        picked = clip[::stride]  # [K, H, W, 3]
        frames = upscale(picked, scale)
        gap = np.full((frames.shape[1], 2, 3), 255, np.uint8)
        row = np.concatenate([np.concatenate([f, gap], axis=1) for f in frames], axis=1)
        text = f"{prompt}   (frames 0, {stride}, {2 * stride}, ...)"
        rows += [caption(row.shape[1], text), row]
    return np.concatenate(rows, axis=0)


def write_mp4(path: str, frames: np.ndarray, fps: int) -> bool:
    """Writes an h264 mp4 with mediapy + the ffmpeg of imageio-ffmpeg; False when that fails."""
    try:
        import imageio_ffmpeg
        import mediapy

        mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())
        even = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
        mediapy.write_video(path, even, fps=fps, codec="h264")
        return True
    except Exception as error:  # noqa: BLE001 - a missing ffmpeg must not stop the gallery
        print(f"could not write {path}: {error}")
        return False


def write_gif(path: str, frames: np.ndarray, fps: int, colors: int) -> None:
    """Writes a looping gif with one palette shared by all frames (no dithering: small files)."""
    from PIL import Image

    palette = Image.fromarray(np.concatenate(frames[:: max(1, len(frames) // 8)], axis=0)).quantize(
        colors=colors, method=Image.Quantize.MEDIANCUT
    )
    images = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def write_png(path: str, image: np.ndarray) -> None:
    if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def main(argv):
    del argv
    config = panworld.PanWorldConfig(seed=FLAGS.seed, num_frames=FLAGS.num_frames)
    os.makedirs(FLAGS.out, exist_ok=True)
    prompts = panworld.camera_prompts(config)
    clips = [
        panworld.to_uint8(panworld.make_clip(config, FLAGS.index, label=label)["video"])
        for label in range(config.num_labels)
    ]  # one [T, H, W, 3] per camera path, same world and start

    write_gif(
        os.path.join(FLAGS.out, "panworld_gallery.gif"),
        gallery_frames(clips, prompts, FLAGS.gif_scale, FLAGS.columns),
        FLAGS.fps,
        FLAGS.gif_colors,
    )
    written = ["panworld_gallery.gif"]
    mp4 = os.path.join(FLAGS.out, "panworld_gallery.mp4")
    if write_mp4(mp4, gallery_frames(clips, prompts, FLAGS.scale, FLAGS.columns), FLAGS.fps):
        written.append("panworld_gallery.mp4")
    write_png(
        os.path.join(FLAGS.out, "panworld_contact_sheet.png"),
        contact_sheet(clips, prompts, FLAGS.scale, FLAGS.sheet_stride),
    )
    world = panworld.make_clip(config, FLAGS.index, num_frames=1)["world"]
    write_png(
        os.path.join(FLAGS.out, "panworld_world.png"), upscale(panworld.to_uint8(world.static_image), 2)
    )
    written += ["panworld_contact_sheet.png", "panworld_world.png"]
    for name in written:
        path = os.path.join(FLAGS.out, name)
        print(f"{path}: {os.path.getsize(path) / 1024:.0f} KiB")


if __name__ == "__main__":
    app.run(main)
