r"""Score a VAE trained with the 'vae' objective on held-out PanWorld clips (PSNR / SSIM + baselines).

  python launch/vae_eval.py --export=outputs/vae_panworld/export --out=assets/vae_panworld

Held-out clips: PanWorld indices [--start_index, --start_index + --num_clips) of the training
config's PanWorld (same seed and frame size); training draws from [0, config.data.panworld.num_clips),
so with the default start 1,000,000 no evaluated clip was seen in training.

Reconstruction = decode(mu) (the posterior mean, no sampling). PSNR and SSIM (`eval.metrics`, data
range 2 for [-1, 1]) are per frame, averaged over frames and clips. Baselines on the same clips:
  untrained_vae   the same VAE configuration, randomly initialised (seed 0);
  mean_frame      every frame replaced by its clip's mean frame (uses the clip itself);
  avgpool4        every frame 4x4 average-pooled and bilinearly upsampled (16x fewer values per
                  frame; the VAE keeps 10.8x fewer values per clip with the default config).
Writes OUT/results.json (numbers, the command, the training run's info) and OUT/recon.png
(--png_clips held-out clips: rows original / reconstruction, every 2nd frame, upscaled 4x).

Owns: this evaluation only. Must not know: training internals beyond the export format.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("export", "outputs/vae_panworld/export", "WORKDIR/export of a 'vae' run.")
flags.DEFINE_string("out", "assets/vae_panworld", "Where results.json and recon.png go.")
flags.DEFINE_integer("num_clips", 64, "Held-out clips to score.")
flags.DEFINE_integer("start_index", 1_000_000, "First held-out PanWorld index.")
flags.DEFINE_integer("batch", 8, "Clips per encode/decode call.")
flags.DEFINE_integer("png_clips", 4, "Held-out clips shown in recon.png.")
FLAGS = flags.FLAGS


def _clips(pw_cfg, start: int, n: int):
    import numpy as np

    from adastate_jax.data import panworld

    return np.stack([panworld.make_clip(pw_cfg, start + i)["video"] for i in range(n)])  # [N, T, H, W, 3]


def _avgpool_upsample(video, factor: int = 4):
    import jax
    import numpy as np

    n, t, h, w, c = video.shape
    pooled = video.reshape(n, t, h // factor, factor, w // factor, factor, c).mean(axis=(3, 5))
    return np.asarray(jax.image.resize(pooled, (n, t, h, w, c), "bilinear"))


def _scores(pred, ref):
    import numpy as np

    from adastate_jax.eval import metrics

    p = metrics.psnr(pred, ref)  # [N, T]
    s = metrics.ssim(pred, ref)  # [N, T]
    return dict(
        psnr_db=float(np.mean(p)),
        psnr_db_median=float(np.median(p)),  # a static clip's mean frame is near-exact (huge PSNR)
        psnr_db_std_over_clips=float(np.std(np.mean(p, axis=1))),
        ssim=float(np.mean(s)),
    )


def _png(path, video, recon, clips: int):
    import numpy as np
    from PIL import Image

    rows = []
    for i in range(min(clips, video.shape[0])):
        for v in (video[i], recon[i]):
            frames = v[::2]  # every 2nd frame
            pad = np.ones((frames.shape[1], 2, 3), np.float32)
            row = np.concatenate([np.concatenate([f, pad], axis=1) for f in frames], axis=1)
            rows.append(row)
        rows.append(np.ones((4, rows[-1].shape[1], 3), np.float32))
    img = np.concatenate(rows, axis=0)
    img = np.clip((img + 1.0) * 127.5, 0, 255).astype(np.uint8)
    img = np.repeat(np.repeat(img, 4, axis=0), 4, axis=1)
    Image.fromarray(img).save(path)


def main(argv):
    del argv
    import jax
    import numpy as np
    from flax import nnx

    from adastate_jax import config as config_lib
    from adastate_jax.models import checkpoint_io
    from adastate_jax.models import vae as vae_lib
    from adastate_jax.training.objectives.vae import load_exported_vae

    text = checkpoint_io.read_config_json(FLAGS.export)
    if text is None:
        raise SystemExit(f"{FLAGS.export}: no config.json (is it the export of a 'vae' run?)")
    exp = config_lib.parse(config_lib.from_json(text))
    train_clips = exp.data.panworld.num_clips
    if FLAGS.start_index < train_clips:
        raise SystemExit(
            f"--start_index={FLAGS.start_index} overlaps the training clips [0, {train_clips}) "
            "(config.data.panworld.num_clips)"
        )
    pw_cfg = exp.data.panworld
    vae_cfg, graphdef, params = load_exported_vae(FLAGS.export)
    print(f"VAE {vae_cfg}")

    t0 = time.perf_counter()
    video = _clips(pw_cfg, FLAGS.start_index, FLAGS.num_clips)
    print(f"{video.shape[0]} held-out clips {video.shape[1:]} in {time.perf_counter() - t0:.1f}s")

    @jax.jit
    def reconstruct(p, x):
        mu = vae_lib.encode(graphdef, p, x, normalize=False)
        return vae_lib.decode(graphdef, p, mu, normalize=False)

    def run(p):
        outs = [
            np.asarray(reconstruct(p, video[i : i + FLAGS.batch])) for i in range(0, len(video), FLAGS.batch)
        ]
        return np.concatenate(outs)

    recon = run(params)
    untrained = nnx.split(jax.jit(lambda: vae_lib.WanVAE(vae_cfg, rngs=nnx.Rngs(0)))())[1]
    results = dict(
        command="python " + " ".join(sys.argv),
        export=os.path.abspath(FLAGS.export),
        train_info=checkpoint_io.read_info(FLAGS.export),
        vae_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in vae_cfg.__dict__.items()},
        held_out=dict(
            panworld_seed=int(pw_cfg.seed),
            indices=[FLAGS.start_index, FLAGS.start_index + FLAGS.num_clips],
            num_clips=int(video.shape[0]),
            frames=int(video.shape[1]),
            frame_size=[int(video.shape[2]), int(video.shape[3])],
            training_indices=[0, train_clips],
        ),
        metric="per-frame PSNR (dB, data range 2) and SSIM, mean over frames and clips; recon = decode(mu)",
        trained_vae=_scores(recon, video),
        baselines=dict(
            untrained_vae=_scores(run(untrained), video),
            mean_frame=_scores(np.broadcast_to(video.mean(axis=1, keepdims=True), video.shape), video),
            avgpool4=_scores(_avgpool_upsample(video), video),
        ),
    )
    metrics_path = os.path.join(os.path.dirname(os.path.abspath(FLAGS.export)), "metrics.jsonl")
    if os.path.exists(metrics_path):
        with open(metrics_path) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        if rows:
            results["last_train_metrics"] = rows[-1]
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    _png(os.path.join(FLAGS.out, "recon.png"), video, recon, FLAGS.png_clips)
    print(json.dumps({k: results[k] for k in ("trained_vae", "baselines", "held_out")}, indent=2))


if __name__ == "__main__":
    app.run(main)
