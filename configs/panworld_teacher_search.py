"""PanWorld teacher search (issue 10, item 3): teachers that follow camera prompts over a whole
21-latent-frame clip (7 chunks of 3).

`--config=configs/panworld_teacher_search.py:<recipe>[,<stage>][,<anchor>]`, e.g.
  python launch/train.py --config=configs/panworld_teacher_search.py:tf21 --workdir=RUN
  python launch/evaluate.py --config=configs/panworld_teacher_search.py:tf21 --checkpoints=full:RUN/export ...
  python launch/train.py --config=configs/panworld_teacher_search.py:df21_w256,dmd,sink \
      --config.train.teacher_path=TEACHER/export --config.train.init_from=ODE/export --workdir=RUN

A stage (`ode`, `dmd`: `configs/panworld.py`'s student stages) builds the students of a recipe's
teacher: that stage's objective, steps and learning rates, with the recipe's model shape and
21-frame clips, and the recipe's layout as the teacher's (`train.teacher_attention`).

Every recipe starts from `configs/panworld.py:teacher` (PanWorld 32x32 frames, PatchCodec patch 4
-> 8x8x48 latents, the word encoder, flow matching) and changes only what its entry in RECIPES
lists; all use 21-frame clips and `stream.max_frames = 21` (the `full` cache holds the clip).
`assets/study/teacher_search.md` has what each recipe reached.
"""

import importlib.util
import os

import ml_collections

from adastate_jax.config import defaults

CLIP_FRAMES = 21  # 7 chunks of 3 latent frames: the paper's training horizon
STUDENT_STAGES = ("ode", "dmd")


def load_panworld():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "panworld.py")
    spec = importlib.util.spec_from_file_location("adastate_configs_panworld", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# recipe -> {dotted config field: value}; applied in order on top of configs/panworld.py:teacher
# 16 tokens per frame: the DiT patchifies the 8x8x48 PatchCodec latents by (1, 2, 2) (an 8x8 pixel
# patch, 192 features, per token), in a wider stream than configs/panworld.py's 128 (which carried
# 192 features badly); 4x fewer tokens than (1, 1, 1) make a 21-frame teacher-forcing step ~3x cheaper
WIDE_16_TOKENS = {
    "model.patch_size": (1, 2, 2),
    "model.dim": 256,
    "model.num_heads": 4,  # head dim 64
    "model.ffn_dim": 1024,
}

# recipe -> {dotted config field: value}; applied in order on top of configs/panworld.py:teacher
RECIPES = {
    # teacher forcing from scratch on 21-frame clips, the tiny DiT of configs/panworld.py
    "tf21": {
        "train.attention": "teacher_forcing",
    },
    # diffusion forcing on 21-frame clips (configs/panworld.py:teacher's objective, longer clips)
    "df21": {
        "train.attention": "diffusion_forcing",
    },
    # pilots: 16 tokens per frame, dim 256, 2 layers (2.75M params)
    "tf21_w256": {
        **WIDE_16_TOKENS,
        "train.attention": "teacher_forcing",
        "train.steps": 1200,
        "train.warmup": 50,
    },
    # configs/panworld.py's shipped teacher (9-frame diffusion forcing + teacher-forcing fine-tune,
    # one token per latent pixel) fine-tuned with teacher forcing on 21-frame clips, with prompt
    # dropout so that it can be sampled with classifier-free guidance
    "tf21_ft": {
        "train.attention": "teacher_forcing",
        "train.init_from": "checkpoints/panworld/teacher",
        "train.text_dropout": 0.1,  # an unconditional model too: classifier-free guidance at sampling
        "train.steps": 600,
        "train.lr": 5e-4,
        "train.warmup": 20,
    },
    "df21_w256": {
        **WIDE_16_TOKENS,
        "train.attention": "diffusion_forcing",
        "train.steps": 1200,
        "train.warmup": 50,
    },
}


def _set(config, dotted: str, value):
    node = config
    *path, last = dotted.split(".")
    for p in path:
        node = node[p]
    if last not in node:
        raise ValueError(f"configs/panworld_teacher_search.py: no config field {dotted!r}")
    node[last] = value


def get_config(arg=None):
    tokens = [t.strip() for t in (arg or "tf21").split(",") if t.strip()]
    recipes = [t for t in tokens if t in RECIPES]
    if len(recipes) != 1:
        raise ValueError(
            f"configs/panworld_teacher_search.py: give exactly one recipe of {sorted(RECIPES)}, got {tokens}"
        )
    panworld = load_panworld()
    stages = [t for t in tokens if t in STUDENT_STAGES]
    rest = ",".join(t for t in tokens if t not in RECIPES and t not in STUDENT_STAGES)
    if len(stages) > 1:
        raise ValueError(
            f"configs/panworld_teacher_search.py: give one stage of {STUDENT_STAGES}, got {stages}"
        )
    config = panworld.get_config(stages[0] if stages else "teacher")
    config.data.panworld.num_frames = CLIP_FRAMES
    config.data.video.num_frames = CLIP_FRAMES
    config.stream.max_frames = CLIP_FRAMES
    config.stream.sink_frames = 1  # students' budget: anchor 1 + window 3 = 4 cached latent frames
    recipe = RECIPES[recipes[0]]
    if not stages:
        config.train.init_from = ""
        for field, value in recipe.items():
            _set(config, field, value)
        return defaults.apply_variants(config, rest)
    for field, value in recipe.items():  # a student: the teacher's shape, its layout as the teacher's
        if field.startswith("model."):
            _set(config, field, value)
        elif field == "train.attention":
            config.train.teacher_attention = value
    return defaults.apply_variants(config, rest)


__all__ = ["RECIPES", "get_config", "ml_collections"]
