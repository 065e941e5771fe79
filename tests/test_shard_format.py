"""The shard format: sample round trips, shard atomicity, manifest checks, local and real S3."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from argen.data_pipeline import shard_format as sf
from argen.data_pipeline import storage
from argen.errors import ArgenError


def _manifest(shards, **kw):
    base = dict(tokenizer={"id": "vq-test", "codebook_size": 1024, "downsample": 8}, codebook_size=1024,
                image_size=32, grid=4, augmentations=["center", "center-flip"], conditioning="class",
                num_classes=10, shards=shards)
    base.update(kw)
    return sf.Manifest(**base)


def _write(prefix, index, n, start=0, compression="gzip", t5=False):
    rng = np.random.default_rng(index)
    written = []
    with sf.ShardWriter(prefix, index, compression=compression) as w:
        for i in range(start, start + n):
            codes = rng.integers(0, 1024, size=(2, 16))
            feats = torch.randn(3 + i % 4, 8) if t5 else None
            w.write(sf.encode_sample(i, codes, label=i % 10, caption=f"caption {i}" if t5 else None, t5=feats))
            written.append((i, codes, feats))
        info = w.commit()
    return info, written


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_roundtrip_local(tmp_path, compression):
    prefix = str(tmp_path / "ds")
    info, written = _write(prefix, 0, 5, compression=compression, t5=True)
    assert info.num_samples == 5 and info.name == sf.shard_name(0, compression)
    path = tmp_path / "ds" / info.name
    assert path.stat().st_size == info.bytes
    assert sorted(os.listdir(tmp_path / "ds")) == [info.name]  # no temp files left behind
    sf.write_manifest(prefix, _manifest([info], compression=compression,
                                        t5={"model": "t", "dim": 8, "dtype": "bfloat16", "max_length": 120}))
    m, samples = sf.read_dataset(prefix, verify=True)
    samples = list(samples)
    assert m.num_samples == 5 and m.codes_shape == (2, 16)
    for s, (i, codes, feats) in zip(samples, written):
        assert s.index == i and s.label == i % 10 and s.caption == f"caption {i}"
        assert s.codes.dtype == np.uint16 and np.array_equal(s.codes, codes)
        assert s.t5.dtype == torch.bfloat16 and s.t5.shape == feats.shape  # valid length only, no padding
        assert torch.equal(s.t5, feats.to(torch.bfloat16))


def test_fp16_features_and_webdataset_reads_shards(tmp_path):
    import webdataset as wds

    prefix = str(tmp_path)
    feats = torch.randn(5, 8)
    with sf.ShardWriter(prefix, 3) as w:
        w.write(sf.encode_sample(7, np.zeros((1, 4), np.int64), caption="x", t5=feats, t5_dtype="float16"))
        info = w.commit()
    got = list(wds.WebDataset(str(tmp_path / info.name), shardshuffle=False))
    assert len(got) == 1 and got[0]["__key__"] == sf.sample_key(7)
    s = sf.decode_sample(got[0], t5_dtype="float16")
    assert s.t5.dtype == torch.float16 and torch.equal(s.t5, feats.half())


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_shards_are_deterministic(tmp_path, compression):
    a, _ = _write(str(tmp_path / "a"), 0, 4, compression=compression)
    b, _ = _write(str(tmp_path / "b"), 0, 4, compression=compression)
    assert a.sha256 == b.sha256 and a.bytes == b.bytes


def test_uint16_only_and_range_checks():
    with pytest.raises(ValueError, match="out of range"):
        sf.encode_sample(0, np.array([[70000]]))
    with pytest.raises(ValueError, match="out of range"):
        sf.encode_sample(0, np.array([[1024]]), codebook_size=1024)
    with pytest.raises(ValueError, match="shape"):
        sf.encode_sample(0, np.zeros(4, np.int64))
    members = sf.encode_sample(0, np.array([[65535, 0]]))
    arr = np.load(io.BytesIO(members["codes.npy"]))
    assert arr.dtype == np.uint16 and arr.tolist() == [[65535, 0]]
    bad = dict(members, **{"codes.npy": sf._npy_bytes(np.zeros((1, 2), np.int64))})
    with pytest.raises(sf.ShardFormatError, match="uint16"):
        sf.decode_sample(bad)
    with pytest.raises(sf.ShardFormatError, match="manifest says"):
        sf.decode_sample(members, expect_shape=(2, 2))


def test_aborted_shard_leaves_nothing(tmp_path, monkeypatch):
    packed = []
    monkeypatch.setattr(sf.ShardWriter, "_zstd_in_place", lambda self: packed.append(self.name))
    for compression in ("gzip", "zstd"):
        with pytest.raises(RuntimeError):
            with sf.ShardWriter(str(tmp_path), 0, tmp_dir=str(tmp_path), compression=compression) as w:
                w.write(sf.encode_sample(0, np.zeros((1, 4), np.int64), label=1))
                raise RuntimeError("killed")
        assert os.listdir(tmp_path) == []
    assert packed == []                                       # a shard thrown away is not compressed first
    with sf.ShardWriter(str(tmp_path), 0) as w:
        w.write(sf.encode_sample(0, np.zeros((1, 4), np.int64)))
        with pytest.raises(ValueError, match="duplicate"):
            w.write(sf.encode_sample(0, np.zeros((1, 4), np.int64)))


def test_corrupt_shard_and_checksum(tmp_path):
    info, _ = _write(str(tmp_path), 0, 3)
    path = tmp_path / info.name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(sf.ShardFormatError, match="corrupt or truncated"):
        list(sf.read_shard(str(path)))
    path.write_bytes(data)
    with pytest.raises(sf.ShardFormatError, match="sha256"):
        list(sf.read_shard(str(path), verify_sha256="0" * 64))


def test_manifest_versions_and_missing(tmp_path):
    info, _ = _write(str(tmp_path), 0, 2)
    with pytest.raises(ArgenError, match="not been finalized|not finished"):
        sf.read_manifest(str(tmp_path))
    m = _manifest([info], skipped={"corrupt": 2})
    sf.write_manifest(str(tmp_path), m)
    d = json.loads((tmp_path / "manifest.json").read_text())
    assert d["format_version"] == sf.FORMAT_VERSION and d["num_samples"] == 2
    assert d["shards"][0]["sha256"] == info.sha256 and d["skipped"] == {"corrupt": 2}
    back = sf.read_manifest(str(tmp_path / "manifest.json"))
    assert back == sf.Manifest.from_dict(d) and back.shards[0] == info
    d["format_version"] = sf.FORMAT_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(sf.ShardFormatError, match="newer"):
        sf.read_manifest(str(tmp_path))
    with pytest.raises(ArgenError, match="no manifest"):
        sf.read_manifest(str(tmp_path / "nowhere"))


def test_tar_layout_is_webdataset(tmp_path):
    info, _ = _write(str(tmp_path), 0, 2, compression="none")
    with tarfile.open(tmp_path / info.name) as t:
        assert t.getnames() == ["0000000000.codes.npy", "0000000000.cls", "0000000001.codes.npy", "0000000001.cls"]
        assert all(m.mtime == 0 and m.uid == 0 for m in t.getmembers())


@pytest.mark.s3
def test_roundtrip_s3(s3_bucket):
    prefix = f"{s3_bucket}/ds"
    info, written = _write(prefix, 0, 4, t5=True)
    assert storage.exists(sf.shard_url(prefix, 0)) and storage.size(sf.shard_url(prefix, 0)) == info.bytes
    assert storage.list_names(prefix) == [info.name]
    sf.write_manifest(prefix, _manifest([info], t5={"model": "t", "dim": 8, "dtype": "bfloat16", "max_length": 120}))
    m, samples = sf.read_dataset(prefix, verify=True)
    got = list(samples)
    assert [s.index for s in got] == [i for i, _, _ in written]
    assert all(np.array_equal(s.codes, c) for s, (_, c, _) in zip(got, written))
    storage.register_webdataset_s3()
    import webdataset as wds
    assert len(list(wds.WebDataset(sf.shard_url(prefix, 0), shardshuffle=False))) == 4
    storage.delete(sf.shard_url(prefix, 0))
    assert not storage.exists(sf.shard_url(prefix, 0))


def test_s3_fixture_fails_in_ci_and_skips_elsewhere(monkeypatch):
    from tests import s3_fixture

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("REQUIRE_S3", "1")
    with pytest.raises(pytest.fail.Exception, match="S3 server required"):
        s3_fixture._unavailable("nothing answers")
    monkeypatch.delenv("REQUIRE_S3")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        s3_fixture._unavailable("nothing answers")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no S3 server"):
        s3_fixture._unavailable("nothing answers")
    assert not s3_fixture.answers("http://127.0.0.1:9", timeout=0.5)


def test_decompress_streamed_and_multi_frame_zstd():
    """Frames without a recorded size (`tar c | zstd`) and files of several frames, as gzip's several members."""
    import zstandard
    a, b = os.urandom(1000), bytes(range(256)) * 40
    streamed = zstandard.ZstdCompressor().compressobj()
    one = streamed.compress(a + b) + streamed.flush()
    assert zstandard.frame_content_size(one) == -1
    assert sf.decompress(one) == a + b
    two = zstandard.ZstdCompressor().compress(a) + zstandard.ZstdCompressor().compress(b)
    assert sf.decompress(two) == a + b


def test_corrupt_zstd_shard_is_a_format_error(tmp_path):
    prefix = str(tmp_path / "ds")
    info, _ = _write(prefix, 0, 5, compression="zstd")
    path = tmp_path / "ds" / info.name
    data = path.read_bytes()
    path.write_bytes(data[:40] + bytes(len(data) - 40))        # frame header kept, the rest zeroed
    with pytest.raises(sf.ShardFormatError, match="corrupt or truncated"):
        list(sf.read_shard(str(path), expect_shape=(2, 16)))
