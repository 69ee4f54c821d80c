"""Training input pipelines: PanWorld -> PatchCodec latents, per-host shards, exact iterator
resume, ArrayRecord latents (writer + source), bad records named by file and index, one source
registry that the config schema reads."""

import numpy as np
import pytest

from adastate_jax.config import parse
from adastate_jax.data import pipeline, records
from adastate_jax.models.vae import PatchCodec
from tests.training.conftest_helpers import panworld_config


def test_panworld_batches_are_codec_latents_and_iterator_state_resumes_exactly():
    cfg = panworld_config("teacher", batch_size=2)
    it = pipeline.make_iterator(parse(cfg))
    first = next(it)
    assert first["latents"].shape == (2, 6, 8, 8, 48) and first["prompt_ids"].shape == (2, 4)
    # the codec is exactly invertible: decoding gives back PanWorld frames in [-1, 1]
    frames = np.asarray(PatchCodec(4, 48, "none").decode(first["latents"]))
    assert frames.shape == (2, 6, 32, 32, 3) and np.abs(frames).max() <= 1.0
    state = it.get_state()
    expected = [next(it)["index"] for _ in range(3)]
    again = pipeline.make_iterator(parse(cfg))
    again.set_state(state)
    np.testing.assert_array_equal(np.stack([next(again)["index"] for _ in range(3)]), np.stack(expected))


def test_hosts_read_disjoint_shards():
    cfg = panworld_config("teacher", batch_size=4)
    cfg.data.panworld.num_clips = 64
    seen = [
        np.concatenate([next(it)["index"] for _ in range(4)])
        for it in (pipeline.make_iterator(parse(cfg), process_index=i, process_count=2) for i in range(2))
    ]
    assert not set(seen[0]) & set(seen[1])
    assert all(len(set(s)) == len(s) for s in seen)


def test_arrayrecord_latents_roundtrip_and_bad_record_names_file_and_index(tmp_path):
    pytest.importorskip("array_record")
    path = str(tmp_path / "latents.array_record")
    rng = np.random.default_rng(0)
    recs = [
        (rng.normal(size=(6, 8, 8, 48)).astype(np.float32), rng.normal(size=(8, 32)).astype(np.float32))
        for _ in range(5)
    ]
    assert records.write_latents_arrayrecord(path, recs) == 5
    src = records.LatentsArrayRecordSource([path])
    assert len(src) == 5
    np.testing.assert_array_equal(src[3]["latents"], recs[3][0])
    np.testing.assert_array_equal(src[3]["text"], recs[3][1])

    cfg = panworld_config("teacher", batch_size=2)
    cfg.data.source = "arrayrecord"
    cfg.data.paths = (path,)
    batch = next(pipeline.make_iterator(parse(cfg)))
    assert batch["latents"].shape == (2, 6, 8, 8, 48) and batch["text"].shape == (2, 8, 32)

    from array_record.python.array_record_module import ArrayRecordWriter

    bad = str(tmp_path / "bad.array_record")
    w = ArrayRecordWriter(bad, "group_size:1")
    w.write(b"not an npz")
    w.close()
    with pytest.raises(ValueError, match=r"bad record 0 of .*bad\.array_record"):
        records.LatentsArrayRecordSource([path, bad])[5]


def test_arrayrecord_paths_accept_directories_and_globs(tmp_path):
    pytest.importorskip("array_record")
    rng = np.random.default_rng(1)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, n in enumerate((3, 2)):
        recs = [(np.full((6, 8, 8, 48), 10 * i + j, np.float32), rng.normal(size=(8, 32))) for j in range(n)]
        records.write_latents_arrayrecord(str(shards / f"shard-{i}.array_record"), recs)
    (shards / "notes.txt").write_text("not a shard")
    cfg = panworld_config("teacher", batch_size=1)
    cfg.data.source, cfg.data.shuffle = "arrayrecord", False
    for paths in ((str(shards),), (str(shards / "shard-*.array_record"),)):
        cfg.data.paths = paths
        firsts = [float(next_batch["latents"][0, 0, 0, 0, 0]) for next_batch in _take(cfg, 5)]
        assert firsts == [0.0, 1.0, 2.0, 10.0, 11.0]  # sorted shards, records in order
    cfg.data.paths = (str(tmp_path / "missing"),)
    with pytest.raises(ValueError, match="config.data.paths: .*missing.* does not exist"):
        pipeline.make_iterator(parse(cfg))


def _take(cfg, n):
    it = pipeline.make_iterator(parse(cfg))
    return [next(it) for _ in range(n)]


def test_one_source_registry_names_the_config_field():
    from types import SimpleNamespace

    from adastate_jax.config import schema

    assert schema.DATA_SOURCES is pipeline.SOURCE_NAMES == tuple(pipeline.SOURCES)
    cfg = panworld_config("teacher")
    cfg.data.source = "webdataset"
    with pytest.raises(ValueError, match=r"config\.data\.source.*'webdataset'.*arrayrecord"):
        parse(cfg)
    exp = SimpleNamespace(data=SimpleNamespace(source="webdataset"))  # past the schema
    with pytest.raises(ValueError, match=r"config\.data\.source: unknown source 'webdataset'"):
        pipeline.source_and_encode(exp)
