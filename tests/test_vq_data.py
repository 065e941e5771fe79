"""Tokenizer training data: the reference crop, class folders, WebDataset shards (local and S3), resumable order."""
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from argen.data_pipeline.synthetic import synthetic_image
from argen.errors import ArgenError
from argen.launcher.vq_data import VQDataConfig, make_loader, random_crop_flip


def test_reference_random_crop_range_and_flip():
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 30))  # left half blue
    rng = np.random.default_rng(0)
    out = [random_crop_flip(img, 16, rng) for _ in range(40)]
    assert all(o.shape == (3, 16, 16) and o.min() >= -1 and o.max() <= 1 for o in out)
    # with flips the blue half is sometimes on the right
    left_blue = [bool(o[2, :, 0].mean() > 0) for o in out]
    assert any(left_blue) and not all(left_blue)


def _png(i, size=24):
    buf = io.BytesIO()
    synthetic_image(i, size).save(buf, format="PNG")
    return buf.getvalue()


def test_positions_make_resume_exact_and_ranks_disjoint(tmp_path):
    cfg = VQDataConfig(source="synthetic", image_size=16, synthetic_count=10, num_workers=0)
    full = make_loader(cfg, 4, 0, 1, 0, seed=3)
    batches = [next(full) for _ in range(4)]
    resumed = make_loader(cfg, 4, 0, 1, 2, seed=3)
    assert torch.equal(next(resumed), batches[2]) and torch.equal(next(resumed), batches[3])
    r0, r1 = make_loader(cfg, 4, 0, 2, 1, seed=3), make_loader(cfg, 4, 1, 2, 1, seed=3)
    assert torch.equal(torch.cat([next(r0), next(r1)]), batches[1])
    with pytest.raises(ArgenError, match="not divisible"):
        make_loader(cfg, 5, 0, 2, 0, seed=0)


def test_class_folders(tmp_path):
    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        for i in range(3):
            (tmp_path / f"class{c}" / f"{i}.png").write_bytes(_png(c * 3 + i))
    cfg = VQDataConfig(source="folder", path=str(tmp_path), image_size=16, num_workers=0)
    batch = next(make_loader(cfg, 4, 0, 1, 0, seed=0))
    assert batch.shape == (4, 3, 16, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArgenError, match="no images"):
        make_loader(VQDataConfig(source="folder", path=str(tmp_path / "empty"), num_workers=0), 4, 0, 1, 0, 0)
    with pytest.raises(ArgenError, match="not found"):
        make_loader(VQDataConfig(source="folder", path=str(tmp_path / "nope"), num_workers=0), 4, 0, 1, 0, 0)


def _write_shards(write, n_shards=2, per_shard=4):
    urls = []
    for s in range(n_shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(per_shard):
                data = _png(s * per_shard + i)
                info = tarfile.TarInfo(f"{s:02d}{i:04d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                meta = b"%d" % i
                info = tarfile.TarInfo(f"{s:02d}{i:04d}.cls")
                info.size = len(meta)
                tar.addfile(info, io.BytesIO(meta))
        urls.append(write(f"shard-{s:06d}.tar", buf.getvalue()))
    return urls


def _check_wds(pattern):
    cfg = VQDataConfig(source="wds", path=pattern, image_size=16, num_workers=0)
    it = make_loader(cfg, 2, 0, 1, 0, seed=0)
    batches = [next(it) for _ in range(5)]  # 8 samples per epoch: the stream wraps into the next epoch
    assert all(b.shape == (2, 3, 16, 16) for b in batches)
    resumed = make_loader(cfg, 2, 0, 1, 3, seed=0)
    assert torch.equal(next(resumed), batches[3])


def test_webdataset_shards_local(tmp_path):
    def write(name, data):
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)
    _write_shards(write)
    _check_wds(str(tmp_path / "shard-{000000..000001}.tar"))
    _check_wds(str(tmp_path))  # a directory of shards
    with pytest.raises(ArgenError, match="cannot feed 4 ranks"):
        make_loader(VQDataConfig(source="wds", path=str(tmp_path), num_workers=0), 4, 0, 4, 0, 0)


@pytest.mark.s3
def test_webdataset_shards_on_s3(s3_bucket):
    from argen.data_pipeline import storage

    def write(name, data):
        url = storage.join(s3_bucket, "imgs", name)
        storage.put_bytes_atomic(url, data)
        return url
    _write_shards(write)
    _check_wds(storage.join(s3_bucket, "imgs") + "/shard-{000000..000001}.tar")
