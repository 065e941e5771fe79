"""`argen tokenize` against the real S3 server (SeaweedFS on 127.0.0.1, started by ci/infra/s3-up.sh)."""
from __future__ import annotations

import pytest

from argen.data_pipeline import shard_format as sf
from argen.data_pipeline import storage
from tests.test_tokenize import BAD_POLICY, _ilsvrc_tar, _img2dataset_shards, broken_class_tree, dataset, make_cfg, run

pytestmark = pytest.mark.s3


def test_synthetic_to_s3_equals_local(tmp_path, vq_dir, s3_bucket):
    common = ("source.num_images=24", "output.samples_per_shard=10", "augment.mode=center_flip")
    local, _ = run(make_cfg(vq_dir, str(tmp_path / "local"), *common))
    m_local = local.finalize()
    prefix = f"{s3_bucket}/synthetic16"
    cfg = make_cfg(vq_dir, prefix, *common)
    run(cfg, part=__import__("argen.tokenize_offline.job", fromlist=["Part"]).Part(1, 2, "flags"))
    assert storage.list_names(prefix) == ["_work", "shard-000001.tar.zst"]
    job, stats = run(cfg)  # one part now: resumes shard 1, writes 0 and 2
    assert stats["resumed"] == 1 and stats["written"] == 2
    m = job.finalize()
    assert [(s.name, s.sha256) for s in m.shards] == [(s.name, s.sha256) for s in m_local.shards]
    assert storage.list_names(prefix) == ["manifest.json"] + [s.name for s in m.shards]  # _work removed
    back, samples = dataset(prefix)
    assert back.num_samples == 24 and sorted(int(k) for k in samples) == list(range(24))


def test_img2dataset_shards_on_s3(tmp_path, vq_dir, s3_bucket):
    _img2dataset_shards(tmp_path / "laion", parquet=False)
    src = f"{s3_bucket}/laion"
    for f in sorted((tmp_path / "laion").iterdir()):
        storage.put_bytes_atomic(f"{src}/{f.name}", f.read_bytes())
    common = ("source.kind=img2dataset", "augment.mode=center")
    job, _ = run(make_cfg(vq_dir, f"{s3_bucket}/out", f"source.path={src}", *common))
    m = job.finalize()
    job, _ = run(make_cfg(vq_dir, str(tmp_path / "out"), f"source.path={tmp_path / 'laion'}", *common))
    m_local = job.finalize()
    assert m.skipped == m_local.skipped and m.num_samples == m_local.num_samples > 0
    assert [s.sha256 for s in m.shards] == [s.sha256 for s in m_local.shards]
    assert sf.read_manifest(f"{s3_bucket}/out").conditioning == "caption"


def test_ilsvrc_tar_on_s3_equals_local_folder(tmp_path, vq_dir, s3_bucket):
    broken_class_tree(tmp_path / "train")
    _ilsvrc_tar(tmp_path / "train", tmp_path / "train.tar", corrupt_class=None)
    url = f"{s3_bucket}/raw/ILSVRC2012_img_train.tar"
    storage.put_file_atomic(str(tmp_path / "train.tar"), url)
    common = ("output.samples_per_shard=7", "augment.mode=center_flip", *BAD_POLICY)
    job, _ = run(make_cfg(vq_dir, f"{s3_bucket}/codes", "source.kind=imagenet_tar", f"source.path={url}", *common))
    m = job.finalize()
    job, _ = run(make_cfg(vq_dir, str(tmp_path / "dir"), "source.kind=imagenet_folder",
                          f"source.path={tmp_path / 'train'}", *common))
    m_dir = job.finalize()
    assert m.skipped == m_dir.skipped and [s.sha256 for s in m.shards] == [s.sha256 for s in m_dir.shards]
