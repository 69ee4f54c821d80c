"""The Wan2.1 DiT's weight-conversion tables: torch key regex -> our parameter path + transform.

Owns: the conversion tables of the Wan DiT for the 'original' Wan2.1 layout (also Self-Forcing's and
LongLive's after their prefixes are stripped) and the 'diffusers' layout of `WanTransformer3DModel`,
layout detection from the torch key names, and the torch keys that carry nothing for us.

Must not know: files, LoRA, prefixes or sharding (`models/convert.py` reads checkpoints and runs the
rule engine), nor the model's code (only the parameter paths of `models/wan.py`).
"""

from __future__ import annotations

import numpy as np

from adastate_jax.models.convert import Rule, identity, linear_kernel


def _patch_kernel(w: np.ndarray) -> np.ndarray:
    """Conv3d weight [D, C, pt, ph, pw] -> [pt*ph*pw*C, D] matching patchify's (ph pw c) order."""
    d = w.shape[0]
    return np.transpose(w, (2, 3, 4, 1, 0)).reshape(-1, d)


def _head_kernel(w: np.ndarray) -> np.ndarray:
    return w.T  # [out=(pt ph pw c), D] -> [D, out]; torch's out order already (pt ph pw c)


def _modulation(w: np.ndarray) -> np.ndarray:
    return w.reshape(w.shape[-2], w.shape[-1])  # [1, 6, D] -> [6, D]


def _linear_rules(src: str, dst: str, stacked: bool) -> list[Rule]:
    g = 1 if stacked else None
    return [
        Rule(src + r"\.weight", dst + "/kernel", linear_kernel, g),
        Rule(src + r"\.bias", dst + "/bias", identity, g),
    ]


def conversion_rules(layout: str) -> list[Rule]:
    """Rules for the 'original' Wan2.1 layout (also Self-Forcing / LongLive after prefix strip) and
    the 'diffusers' layout of `WanTransformer3DModel`."""
    if layout == "original":
        names = dict(
            patch=r"patch_embedding",
            text1=r"text_embedding\.0",
            text2=r"text_embedding\.2",
            time1=r"time_embedding\.0",
            time2=r"time_embedding\.2",
            proj=r"time_projection\.1",
            sa=r"blocks\.(\d+)\.self_attn",
            ca=r"blocks\.(\d+)\.cross_attn",
            q="q",
            k="k",
            v="v",
            o="o",
            normc=r"blocks\.(\d+)\.norm3",
            ffn1=r"blocks\.(\d+)\.ffn\.0",
            ffn2=r"blocks\.(\d+)\.ffn\.2",
            mod=r"blocks\.(\d+)\.modulation",
            head=r"head\.head",
            head_mod=r"head\.modulation",
        )
    elif layout == "diffusers":
        names = dict(
            patch=r"patch_embedding",
            text1=r"condition_embedder\.text_embedder\.linear_1",
            text2=r"condition_embedder\.text_embedder\.linear_2",
            time1=r"condition_embedder\.time_embedder\.linear_1",
            time2=r"condition_embedder\.time_embedder\.linear_2",
            proj=r"condition_embedder\.time_proj",
            sa=r"blocks\.(\d+)\.attn1",
            ca=r"blocks\.(\d+)\.attn2",
            q="to_q",
            k="to_k",
            v="to_v",
            o=r"to_out\.0",
            normc=r"blocks\.(\d+)\.norm2",
            ffn1=r"blocks\.(\d+)\.ffn\.net\.0\.proj",
            ffn2=r"blocks\.(\d+)\.ffn\.net\.2",
            mod=r"blocks\.(\d+)\.scale_shift_table",
            head=r"proj_out",
            head_mod=r"scale_shift_table",
        )
    else:
        raise ValueError(f"unknown DiT checkpoint layout {layout!r}; expected 'original' or 'diffusers'")
    n = names
    rules = [
        Rule(n["patch"] + r"\.weight", "patch_embedding/kernel", _patch_kernel),
        Rule(n["patch"] + r"\.bias", "patch_embedding/bias"),
        *_linear_rules(n["text1"], "text_embedding_1", False),
        *_linear_rules(n["text2"], "text_embedding_2", False),
        *_linear_rules(n["time1"], "time_embedding_1", False),
        *_linear_rules(n["time2"], "time_embedding_2", False),
        *_linear_rules(n["proj"], "time_projection", False),
        Rule(n["head"] + r"\.weight", "head/kernel", _head_kernel),
        Rule(n["head"] + r"\.bias", "head/bias"),
        Rule(n["head_mod"], "head_modulation", _modulation),
        Rule(n["normc"] + r"\.weight", "blocks/norm_cross_scale", identity, 1),
        Rule(n["normc"] + r"\.bias", "blocks/norm_cross_bias", identity, 1),
        *_linear_rules(n["ffn1"], "blocks/ffn_in", True),
        *_linear_rules(n["ffn2"], "blocks/ffn_out", True),
        Rule(n["mod"], "blocks/modulation", _modulation, 1),
    ]
    for attn_src, attn_dst in ((n["sa"], "blocks/self_attn"), (n["ca"], "blocks/cross_attn")):
        for proj in ("q", "k", "v", "o"):
            rules += _linear_rules(attn_src + r"\." + n[proj], f"{attn_dst}/{proj}", True)
        rules += [
            Rule(attn_src + r"\.norm_q\.weight", f"{attn_dst}/norm_q/scale", identity, 1),
            Rule(attn_src + r"\.norm_k\.weight", f"{attn_dst}/norm_k/scale", identity, 1),
        ]
    return rules


def detect_layout(keys) -> str:
    keys = set(keys)
    if any(k.startswith("condition_embedder.") for k in keys):
        return "diffusers"
    if any(k.startswith("text_embedding.") or k.startswith("head.head") for k in keys):
        return "original"
    raise ValueError(
        "cannot tell the checkpoint layout (neither Wan2.1 'original' nor 'diffusers' keys found)"
    )


# Keys present in some checkpoints that carry no parameters of ours (e.g. buffers, I2V image parts).
IGNORED_KEYS = (r"freqs", r".*\.rope\..*", r"rope\..*")
