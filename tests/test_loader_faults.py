"""Loader faults on local shards: corrupt shards skipped and counted, bad samples dropped, retries, limits."""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest

from argen.data_pipeline import reader as reader_mod
from argen.data_pipeline import shard_format as sf
from argen.data_pipeline.loader import DataConfig, build_loader
from argen.data_pipeline.retry import RetryConfig, ShardCorrupt, ShardUnreadable, read_with_retry
from argen.errors import ArgenError
from tests.test_loader import CODEBOOK, GRID, make_dataset, take

FAST = RetryConfig(max_attempts=3, initial_backoff_s=0.0, max_backoff_s=0.0)


def flaky(failures):
    calls = {"n": 0}

    def read():
        calls["n"] += 1
        if calls["n"] <= len(failures):
            raise failures[calls["n"] - 1]
        return "data"

    return read, calls


def test_transient_errors_are_retried_with_backoff():
    sleeps = []
    read, calls = flaky([ConnectionResetError("reset"), TimeoutError("slow")])
    got = read_with_retry("s3://b/x", read, RetryConfig(initial_backoff_s=1.0, max_backoff_s=3.0),
                          sleep=sleeps.append)
    assert got == "data" and calls["n"] == 3
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0   # exponential, jittered


def test_corruption_is_confirmed_by_a_second_read():
    read, calls = flaky([sf.ShardFormatError("truncated")])           # a one-off truncation: not corrupt
    assert read_with_retry("u", read, FAST, sleep=lambda s: None) == "data"
    read, calls = flaky([sf.ShardFormatError("bad")] * 5)
    with pytest.raises(ShardCorrupt):
        read_with_retry("u", read, FAST, sleep=lambda s: None)
    assert calls["n"] == 2
    read, calls = flaky([OSError("503")] * 5)
    with pytest.raises(ShardUnreadable):
        read_with_retry("u", read, FAST, sleep=lambda s: None)
    assert calls["n"] == 3


@pytest.fixture(params=["gzip", "zstd"])
def corrupt_dataset(tmp_path, request):
    prefix = str(tmp_path / "ds")
    make_dataset(prefix, [6, 6, 6, 6], compression=request.param)
    path = os.path.join(prefix, sf.shard_name(1, request.param))
    data = open(path, "rb").read()
    with open(path, "wb") as f:                                       # keep the gzip/zstd header, garble the rest
        f.write(data[:20] + bytes(len(data) - 20))
    return prefix


def test_corrupt_shard_is_skipped_logged_and_counted(corrupt_dataset, caplog):
    with caplog.at_level("ERROR", logger="argen.data"):
        loader = build_loader(DataConfig(url=corrupt_dataset, shuffle_buffer=5, num_workers=1, retry=FAST), 0, 1, 6)
        batches = take(loader, 6)                                     # 2 epochs of the 18 good samples
        stats = loader.stats()
        loader.close()
    ids = collections.Counter(i for b in batches for i in b["sample_id"].tolist())
    assert sorted(ids) == [i for i in range(24) if not 6 <= i < 12]
    assert set(ids.values()) == {2}
    assert stats["corrupt_shards"] == 1 and stats["skipped_samples"] == 12
    assert "shard-000001.tar." in caplog.text


def test_too_many_corrupt_shards_is_a_clear_error(corrupt_dataset):
    loader = build_loader(DataConfig(url=corrupt_dataset, shuffle_buffer=5, num_workers=0, max_corrupt_shards=0,
                                     retry=FAST), 0, 1, 6)
    with pytest.raises(ArgenError, match=r"corrupt shards .*max_corrupt_shards=0.*shard-000001"):
        take(loader, 4)
    loader.close()


def test_truncated_shard_and_bad_samples(tmp_path):
    prefix = str(tmp_path / "ds")
    m = make_dataset(prefix, [5, 5])
    # shard 0 loses its tail: fewer samples than the manifest says
    p0 = os.path.join(prefix, m.shards[0].name)
    os.truncate(p0, 2 * 2048 + 600)                                   # mid-way through sample 2
    # shard 1 gets a sample whose codes exceed the codebook: that sample alone is dropped
    with sf.ShardWriter(prefix, 1, compression="none") as w:
        for idx in range(5, 10):
            codes = np.full((3, GRID * GRID), CODEBOOK + 5 if idx == 7 else 1, dtype=np.uint16)
            w.write(sf.encode_sample(idx, codes, label=1))
        w.commit()
    loader = build_loader(DataConfig(url=prefix, shuffle_buffer=10, num_workers=0, retry=FAST), 0, 1, 4)
    got = sorted(take(loader, 1)[0]["sample_id"].tolist())
    s = loader.stats()
    loader.close()
    assert got == [5, 6, 8, 9]
    assert s["corrupt_shards"] == 1 and s["bad_samples"] == 1


def _hook_shard_reads(monkeypatch, before):
    """Every whole-shard read calls before(url) first, which may raise to simulate a storage error."""
    real = reader_mod.storage.read_whole

    def read_whole(url):
        before(str(url))
        return real(url)

    monkeypatch.setattr(reader_mod.storage, "read_whole", read_whole)


def test_unreadable_shard_names_it_after_retries(tmp_path, monkeypatch):
    prefix = str(tmp_path / "ds")
    make_dataset(prefix, [4, 4])
    attempts = collections.Counter()

    def refuse(url):
        if url.endswith("shard-000001.tar"):
            attempts[url] += 1
            raise ConnectionRefusedError("connection refused")

    _hook_shard_reads(monkeypatch, refuse)
    loader = build_loader(DataConfig(url=prefix, shuffle=False, shuffle_buffer=4, num_workers=0, retry=FAST), 0, 1, 4)
    assert next(loader)["sample_id"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ArgenError, match=r"cannot read shard .*shard-000001.tar after 3 attempts"):
        next(loader)
    loader.close()
    assert sum(attempts.values()) == 3


def test_transient_failure_recovers_without_changing_the_order(tmp_path, monkeypatch):
    prefix = str(tmp_path / "ds")
    make_dataset(prefix, [4, 4, 4])
    clean = build_loader(DataConfig(url=prefix, shuffle_buffer=3, num_workers=0, retry=FAST), 0, 1, 4)
    want = [b["sample_id"].tolist() for b in take(clean, 6)]
    clean.close()
    failures = {"left": 2}

    def reset_twice(url):
        if failures["left"] and url.endswith("shard-000002.tar"):
            failures["left"] -= 1
            raise ConnectionResetError("server restarted")

    _hook_shard_reads(monkeypatch, reset_twice)
    loader = build_loader(DataConfig(url=prefix, shuffle_buffer=3, num_workers=0, retry=FAST), 0, 1, 4)
    got = [b["sample_id"].tolist() for b in take(loader, 6)]
    assert got == want and loader.stats()["retries"] == 2
    loader.close()


def test_garbled_tar_header_is_caught_by_its_checksum(tmp_path):
    prefix = str(tmp_path / "ds")
    m = make_dataset(prefix, [4, 4])
    path = os.path.join(prefix, m.shards[1].name)
    data = bytearray(open(path, "rb").read())
    data[1024 + 136 + 3] ^= 0x01            # the mtime field of the 2nd member header: only the checksum notices
    open(path, "wb").write(bytes(data))
    loader = build_loader(DataConfig(url=prefix, shuffle=False, shuffle_buffer=8, num_workers=0, retry=FAST), 0, 1, 4)
    assert next(loader)["sample_id"].tolist() == [0, 1, 2, 3]
    assert next(loader)["sample_id"].tolist() == [0, 1, 2, 3]      # shard 1 skipped: epoch 1 starts
    assert loader.stats()["corrupt_shards"] == 1
    loader.close()


def test_fast_tar_walker_agrees_with_tarfile(tmp_path):
    import io
    import tarfile

    prefix = str(tmp_path / "ds")
    m = make_dataset(prefix, [6])
    buf = open(os.path.join(prefix, m.shards[0].name), "rb").read()
    fast = [(n, bytes(d)) for n, d in reader_mod._fast_members(buf)]
    assert fast == [(n, bytes(d)) for n, d in reader_mod._tarfile_members(buf)] and len(fast) == 12
    # an archive with a pax header is left to tarfile
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("0000000001.cls")
        info.size, info.pax_headers = 1, {"comment": "x"}
        tar.addfile(info, io.BytesIO(b"3"))
    assert reader_mod._fast_members(out.getvalue()) is None


def _shard_with(tmp_path, labels, extra_member_at=None, compression="none"):
    rng = np.random.default_rng(0)
    with sf.ShardWriter(str(tmp_path), 0, compression=compression) as w:
        for i, label in enumerate(labels):
            members = sf.encode_sample(i, rng.integers(0, CODEBOOK, (3, GRID * GRID)), label=label)
            if i == extra_member_at:
                members["json"] = b'{"note": "an extra member"}'
            w.write(members)
        info = w.commit()
    return os.path.join(str(tmp_path), info.name), info


@pytest.mark.parametrize("extra_member_at, compression", [(None, "none"), (None, "zstd"), (5, "gzip")])
def test_regular_layout_fast_path_equals_the_member_walker(tmp_path, monkeypatch, extra_member_at, compression):
    """The arithmetic c2i reader returns what the member walker returns (labels of 1 to 5 digits, any order and
    augmentations, a block read from an offset); a shard whose samples differ in layout falls back to the walker."""
    from argen.data_pipeline.reader import Source, read_block
    from argen.data_pipeline.sampler import Block, Segment

    labels = [0, 7, 42, 999, 1000, 12345, 3, 88] * 5
    path, info = _shard_with(tmp_path, labels, extra_member_at, compression)
    m = sf.Manifest(tokenizer={"id": "test"}, codebook_size=CODEBOOK, image_size=GRID * 16, grid=GRID,
                    augmentations=["a", "b", "c"], conditioning="class", num_classes=20000, shards=[info])
    src = Source.from_manifest(str(tmp_path), m)
    rng = np.random.default_rng(1)
    seg = Segment(0, 4, len(labels))
    n = seg.hi - seg.lo
    block = Block(component=0, epoch=0, index=0, segments=(seg,), order=rng.permutation(n),
                  sample_ids=np.arange(n), augs=rng.integers(0, 3, n))
    buf = sf.decompress(open(path, "rb").read())
    located = reader_mod._regular_c2i(buf, seg, reader_mod._CodesDecoder(3, GRID * GRID))
    assert (located is None) == (extra_member_at is not None)
    fast = read_block(src, block, 3, FAST, "c2i")
    monkeypatch.setattr(reader_mod, "_regular_c2i", lambda *a: None)
    walked = read_block(src, block, 3, FAST, "c2i")
    assert fast["codes"].equal(walked["codes"]) and fast["meta"].equal(walked["meta"])
    expected = [labels[seg.lo + j] for j in block.order[3:]]
    assert fast["meta"][:, 0].tolist() == expected and fast["meta"][:, 1].all()
