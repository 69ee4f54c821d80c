"""Arms, models with training seeds, and the evaluation's flag texts: what they mean and how a bad
one is reported (the error names the entry or the flag)."""

import json

import pytest

from adastate_jax.eval import arms


def test_arm_names_resolve_to_policy_preset_or_trained_variant():
    assert arms.resolve_arm("sink") == arms.Arm("sink", "sink")
    a4 = arms.resolve_arm("adastate_a4")
    assert (a4.name, a4.policy, a4.stream) == ("adastate_a4", "adastate", ())
    assert arms.resolve_arm("ema_sink_s2").policy == "ema_sink"  # longest base wins over 'sink'
    longlive = arms.resolve_arm("longlive")
    assert longlive.policy == "sink" and dict(longlive.stream) == {"sink_frames": 3, "window_frames": 6}
    assert longlive.overrides == {"anchor": "sink", "sink_frames": 3, "window_frames": 6}
    assert arms.resolve_arm("longlive_b").overrides == longlive.overrides
    with pytest.raises(ValueError, match="arm 'bogus'"):
        arms.resolve_arm("bogus")


def test_arm_refuses_unknown_and_reserved_stream_fields():
    with pytest.raises(ValueError, match="no field 'windw_frames'"):
        arms.make_arm("x", "window", windw_frames=6)
    with pytest.raises(ValueError, match="config.stream.anchor cannot be set per arm"):
        arms.make_arm("x", "window", anchor="sink")
    with pytest.raises(ValueError, match="unknown policy 'sinks'"):
        arms.make_arm("x", "sinks")


def test_inline_checkpoints_carry_arm_path_and_train_seed(tmp_path):
    d0, d1 = tmp_path / "a0", tmp_path / "a1"
    d0.mkdir(), d1.mkdir()
    models = arms.parse_checkpoints(f"adastate_a4:{d0}@0, adastate_a4:{d1}@1,window:{d0}")
    assert [(m.arm.name, m.arm.policy, m.path, m.train_seed) for m in models] == [
        ("adastate_a4", "adastate", str(d0), 0),
        ("adastate_a4", "adastate", str(d1), 1),
        ("window", "window", str(d0), None),
    ]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("bogus:{d}", "--checkpoints entry 'bogus:{d}': arm 'bogus'"),
        ("window", "--checkpoints entry 'window' is not ARM:DIR"),
        ("window:{d}/missing", "is not a directory"),
        ("window:{d}@x", "train seed 'x' is not an integer"),
        ("window:{d}@-1", "train seed -1 must be >= 0"),
        ("window:{d}@0,window:{d}@0", "arm 'window' has two models with train_seed 0"),
        ("window:{d},window:{d}", "has two models with no @TRAIN_SEED"),
    ],
)
def test_bad_checkpoint_entries_are_named(tmp_path, text, needle):
    with pytest.raises(ValueError) as e:
        arms.parse_checkpoints(text.format(d=tmp_path))
    assert needle.format(d=tmp_path) in str(e.value)


def test_spec_file_defines_arms_and_resolves_paths_against_itself(tmp_path):
    (tmp_path / "runs" / "ll").mkdir(parents=True)
    spec = {
        "arms": {"ll4": {"policy": "sink", "stream": {"sink_frames": 1, "window_frames": 3}}},
        "checkpoints": [
            {"arm": "ll4", "path": "runs/ll", "train_seed": 2},
            {"arm": "longlive", "path": "runs/ll", "train_seed": 0},
        ],
    }
    path = tmp_path / "models.json"
    path.write_text(json.dumps(spec))
    m0, m1 = arms.parse_checkpoints(str(path))
    assert m0.arm == arms.make_arm("ll4", "sink", sink_frames=1, window_frames=3)
    assert (m0.path, m0.train_seed) == (str(tmp_path / "runs" / "ll"), 2)
    assert m1.arm == arms.PRESETS["longlive"] and m1.train_seed == 0


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"checkpoints": []}, "'checkpoints' must be a non-empty list"),
        ({"checkpoints": [{"arm": "window"}]}, "checkpoints[0] needs 'arm' and 'path'"),
        ({"checkpoints": [{"arm": "window", "path": ".", "seed": 1}]}, "unknown keys ['seed']"),
        (
            {"arms": {"x": {"policy": "window", "strem": {}}}, "checkpoints": [{"arm": "x", "path": "."}]},
            "arms.x",
        ),
        ({"checkpoint": []}, "unknown keys ['checkpoint']"),
    ],
)
def test_bad_spec_files_are_named(tmp_path, spec, needle):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError) as e:
        arms.parse_checkpoints(str(path))
    assert f"--checkpoints={path}" in str(e.value) and needle in str(e.value)


def test_arms_and_list_flags_name_the_flag():
    assert [a.name for a in arms.parse_arms("window, longlive,adastate_a2")] == [
        "window",
        "longlive",
        "adastate_a2",
    ]
    with pytest.raises(ValueError, match=r"--arms='window,nope'"):
        arms.parse_arms("window,nope")
    with pytest.raises(ValueError, match="named twice"):
        arms.parse_arms("sink,sink")
    assert arms.parse_int_list("horizons", "1, 2,4", 1) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"--horizons='1,x': expected comma-separated integers"):
        arms.parse_int_list("horizons", "1,x", 1)
    with pytest.raises(ValueError, match=r"--seeds='-1': expected integers >= 0"):
        arms.parse_int_list("seeds", "-1", 0)
    assert arms.parse_frame_size("16X32") == (16, 32)
    with pytest.raises(ValueError, match="--frame_size='16': expected HxW"):
        arms.parse_frame_size("16")
