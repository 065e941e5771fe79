"""The HTTP server: many concurrent clients, PNG output, t2i prompts, the concurrency limit, deadlines, bad input."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import argen
from argen.errors import ArgenError
from argen.model import save
from argen.model.vq import VQModel, vq_config
from argen.serve import Engine
from argen.serve.server import ServeApp, make_server
from argen.serve.text import right_align
from tests.test_serve import tiny_gpt

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]


class Client:
    def __init__(self, server):
        host, port = server.server_address[:2]
        self.base = f"http://{host}:{port}"

    def request(self, method: str, path: str, body=None, raw: bytes | None = None, timeout: float = 60):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def post(self, body, **kw):
        status, headers, payload = self.request("POST", "/v1/generate", body, **kw)
        return status, json.loads(payload)


def serve(app):
    server = make_server(app, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return server


@pytest.fixture(scope="module")
def gpt():
    return tiny_gpt("c2i", vocab_size=256)  # VQ-micro's codebook: 256 codes, 2x downsampling -> 8x8 px images


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(1)
    return VQModel(vq_config("VQ-micro")).eval()


@pytest.fixture(scope="module")
def c2i_server(gpt, vq):
    engine = Engine(gpt, max_batch=8)
    app = ServeApp(engine, vq=vq, max_concurrency=64, timeout_s=60, max_images=4)
    server = serve(app)
    yield server, app
    server.shutdown()
    server.server_close()
    engine.close()


def test_many_concurrent_clients_get_their_own_codes(c2i_server, gpt):
    server, _ = c2i_server
    client = Client(server)
    bodies = [{"class_labels": [i % 10] * (1 + i % 3), "seed": i, "cfg_scale": 1.0 + (i % 4), "top_k": [0, 30][i % 2],
               "top_p": [1.0, 0.9][i % 3 == 0]} for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(client.post, bodies))
    for body, (status, out) in zip(bodies, replies):
        assert status == 200, out
        ref = argen.generate(gpt, torch.tensor(body["class_labels"]), seed=body["seed"], cfg_scale=body["cfg_scale"],
                             top_k=body["top_k"], top_p=body["top_p"])
        assert out["codes"] == ref.tolist()
        assert out["seed"] == body["seed"] and out["grid"] == [4, 4]


def test_png_output(c2i_server):
    from PIL import Image
    client = Client(c2i_server[0])
    status, out = client.post({"class_labels": [1, 2], "format": "png", "seed": 3})
    assert status == 200, out
    imgs = [Image.open(io.BytesIO(base64.b64decode(b))) for b in out["images"]]
    assert [im.size for im in imgs] == [(8, 8), (8, 8)] and imgs[0].mode == "RGB"
    status, headers, png = client.request("GET", "/v1/image?class_label=4&seed=3&cfg_scale=2")
    assert status == 200 and headers["Content-Type"] == "image/png" and headers["X-Seed"] == "3"
    assert Image.open(io.BytesIO(png)).size == (8, 8)


def test_info_and_health(c2i_server):
    client = Client(c2i_server[0])
    status, _, body = client.request("GET", "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, body = client.request("GET", "/v1/info")
    info = json.loads(body)
    assert info["model_type"] == "c2i" and info["num_classes"] == 10 and info["png"] and not info["prompts"]
    assert info["defaults"]["cfg_scale"] == 4.0


@pytest.mark.parametrize("body, status, msg", [
    ({"class_labels": [10]}, 400, "unknown class 10"),
    ({"class_labels": [-1]}, 400, "unknown class -1"),
    ({"class_labels": []}, 400, "empty"),
    ({"class_labels": ["cat"]}, 400, "integers"),
    ({"class_labels": [1] * 5}, 400, "at most 4"),
    ({}, 400, "missing 'class_labels'"),
    ({"class_labels": [1], "top_p": 1.5}, 400, "'top_p' = 1.5 is out of range"),
    ({"class_labels": [1], "top_p": 0}, 400, "'top_p'"),
    ({"class_labels": [1], "temperature": 0}, 400, "'temperature'"),
    ({"class_labels": [1], "top_k": 257}, 400, "'top_k'"),
    ({"class_labels": [1], "top_k": 2.5}, 400, "integer"),
    ({"class_labels": [1], "cfg_scale": -1}, 400, "'cfg_scale'"),
    ({"class_labels": [1], "cfg_scale": "high"}, 400, "must be a number"),
    ({"class_labels": [1], "seed": -5}, 400, "'seed'"),
    ({"class_labels": [1], "cfg_schedule": "cosine"}, 400, "cfg_schedule"),
    ({"class_labels": [1], "format": "jpeg"}, 400, "'format'"),
    ({"class_labels": [1], "topk": 5}, 400, "did you mean 'top_k'"),
    ({"prompts": ["a cat"]}, 400, "class-conditional"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_requests_get_clear_400s(c2i_server, body, status, msg):
    got, out = Client(c2i_server[0]).post(body)
    assert got == status and msg in out["error"], out


def test_malformed_http(c2i_server):
    client = Client(c2i_server[0])
    status, _, body = client.request("POST", "/v1/generate", raw=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    status, _, body = client.request("GET", "/v1/nothing")
    assert status == 404
    status, _, body = client.request("GET", "/v1/image?class_label=x")
    assert status == 400 and "class_label" in json.loads(body)["error"]


def test_concurrency_limit_answers_503(gpt):
    with Engine(gpt, max_batch=2) as engine:
        app = ServeApp(engine, max_concurrency=2, timeout_s=60)
        server = serve(app)
        try:
            app._slots.acquire()
            app._slots.acquire()  # two requests "in flight"
            status, out = Client(server).post({"class_labels": [1]})
            assert status == 503 and "busy" in out["error"]
            app._slots.release()
            status, out = Client(server).post({"class_labels": [1], "seed": 0})
            assert status == 200
        finally:
            server.shutdown()
            server.server_close()


def test_deadline_answers_504_and_frees_the_slots():
    model = tiny_gpt("c2i", image_size=256)  # 256 tokens: far longer than the deadline
    with Engine(model, max_batch=2) as engine:
        app = ServeApp(engine, timeout_s=60)
        server = serve(app)
        try:
            status, out = Client(server).post({"class_labels": [1, 2], "timeout_s": 0.05})
            assert status == 504 and "0.05 s" in out["error"]
            deadline = time.monotonic() + 10
            while engine.busy_slots and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.busy_slots == 0
            status, out = Client(server).post({"class_labels": [3], "num_tokens": 3, "seed": 1})
            assert status == 200 and len(out["codes"][0]) == 3
        finally:
            server.shutdown()
            server.server_close()


def test_png_needs_a_vq_decoder(gpt):
    with Engine(gpt, max_batch=1) as engine:
        app = ServeApp(engine)
        with pytest.raises(Exception, match="--vq"):
            app.parse({"class_labels": [1], "format": "png"})


def test_t2i_prompts_through_a_text_encoder():
    model = tiny_gpt("t2i")
    table = {}

    def encoder(prompts):  # stands in for T5: a fixed feature sequence per prompt, length = word count
        feats = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(map(ord, p)))
            feats.append(table.setdefault(p, torch.randn(min(len(p.split()), 6), 24, generator=g)))
        return right_align(feats, 6, 24)

    with Engine(model, max_batch=4) as engine:
        server = serve(ServeApp(engine, text_encoder=encoder))
        client = Client(server)
        try:
            status, out = client.post({"prompts": ["a red fox", "two cats on a mat"], "seed": 7, "cfg_scale": 3.0,
                                       "top_k": 50})
            assert status == 200, out
            feats, mask = encoder(["a red fox", "two cats on a mat"])
            ref = argen.generate(model, feats, cond_mask=mask, seed=7, cfg_scale=3.0, top_k=50)
            assert out["codes"] == ref.tolist()
            status, out = client.post({"prompts": ["ok", "  "]})
            assert status == 400 and "prompt 1 is empty" in out["error"]
            status, out = client.post({"class_labels": [1]})
            assert status == 400 and "text-conditional" in out["error"]
        finally:
            server.shutdown()
            server.server_close()
        no_t5 = ServeApp(engine)
        with pytest.raises(Exception, match="--t5 PATH"):
            no_t5.parse({"prompt": "a cat"})


def test_cli_errors_name_the_input(tmp_path):
    from argen.serve.cli import main
    with pytest.raises(ArgenError, match="missing config.json"):
        main([str(tmp_path / "nope"), "--port", "0"])
    with pytest.raises(SystemExit):
        main(["--help"])


@pytest.mark.timeout(180)
def test_cli_serves_a_checkpoint(tmp_path, gpt, vq):
    save(gpt, tmp_path / "gpt")
    save(vq, tmp_path / "vq")
    proc = subprocess.Popen([sys.executable, "-m", "argen.cli", "serve", str(tmp_path / "gpt"), "--port", "0",
                             "--vq", str(tmp_path / "vq"), "--threads", "1", "--log-level", "WARNING"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "http://" not in line:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
        base = line.split("http://")[1].split()[0]
        req = urllib.request.Request(f"http://{base}/v1/generate", method="POST",
                                     data=json.dumps({"class_labels": [2], "seed": 4, "format": "png"}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
        assert len(out["images"]) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0


def tiny_t5_dir(path: Path) -> Path:
    """A random 1-layer T5 encoder (d_model 24) and a word-level tokenizer saved as a local directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
    words = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "cat", "in", "the", "snow"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(words), d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0,
                   eos_token_id=1)
    T5EncoderModel(cfg).save_pretrained(path)
    return path


def test_t2i_prompts_through_a_local_t5(tmp_path):
    from argen.serve.text import PromptEncoder
    t5 = tiny_t5_dir(tmp_path / "t5")
    model = tiny_gpt("t2i")
    encoder = PromptEncoder(str(t5), slots=6, dim=24)
    feats, mask = encoder(["a red fox", "the cat in the snow snow snow"])
    assert mask.tolist() == [[False, False, False, True, True, True], [True] * 6]  # right-aligned, truncated
    with Engine(model, max_batch=4) as engine:
        server = serve(ServeApp(engine, text_encoder=encoder))
        try:
            status, out = Client(server).post({"prompt": "a red fox", "seed": 2, "cfg_scale": 2.0, "top_k": 10})
        finally:
            server.shutdown()
            server.server_close()
    assert status == 200, out
    assert out["codes"] == argen.generate(model, feats[:1], cond_mask=mask[:1], seed=2, cfg_scale=2.0,
                                          top_k=10).tolist()
    with pytest.raises(ArgenError, match="caption_dim 32"):
        PromptEncoder(str(t5), slots=6, dim=32)
    with pytest.raises(ArgenError, match="T5 model directory not found"):
        PromptEncoder(str(tmp_path / "missing"), slots=6, dim=24)


def test_image_endpoint_takes_one_image(c2i_server):
    status, _, body = Client(c2i_server[0]).request("GET", "/v1/image?class_labels=1,2")
    assert status == 400 and "one image" in json.loads(body)["error"]


def test_sample_cli_prompts_through_a_local_t5(tmp_path):
    """`argen sample CKPT --prompts ... --t5 DIR` samples what the server samples for the same prompt and seed."""
    import numpy as np

    from argen.model import save
    from argen.model.sample_cli import main as sample_main
    from argen.serve.text import PromptEncoder
    t5 = tiny_t5_dir(tmp_path / "t5")
    model = tiny_gpt("t2i")
    save(model, tmp_path / "gpt")
    assert sample_main([str(tmp_path / "gpt"), "--prompts", "a red fox", "--t5", str(t5), "--cfg-scale", "2",
                        "--top-k", "10", "--seed", "3", "--save-codes", str(tmp_path / "codes.npy")]) == 0
    feats, mask = PromptEncoder(str(t5), slots=6, dim=24)(["a red fox"])
    expected = argen.generate(model, feats, cond_mask=mask, seed=3, cfg_scale=2.0, top_k=10)
    assert np.load(tmp_path / "codes.npy").tolist() == expected.tolist()


def test_query_strings_keep_text_fields_text():
    """?prompt=2024 is the prompt "2024", not the number; a cfg_schedule of digits is an interval."""
    from argen.serve.server import _query_body
    assert _query_body("prompt=2024&seed=3&cfg_schedule=5") == {"prompt": "2024", "seed": 3, "cfg_schedule": 5}
    assert _query_body("cfg_schedule=linear&class_labels=1,2") == {"cfg_schedule": "linear", "class_labels": [1, 2]}


def test_closed_engine_answers_503_and_bad_input_400(gpt):
    engine = Engine(gpt, max_batch=2)
    server = serve(ServeApp(engine, timeout_s=60))
    try:
        status, out = Client(server).post({"class_labels": [99999]})
        assert status == 400 and "unknown class" in out["error"]
        engine.close()
        status, out = Client(server).post({"class_labels": [1]})
        assert status == 503 and "closed" in out["error"]
    finally:
        server.shutdown()
        server.server_close()
