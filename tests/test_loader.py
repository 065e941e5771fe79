"""The streaming loader on local shards: coverage per epoch over ranks x workers, resume, mixtures, t2i batches."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from argen.config import load_config
from argen.data_pipeline import shard_format as sf
from argen.data_pipeline.loader import DataConfig, DatasetSpec, build_loader
from argen.data_pipeline.sampler import EpochPlan, Mixture, schedule
from argen.errors import ArgenError

GRID = 4
CODEBOOK = 1024


def code_value(idx: int, aug: int) -> int:
    return (idx * 7 + aug * 131) % CODEBOOK


def make_dataset(prefix: str, counts: list[int], n_aug: int = 3, t5_lens=None, t5_dim: int = 8,
                 compression: str = "none", first_index: int = 0) -> sf.Manifest:
    """A tiny data set whose codes encode (sample index, augmentation) so tests can check what they got."""
    shards, idx = [], first_index
    for i, c in enumerate(counts):
        with sf.ShardWriter(prefix, i, compression=compression) as w:
            for _ in range(c):
                codes = np.stack([np.full(GRID * GRID, code_value(idx, a), dtype=np.uint16) for a in range(n_aug)])
                if t5_lens is None:
                    w.write(sf.encode_sample(idx, codes, label=idx % 10))
                else:
                    n = t5_lens(idx)
                    t5 = None if n == 0 else torch.arange(n * t5_dim, dtype=torch.float32).reshape(n, t5_dim) + idx
                    w.write(sf.encode_sample(idx, codes, caption=f"caption {idx}", t5=t5, t5_dtype="bfloat16"))
                idx += 1
            shards.append(w.commit())
    m = sf.Manifest(tokenizer={"id": "test"}, codebook_size=CODEBOOK, image_size=GRID * 16, grid=GRID,
                    augmentations=[f"aug{a}" for a in range(n_aug)],
                    conditioning="class" if t5_lens is None else "caption",
                    num_classes=10 if t5_lens is None else None,
                    t5=None if t5_lens is None else {"model": "test", "dim": t5_dim, "dtype": "bfloat16",
                                                     "max_length": 120},
                    compression=compression, shards=shards)
    sf.write_manifest(prefix, m)
    return m


COUNTS = [7, 3, 10, 5, 0, 8, 6]   # 39 samples, uneven shards, one empty
TOTAL = sum(COUNTS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("codes") / "ds")
    make_dataset(prefix, COUNTS)
    return prefix


def take(loader, n):
    return [next(loader) for _ in range(n)]


def cfg_for(url, **kw) -> DataConfig:
    kw.setdefault("shuffle_buffer", 8)
    kw.setdefault("seed", 11)
    return DataConfig(url=url, **kw)


def check_codes_match_ids(batch):
    """Each row's codes are the chosen augmentation of the sample the row claims to be."""
    sid = (batch["sample_id"] & ((1 << 48) - 1)).tolist()
    want = [code_value(i, a) for i, a in zip(sid, batch["aug"].tolist())]
    assert batch["codes"][:, 1].tolist() == want
    assert batch["labels"].tolist() == [i % 10 for i in sid]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_sample_once_per_epoch_any_ranks_and_workers(dataset, world):
    batch = 4
    per_rank = -(-TOTAL // world)
    n_batches = -(-3 * per_rank // batch) + 1          # enough for three whole epochs on every rank
    orders = {}
    for workers in (0, 1, 2):
        seen: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        for rank in range(world):
            loader = build_loader(cfg_for(dataset, num_workers=workers), rank, world, batch)
            batches = take(loader, n_batches)
            loader.close()
            for b in batches:
                assert b["codes"].shape == (batch, GRID * GRID) and b["codes"].dtype == torch.long
                assert b["labels"].dtype == torch.long
                check_codes_match_ids(b)
                for e, i in zip(b["epoch"].tolist(), b["sample_id"].tolist()):
                    seen[e][i] += 1
            orders[(workers, rank)] = torch.cat([b["sample_id"] for b in batches]).tolist()
        for epoch in (0, 1, 2):
            assert sorted(seen[epoch]) == list(range(TOTAL)), f"epoch {epoch} with {workers} workers"
            assert set(seen[epoch].values()) == {1}, f"duplicates in epoch {epoch}"
    for rank in range(world):     # the order does not depend on the number of workers
        assert orders[(0, rank)] == orders[(1, rank)] == orders[(2, rank)]
    if world == 1:   # reshuffled every epoch
        assert orders[(0, 0)][:TOTAL] != orders[(0, 0)][TOTAL:2 * TOTAL]


def test_drop_last_gives_whole_batches_per_epoch(dataset):
    world, batch = 2, 4
    per_rank = (TOTAL // (world * batch)) * batch      # 16
    seen = collections.Counter()
    for rank in range(world):
        loader = build_loader(cfg_for(dataset, num_workers=0, drop_last=True), rank, world, batch)
        assert loader.steps_per_epoch == per_rank // batch
        batches = take(loader, 2 * loader.steps_per_epoch)
        loader.close()
        first, second = batches[:loader.steps_per_epoch], batches[loader.steps_per_epoch:]
        assert all((b["epoch"] == 0).all() for b in first) and all((b["epoch"] == 1).all() for b in second)
        seen.update(torch.cat([b["sample_id"] for b in first]).tolist())
    assert len(seen) == world * per_rank and set(seen.values()) == {1}


def test_augmentation_is_one_per_sample_per_epoch_and_varies(dataset):
    loader = build_loader(cfg_for(dataset, num_workers=0), 0, 1, TOTAL)
    e0, e1, e2 = take(loader, 3)
    loader.close()
    by_epoch = [dict(zip(b["sample_id"].tolist(), b["aug"].tolist())) for b in (e0, e1, e2)]
    assert all(len(d) == TOTAL for d in by_epoch)
    assert all(set(d.values()) <= {0, 1, 2} for d in by_epoch)
    assert by_epoch[0] != by_epoch[1]                       # a new draw each epoch
    again = build_loader(cfg_for(dataset, num_workers=0), 0, 1, TOTAL)
    b0 = next(again)
    assert dict(zip(b0["sample_id"].tolist(), b0["aug"].tolist())) == by_epoch[0]   # deterministic
    again.close()


def test_no_shuffle_reads_in_stored_order(dataset):
    loader = build_loader(cfg_for(dataset, num_workers=0, shuffle=False), 0, 1, TOTAL)
    assert next(loader)["sample_id"].tolist() == list(range(TOTAL))
    loader.close()


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.timeout(60)
def test_resume_continues_exactly_with_other_worker_count(dataset):
    ref_loader = build_loader(cfg_for(dataset, num_workers=2), 0, 2, 3)
    reference = take(ref_loader, 20)                   # crosses epoch boundaries (20 per rank per epoch)
    ref_loader.close()

    first = build_loader(cfg_for(dataset, num_workers=2), 0, 2, 3)
    head = take(first, 7)
    state = first.global_state_dict()
    first.close()
    assert state["ranks"][0]["position"] == 21
    for workers in (0, 1):
        resumed = build_loader(cfg_for(dataset, num_workers=workers, prefetch_blocks=1), 0, 2, 3)
        resumed.load_state_dict(state)
        tail = take(resumed, 13)
        resumed.close()
        assert_batches_equal(head + tail, reference)

    # progress is counted in samples: a different batch size continues the same sample sequence
    other = build_loader(cfg_for(dataset, num_workers=0), 0, 2, 7)
    other.load_state_dict(first.state_dict())
    ids = torch.cat([b["sample_id"] for b in take(other, 3)]).tolist()
    other.close()
    assert ids == torch.cat([b["sample_id"] for b in reference[7:14]]).tolist()


def test_resume_mid_stream_after_loading_twice(dataset):
    loader = build_loader(cfg_for(dataset, num_workers=0), 0, 1, 5)
    take(loader, 3)
    state = loader.state_dict()
    after = take(loader, 4)
    loader.load_state_dict(state)                       # rewinding a live loader restarts its pipeline
    assert_batches_equal(take(loader, 4), after)
    loader.close()


def test_resume_refuses_changed_data_set(dataset, tmp_path):
    other = str(tmp_path / "other")
    make_dataset(other, [5, 5])
    state = build_loader(cfg_for(dataset, num_workers=0), 0, 1, 2).state_dict()
    loader = build_loader(cfg_for(other, num_workers=0), 0, 1, 2)
    with pytest.raises(ArgenError, match="changed since the checkpoint"):
        loader.load_state_dict(state)


def test_resume_on_other_world_size_keeps_epoch_share(dataset, caplog):
    a = build_loader(cfg_for(dataset, num_workers=0), 0, 2, 4)
    take(a, 3)
    b = build_loader(cfg_for(dataset, num_workers=0), 0, 4, 4)
    with caplog.at_level("WARNING", logger="argen.data"):
        b.load_state_dict(a.global_state_dict())
    assert "world_size" in caplog.text
    assert b.position == 6 and b.epoch == 0
    a.close()
    b.close()


def test_resume_from_older_state_version_warns_and_keeps_position(dataset, caplog):
    a = build_loader(cfg_for(dataset, num_workers=0), 0, 1, 4)
    take(a, 2)
    state = a.state_dict()
    a.close()
    b = build_loader(cfg_for(dataset, num_workers=0), 0, 1, 4)
    with caplog.at_level("WARNING", logger="argen.data"):
        b.load_state_dict(state)
    assert "not exact" not in caplog.text
    state["version"] = 1                                # written before blocks were cut at shard boundaries
    with caplog.at_level("WARNING", logger="argen.data"):
        b.load_state_dict(state)
    assert "block layout (state version 1" in caplog.text
    assert b.position == 8
    b.close()


@pytest.mark.timeout(60)
def test_mixture_ratios_and_determinism(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_dataset(a, [50, 50, 50])                       # ids 0..149
    make_dataset(b, [20, 20], first_index=1000)
    cfg = DataConfig(mixture=[DatasetSpec(a, 3.0), DatasetSpec(b, 1.0)], shuffle_buffer=16, seed=5, num_workers=2)
    loader = build_loader(cfg, 0, 1, 50)
    batches = take(loader, 40)
    loader.close()
    comp = torch.cat([b["sample_id"] >> 48 for b in batches])
    share = (comp == 1).float().mean().item()
    assert abs(share - 0.25) < 0.03, share              # 2000 draws: 3 sigma is about 0.029
    # each component still covers its own epochs exactly once
    ids_b = [int(i) & ((1 << 48) - 1) for i, c in zip(torch.cat([x["sample_id"] for x in batches]), comp) if c == 1]
    assert sorted(ids_b[:40]) == list(range(40)) and sorted(ids_b[40:80]) == list(range(40))
    for x in batches:
        sid = x["sample_id"] & ((1 << 48) - 1)
        own = torch.where(x["sample_id"] >> 48 == 1, sid + 1000, sid)
        assert x["codes"][:, 0].tolist() == [code_value(i, g) for i, g in zip(own.tolist(), x["aug"].tolist())]
    # same batches with another worker count, and after a resume
    first = build_loader(DataConfig(mixture=cfg.mixture, shuffle_buffer=16, seed=5, num_workers=0), 0, 1, 50)
    head = take(first, 9)
    state_at = first.state_dict()
    first.close()
    resumed = build_loader(DataConfig(mixture=cfg.mixture, shuffle_buffer=16, seed=5, num_workers=1), 0, 1, 50)
    resumed.load_state_dict(state_at)
    assert_batches_equal(head + take(resumed, 11), batches[:20])
    resumed.close()


def test_schedule_matches_plan_blocks():
    plans = [EpochPlan([5, 9, 4], seed=1, component=0, rank=0, world_size=1, block_size=4),
             EpochPlan([3, 3], seed=1, component=1, rank=0, world_size=1, block_size=2)]
    mix = Mixture([1, 1], seed=1, rank=0)
    refs = []
    for ref in schedule(plans, mix, 0, [0, 0], chunk=7):
        refs.append(ref)
        if len(refs) == 30:
            break
    for d in (0, 1):
        mine = [(r.epoch, r.index) for r in refs if r.component == d]
        want = [(e, b) for e in range(10) for b in range(plans[d].blocks_in(e))][:len(mine)]
        assert mine == want
        for e in range(3):                              # blocks: whole shard segments, >= block_size but the last
            sizes = [len(plans[d].block(e, b)) for b in range(plans[d].blocks_in(e))]
            assert sum(sizes) == sum(plans[d].counts) and all(x >= plans[d].block_size for x in sizes[:-1])
            shards = [s.shard for b in range(plans[d].blocks_in(e)) for s in plans[d].block(e, b).segments]
            assert len(shards) == len(set(shards))     # every shard read by one block only


@pytest.mark.timeout(60)
def test_t2i_batches_right_align_caption_features(tmp_path):
    prefix = str(tmp_path / "t2i")
    lens = {i: (0 if i % 7 == 3 else (125 if i % 5 == 0 else 1 + i % 9)) for i in range(20)}
    make_dataset(prefix, [12, 8], n_aug=1, t5_lens=lambda i: lens[i], compression="zstd")
    loader = build_loader(DataConfig(url=prefix, task="t2i", shuffle_buffer=8, num_workers=1), 0, 1, 20)
    batch = next(loader)
    loader.close()
    assert batch["caption_embs"].shape == (20, 120, 8) and batch["caption_embs"].dtype == torch.float32
    assert batch["caption_mask"].dtype == torch.bool and batch["valid"].dtype == torch.bool
    for row, i in enumerate(batch["sample_id"].tolist()):
        n = min(lens[i], 120)
        mask = batch["caption_mask"][row]
        assert mask.sum().item() == n and (n == 0 or mask[-n:].all())
        assert batch["valid"][row].item() == (lens[i] > 0)
        if n:
            want = (torch.arange(n * 8, dtype=torch.float32).reshape(n, 8) + i).to(torch.bfloat16).float()
            assert torch.equal(batch["caption_embs"][row, 120 - n:], want)   # the first n tokens, at the end
            assert (batch["caption_embs"][row, :120 - n] == 0).all()
        assert batch["codes"][row, 0].item() == code_value(i, 0)


def test_config_errors_name_the_key(dataset, tmp_path):
    with pytest.raises(ArgenError, match="shuffle_buffer"):
        load_config(DataConfig, None, ["url=x", "shuffle_buffer=0"])
    with pytest.raises(ArgenError, match=r"mixture\[1\].weight"):
        load_config(DataConfig, None, ["mixture=[{url: a}, {url: b, weight: 0}]"])
    with pytest.raises(ArgenError, match="data.url is empty"):
        build_loader(DataConfig(), 0, 1, 2)
    with pytest.raises(ArgenError, match="no manifest"):
        build_loader(DataConfig(url=str(tmp_path / "nothing")), 0, 1, 2)
    with pytest.raises(ArgenError, match="too few"):
        build_loader(cfg_for(dataset, drop_last=True), 0, 4, 16)
    with pytest.raises(ArgenError, match="t2i"):
        build_loader(cfg_for(dataset, task="t2i"), 0, 1, 2)


def test_stats_report_throughput_and_wait(dataset):
    loader = build_loader(cfg_for(dataset, num_workers=0), 0, 1, 4)
    take(loader, 5)
    s = loader.stats()
    assert s["samples"] == 20 and s["batches"] == 5 and s["samples_per_s"] > 0
    assert 0 < s["wait_fraction"] <= 1
    import time
    next(loader)
    time.sleep(0.2)                                     # the "training step": data was ready, so little wait
    next(loader)
    s = loader.stats()
    assert s["wait_fraction"] < 0.5 and s["samples"] == 28
    loader.close()
