"""`argen tokenize`: sources with deliberately broken inputs, codes equal to the VQ codes of the reference crops,
T5 features, part splits, resume, and the CLI. Tiny models (VQ-micro at 16 px, a 1-layer random T5)."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import argen.model as M
from argen.config import load_config
from argen.data_pipeline import shard_format as sf
from argen.data_pipeline.synthetic import synthetic_image
from argen.errors import ArgenError
from argen.model.vq import VQ_SIZES, VQModel
from argen.tokenize_offline import images as im
from argen.tokenize_offline.config import TokenizeConfig
from argen.tokenize_offline.job import Part, TokenizeJob, resolve_part

SIZE = 16  # VQ-micro: downsample 2 -> 8x8 grid


# ----------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory) -> str:
    """A 1-layer random-init T5 encoder and a sentencepiece tokenizer trained here, saved with save_pretrained."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    d = tmp_path_factory.mktemp("t5") / "tiny-t5"
    words = ("a photo of the red blue green circle square triangle dog cat on grass with sky and some light "
             "background colour in shape").split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 3
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=60,
                                   model_type="unigram", hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    tok = T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())], extra_ids=0)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_kv=4, num_heads=2, num_layers=1, d_ff=32, pad_token_id=0,
                   eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(d)
    return str(d)


def make_cfg(vq_dir: str, out: str, *overrides: str) -> TokenizeConfig:
    base = [f"vq.path={vq_dir}", f"output.url={out}", f"image_size={SIZE}", "threads=1", "num_workers=0",
            "progress=false", "images_per_batch=4"]
    return load_config(TokenizeConfig, None, base + list(overrides))


def run(cfg: TokenizeConfig, part: Part = Part(0, 1, "single")):
    job = TokenizeJob(cfg, log=lambda m: None)
    stats = job.run_part(part)
    return job, stats


def dataset(prefix: str) -> tuple[sf.Manifest, dict[str, sf.Sample]]:
    m, samples = sf.read_dataset(prefix, verify=True)
    out = {}
    for s in samples:
        assert s.key not in out, f"duplicate sample {s.key}"
        out[s.key] = s
    return m, out


def ref_center_crop_arr(pil_image, image_size):
    """ADM / LlamaGen center_crop_arr, as published."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def ref_ten_crop(img: Image.Image, size: int) -> list[Image.Image]:
    """torchvision TenCrop with PIL operations: 5 crops, then the 5 crops of the mirrored image."""
    w, h = img.size

    def five(x):
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        return [x.crop((0, 0, size, size)), x.crop((w - size, 0, w, size)), x.crop((0, h - size, size, h)),
                x.crop((w - size, h - size, w, h)), x.crop((left, top, left + size, top + size))]

    return five(img) + five(ImageOps.mirror(img))


def ref_codes(vq, img: Image.Image, ranges=(1.1, 1.05), mode="ten_crop") -> np.ndarray:
    """The codes of one image's crops in one forward pass (compared with a job run at crops_per_forward = n_aug,
    since conv rounding depends on the batch size and can flip argmin near-ties)."""
    crops = []
    if mode == "ten_crop":
        for r in ranges:
            crops += ref_ten_crop(ref_center_crop_arr(img, int(SIZE * r)), SIZE)
    else:
        c = ref_center_crop_arr(img, SIZE)
        crops = [c, ImageOps.mirror(c)] if mode == "center_flip" else [c]
    x = torch.stack([torch.from_numpy(np.asarray(c, dtype=np.uint8).copy()).permute(2, 0, 1) for c in crops])
    x = (x.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        return vq.encode(x).reshape(len(crops), -1).numpy()


def jpeg(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=95, **kw)
    return b.getvalue()


def png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def broken_class_tree(root: Path) -> dict:
    """3 synsets with good images and every kind of bad input; returns the expected accounting."""
    good = {}
    k = 0
    for c, syn in enumerate(["n01", "n02", "n03"]):
        d = root / syn
        d.mkdir(parents=True)
        for j in range(3):
            img = synthetic_image(k, 20 + 4 * j, seed=1)
            name = f"img{j}.jpg" if j % 2 == 0 else f"img{j}.png"
            (d / name).write_bytes(jpeg(img) if name.endswith(".jpg") else png(img))
            good[f"{syn}/{name}"] = c
            k += 1
    ok = jpeg(synthetic_image(99, 24))
    (root / "n01" / "x_empty.jpg").write_bytes(b"")
    (root / "n01" / "x_trunc.jpg").write_bytes(ok[: len(ok) // 2])
    (root / "n01" / "x_garbage.jpg").write_bytes(os.urandom(300))
    (root / "n02" / "y_cmyk.jpg").write_bytes(jpeg(synthetic_image(5, 24).convert("CMYK")))
    (root / "n02" / "y_gray.png").write_bytes(png(synthetic_image(6, 24).convert("L")))
    deep = (np.asarray(synthetic_image(7, 24).convert("L"), dtype=np.uint16) * 257)
    (root / "n02" / "y_deep16.png").write_bytes(png(Image.fromarray(deep)))
    (root / "n03" / "z_palette.png").write_bytes(png(synthetic_image(8, 24).convert("P")))
    (root / "n03" / "z_alpha.png").write_bytes(png(synthetic_image(9, 24).convert("RGBA")))
    (root / "n03" / "z_tiny.png").write_bytes(png(synthetic_image(10, 5)))
    (root / "n03" / "z_huge.png").write_bytes(png(Image.new("RGB", (400, 400), (9, 9, 9))))
    (root / "n03" / "notes.txt").write_text("not an image, ignored like torchvision ImageFolder does")
    return {"good": good, "skipped": {"empty_file": 1, "truncated": 1, "not_an_image": 1, "too_small": 1,
                                      "too_large": 1},
            "converted": {"cmyk": 1, "grayscale": 1, "16bit": 1, "palette": 1, "alpha": 1}, "stored": 9 + 5}


BAD_POLICY = ("min_short_side=8", "max_pixels=100000")


# ----------------------------------------------------------------------------------------------- sources

def test_class_folder_with_broken_files(tmp_path, vq_dir):
    exp = broken_class_tree(tmp_path / "train")
    cfg = make_cfg(vq_dir, str(tmp_path / "out"), "source.kind=imagenet_folder", f"source.path={tmp_path / 'train'}",
                   "output.samples_per_shard=5", "num_workers=2", "vq.crops_per_forward=20", *BAD_POLICY)
    job, stats = run(cfg)
    m = job.finalize()
    m2, samples = dataset(str(tmp_path / "out"))
    assert m2 == m and m.num_samples == exp["stored"] == len(samples)
    assert m.skipped == exp["skipped"]
    assert {k: m.converted.get(k) for k in exp["converted"]} == exp["converted"]
    assert m.source["classes"] == ["n01", "n02", "n03"] and m.num_classes == 3
    assert m.codes_shape == (20, 64) and m.grid == 8 and m.n_aug == 20 and len(m.shards) == 4  # 19 inputs / 5
    assert m.source["ignored_non_image_files"] == 1
    # keys are the ImageFolder index in (synset, file name) order; stored codes = VQ codes of the reference crops
    files = sorted(p.relative_to(tmp_path / "train").as_posix() for p in (tmp_path / "train").rglob("*")
                   if p.is_file() and p.suffix in (".jpg", ".png"))
    vq = M.load(vq_dir)
    for key, s in samples.items():
        rel = files[int(key)]
        assert s.label == ["n01", "n02", "n03"].index(rel.split("/")[0])
        assert s.codes.dtype == np.uint16
        if rel in exp["good"]:
            img = Image.open(tmp_path / "train" / rel).convert("RGB")
            np.testing.assert_array_equal(s.codes, ref_codes(vq, img))
    assert sum(r in exp["good"] for r in (files[int(k)] for k in samples)) == 9
    # 16-bit input is scaled to 8 bits (not clipped to white): same codes as its 8-bit original
    deep_key = sf.sample_key(files.index("n02/y_deep16.png"))
    gray8 = synthetic_image(7, 24).convert("L").convert("RGB")
    np.testing.assert_array_equal(samples[deep_key].codes, ref_codes(vq, gray8))


def _ilsvrc_tar(folder: Path, path: Path, corrupt_class: str | None = "n04") -> None:
    with tarfile.open(path, "w") as outer:
        for syn in sorted(p.name for p in folder.iterdir()):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for f in sorted((folder / syn).iterdir()):
                    inner.add(f, arcname=f.name)
            info = tarfile.TarInfo(f"{syn}.tar")
            info.size = len(buf.getvalue())
            outer.addfile(info, io.BytesIO(buf.getvalue()))
        if corrupt_class:
            junk = os.urandom(2048)
            info = tarfile.TarInfo(f"{corrupt_class}.tar")
            info.size = len(junk)
            outer.addfile(info, io.BytesIO(junk))


def test_ilsvrc_tar_equals_class_folder(tmp_path, vq_dir):
    exp = broken_class_tree(tmp_path / "train")
    _ilsvrc_tar(tmp_path / "train", tmp_path / "ILSVRC2012_img_train.tar")
    common = ("output.samples_per_shard=6", *BAD_POLICY)
    job, _ = run(make_cfg(vq_dir, str(tmp_path / "tar-out"), "source.kind=imagenet_tar",
                          f"source.path={tmp_path / 'ILSVRC2012_img_train.tar'}", *common))
    m = job.finalize()
    assert m.source["classes"] == ["n01", "n02", "n03", "n04"]           # sorted synset order, broken one included
    assert m.skipped == {**exp["skipped"], "unreadable_source": 1}
    job, _ = run(make_cfg(vq_dir, str(tmp_path / "dir-out"), "source.kind=imagenet_folder",
                          f"source.path={tmp_path / 'train'}", *common))
    job.finalize()
    _, from_tar = dataset(str(tmp_path / "tar-out"))
    _, from_dir = dataset(str(tmp_path / "dir-out"))
    assert sorted(from_tar) == sorted(from_dir) and len(from_tar) == exp["stored"]
    for k in from_dir:
        assert from_tar[k].label == from_dir[k].label
        np.testing.assert_array_equal(from_tar[k].codes, from_dir[k].codes)


def _img2dataset_shards(root: Path, parquet: bool = True) -> dict:
    """Two good-ish img2dataset shards (jpg/txt/json) with caption problems, and one truncated shard."""
    root.mkdir(parents=True)
    captions = {}
    rows = []
    for s in range(3):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for i in range(4):
                key = f"{s:05d}{i:04d}"
                cap = {0: "A RED circle on GRASS, https://example.com/x.jpg", 1: "   ", 2: None,
                       3: "a blue square with sky"}[i]
                members = {"jpg": jpeg(synthetic_image(10 * s + i, 22)),
                           "json": json.dumps({"key": key, "status": "success"}).encode()}
                if cap is not None:
                    members["txt"] = cap.encode()
                if s == 1 and i == 3:
                    members.pop("jpg")                              # img2dataset failure rows have no image
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
                captions[key] = cap
                rows.append({"key": key, "top_caption": f"a photo of a dog number {i}" if s == 0 else None})
        data = buf.getvalue()
        if s == 2:
            data = data[: len(data) // 2 + 700]                        # truncated mid-shard: unreadable source
        (root / f"{s:05d}.tar").write_bytes(data)
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([r for r in rows if r["key"].startswith("00000")]),
                       root / "00000.parquet")
    return captions


def test_img2dataset_captions_and_t5_features(tmp_path, vq_dir, t5_dir):
    from argen.model.text_encoder import T5TextEncoder, clean_caption

    _img2dataset_shards(tmp_path / "laion")
    cfg = make_cfg(vq_dir, str(tmp_path / "out"), "source.kind=img2dataset", f"source.path={tmp_path / 'laion'}",
                   "augment.mode=center_flip", "text.enabled=true", f"text.t5_path={t5_dir}", "text.dtype=bfloat16")
    job, _ = run(cfg)
    m = job.finalize()
    m2, samples = dataset(str(tmp_path / "out"))
    assert m.conditioning == "caption" and m.codes_shape == (2, 64) and m.augmentations == ["center", "center-flip"]
    assert m.t5 == {"model": t5_dir, "dim": 16, "dtype": "bfloat16", "max_length": 120}
    assert m.skipped.get("unreadable_source") == 1 and m.skipped.get("missing_image") == 1
    assert m.skipped.get("no_caption", 0) >= 2  # blank and missing captions (shards 0 and 1)
    assert [s.name for s in m.shards] == ["shard-000000.tar.zst", "shard-000001.tar.zst", "shard-000002.tar.zst"]
    enc = T5TextEncoder(t5_dir, dtype=torch.bfloat16)
    vq = M.load(vq_dir)
    for key, s in samples.items():
        assert s.caption == clean_caption(s.caption) and s.caption  # stored cleaned, never empty
        feats = enc.encode([s.caption])[0]
        assert s.t5.dtype == torch.bfloat16 and s.t5.shape == feats.shape  # valid length (EOS included), no padding
        assert s.t5.shape[0] == len(enc.tokenizer(s.caption)["input_ids"])
        torch.testing.assert_close(s.t5.float(), feats.float(), atol=2e-2, rtol=2e-2)
    # captions come from the parquet column when asked
    cfg = make_cfg(vq_dir, str(tmp_path / "out-pq"), "source.kind=img2dataset", f"source.path={tmp_path / 'laion'}",
                   "augment.mode=center", "source.parquet=true", "source.caption_column=top_caption",
                   "source.limit=1", "vq.crops_per_forward=1")
    job, _ = run(cfg)
    job.finalize()
    _, pq_samples = dataset(str(tmp_path / "out-pq"))
    assert {s.caption for s in pq_samples.values()} == {f"a photo of a dog number {i}" for i in range(4)}
    first = pq_samples["000000000"]
    img = Image.open(io.BytesIO(jpeg(synthetic_image(0, 22)))).convert("RGB")
    np.testing.assert_array_equal(first.codes, ref_codes(vq, img, mode="center"))


def test_missing_t5_is_a_clear_error(tmp_path, vq_dir):
    from argen.model.text_encoder import check_t5_dir

    with pytest.raises(ArgenError, match="not found.*never downloads"):
        check_t5_dir(tmp_path / "flan-t5-xl")
    (tmp_path / "flan-t5-xl").mkdir()
    (tmp_path / "flan-t5-xl" / "config.json").write_text("{}")
    with pytest.raises(ArgenError, match="missing: model.safetensors.*spiece.model or tokenizer.json"):
        check_t5_dir(tmp_path / "flan-t5-xl")


# ----------------------------------------------------------------------------------------------- scale-out

def test_two_parts_plus_finalize_equal_one_job(tmp_path, vq_dir, monkeypatch):
    import argen.device

    import argen.tokenize_offline.job as job_mod

    tuned, sized = [], []
    monkeypatch.setattr(argen.device, "keep_freed_cpu_memory", lambda: tuned.append(1) or True)
    auto = job_mod.auto_crops_per_forward
    monkeypatch.setattr(job_mod, "auto_crops_per_forward", lambda *a: sized.append(a) or auto(*a))
    common = ("source.num_images=30", "output.samples_per_shard=8", "augment.mode=center_flip")
    one, stats = run(make_cfg(vq_dir, str(tmp_path / "one"), *common))
    assert tuned, "a CPU part tunes the allocator before its first forward"
    assert stats["written"] == 4 and len(sized) == 1, "one batch shape per part, chosen before any forward"
    m_one = one.finalize()
    cfg = make_cfg(vq_dir, str(tmp_path / "two"), *common)
    job, stats = run(cfg, Part(1, 2, "flags"))
    assert stats["written"] == 2  # units 1 and 3 of 0..3
    with pytest.raises(ArgenError, match="2 of 4 shards are not done.*0, 2"):
        job.finalize()
    _, again = run(cfg, Part(1, 2, "flags"))
    assert again["written"] == 0 and again["resumed"] == 2
    run(cfg, Part(0, 2, "flags"))
    m_two = TokenizeJob(cfg, log=lambda m: None).finalize()
    assert [(s.name, s.sha256, s.num_samples) for s in m_two.shards] == \
           [(s.name, s.sha256, s.num_samples) for s in m_one.shards]
    assert m_two.num_samples == 30 and not (tmp_path / "two" / "_work").exists()
    # finished data set: a rerun does nothing; another config at the same place is refused
    _, done = run(cfg)
    assert done.get("complete")
    with pytest.raises(ArgenError, match="different config"):
        run(make_cfg(vq_dir, str(tmp_path / "two"), "source.num_images=31", "output.samples_per_shard=8",
                     "augment.mode=center_flip"))


def test_resolve_part_sources():
    assert resolve_part(2, 5) == Part(2, 5, "flags")
    env = {"SLURM_ARRAY_TASK_ID": "13", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10",
           "RANK": "1", "WORLD_SIZE": "2"}
    assert resolve_part(environ=env) == Part(3, 4, "slurm_array")
    assert resolve_part(environ={"RANK": "1", "WORLD_SIZE": "2"}) == Part(1, 2, "torchrun")
    assert resolve_part(environ={}) == Part(0, 1, "single")
    with pytest.raises(ArgenError, match="out of range"):
        resolve_part(3, 3)
    with pytest.raises(ArgenError, match="go together"):
        resolve_part(1, None)


# ----------------------------------------------------------------------------------------------- units

def test_decode_conversions_and_reasons():
    pol = im.DecodePolicy(crop_size=16)
    arr16 = np.array([[0, 32768], [65535, 257]], dtype=np.uint16)
    img, conv, skip = im.decode_image(png(Image.fromarray(arr16)), pol)
    assert skip is None and "16bit" in conv
    assert np.asarray(img)[..., 0].tolist() == [[0, 128], [255, 1]]
    assert im.decode_image(b"", pol)[2] == "empty_file"
    assert im.decode_image(b"hello", pol)[2] == "not_an_image"
    assert im.decode_image(png(Image.new("RGB", (4, 4))), im.DecodePolicy(min_short_side=8))[2] == "too_small"
    assert im.augmentation_names("ten_crop", [1.1])[5] == "r1.1/flip-tl"
    big = jpeg(Image.new("RGB", (400, 240), (200, 10, 10)))
    img, conv, skip = im.decode_image(big, im.DecodePolicy(crop_size=16, draft_pixels=10_000, max_pixels=20_000))
    assert skip is None and "draft_decoded" in conv and 16 <= min(img.size) < 240  # huge JPEG: DCT-scaled decode
    assert im.decode_image(png(Image.new("RGB", (400, 240))), im.DecodePolicy(max_pixels=20_000))[2] == "too_large"


def test_codebook_over_uint16_is_refused(tmp_path):
    cfg_big = VQ_SIZES["VQ-micro"]
    import dataclasses

    big = dataclasses.replace(cfg_big, codebook_size=70000)
    M.save(VQModel(big), tmp_path / "vq-big")
    with pytest.raises(ArgenError, match="does not fit uint16"):
        TokenizeJob(make_cfg(str(tmp_path / "vq-big"), str(tmp_path / "o")))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from argen.cli import main

    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"vq:\n  path: {tmp_path / 'no-vq'}\noutput:\n  url: {tmp_path / 'o'}\n")
    assert main(["tokenize", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("argen tokenize: error:") and "no-vq" in err and len(err.splitlines()) == 1
    assert main(["tokenize", str(cfg), "output.samples_per_shrd=3"]) == 2
    assert "did you mean 'samples_per_shard'" in capsys.readouterr().err


def test_caption_cleaning_and_t5_truncation(t5_dir):
    from argen.model.text_encoder import T5TextEncoder, clean_caption

    assert clean_caption("A RED Circle!!! see https://x.com/a.jpg @bob &amp; <b>more</b>") == "a red circle! see more"
    assert clean_caption("“Quoted” — text 中文 192.168.0.1 IMG_1234.JPG") == '"quoted" - text'
    assert clean_caption(None) == "" and clean_caption("   https://only.a/url ") == ""
    enc = T5TextEncoder(t5_dir, dtype=torch.float16, max_length=120)
    long, short = enc.encode(["a red dog " * 100, "a dog"])
    assert long.shape == (120, 16) and long.dtype == torch.float16          # truncated to 120 tokens (EOS kept)
    assert short.shape[0] == len(enc.tokenizer("a dog")["input_ids"]) < 120  # not padded


def test_vanished_input_is_skipped_and_io_errors_are_retried(tmp_path, vq_dir, monkeypatch):
    from argen.tokenize_offline import job as job_mod

    broken_class_tree(tmp_path / "train")
    cfg = make_cfg(vq_dir, str(tmp_path / "out"), "source.kind=imagenet_folder", f"source.path={tmp_path / 'train'}",
                   "augment.mode=center", *BAD_POLICY)
    job = TokenizeJob(cfg, log=lambda m: None)
    job.load_index()
    (tmp_path / "train" / "n01" / "img0.jpg").unlink()          # gone after indexing: skipped, counted
    real, calls = job_mod.src.read_item_bytes, {"n": 0}

    def flaky(item, index, root):
        calls["n"] += 1
        if calls["n"] in (3, 4):                                  # a transient storage error, twice
            raise ConnectionError("connection reset by peer")
        return real(item, index, root)

    monkeypatch.setattr(job_mod.src, "read_item_bytes", flaky)
    monkeypatch.setattr(job_mod.time, "sleep", lambda s: None)
    job.run_part(Part(0, 1, "single"))
    m = job.finalize()
    assert m.skipped["unreadable_source"] == 1 and m.num_samples == 13

    def down(item, index, root):
        raise ConnectionError("S3 is down")

    monkeypatch.setattr(job_mod.src, "read_item_bytes", down)
    cfg2 = make_cfg(vq_dir, str(tmp_path / "out2"), "source.kind=imagenet_folder", f"source.path={tmp_path / 'train'}",
                    "augment.mode=center")
    with pytest.raises(ConnectionError):                          # not silently skipped: the job stops, rerun resumes
        TokenizeJob(cfg2, log=lambda m: None).run_part(Part(0, 1, "single"))


def test_keep_freed_cpu_memory_serves_large_blocks_from_the_heap():
    """After keep_freed_cpu_memory (what a CPU tokenize part calls first) a 64 MiB block comes from the heap, not
    from a fresh mmap that every forward would page-fault in again; run in a child so this process is untouched."""
    import subprocess
    import sys

    probe = r"""
import ctypes, sys
from argen.device import keep_freed_cpu_memory
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def mmapped_during_alloc():
    n = libc.mallinfo2().hblks
    p = libc.malloc(64 << 20)
    n = libc.mallinfo2().hblks - n
    libc.free(p)
    return n
before = mmapped_during_alloc()
assert keep_freed_cpu_memory() and keep_freed_cpu_memory()   # takes effect, idempotent
print(before, mmapped_during_alloc())
"""
    libc = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION")
    assert libc, "these test machines run glibc"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "ARGEN_KEEP_MALLOC": ""}).stdout.split()
    assert out == ["1", "0"], out


def test_untuned_allocator_is_reported(tmp_path, vq_dir, monkeypatch):
    import argen.device

    monkeypatch.setattr(argen.device, "keep_freed_cpu_memory", lambda: False)
    logs = []
    TokenizeJob(make_cfg(vq_dir, str(tmp_path / "o"), "source.num_images=4"), log=logs.append).run_part(
        Part(0, 1, "single"))
    assert any("allocator thresholds not set" in m for m in logs), logs


def test_auto_crops_per_forward_fits_the_accelerator():
    from argen.model.vq import vq_config
    from argen.tokenize_offline.job import auto_crops_per_forward

    vq16 = vq_config("VQ-16")
    assert auto_crops_per_forward(vq16, 256, None) == 20                         # CPU
    assert auto_crops_per_forward(vq16, 256, 139 << 30) == 370                   # H200: half of 139 GiB / ~201 MB
    assert auto_crops_per_forward(vq16, 128, 139 << 30) == 512                   # capped
    assert auto_crops_per_forward(vq16, 256, 1 << 30) == 2
    assert auto_crops_per_forward(vq16, 256, 1 << 20) == 1                       # never zero
