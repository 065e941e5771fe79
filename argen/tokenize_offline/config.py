"""The typed config of `argen tokenize` (YAML + dotted overrides through argen.config.load_config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class SourceConfig:
    kind: Literal["synthetic", "imagenet_folder", "imagenet_tar", "img2dataset"] = "synthetic"
    path: str = ""                          # folder / tar / shard dir or brace pattern; local or s3://
    parquet: bool = False                   # img2dataset: read NNNNN.parquet next to each tar for captions
    caption_column: str = "caption"         # parquet column holding the caption
    num_images: int = 1000                  # synthetic: data set size
    synthetic_size: int = 0                 # synthetic: picture size (0: the largest crop the augmentation needs)
    synthetic_seed: int = 0
    limit: Optional[int] = None             # indexed sources: first N images only; img2dataset: first N shards
    shuffle_seed: Optional[int] = 0         # permutation before cutting into shards (None: keep source order)

    def validate(self) -> None:
        if self.kind != "synthetic" and not self.path:
            raise ValueError(f"path is required for source kind '{self.kind}'")
        if self.kind == "synthetic" and self.num_images < 1:
            raise ValueError("num_images must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1 (or null)")


@dataclass
class AugmentConfig:
    mode: Literal["ten_crop", "center_flip", "center"] = "ten_crop"
    crop_ranges: list[float] = field(default_factory=lambda: [1.1, 1.05])   # ten_crop only, as the reference

    def validate(self) -> None:
        if self.mode == "ten_crop":
            if not self.crop_ranges:
                raise ValueError("crop_ranges must not be empty for ten_crop")
            if any(r < 1.0 for r in self.crop_ranges):
                raise ValueError(f"crop_ranges must be >= 1.0, got {self.crop_ranges}")


@dataclass
class VQSection:
    path: str = ""                          # argen model directory (config.json + model.safetensors) of kind "vq"
    dtype: Literal["float32", "bfloat16"] = "float32"   # the reference encodes in fp32
    crops_per_forward: int = 0              # VQ forward batch in crops; 0: auto (20 on CPU, where small batches
                                            # stay in cache and run fastest; on an accelerator as many as fit in
                                            # half its free memory, at most 512)
    channels_last: bool = True              # NHWC convolutions: 1.1-1.9x on this CPU for VQ-tiny, same codes

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path is required: an argen VQ export directory (argen.model.save)")
        if self.crops_per_forward < 0:
            raise ValueError("crops_per_forward must be >= 1 (or 0 for auto)")


@dataclass
class TextSection:
    enabled: bool = False                   # encode captions with T5 (caption sources)
    t5_path: str = "pretrained_models/t5-ckpt/flan-t5-xl"
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    max_length: int = 120
    batch_size: int = 32

    def validate(self) -> None:
        if not 1 <= self.max_length <= 512:
            raise ValueError(f"max_length must be in [1, 512], got {self.max_length}")


@dataclass
class OutputSection:
    url: str = ""                           # local path or s3://bucket/prefix
    samples_per_shard: int = 1000           # indexed sources; img2dataset keeps one output shard per input tar
    # zstd: about gzip's bytes, ~5x faster for the loader to inflate; gzip: readable by the webdataset library as is
    compression: Literal["zstd", "gzip", "none"] = "zstd"

    def validate(self) -> None:
        if not self.url:
            raise ValueError("url is required (a local path or s3://bucket/prefix)")
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")


@dataclass
class TokenizeConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    vq: VQSection = field(default_factory=VQSection)
    text: TextSection = field(default_factory=TextSection)
    output: OutputSection = field(default_factory=OutputSection)
    image_size: int = 256
    images_per_batch: int = 16              # images decoded per loader batch
    num_workers: int = 2                    # image-decoding worker processes (0: decode in the main process)
    threads: int = 0                        # torch intra-op threads for VQ/T5 on CPU (0: torch's default)
    min_short_side: int = 0                 # skip images with a smaller short side (0: keep, upscale like reference)
    max_pixels: int = 1 << 28               # skip larger images (decompression bombs)
    progress: bool = True

    def validate(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.images_per_batch < 1 or self.num_workers < 0:
            raise ValueError("images_per_batch must be >= 1 and num_workers >= 0")
        if self.text.enabled and self.source.kind not in ("img2dataset", "synthetic"):
            raise ValueError(f"text.enabled needs a caption source (img2dataset or synthetic), not '{self.source.kind}'")
