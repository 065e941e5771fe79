"""The loader against the real S3 test server (SeaweedFS; `bash ci/infra/s3-up.sh`): same batches as from local
disk, and an epoch that survives a server restart in its middle. Fails under CI=true when the server is missing."""
from __future__ import annotations

import collections
import threading
import time

import pytest
import torch

from argen.data_pipeline.loader import DataConfig, build_loader
from argen.data_pipeline.retry import RetryConfig
from tests.test_loader import assert_batches_equal, make_dataset, take

pytestmark = pytest.mark.s3


@pytest.mark.timeout(120)
def test_s3_reads_the_same_batches_as_local_disk(s3_bucket, tmp_path):
    counts = [9, 4, 12, 7]
    local = str(tmp_path / "ds")
    make_dataset(local, counts, compression="gzip")
    remote = f"{s3_bucket}/imagenet-codes"
    make_dataset(remote, counts, compression="gzip")
    out = {}
    for url in (local, remote):
        loader = build_loader(DataConfig(url=url, shuffle_buffer=6, num_workers=2, seed=4), 1, 2, 5)
        out[url] = take(loader, 8)
        stats = loader.stats()
        loader.close()
        assert stats["read_MBps"] > 0 and stats["corrupt_shards"] == 0
    assert_batches_equal(out[local], out[remote])


@pytest.mark.timeout(180)
def test_epoch_survives_s3_server_restart(s3_bucket, s3_server):
    counts = [8] * 10
    url = f"{s3_bucket}/codes"
    make_dataset(url, counts, compression="gzip")
    total = sum(counts)
    cfg = DataConfig(url=url, shuffle_buffer=4, num_workers=1, prefetch_blocks=1, seed=2,
                     retry=RetryConfig(max_attempts=12, initial_backoff_s=0.2, max_backoff_s=2.0))
    loader = build_loader(cfg, 0, 1, 4)
    seen = collections.Counter(i for b in take(loader, 4) for i in b["sample_id"].tolist())
    s3_server.stop()                                   # mid-epoch: the worker's next reads fail ...
    restarter = threading.Timer(2.0, s3_server.start)  # ... until the server is back
    restarter.start()
    try:
        t0 = time.time()
        rest = take(loader, total // 4 - 4)            # the remainder of the epoch
        waited = time.time() - t0
    finally:
        restarter.join()
    stats = loader.stats()
    loader.close()
    seen.update(i for b in rest for i in b["sample_id"].tolist())
    assert sorted(seen) == list(range(total)) and set(seen.values()) == {1}
    # s3fs/botocore retry short outages themselves; longer ones reach retry.py (stats["retries"]). Either way
    # nothing may be mistaken for corruption.
    assert stats["corrupt_shards"] == 0 and stats["skipped_samples"] == 0, stats
    assert waited >= 1.0                               # it really waited for the server
    assert all(b["codes"].dtype == torch.long for b in rest)
