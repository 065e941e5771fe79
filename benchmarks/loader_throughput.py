"""Loader throughput: the reference's one-.npy-per-sample layout vs argen's shard loader (local disk and S3).

    .venv/bin/python benchmarks/loader_throughput.py [--samples 5000] [--batch 64] [--workers 2] [--seconds 4] [--rounds 3]
        [--compression zstd none gzip] [--shuffle-buffer 1024] [--no-s3] [--no-gpt] [--gpt-batch 8] [--gpt-steps 3]

Prints, from one run on the same synthetic codes (256 px ten-crop: 10 augmentations x 256 tokens per sample):
- reference: LlamaGen's layout (`{i}.npy` int64 (1, 10, 256) + `{i}.npy` label per sample, as extract_codes_c2i.py
  writes it) through a map-style Dataset (random augmentation column per access) and torch DataLoader (shuffle, drop_last);
- argen local: build_loader over WebDataset shards (1000 samples each) on local disk, once per --compression;
- argen s3: the same shards on the S3 test server (needs `bash ci/infra/s3-up.sh`; skipped if it is not up);
- the data wait of a GPT-B c2i training step on this CPU (argen.model.gpt), from loader.stats()["wait_fraction"].
Both loaders use the same number of worker processes and batch size; they run in alternating rounds (the machine is
shared) and each loader's best round is reported, with all rounds listed. Page cache is warm for both (files were just
written), which favours the reference: on a cold network file system its per-file opens cost far more.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from argen.data_pipeline import shard_format as sf  # noqa: E402
from argen.data_pipeline.loader import DataConfig, build_loader  # noqa: E402

N_AUG, TOKENS, VOCAB, PER_SHARD = 10, 256, 16384, 1000


class ReferenceCodes(torch.utils.data.Dataset):
    """LlamaGen dataset/imagenet.py CustomDataset for a '...flip...' code dir: one file pair per sample."""

    def __init__(self, feature_dir: str, label_dir: str, n: int):
        self.feature_dir, self.label_dir, self.n = feature_dir, label_dir, n
        self.flip = True

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        features = np.load(os.path.join(self.feature_dir, f"{index}.npy"))
        if self.flip:
            aug_idx = torch.randint(low=0, high=features.shape[1], size=(1,)).item()
            features = features[:, aug_idx]
        labels = np.load(os.path.join(self.label_dir, f"{index}.npy"))
        return torch.from_numpy(features), torch.from_numpy(labels)


def write_data(root: str, n: int, s3_prefix: str | None, compressions: list[str]) -> dict[str, tuple[str, str | None]]:
    """The reference files under root, and per compression the same samples as shards: {compression: (local, s3)}."""
    rng = np.random.default_rng(0)
    fdir, ldir = os.path.join(root, "imagenet256_codes_flip"), os.path.join(root, "imagenet256_labels")
    os.makedirs(fdir)
    os.makedirs(ldir)
    out = {c: (os.path.join(root, f"shards-{c}"), f"{s3_prefix}-{c}" if s3_prefix else None) for c in compressions}
    infos: dict[str, list] = {p: [] for pair in out.values() for p in pair if p}
    for s in range(-(-n // PER_SHARD)):
        writers = [(p, sf.ShardWriter(p, s, compression=c)) for c, pair in out.items() for p in pair if p]
        for i in range(s * PER_SHARD, min(n, (s + 1) * PER_SHARD)):
            codes = rng.integers(0, VOCAB, size=(N_AUG, TOKENS))
            label = int(rng.integers(0, 1000))
            np.save(os.path.join(fdir, f"{i}.npy"), codes[None].astype(np.int64))
            np.save(os.path.join(ldir, f"{i}.npy"), np.array([label], dtype=np.int64))
            members = sf.encode_sample(i, codes, label=label, codebook_size=VOCAB)
            for _, w in writers:
                w.write(members)
        for p, w in writers:
            infos[p].append(w.commit())
    for c, pair in out.items():
        for prefix in pair:
            if prefix:
                sf.write_manifest(prefix, sf.Manifest(tokenizer={"id": "bench"}, codebook_size=VOCAB, image_size=256,
                                                      grid=16, augmentations=[f"crop{k}" for k in range(N_AUG)],
                                                      conditioning="class", num_classes=1000, shards=infos[prefix],
                                                      compression=c))
    return out


def timed(batches, seconds: float, batch: int) -> tuple[float, float]:
    """(seconds to the first batch, samples/s after it, over at least `seconds`)."""
    t0 = time.perf_counter()
    next(batches)
    t1 = time.perf_counter()
    n = 0
    while time.perf_counter() - t1 < seconds:
        for _ in range(10):
            next(batches)
        n += 10
    return t1 - t0, n * batch / (time.perf_counter() - t1)


def bench_reference(root: str, n: int, batch: int, workers: int, seconds: float) -> tuple[float, float]:
    ds = ReferenceCodes(os.path.join(root, "imagenet256_codes_flip"), os.path.join(root, "imagenet256_labels"), n)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                     persistent_workers=True)

    def forever():
        while True:
            yield from dl

    gen = forever()
    out = timed(gen, seconds, batch)
    gen.close()
    del dl
    return out


def bench_argen(url: str, batch: int, workers: int, seconds: float, shuffle_buffer: int) -> tuple[float, float]:
    loader = build_loader(DataConfig(url=url, num_workers=workers, shuffle_buffer=shuffle_buffer, prefetch_blocks=2),
                          0, 1, batch)
    out = timed(loader, seconds, batch)
    loader.close()
    return out


def gpt_b_wait(url: str, batch: int, workers: int, steps: int) -> tuple[float, float]:
    from argen.model.gpt import GPT, gpt_config, gpt_loss

    model = GPT(gpt_config("GPT-B", image_size=256, vocab_size=VOCAB))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    loader = build_loader(DataConfig(url=url, num_workers=workers, shuffle_buffer=2048), 0, 1, batch)

    def step(b):
        logits = model(b["codes"], b["labels"])
        loss = gpt_loss(logits, b["codes"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(next(loader))           # warm-up: first batch includes pipeline start-up, first step allocator warm-up
    loader.stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(next(loader))
    step_s = (time.perf_counter() - t0) / steps
    wait = loader.stats()["wait_fraction"]
    loader.close()
    return step_s, wait


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0, help="steady-state time measured per loader and round")
    ap.add_argument("--shuffle-buffer", type=int, default=1024, help="argen's data.shuffle_buffer")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each loader counts")
    ap.add_argument("--compression", choices=sf.COMPRESSIONS, nargs="+", default=["zstd", "none", "gzip"],
                    help="shard compressions to measure (zstd is the tokenizer default; the first one is also used "
                         "for the GPT-B data-wait measurement)")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--no-gpt", action="store_true")
    ap.add_argument("--gpt-batch", type=int, default=8)
    ap.add_argument("--gpt-steps", type=int, default=3)
    args = ap.parse_args()

    s3_prefix = None
    if not args.no_s3:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from s3_fixture import _client, answers, delete_bucket, server_env

        env = server_env()
        if env.get("AWS_ENDPOINT_URL") and answers(env["AWS_ENDPOINT_URL"]):
            os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
            bucket = f"argen-bench-{uuid.uuid4().hex[:8]}"
            _client(env).create_bucket(Bucket=bucket)
            s3_prefix = f"s3://{bucket}/imagenet256"
        else:
            print("S3 server not reachable: skipping the S3 measurement (bash ci/infra/s3-up.sh)")
    root = tempfile.mkdtemp(prefix="argen-loader-bench-")
    try:
        t0 = time.perf_counter()
        data = write_data(root, args.samples, s3_prefix, args.compression)
        print(f"data: {args.samples} samples of ({N_AUG}, {TOKENS}) codes, written in {time.perf_counter() - t0:.1f}s;"
              f" shards of {PER_SHARD}; batch {args.batch}, {args.workers} workers, {os.cpu_count()} CPUs")
        # Rounds alternate the reference and argen so that load from other jobs hits both alike; best round counts.
        runs: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
        for _ in range(args.rounds):
            runs["reference"].append(bench_reference(root, args.samples, args.batch, args.workers, args.seconds))
            for c, (local, remote) in data.items():
                runs[f"local {c}"].append(bench_argen(local, args.batch, args.workers, args.seconds,
                                                      args.shuffle_buffer))
                if remote:
                    runs[f"S3 {c}"].append(bench_argen(remote, args.batch, args.workers, args.seconds,
                                                       args.shuffle_buffer))
        best = {k: (min(r[0] for r in v), max(r[1] for r in v)) for k, v in runs.items()}
        ref = best["reference"][1]
        for k, (first, rate) in best.items():
            name = ("reference (.npy per sample, map-style Dataset)" if k == "reference"
                    else f"argen loader, {k} shards")
            line = f"{name:48s} {rate:8.0f} samples/s   first batch {first:5.2f}s"
            if k != "reference":
                line += f"   {rate / ref:5.1f}x reference"
            if k.startswith("S3 "):
                line += f", local/S3 = {best['local ' + k[3:]][1] / rate:.2f}"
            print(line + f"   (rounds: {', '.join(f'{r[1]:.0f}' for r in runs[k])})")
        if not args.no_gpt:
            local = data[args.compression[0]][0]
            step_s, wait = gpt_b_wait(local, args.gpt_batch, args.workers, args.gpt_steps)
            print(f"GPT-B c2i 256px training step on this CPU (batch {args.gpt_batch}, {args.compression[0]} shards): "
                  f"{step_s:.2f} s/step, data wait {100 * wait:.3f}% of step time")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if s3_prefix:
            delete_bucket(server_env(), s3_prefix.split("/")[2])


if __name__ == "__main__":
    main()
