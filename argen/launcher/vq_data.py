"""Image batches for tokenizer training: synthetic demo images, class folders, or WebDataset image shards.

Augmentation is the reference's: the shorter side is resized (BOX halving while >= 2x the target, then BICUBIC) to a
random integer in [S, ceil(S / crop_min)] (crop_min 0.8 -> [256, 320] at S = 256), then a random S x S crop and a
random horizontal flip; pixels go to [-1, 1].

Exact resume without loader state: for the map-style sources (synthetic, folder) sample number p of the run (over all
ranks) is image perm_epoch[p % N] of the epoch p // N, augmented with an RNG seeded by (seed, p), and rank r takes
positions step*G + r*B ... + B - 1 of each step. Restarting at step s therefore produces exactly the batches the
uninterrupted run would have seen, whatever the number of loader workers. WebDataset shards are streams: each
(rank, worker) reads its own shards in a per-epoch seeded order and, on resume, skips the samples it already
delivered without decoding them (exact for the same world size and worker count).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
from PIL import Image

from argen.errors import ArgenError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG", ".JPG", ".PNG")


@dataclass
class VQDataConfig:
    source: Literal["synthetic", "folder", "wds"] = "synthetic"
    path: str = ""              # folder: root with one sub-folder per class; wds: shard URL(s), brace patterns ok
    image_size: int = 256
    crop_min: float = 0.8       # shorter side resized to a random size in [S, ceil(S / crop_min)]
    flip: bool = True
    synthetic_count: int = 10000
    synthetic_seed: int = 0
    num_workers: int = 2
    image_keys: str = "jpg;jpeg;png;webp"

    def validate(self) -> None:
        if self.source in ("folder", "wds") and not self.path:
            raise ValueError(f"source '{self.source}' needs data.path")
        if not 0 < self.crop_min <= 1:
            raise ValueError("crop_min must be in (0, 1]")
        if self.image_size < 8:
            raise ValueError("image_size must be >= 8")


def _resize_shorter(img: Image.Image, target: int) -> Image.Image:
    while min(*img.size) >= 2 * target:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = target / min(*img.size)
    return img.resize(tuple(max(target, round(x * scale)) for x in img.size), resample=Image.BICUBIC)


def random_crop_flip(img: Image.Image, size: int, rng: np.random.Generator, crop_min: float = 0.8,
                     flip: bool = True) -> torch.Tensor:
    """The reference's random-resized crop + flip -> (3, size, size) float in [-1, 1]."""
    img = img.convert("RGB")
    hi = math.ceil(size / crop_min)
    img = _resize_shorter(img, int(rng.integers(size, hi + 1)))
    w, h = img.size
    x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    arr = np.asarray(img.crop((x0, y0, x0 + size, y0 + size)), dtype=np.float32)
    if flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1) / 127.5 - 1.0


def center_crop(img: Image.Image, size: int) -> torch.Tensor:
    """ADM's center_crop_arr: resize the shorter side to `size`, center crop -> (3, size, size) in [-1, 1]."""
    img = _resize_shorter(img.convert("RGB"), size)
    w, h = img.size
    x0, y0 = (w - size) // 2, (h - size) // 2
    arr = np.asarray(img.crop((x0, y0, x0 + size, y0 + size)), dtype=np.float32)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1.0


class _Images:
    """A finite, indexable image collection."""

    def __len__(self) -> int: ...

    def load(self, i: int) -> Image.Image: ...


class SyntheticImages(_Images):
    def __init__(self, count: int, size: int, seed: int):
        self.count, self.size, self.seed = count, size, seed

    def __len__(self) -> int:
        return self.count

    def load(self, i: int) -> Image.Image:
        from argen.data_pipeline.synthetic import synthetic_image
        return synthetic_image(i, self.size, self.seed)


class FolderImages(_Images):
    """ImageFolder layout: ROOT/<class>/<image>; classes and files sorted, so indices are stable."""

    def __init__(self, root: str):
        r = Path(root)
        if not r.is_dir():
            raise ArgenError(f"data.path: image folder not found: {root}")
        files = [p for p in sorted(r.rglob("*")) if p.suffix in IMAGE_EXTS and p.is_file()]
        if not files:
            raise ArgenError(f"data.path: no images ({', '.join(IMAGE_EXTS[:5])}) under {root}")
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> Image.Image:
        try:
            with Image.open(self.files[i]) as im:
                return im.convert("RGB")
        except OSError as e:
            raise ArgenError(f"cannot read image {self.files[i]}: {e}") from None


class PositionDataset(torch.utils.data.Dataset):
    """Item p = augmented image for global sample position p (see module docstring)."""

    def __init__(self, images: _Images, cfg: VQDataConfig, seed: int):
        self.images, self.cfg, self.seed = images, cfg, seed
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:  # positions are unbounded; the sampler decides
        return 2 ** 62

    def _index(self, p: int) -> int:
        n = len(self.images)
        epoch = p // n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch, 7]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[p % n])

    def __getitem__(self, p: int) -> torch.Tensor:
        img = self.images.load(self._index(p))
        return random_crop_flip(img, self.cfg.image_size, np.random.default_rng([self.seed, p]), self.cfg.crop_min,
                                self.cfg.flip)


class StepBatchSampler(torch.utils.data.Sampler):
    def __init__(self, global_batch: int, rank: int, world: int, start_step: int):
        self.B = global_batch // world
        self.G, self.rank, self.start = global_batch, rank, start_step

    def __iter__(self) -> Iterator[list[int]]:
        s = self.start
        while True:
            base = s * self.G + self.rank * self.B
            yield list(range(base, base + self.B))
            s += 1


def expand_urls(path: str) -> list[str]:
    """Brace patterns (`shard-{000000..000009}.tar`), comma lists, or a directory/prefix holding *.tar."""
    import braceexpand  # installed with webdataset
    urls: list[str] = []
    for part in path.split(","):
        urls += list(braceexpand.braceexpand(part.strip()))
    if len(urls) == 1 and not urls[0].endswith(".tar"):
        from argen.data_pipeline import storage
        base = urls[0].rstrip("/")
        urls = [storage.join(base, n) for n in sorted(storage.list_names(base)) if n.endswith(".tar")]
    if not urls:
        raise ArgenError(f"data.path: no .tar shards found at {path}")
    return urls


class WebDatasetImages(torch.utils.data.IterableDataset):
    def __init__(self, cfg: VQDataConfig, seed: int, rank: int, world: int, per_rank_batch: int, start_step: int):
        self.cfg, self.seed, self.rank, self.world = cfg, seed, rank, world
        self.B, self.start_step = per_rank_batch, start_step
        self.urls = expand_urls(cfg.path)
        if len(self.urls) < world:
            raise ArgenError(f"data.path: {len(self.urls)} shard(s) cannot feed {world} ranks; write more shards")

    def _samples(self, urls: list[str]) -> Iterator[dict]:
        import webdataset as wds
        from argen.data_pipeline import storage
        for url in urls:
            with storage.open_url(url, "rb") as stream:
                yield from wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"url": url, "stream": stream}]))

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes whole batches from workers in turn, starting with worker 0. Worker w of a loader
        # started at step s plays the part of worker (w + s) % nw of the original run, which delivered batches
        # (w + s) % nw, + nw, ... of the whole stream.
        wid = (wid + self.start_step) % nw
        done_batches = max(0, -(-(self.start_step - wid) // nw)) if self.start_step > wid else 0
        skip = done_batches * self.B
        keys = self.cfg.image_keys.split(";")
        mine = self.urls[self.rank::self.world]
        mine = mine[wid::nw] or mine[wid % len(mine)::len(mine)]
        count, epoch = 0, 0
        while True:
            order = np.random.default_rng([self.seed, epoch, self.rank, wid]).permutation(len(mine))
            for sample in self._samples([mine[i] for i in order]):
                if count < skip:
                    count += 1
                    continue
                key = next((k for k in keys if k in sample), None)
                if key is None:
                    count += 1
                    continue
                rng = np.random.default_rng([self.seed, self.rank, wid, count])
                count += 1
                try:
                    img = Image.open(io.BytesIO(sample[key]))
                    yield random_crop_flip(img, self.cfg.image_size, rng, self.cfg.crop_min, self.cfg.flip)
                except OSError:
                    continue  # a corrupt image in a web-scale shard is skipped, not fatal
            epoch += 1


def make_loader(cfg: VQDataConfig, global_batch: int, rank: int, world: int, start_step: int,
                seed: int) -> Iterator[torch.Tensor]:
    """An endless iterator of (B_rank, 3, S, S) batches starting at `start_step`."""
    if global_batch % world:
        raise ArgenError(f"train.global_batch_size={global_batch} is not divisible by the {world} ranks")
    per_rank = global_batch // world
    common = dict(num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                  prefetch_factor=2 if cfg.num_workers > 0 else None)
    if cfg.source == "wds":
        ds = WebDatasetImages(cfg, seed, rank, world, per_rank, start_step)
        return iter(torch.utils.data.DataLoader(ds, batch_size=per_rank, **common))
    images: _Images = (SyntheticImages(cfg.synthetic_count, cfg.image_size, cfg.synthetic_seed)
                       if cfg.source == "synthetic" else FolderImages(cfg.path))
    ds = PositionDataset(images, cfg, seed)
    sampler = StepBatchSampler(global_batch, rank, world, start_step)
    return iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler, **common))


def fixed_batch(cfg: VQDataConfig, n: int) -> torch.Tensor:
    """A fixed, center-cropped evaluation batch (the first n images of the source) for PSNR and grids."""
    if cfg.source == "wds":
        ds = WebDatasetImages(cfg, 0, 0, 1, n, 0)
        it = iter(ds)
        return torch.stack([next(it) for _ in range(n)])
    images = (SyntheticImages(cfg.synthetic_count, cfg.image_size, cfg.synthetic_seed + 1000)
              if cfg.source == "synthetic" else FolderImages(cfg.path))
    return torch.stack([center_crop(images.load(i % len(images)), cfg.image_size) for i in range(n)])
