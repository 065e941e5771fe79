"""`argen eval score`: the whole path on a tiny random-init Inception saved locally, reference statistics,
provenance, errors, and the CLIP score on a tiny random CLIP."""
import json

import numpy as np
import pytest
import torch

from argen.cli import main as argen_main
from argen.errors import ArgenError
from argen.eval.fid import feature_stats, frechet_distance
from argen.data_pipeline.storage import sha256_file
from argen.eval.inception import InceptionV3, load_inception, save_inception
from argen.eval.npz import NpzImages, save_images
from argen.eval.score import extract_features, score


def save_tiny_inception(path, seed=0):
    """A width-1/8, 75-px Inception with He-initialised convs (features neither vanish nor explode)."""
    torch.manual_seed(seed)
    net = InceptionV3(width=1 / 8, input_size=75)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return save_inception(net, path)


def _images(rng, n, size=16, shift=0):
    base = rng.integers(0, 200, size=(n, size, size, 3))
    return np.clip(base + shift, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    inc = save_tiny_inception(d / "inception-tiny.safetensors")
    ref = _images(rng, 40)
    save_images(d / "ref.npz", ref)
    save_images(d / "same.npz", ref[::-1].copy())
    save_images(d / "other.npz", _images(rng, 30, shift=60))
    return d, inc


def test_npz_roundtrip_and_streaming(tmp_path):
    rng = np.random.default_rng(1)
    x = _images(rng, 11, size=8)
    save_images(tmp_path / "a.npz", x, mu=np.arange(3.0), sigma=np.eye(3))
    data = np.load(tmp_path / "a.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (11, 8, 8, 3)
    assert np.array_equal(data["arr_0"], x)
    r = NpzImages(tmp_path / "a.npz")
    assert len(r) == 11 and [len(b) for b in r.batches(4)] == [4, 4, 3]
    assert np.array_equal(r.read_all(), x)
    mu, sigma = r.stats()
    assert np.array_equal(mu, np.arange(3.0)) and r.stats(spatial=True) is None
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ArgenError, match="uint8"):
        NpzImages(tmp_path / "bad.npz")
    with pytest.raises(ArgenError, match="no such"):
        NpzImages(tmp_path / "missing.npz")


def test_tiny_inception_loads_with_checksum(tiny):
    d, inc = tiny
    net, digest = load_inception(inc)
    assert digest == sha256_file(inc) and net.pool_dim == 256 and net.input_size == 75
    feats = extract_features(np.zeros((3, 16, 16, 3), np.uint8), net, batch_size=2)
    assert feats["pool"].shape == (3, 256) and feats["spatial"].shape == (3, 3 * 3 * 7)
    assert feats["logits"].shape == (3, 1008)


def test_score_whole_path(tiny, tmp_path, monkeypatch):
    d, inc = tiny
    monkeypatch.setenv("ARGEN_CACHE", str(tmp_path / "cache"))
    same = score(d / "same.npz", d / "ref.npz", inception=inc, batch_size=16)
    other = score(d / "other.npz", d / "ref.npz", inception=inc, batch_size=16)
    m_same, m_other = same["metrics"], other["metrics"]
    assert set(m_same) == {"fid", "sfid", "inception_score", "precision", "recall"}
    assert abs(m_same["fid"]) < 1e-6 and m_same["precision"] == 1.0 and m_same["recall"] == 1.0
    assert m_other["fid"] > 1e-3 and m_other["sfid"] > 1e-3
    assert m_same["inception_score"] >= 1.0
    assert same["evaluator"]["weights_sha256"] == sha256_file(inc)
    assert same["reference"]["sha256"] == sha256_file(d / "ref.npz")
    assert same["reference"]["fid_stats"] == "computed" and same["evaluator"]["version"]
    assert list((tmp_path / "cache").glob("eval/ref-*.npz")), "reference features are cached"
    # the cached reference gives the same numbers
    assert score(d / "other.npz", d / "ref.npz", inception=inc)["metrics"] == pytest.approx(m_other)


def test_stored_reference_statistics_win(tiny, tmp_path, monkeypatch):
    d, inc = tiny
    monkeypatch.setenv("ARGEN_CACHE", str(tmp_path / "cache"))
    net, _ = load_inception(inc)
    ref_imgs = NpzImages(d / "ref.npz").read_all()
    stats_from = extract_features(NpzImages(d / "other.npz").read_all(), net)
    mu, sigma = feature_stats(stats_from["pool"])
    save_images(tmp_path / "ref_stats.npz", ref_imgs, mu=mu, sigma=sigma)
    result = score(d / "other.npz", tmp_path / "ref_stats.npz", inception=inc)
    assert result["reference"]["fid_stats"] == "stored" and result["reference"]["sfid_stats"] == "computed"
    assert abs(result["metrics"]["fid"]) < 1e-6  # the stored stats are the samples' own
    sample_feats = extract_features(NpzImages(d / "other.npz").read_all(), net)
    ref_feats = extract_features(ref_imgs, net)
    want_sfid = frechet_distance(*feature_stats(sample_feats["spatial"]), *feature_stats(ref_feats["spatial"]))
    assert result["metrics"]["sfid"] == pytest.approx(want_sfid, rel=1e-6)


def test_score_cli_writes_json_and_paired(tiny, tmp_path, monkeypatch, capsys):
    d, inc = tiny
    monkeypatch.setenv("ARGEN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "m.json"
    assert argen_main(["eval", "score", str(d / "other.npz"), str(d / "ref.npz"), "--inception", str(inc),
                       "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert "fid" in record["metrics"] and "fid" in capsys.readouterr().out
    rng = np.random.default_rng(5)
    orig = NpzImages(d / "ref.npz").read_all()
    recon = np.clip(orig.astype(int) + rng.integers(-3, 4, orig.shape), 0, 255).astype(np.uint8)
    save_images(tmp_path / "recon.npz", recon)
    assert argen_main(["eval", "score", str(tmp_path / "recon.npz"), str(d / "ref.npz"), "--inception", str(inc),
                       "--paired"]) == 0
    paired = json.loads((tmp_path / "recon.metrics.json").read_text())["metrics"]
    assert {"rfid", "psnr", "ssim"} <= set(paired) and "fid" not in paired
    assert 35 < paired["psnr"] < 50 and 0.9 < paired["ssim"] < 1.0


def test_missing_weights_is_a_one_line_error(tiny, tmp_path, capsys):
    d, _ = tiny
    rc = argen_main(["eval", "score", str(d / "other.npz"), str(d / "ref.npz"), "--inception",
                     str(tmp_path / "nope.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.pth" in err and "pt_inception-2015-12-05" in err and "Traceback" not in err
    with pytest.raises(ArgenError, match="not an FID Inception"):
        torch.save({"foo": torch.zeros(1)}, tmp_path / "wrong.pth")
        load_inception(tmp_path / "wrong.pth")


def save_tiny_clip(path):
    """A random 2-layer CLIP with a byte-level character vocabulary, in save_pretrained layout."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest to 256+
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                      bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                      pad_token_id=vocab["<|endoftext|>"]),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def test_clip_score_tiny(tmp_path):
    from argen.eval.clip_score import ClipScorer, read_prompts
    from argen.eval.score import clip_metrics
    clip_dir = save_tiny_clip(tmp_path / "clip")
    rng = np.random.default_rng(2)
    save_images(tmp_path / "t2i.npz", _images(rng, 6, size=24))
    prompts = ["a red cube", "two dogs on grass", "a city at night", "a bowl of soup", "an old car", "a cat"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    assert read_prompts(tmp_path / "prompts.txt") == prompts
    result = clip_metrics(tmp_path / "t2i.npz", clip_dir, prompts, batch_size=4)
    value = result["metrics"]["clip_score"]
    assert -1.0 <= value <= 1.0 and np.isfinite(value) and len(result["clip"]["weights_sha256"]) == 64
    scorer = ClipScorer(clip_dir)
    sims = scorer.similarities(NpzImages(tmp_path / "t2i.npz").read_all(), prompts)
    assert value == pytest.approx(float(sims.mean()), abs=1e-5)
    # the score depends on which caption goes with which image
    assert not np.allclose(sims, scorer.similarities(NpzImages(tmp_path / "t2i.npz").read_all(), prompts[::-1]))
    with pytest.raises(ArgenError, match="huggingface-cli download"):
        ClipScorer(tmp_path / "no-clip")


def test_reconstruct_cli_then_paired_score(tiny, tmp_path, monkeypatch):
    import argen.model
    from argen.model.vq import VQ_SIZES, VQModel
    d, inc = tiny
    monkeypatch.setenv("ARGEN_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    vq = argen.model.save(VQModel(VQ_SIZES["VQ-micro"]), tmp_path / "vq", {})
    out = tmp_path / "recon.npz"
    assert argen_main(["eval", "reconstruct", str(vq), str(d / "ref.npz"), "--out", str(out),
                       "--batch-size", "16"]) == 0
    recon = NpzImages(out)
    assert recon.shape == NpzImages(d / "ref.npz").shape
    assert json.loads((tmp_path / "recon.json").read_text())["source"]["num_images"] == 40
    assert argen_main(["eval", "score", str(out), str(d / "ref.npz"), "--inception", str(inc), "--paired"]) == 0
    assert {"rfid", "psnr", "ssim"} <= set(json.loads((tmp_path / "recon.metrics.json").read_text())["metrics"])
    np.savez(tmp_path / "odd.npz", arr_0=np.zeros((2, 15, 15, 3), np.uint8))
    assert argen_main(["eval", "reconstruct", str(vq), str(tmp_path / "odd.npz"), "--out", str(out)]) == 2


def test_full_size_inception_layout():
    """The full network: ADM's feature sizes (pool 2048, sFID 17·17·7 = 2023, 1008 logits) and the parameter count
    of the FID Inception (torchvision's Inception3 without the aux head, 1008 classes), built on the meta device."""
    with torch.device("meta"):
        net = InceptionV3()
        out = net(torch.zeros(2, 256, 256, 3))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"pool": (2, 2048), "spatial": (2, 2023),
                                                          "logits": (2, 1008)}
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    keys = set(net.state_dict())
    assert {"Conv2d_1a_3x3.conv.weight", "Mixed_6d.branch1x1.bn.running_var", "Mixed_7c.branch_pool.conv.weight",
            "fc.weight", "fc.bias"} <= keys


def test_tf1_bilinear_resize():
    from argen.eval.inception import resize_bilinear_tf1
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    # TF1 (align_corners=False, no half-pixel centres) halving picks every other pixel exactly
    assert torch.equal(resize_bilinear_tf1(x, 4), x[:, :, ::2, ::2])
    assert torch.equal(resize_bilinear_tf1(x, 8), x)
    up = resize_bilinear_tf1(x, 16)
    assert torch.allclose(up[:, :, 1, 0], (x[:, :, 0, 0] + x[:, :, 1, 0]) / 2)  # source row 0.5
    assert torch.equal(up[:, :, -1, -1], x[:, :, -1, -1])  # edge clamped


def test_reconstruction_metrics_in_memory(tiny):
    from argen.eval.score import reconstruction_metrics
    d, inc = tiny
    orig = NpzImages(d / "ref.npz").read_all()
    same = reconstruction_metrics(orig, orig.copy(), inception=inc)
    assert abs(same["rfid"]) < 1e-6 and same["psnr"] == 100.0 and same["ssim"] == pytest.approx(1.0)
    noisy = np.clip(orig.astype(int) + 40, 0, 255).astype(np.uint8)
    worse = reconstruction_metrics(orig, noisy, inception=inc)
    assert worse["rfid"] > 1e-4 and worse["psnr"] < 30 and worse["weights_sha256"] == sha256_file(inc)


def test_statistics_only_reference(tiny, tmp_path, monkeypatch):
    """A reference holding only mu/sigma (pytorch-fid --save-stats style) gives FID and IS, and says what it skipped."""
    d, inc = tiny
    monkeypatch.setenv("ARGEN_CACHE", str(tmp_path / "cache"))
    net, _ = load_inception(inc)
    feats = extract_features(NpzImages(d / "ref.npz").read_all(), net)
    mu, sigma = feature_stats(feats["pool"])
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    only = score(d / "other.npz", tmp_path / "stats.npz", inception=inc)
    full = score(d / "other.npz", d / "ref.npz", inception=inc)
    assert only["metrics"]["fid"] == pytest.approx(full["metrics"]["fid"], rel=1e-6)
    assert set(only["metrics"]) == {"fid", "inception_score"}
    assert set(only["skipped"]) == {"sfid", "precision", "recall"} and "skipped" not in full
    np.savez(tmp_path / "empty.npz", other=np.zeros(3))
    with pytest.raises(ArgenError, match="neither images"):
        score(d / "other.npz", tmp_path / "empty.npz", inception=inc)
