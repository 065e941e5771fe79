"""Score a sample batch against a reference batch: FID, sFID, IS, precision/recall (ADM evaluator definitions).

Reference features depend only on (reference file, weight file), so they are computed once and cached under
`$ARGEN_CACHE/eval` (default ~/.cache/argen/eval) keyed by both checksums; the watcher scores every export
against the same reference without re-reading it.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from argen import device as dev
from argen.errors import ArgenError
from argen.eval import EVALUATOR_VERSION
from argen.eval.fid import feature_stats, frechet_distance
from argen.data_pipeline.storage import sha256_file_cached
from argen.eval.inception import InceptionV3, load_inception
from argen.eval.metrics import inception_score, precision_recall
from argen.eval.npz import NpzImages, load_stats, npz_keys, sidecar_path

FEATURES = ("pool", "spatial", "logits")


def cache_dir() -> Path:
    root = os.environ.get("ARGEN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "argen"
    return Path(root) / "eval"


@torch.no_grad()
def extract_features(images: NpzImages | np.ndarray, net: InceptionV3, batch_size: int = 64,
                     device: torch.device | str = "cpu", desc: str = "features") -> dict[str, np.ndarray]:
    """Pool, spatial and logit features of uint8 N×H×W×3 images, streamed in batches."""
    if isinstance(images, np.ndarray):
        arr = images
        batches = (arr[i:i + batch_size] for i in range(0, len(arr), batch_size))
        total = len(arr)
    else:
        batches, total = images.batches(batch_size), len(images)
    out: dict[str, list[np.ndarray]] = {k: [] for k in FEATURES}
    # The features feed float64 statistics: keep convolutions in true fp32 (cuDNN's TF32 default would shift them).
    full_fp32 = torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False)
    with full_fp32, tqdm(total=total, desc=desc, unit="img", disable=None) as bar:
        for batch in batches:
            feats = net(torch.tensor(batch, device=device, dtype=torch.float32))
            for k in FEATURES:
                out[k].append(feats[k].float().cpu().numpy())
            bar.update(len(batch))
    return {k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in out.items()}


def reference_features(ref_path: str | Path, net: InceptionV3, weights_sha: str, *, batch_size: int = 64,
                       device: torch.device | str = "cpu", use_cache: bool = True) -> dict:
    """Reference pool features (for precision/recall), logits, and FID/sFID statistics (stored ones win).

    A statistics-only file (mu/sigma and optionally mu_s/sigma_s, no arr_0, e.g. pytorch-fid's --save-stats) gives
    FID (and sFID) but no precision/recall: `pool` is None then.
    """
    keys = npz_keys(ref_path)
    ref_sha = sha256_file_cached(ref_path)
    stored, stored_s = load_stats(ref_path), load_stats(ref_path, spatial=True)
    if "arr_0" not in keys:
        if stored is None:
            raise ArgenError(f"reference {ref_path} has neither images (arr_0) nor statistics (mu, sigma)")
        return {"pool": None, "mu": stored[0], "sigma": stored[1],
                "mu_s": stored_s[0] if stored_s else None, "sigma_s": stored_s[1] if stored_s else None,
                "stats_source": "stored", "stats_source_s": "stored" if stored_s else "absent",
                "sha256": ref_sha, "num_images": None, "image_size": None}
    ref = NpzImages(ref_path)
    cache = cache_dir() / f"ref-{ref_sha[:16]}-{weights_sha[:16]}.npz"
    if use_cache and cache.is_file():
        with np.load(cache) as data:
            feats = {k: data[k] for k in data.files}
    else:
        raw = extract_features(ref, net, batch_size, device, desc=f"reference {Path(ref_path).name}")
        mu, sigma = feature_stats(raw["pool"])
        mu_s, sigma_s = feature_stats(raw["spatial"])
        feats = {"pool": raw["pool"], "logits": raw["logits"], "mu": mu, "sigma": sigma, "mu_s": mu_s,
                 "sigma_s": sigma_s}
        if use_cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}.npz")
            np.savez(tmp, **feats)
            os.replace(tmp, cache)
    # ADM uses the ref batch's stored statistics (ImageNet train for VIRTUAL_imagenet256_labeled.npz) when present.
    feats["stats_source"] = "stored" if stored else "computed"
    feats["stats_source_s"] = "stored" if stored_s else "computed"
    if stored:
        feats["mu"], feats["sigma"] = stored
    if stored_s:
        feats["mu_s"], feats["sigma_s"] = stored_s
    feats["sha256"], feats["num_images"], feats["image_size"] = ref_sha, len(ref), list(ref.shape[1:3])
    return feats


def score(samples_path: str | Path, ref_path: str | Path, *, inception: str | Path | None = None,
          batch_size: int = 64, device: torch.device | str | None = None, use_cache: bool = True,
          is_split: int = 5000, k: int = 3, paired: bool = False) -> dict:
    """All class-conditional metrics of a sample batch against a reference batch, with provenance.

    `paired`: the samples are reconstructions of the reference images in the same order (tokenizer evaluation):
    the FID is reported as `rfid` and PSNR/SSIM are added.
    """
    start = time.time()
    device = device or dev.default_device()
    net, weights_sha = load_inception(inception, device)
    samples = NpzImages(samples_path)
    if len(samples) < k + 1:
        raise ArgenError(f"{samples_path} holds {len(samples)} images; scoring needs at least {k + 1}")
    ref = reference_features(ref_path, net, weights_sha, batch_size=batch_size, device=device, use_cache=use_cache)
    if ref["mu"].shape[0] != net.pool_dim:
        raise ArgenError(f"reference {ref_path} statistics are {ref['mu'].shape[0]}-d but the network gives "
                         f"{net.pool_dim}-d features")
    feats = extract_features(samples, net, batch_size, device, desc=f"samples {Path(samples_path).name}")
    mu, sigma = feature_stats(feats["pool"])
    metrics = {"fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"])}
    skipped = {}
    if ref["mu_s"] is not None:
        metrics["sfid"] = frechet_distance(*feature_stats(feats["spatial"]), ref["mu_s"], ref["sigma_s"])
    else:
        skipped["sfid"] = "the reference holds no images and no mu_s/sigma_s"
    metrics["inception_score"] = inception_score(feats["logits"], split_size=is_split)
    if ref["pool"] is not None:
        metrics["precision"], metrics["recall"] = precision_recall(ref["pool"], feats["pool"], k=k, device=device)
    else:
        skipped["precision"] = skipped["recall"] = "the reference holds statistics only, no images"
    if paired and ref["pool"] is None:
        raise ArgenError(f"--paired needs the original images in {ref_path} (arr_0)")
    if paired:
        metrics.update(paired_metrics(samples, NpzImages(ref_path), batch_size))
        metrics["rfid"] = metrics.pop("fid")
    protocol = None
    side = sidecar_path(samples_path)
    if side.is_file():
        try:
            protocol = json.loads(side.read_text())
        except json.JSONDecodeError:
            protocol = None
    return {
        "metrics": metrics,
        **({"skipped": skipped} if skipped else {}),
        "samples": {"path": str(samples_path), "num_images": len(samples), "image_size": list(samples.shape[1:3]),
                    "protocol": protocol},
        "reference": {"path": str(ref_path), "name": Path(ref_path).name, "sha256": ref["sha256"],
                      "num_images": ref["num_images"], "image_size": ref["image_size"],
                      "fid_stats": ref["stats_source"], "sfid_stats": ref["stats_source_s"]},
        "evaluator": evaluator_record(net, weights_sha, inception, is_split=is_split, k=k),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(time.time() - start, 2),
    }


def paired_metrics(recon: NpzImages, orig: NpzImages, batch_size: int = 256) -> dict:
    """PSNR/SSIM of reconstructions against originals, image by image."""
    from argen.eval.metrics import psnr, ssim
    if recon.shape != orig.shape:
        raise ArgenError(f"paired scoring needs equal shapes, got {recon.shape} (samples) and {orig.shape} (reference)")
    n, p_sum, s_sum = 0, 0.0, 0.0
    for a, b in zip(recon.batches(batch_size), orig.batches(batch_size)):
        p_sum += psnr(a, b) * len(a)
        s_sum += ssim(a, b) * len(a)
        n += len(a)
    return {"psnr": p_sum / n, "ssim": s_sum / n}


def reconstruction_metrics(originals: np.ndarray, reconstructions: np.ndarray, *, inception: str | Path | None = None,
                           batch_size: int = 64, device: torch.device | str | None = None) -> dict:
    """rFID, PSNR and SSIM of in-memory uint8 N×H×W×3 batches (for a tokenizer trainer's periodic check; the
    files-based route is `argen eval reconstruct` + `argen eval score --paired`)."""
    from argen.eval.fid import fid_from_features
    from argen.eval.metrics import psnr, ssim
    if originals.shape != reconstructions.shape:
        raise ArgenError(f"originals {originals.shape} and reconstructions {reconstructions.shape} differ in shape")
    device = device or dev.default_device()
    net, weights_sha = load_inception(inception, device)
    a = extract_features(originals, net, batch_size, device, desc="originals")["pool"]
    b = extract_features(reconstructions, net, batch_size, device, desc="reconstructions")["pool"]
    return {"rfid": fid_from_features(b, a), "psnr": psnr(reconstructions, originals),
            "ssim": ssim(reconstructions, originals), "num_images": len(originals),
            "evaluator_version": EVALUATOR_VERSION, "weights_sha256": weights_sha}


def clip_metrics(samples_path: str | Path, clip_dir: str | Path, prompts: list[str], *, batch_size: int = 64,
                 device: torch.device | str | None = None, eval_res: int = 256, cycle: bool = False) -> dict:
    """CLIP score of a t2i sample batch: image i was generated for prompt i (for prompt i % M with `cycle`, the
    layout of `argen eval sample --captions` with M captions)."""
    from argen.eval.clip_score import ClipScorer
    samples = NpzImages(samples_path)
    if not prompts:
        raise ArgenError("no prompts for the CLIP score")
    if cycle:
        prompts = [prompts[i % len(prompts)] for i in range(len(samples))]
    if len(prompts) < len(samples):
        raise ArgenError(f"{len(samples)} images but only {len(prompts)} prompts")
    scorer = ClipScorer(clip_dir, device or dev.default_device(), eval_res=eval_res)
    value = scorer.score(samples.batches(batch_size), prompts, len(samples))
    return {"metrics": {"clip_score": value},
            "clip": {"path": str(clip_dir), "weights_sha256": scorer.sha256, "eval_res": eval_res,
                     "prefix": "A photo depicts ", "num_images": len(samples)}}


def evaluator_record(net: InceptionV3, weights_sha: str, weights_path, **params) -> dict:
    from argen.eval.inception import default_weights_path
    return {"version": EVALUATOR_VERSION, "network": "inception-v3-fid (pool_3; mixed_6/conv[:7]; unbiased logits)",
            "weights": str(weights_path or default_weights_path()), "weights_sha256": weights_sha,
            "input": f"tf1-bilinear {net.input_size}px, (x-128)/128", "width": net.width, **params}


def default_output(samples_path: str | Path) -> Path:
    p = Path(samples_path)
    return p.with_name((p.name[:-4] if p.name.endswith(".npz") else p.name) + ".metrics.json")
