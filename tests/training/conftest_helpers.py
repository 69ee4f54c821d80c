"""Shared helpers of the training tests: tiny PanWorld configs and a persistent compile cache."""

import importlib.util
import os

import jax

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def panworld_config(arg="teacher", **train):
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
    for k, v in train.items():
        cfg.train[k] = v
    return cfg


def one_device_mesh():
    from adastate_jax import sharding as shd

    return shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def read_metrics(workdir):
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return [json.loads(x) for x in fh if x.strip()]
