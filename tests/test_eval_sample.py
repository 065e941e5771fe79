"""`argen eval sample`: the .npz format, both protocols, GPU-count independence of the balanced one, resume,
and the reference pixel conversion. Uses a tiny GPT and a tiny VQ built here."""
import json
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import argen.model
from argen.cli import main as argen_main
from argen.errors import ArgenError
from argen.eval.sample import SampleProtocol, Sampler, batch_seed, to_uint8
from argen.model.gpt import GPT, GPTConfig
from argen.model.vq import VQ_SIZES, VQModel


def save_tiny_models(root, *, gpt_name="GPT-test", step=None):
    """A 1-layer GPT over a 4×4 grid with 256 codes and a VQ-micro (2× downsampling): 8-px images."""
    torch.manual_seed(0)
    cfg = GPTConfig(name=gpt_name, vocab_size=256, n_layer=1, n_head=2, dim=16, block_size=16, num_classes=10)
    gpt = GPT(cfg)
    torch.nn.init.normal_(gpt.output.weight, std=0.5)  # the zero-initialised head would sample uniformly
    vq = VQModel(VQ_SIZES["VQ-micro"])
    gpt_dir = argen.model.save(gpt, root / "gpt", {"step": step} if step is not None else {})
    vq_dir = argen.model.save(vq, root / "vq", {})
    return gpt_dir, vq_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def _proto(**kw):
    base = dict(protocol="balanced", num=10, batch_size=4, cfg_scale=2.0, image_size_eval=12, precision="fp32")
    base.update(kw)
    return SampleProtocol(**base)


def _run_ranks(models, proto, out, world):
    """Run `world` ranks as threads (each with its own model copy) joined by a real barrier."""
    gpt, vq = models
    samplers = [Sampler(gpt, vq, precision="fp32") for _ in range(world)]
    bar = threading.Barrier(world)
    errors = []

    def body(rank):
        try:
            samplers[rank].run(proto, out, rank=rank, world=world, barrier=bar.wait if world > 1 else None)
        except BaseException as e:  # surfaced below; a dead rank would otherwise hang the barrier
            errors.append(e)
            bar.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return np.load(out)["arr_0"]


def test_balanced_npz_format_and_protocol_record(models, tmp_path):
    out = tmp_path / "s.npz"
    imgs = _run_ranks(models, _proto(), out, world=1)
    assert imgs.dtype == np.uint8 and imgs.shape == (10, 12, 12, 3)
    assert list(np.load(out).keys()) == ["arr_0"]
    record = json.loads((tmp_path / "s.json").read_text())
    p = record["protocol"]
    assert p["protocol"] == "balanced" and p["cfg_scale"] == 2.0 and p["top_k"] == 0 and p["seed"] == 0
    assert p["image_size"] == 8 and p["image_size_eval"] == 12 and p["resize"] == "bicubic"
    assert p["num_classes"] == 10 and record["shape"] == [10, 12, 12, 3]
    assert not (tmp_path / "s.npz.parts").exists()


def test_balanced_is_independent_of_world_size_and_seeded(models, tmp_path):
    one = _run_ranks(models, _proto(), tmp_path / "w1.npz", world=1)
    two = _run_ranks(models, _proto(), tmp_path / "w2.npz", world=2)
    three = _run_ranks(models, _proto(), tmp_path / "w3.npz", world=3)
    assert np.array_equal(one, two) and np.array_equal(one, three)
    other = _run_ranks(models, _proto(seed=1), tmp_path / "s1.npz", world=1)
    assert not np.array_equal(one, other)
    assert batch_seed(0, 1) != batch_seed(0, 2) != batch_seed(1, 1)


def test_balanced_labels_and_seed_per_batch(models, monkeypatch, tmp_path):
    calls = []
    import argen.model.generate as gen
    real = gen.generate

    def spy(model, cond, **kw):
        calls.append((cond.tolist(), kw["seed"]))
        return real(model, cond, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    _run_ranks(models, _proto(num=10, batch_size=4), tmp_path / "l.npz", world=1)
    assert [c[0] for c in calls] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]  # i % num_classes
    assert [c[1] for c in calls] == [batch_seed(0, b) for b in range(3)]


def test_balanced_resumes_after_a_crash(models, tmp_path, monkeypatch):
    gpt, vq = models
    full = _run_ranks(models, _proto(), tmp_path / "full.npz", world=1)  # 3 batches of 4 for 10 images
    out, parts = tmp_path / "r.npz", tmp_path / "r.npz.parts"
    seeds = []
    real = Sampler._images

    def crash_on_third_batch(self, p, cond, mask, seed):
        seeds.append(seed)
        if len(seeds) == 3:
            raise RuntimeError("node died")
        return real(self, p, cond, mask, seed)

    monkeypatch.setattr(Sampler, "_images", crash_on_third_batch)
    with pytest.raises(RuntimeError, match="node died"):
        Sampler(gpt, vq, precision="fp32").run(_proto(), out)
    assert sorted(f.name for f in parts.glob("batch-*.npy")) == ["batch-00000000.npy", "batch-00000001.npy"]
    assert not out.exists()
    seeds.clear()
    monkeypatch.setattr(Sampler, "_images", lambda self, p, cond, mask, seed: seeds.append(seed) or
                        real(self, p, cond, mask, seed))
    ident = json.loads((parts / "protocol.json").read_text())
    resumed = _run_ranks(models, _proto(), out, world=1)
    assert seeds == [batch_seed(0, 2)] and np.array_equal(resumed, full)  # only the missing batch was sampled
    # finished batches of other weights (or other settings) are never reused
    parts.mkdir()
    (parts / "protocol.json").write_text(json.dumps({**ident, "model": "sha of another export"}))
    np.save(parts / "batch-00000001.npy", np.zeros((4, 12, 12, 3), np.uint8))
    seeds.clear()
    assert np.array_equal(_run_ranks(models, _proto(), out, world=1), full) and len(seeds) == 3


def test_reference_protocol_interleaves_ranks(models, tmp_path, monkeypatch):
    seen = {}
    real = Sampler._images

    def spy(self, p, cond, mask, seed):
        imgs = real(self, p, cond, mask, seed)
        # tag each image with its label so positions can be checked after packing
        imgs[:, 0, 0, 0] = cond.cpu().numpy().astype(np.uint8)
        seen.setdefault(threading.current_thread().name, []).append(cond.tolist())
        return imgs

    monkeypatch.setattr(Sampler, "_images", spy)
    imgs = _run_ranks(models, _proto(protocol="reference", num=14, batch_size=4), tmp_path / "ref.npz", world=2)
    assert imgs.shape == (14, 12, 12, 3)
    per_rank = sorted(seen.values())
    assert all(len(v) == 2 for v in per_rank)  # ceil(14 / (4·2)) = 2 steps per rank
    record = json.loads((tmp_path / "ref.json").read_text())["protocol"]
    assert record["protocol"] == "reference" and record["world_size"] == 2
    # Image i of step s on rank r sits at position s·8 + i·2 + r (the reference's index = i·world + rank + total).
    labels = imgs[:, 0, 0, 0].tolist()

    def matches(steps, r):
        return all(labels[s * 8 + i * 2 + r] == steps[s][i] for s in range(2) for i in range(4) if s * 8 + i * 2 + r < 14)

    ranks = [[r for r in range(2) if matches(steps, r)] for steps in per_rank]
    assert sorted(sum(ranks, [])) == [0, 1]


def test_reference_pixel_conversion():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 1.2]).view(1, 1, 1, 6).expand(1, 3, 6, 6).contiguous()
    u = to_uint8(x, None, "none")
    assert u.shape == (1, 6, 6, 3)
    assert u[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255, 255]  # uint8(clamp(127.5x + 128))
    big = torch.rand(2, 3, 24, 24) * 2 - 1
    want = torch.clamp(127.5 * F.interpolate(big, size=(16, 16), mode="bicubic") + 128, 0, 255).to(torch.uint8)
    assert np.array_equal(to_uint8(big, 16, "bicubic"), want.permute(0, 2, 3, 1).numpy())
    assert not np.array_equal(to_uint8(big, 16, "bicubic-aa"), to_uint8(big, 16, "bicubic"))


def test_cli_sample_and_errors(models, tmp_path, capsys):
    gpt, vq = models
    out = tmp_path / "cli.npz"
    assert argen_main(["eval", "sample", str(gpt), "--vq", str(vq), "--out", str(out), "--num", "5",
                       "--batch-size", "3", "--image-size-eval", "0"]) == 0
    assert np.load(out)["arr_0"].shape == (5, 8, 8, 3)
    record = json.loads((tmp_path / "cli.json").read_text())["protocol"]
    assert record["cfg_scale"] == 1.5 and record["precision"] == "fp32"  # unknown size: the DDP default
    assert argen_main(["eval", "sample", str(gpt), "--vq", str(gpt), "--out", str(out), "--num", "2"]) == 2
    assert "not a VQ" in capsys.readouterr().err
    assert argen_main(["eval", "sample", str(gpt), "--vq", str(vq), "--out", str(out), "--num", "0"]) == 2
    with pytest.raises(ArgenError, match=".npz"):
        Sampler(gpt, vq, precision="fp32").run(_proto(), tmp_path / "x.png")


def test_protocol_config_files_and_flag_overrides(models, tmp_path):
    from pathlib import Path

    from argen.eval.cli import build_parser, protocol_from_args
    configs = Path(__file__).resolve().parent.parent / "configs"
    args = build_parser().parse_args(["sample", "ckpt", "--vq", "v", "--out", "o.npz",
                                      "--config", str(configs / "eval-c2i-reference.yaml"), "--num", "64"])
    proto = protocol_from_args(args)
    assert proto.protocol == "reference" and proto.num == 64 and proto.top_k == 0 and proto.batch_size == 32
    assert proto.image_size_eval == 256 and proto.resize == "bicubic" and proto.cfg_scale is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("protocol: balanced\ntopk: 5\n")
    args = build_parser().parse_args(["sample", "c", "--vq", "v", "--out", "o.npz", "--config", str(bad)])
    with pytest.raises(ArgenError, match="topk"):
        protocol_from_args(args)


def test_t2i_sampling_with_captions_then_clip_score(tmp_path, capsys):
    """t2i: caption i % M for image i, recorded in the JSON, and the CLIP score reads the prompts from it."""
    from tests.test_eval_score import save_tiny_clip
    torch.manual_seed(0)
    cfg = GPTConfig(name="GPT-t2i-test", vocab_size=256, n_layer=1, n_head=2, dim=16, block_size=16,
                    model_type="t2i", caption_dim=8, caption_len=4, cls_token_num=4)
    gpt = argen.model.save(GPT(cfg), tmp_path / "gpt", {})
    vq = argen.model.save(VQModel(VQ_SIZES["VQ-micro"]), tmp_path / "vq", {})
    caps = tmp_path / "caps.npz"
    mask = np.array([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=bool)  # right-aligned captions
    np.savez(caps, features=np.random.default_rng(0).normal(size=(3, 4, 8)).astype(np.float32), mask=mask,
             prompts=np.array(["a red cube", "a dog", "a city at night"]))
    out = tmp_path / "t2i.npz"
    assert argen_main(["eval", "sample", str(gpt), "--vq", str(vq), "--out", str(out), "--num", "5",
                       "--batch-size", "2", "--captions", str(caps), "--cfg-scale", "3", "--image-size-eval",
                       "32"]) == 0
    assert np.load(out)["arr_0"].shape == (5, 32, 32, 3)
    assert json.loads((tmp_path / "t2i.json").read_text())["protocol"]["captions"] == str(caps)
    clip = save_tiny_clip(tmp_path / "clip")
    assert argen_main(["eval", "score", str(out), "--clip", str(clip)]) == 0
    record = json.loads((tmp_path / "t2i.metrics.json").read_text())
    assert -1 <= record["metrics"]["clip_score"] <= 1 and record["clip"]["prompts"] == str(caps)
    assert argen_main(["eval", "sample", str(gpt), "--vq", str(vq), "--out", str(out), "--num", "2"]) == 2
    assert "--captions" in capsys.readouterr().err


def _dist_sample(rank, gpt, vq, out):
    from argen.eval.cli import main as eval_main
    assert eval_main(["sample", gpt, "--vq", vq, "--out", out, "--num", "6", "--batch-size", "2",
                      "--image-size-eval", "0", "--cfg-scale", "2"]) == 0


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_two_gloo_ranks_match_one_process(models, tmp_path):
    """The real launch path (dist_env.init, gloo barrier) gives the single-process batch, image for image."""
    from tests.dist_utils import run_distributed
    gpt, vq = models
    run_distributed(_dist_sample, 2, str(gpt), str(vq), str(tmp_path / "d.npz"), timeout=240)
    assert argen_main(["eval", "sample", str(gpt), "--vq", str(vq), "--out", str(tmp_path / "s.npz"), "--num", "6",
                       "--batch-size", "2", "--image-size-eval", "0", "--cfg-scale", "2"]) == 0
    two, one = np.load(tmp_path / "d.npz")["arr_0"], np.load(tmp_path / "s.npz")["arr_0"]
    assert two.shape == (6, 8, 8, 3) and np.array_equal(two, one)
    assert json.loads((tmp_path / "d.json").read_text())["protocol"]["world_size"] == 2
