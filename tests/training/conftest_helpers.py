"""Shared helpers of the training tests: tiny PanWorld configs and a persistent compile cache."""

import importlib.util
import os

import jax

# the DiT of the tests: what they check does not depend on the recipe's size
SMALL_MODEL = dict(num_layers=1, dim=64, num_heads=2, ffn_dim=128)
SMALL_STEPS = (1000.0, 500.0)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def panworld_config(arg="teacher", **train):
    """configs/panworld.py:`arg` for a test: batch 2, 6-frame clips (2 chunks of 3), synchronous
    checkpoints, and a 1-layer, 64-wide DiT with 2 denoising steps: what these
    tests check does not depend on the recipe's size (dim 128, 2 layers, 4 steps), their compile
    time does (about linear in the layers and steps a program traces)."""
    path = os.path.join(REPO, "configs", "panworld.py")
    spec = importlib.util.spec_from_file_location("panworld_config_for_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(arg)
    cfg.train.batch_size = 2
    cfg.train.log_every = 1
    cfg.train.ckpt_every = 1000
    cfg.train.warmup = 0
    cfg.train.async_checkpoints = False
    cfg.data.panworld.num_frames = 6  # 2 chunks of 3
    cfg.model.update(SMALL_MODEL)
    cfg.sampler.denoising_steps = SMALL_STEPS
    for k, v in train.items():
        cfg.train[k] = v
    if train.get("init_from") == "" and "init_policy" not in train:
        cfg.train.init_policy = ""  # a student from scratch has no init policy to check
    return cfg


def one_device_mesh():
    from adastate_jax import sharding as shd

    return shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def read_metrics(workdir):
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return [json.loads(x) for x in fh if x.strip()]


def small_model_flags() -> list[str]:
    """`--config.model.*` flags that give a launch script the tests' small DiT."""
    return [f"--config.model.{k}={v}" for k, v in SMALL_MODEL.items()]
