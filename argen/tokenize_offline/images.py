"""Image decoding with bad-input accounting, and the reference's crops (ADM center_crop_arr, torchvision TenCrop).

`decode_image(bytes)` never raises for bad data: it returns (RGB image, conversions) or a skip reason. The crop
functions reproduce the reference pixel for pixel (PIL BOX halvings then BICUBIC resize, integer center offsets,
torchvision five_crop/ten_crop order), so codes match LlamaGen's extract_codes_c2i.py for the same VQ.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# skip reasons (manifest "skipped") and conversion kinds (manifest "converted")
EMPTY, NOT_IMAGE, TRUNCATED, CORRUPT, TOO_SMALL, TOO_LARGE, UNSUPPORTED = (
    "empty_file", "not_an_image", "truncated", "corrupt", "too_small", "too_large", "unsupported_mode")


@dataclass
class DecodePolicy:
    min_short_side: int = 0          # skip images whose short side is below this (0: keep all, upscale)
    max_pixels: int = 1 << 28        # skip images with more pixels after any JPEG draft (decompression bombs)
    draft_pixels: int = 1 << 25      # JPEGs above this decode at reduced scale (DCT draft) to bound memory/time
    crop_size: int = 256             # the largest crop the augmentation needs (for upscale accounting and drafts)


def decode_image(data: bytes, policy: DecodePolicy) -> tuple[Image.Image | None, list[str], str | None]:
    """-> (rgb_image or None, conversions applied, skip reason or None)."""
    if not data:
        return None, [], EMPTY
    conversions: list[str] = []
    old_max = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # our own limits below: a huge JPEG can still be decoded at reduced scale
        img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        if img.format == "JPEG" and w * h > policy.draft_pixels:
            target = max(policy.crop_size, 1)
            img.draft("RGB", (target, target))
            if img.size != (w, h):
                conversions.append("draft_decoded")
            w, h = img.size
        if w * h > policy.max_pixels:
            return None, [], TOO_LARGE
        img.load()
    except UnidentifiedImageError:
        return None, [], NOT_IMAGE
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return None, [], TRUNCATED if "truncat" in str(e).lower() else CORRUPT
    except Exception:  # decoders raise assorted errors on hostile files; none may stop the job
        return None, [], CORRUPT
    finally:
        Image.MAX_IMAGE_PIXELS = old_max
    try:
        img, kind = to_rgb(img)
    except Exception:
        return None, [], CORRUPT
    if img is None:
        return None, [], UNSUPPORTED
    if kind:
        conversions.append(kind)
    if min(img.size) < 1:
        return None, conversions, CORRUPT
    if policy.min_short_side and min(img.size) < policy.min_short_side:
        return None, conversions, TOO_SMALL
    if min(img.size) < policy.crop_size:
        conversions.append("upscaled")
    return img, conversions, None


def to_rgb(img: Image.Image) -> tuple[Image.Image | None, str | None]:
    """(RGB image, conversion kind) — 16-bit is scaled, not clipped; None for modes with no sensible RGB."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB"), "16bit"
    if mode == "F":
        return None, None
    kind = {"CMYK": "cmyk", "L": "grayscale", "LA": "grayscale", "1": "grayscale", "P": "palette", "PA": "palette",
            "RGBA": "alpha", "RGBa": "alpha", "YCbCr": "ycbcr", "LAB": "lab", "HSV": "hsv"}.get(mode, mode.lower())
    # Like torchvision's pil_loader (the reference): alpha is dropped, not composited.
    return img.convert("RGB"), kind


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM/LlamaGen center_crop_arr: BOX-halve while the short side >= 2*size, BICUBIC to short side = size, crop."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    y = (arr.shape[0] - size) // 2
    x = (arr.shape[1] - size) // 2
    return arr[y: y + size, x: x + size]


def _five(arr: np.ndarray, size: int) -> list[np.ndarray]:
    # torchvision five_crop order: top-left, top-right, bottom-left, bottom-right, center (center offset rounded)
    h, w = arr.shape[:2]
    cy, cx = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return [arr[:size, :size], arr[:size, w - size:], arr[h - size:, :size], arr[h - size:, w - size:],
            arr[cy: cy + size, cx: cx + size]]


FIVE_NAMES = ("tl", "tr", "bl", "br", "center")


def augmentation_names(mode: str, crop_ranges: list[float]) -> list[str]:
    if mode == "ten_crop":
        return [f"r{r:g}/{'flip-' if f else ''}{n}" for r in crop_ranges for f in (0, 1) for n in FIVE_NAMES]
    if mode == "center_flip":
        return ["center", "center-flip"]
    if mode == "center":
        return ["center"]
    raise ValueError(f"unknown augmentation mode {mode!r} (ten_crop, center_flip, center)")


def crop_sizes(image_size: int, crop_ranges: list[float]) -> list[int]:
    return [int(image_size * r) for r in crop_ranges]


def augment(img: Image.Image, image_size: int, mode: str, crop_ranges: list[float]) -> np.ndarray:
    """All augmentations of one image as uint8 (n_aug, image_size, image_size, 3), in augmentation_names order."""
    out: list[np.ndarray] = []
    if mode == "ten_crop":
        for big in crop_sizes(image_size, crop_ranges):
            arr = center_crop_arr(img, big)
            out += _five(arr, image_size)
            out += _five(np.ascontiguousarray(arr[:, ::-1]), image_size)  # ten_crop: five crops of the flipped image
    elif mode in ("center_flip", "center"):
        arr = center_crop_arr(img, image_size)
        out.append(arr)
        if mode == "center_flip":
            out.append(arr[:, ::-1])
    else:
        raise ValueError(f"unknown augmentation mode {mode!r}")
    return np.stack([np.ascontiguousarray(a) for a in out])


def to_model_input(crops_uint8):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1] with ToTensor + Normalize(0.5, 0.5)'s exact arithmetic."""
    import torch

    t = torch.as_tensor(crops_uint8).permute(0, 3, 1, 2).float().div(255)
    return t.sub(0.5).div(0.5)
