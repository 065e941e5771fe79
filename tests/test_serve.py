"""The sampling engine: same codes as argen.generate, mixed batches, continuous batching, cancellation, bad input."""
from __future__ import annotations

import contextlib
import time

import pytest
import torch

import argen
from argen.errors import ArgenError
from argen.model.gpt import GPT, gpt_config
from argen.serve import Engine, Request
from argen.serve.text import right_align

pytestmark = pytest.mark.timeout(120)


def tiny_gpt(model_type="c2i", seed=0, image_size=64, **over) -> GPT:
    kw = dict(vocab_size=512, num_classes=10)
    if model_type == "t2i":
        kw = dict(vocab_size=512, caption_dim=24, caption_len=6, cls_token_num=6)
    kw.update(over)
    torch.manual_seed(seed)
    model = GPT(gpt_config("GPT-tiny", image_size=image_size, model_type=model_type, **kw))
    with torch.no_grad():  # spread logits (the zero-init head samples uniformly, which would hide ordering bugs)
        model.output.weight.normal_(0, 0.3)
        for layer in model.layers:
            layer.attention.wo.weight.mul_(5)
    return model.eval()


@pytest.fixture(scope="module")
def c2i():
    return tiny_gpt("c2i")


@pytest.fixture(scope="module")
def engine(c2i):
    with Engine(c2i, max_batch=6) as e:
        yield e


PARAMS = [
    dict(),
    dict(cfg_scale=4.0, top_k=40),
    dict(cfg_scale=2.0, top_p=0.8, temperature=0.7),
    dict(cfg_scale=3.0, cfg_schedule="linear", top_k=100, top_p=0.95),
    dict(cfg_scale=2.5, cfg_schedule=5, temperature=1.3),
    dict(cfg_scale=1.5, greedy=True),
    dict(cfg_scale=4.0, num_tokens=7, top_k=3),
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "defaults")
def test_same_codes_as_generate(engine, c2i, params):
    labels = torch.tensor([3, 7, 0])
    ref = argen.generate(c2i, labels, seed=11, **params)
    got = engine.generate(Request(labels, seed=11, **params))[0]
    assert got.shape == ref.shape and not got.is_inference()
    assert torch.equal(got, ref)


@pytest.mark.parametrize("static", [False, True], ids=["bucketed", "static-shapes"])
def test_mixed_batch_each_request_matches_generate(engine, c2i, static):
    """More images than slots, different parameters per request: every request still gets its own codes, so the
    uncond row of each image is its own whatever it is batched with. static: the accelerator layout (all slots,
    whole cache, every step)."""
    with contextlib.ExitStack() as own:  # closes the static engine even when an assertion fails
        if static:
            engine = own.enter_context(Engine(c2i, max_batch=6, length_bucket=0))
        reqs = [Request([i % 10] * (1 + i % 3), seed=100 + i, **PARAMS[i % len(PARAMS)]) for i in range(9)]
        futs = [engine.submit(r) for r in reqs]
        results = [f.result(timeout=60) for f in futs]
        for r, res in zip(reqs, results):
            kw = {k: getattr(r, k) for k in ("cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p", "greedy",
                                             "num_tokens")}
            assert torch.equal(res.codes, argen.generate(c2i, torch.tensor(r.cond), seed=r.seed, **kw))
        assert sum(res.codes.shape[0] for res in results) > engine.max_batch  # some waited for free slots


def test_warmup(c2i):
    with Engine(c2i, max_batch=2) as eng:
        assert eng.warmup(timeout=60) > 0
        assert eng.busy_slots == 0


def test_new_requests_join_a_running_batch(c2i):
    model = tiny_gpt("c2i", image_size=128)  # 64 tokens: long enough to join mid-way
    with Engine(model, max_batch=4) as eng:
        first = eng.submit(Request([1, 2], cfg_scale=3.0, seed=1))
        while eng.stats["steps"] < 5:
            time.sleep(0.002)
        second = eng.submit(Request([4], cfg_scale=2.0, top_k=20, seed=2))
        r1, r2 = first.result(timeout=60), second.result(timeout=60)
    assert r1.first_step < r2.first_step < r1.last_step  # admitted between decode steps of the running batch
    assert torch.equal(r2.codes, argen.generate(model, torch.tensor([4]), cfg_scale=2.0, top_k=20, seed=2))
    assert torch.equal(r1.codes, argen.generate(model, torch.tensor([1, 2]), cfg_scale=3.0, seed=1))


def test_t2i_with_padded_captions_matches_generate():
    model = tiny_gpt("t2i")
    g = torch.Generator().manual_seed(0)
    feats, mask = right_align([torch.randn(n, 24, generator=g) for n in (2, 6, 4)], 6, 24)
    with Engine(model, max_batch=4) as eng:
        for params in (dict(cfg_scale=5.0, top_k=50), dict()):
            ref = argen.generate(model, feats, cond_mask=mask, seed=3, **params)
            got = eng.generate(Request(feats, cond_mask=mask, seed=3, **params))[0]
            assert torch.equal(got, ref)
        # without a mask every caption row is valid, as in generate
        assert torch.equal(eng.generate(Request(feats[:1], seed=4, cfg_scale=2.0))[0],
                           argen.generate(model, feats[:1], seed=4, cfg_scale=2.0))


def test_unseeded_requests_sample_from_the_filtered_set(engine, c2i):
    labels = torch.tensor([5, 6])
    greedy = argen.generate(c2i, labels, cfg_scale=3.0, greedy=True)
    # top-1 leaves one candidate, so sampling with the engine's own generator must return the greedy codes
    assert torch.equal(engine.generate(Request(labels, cfg_scale=3.0, top_k=1))[0], greedy)
    assert torch.equal(engine.generate(Request(labels, cfg_scale=3.0, top_k=50, top_p=1e-6))[0], greedy)
    assert torch.equal(engine.generate(Request(labels, cfg_scale=3.0, top_p=1e-6))[0], greedy)
    # and different draws for different unseeded requests
    a, b = engine.generate([Request(labels, top_k=100), Request(labels, top_k=100)])
    assert not torch.equal(a, b)


def test_whole_float_top_k_is_an_integer(engine, c2i):
    """top_k=5.0 passes validation; it must sample as top_k=5, not kill the worker (and with it the engine)."""
    labels = torch.tensor([3])
    got = engine.generate(Request(labels, cfg_scale=2.0, top_k=5.0, seed=1))[0]
    assert torch.equal(got, argen.generate(c2i, labels, cfg_scale=2.0, top_k=5, seed=1))
    assert torch.equal(engine.generate(Request(labels, top_k=5, seed=1))[0],
                       argen.generate(c2i, labels, top_k=5, seed=1))


def test_cancelled_request_frees_its_slots(c2i):
    model = tiny_gpt("c2i", image_size=256)  # 256 tokens
    with Engine(model, max_batch=2) as eng:
        slow = eng.submit(Request([1, 2], seed=0))
        while eng.stats["steps"] < 2:
            time.sleep(0.002)
        assert slow.cancel()
        quick = eng.generate(Request([3], seed=5, num_tokens=4), timeout=60)[0]
        assert torch.equal(quick, argen.generate(model, torch.tensor([3]), seed=5, num_tokens=4))
        deadline = time.monotonic() + 10
        while eng.busy_slots and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.busy_slots == 0


@pytest.mark.parametrize("req, msg", [
    (Request([10]), "unknown class label"),
    (Request([-1]), "unknown class label"),
    (Request([]), "no conditions"),
    (Request([1] * 7), "max_batch is 6"),
    (Request([1], top_p=0.0), "top_p"),
    (Request([1], top_p=1.5), "top_p"),
    (Request([1], temperature=-1.0), "temperature"),
    (Request([1], top_k=-3), "top_k"),
    (Request([1], cfg_scale=float("nan")), "cfg_scale"),
    (Request([1], cfg_schedule="cosine", cfg_scale=2.0), "cfg_schedule"),
    (Request([1], num_tokens=17), "num_tokens"),
    (Request([1], seed=-2), "seed"),
    (Request(torch.randn(2, 6, 24)), "class labels"),
])
def test_bad_requests_are_refused_at_submit(engine, req, msg):
    with pytest.raises(ArgenError, match=msg):
        engine.submit(req)


def test_t2i_bad_shapes():
    with Engine(tiny_gpt("t2i"), max_batch=2) as eng:
        with pytest.raises(ArgenError, match=r"\(n, 6, 24\)"):
            eng.submit(Request(torch.randn(1, 5, 24)))
        with pytest.raises(ArgenError, match="caption mask"):
            eng.submit(Request(torch.randn(1, 6, 24), cond_mask=torch.ones(1, 5, dtype=torch.bool)))


def test_closed_engine_refuses_and_fails_waiters(c2i):
    eng = Engine(c2i, max_batch=1)
    fut = eng.submit(Request([1], seed=0))
    fut.result(timeout=60)
    eng.close()
    with pytest.raises(ArgenError, match="closed"):
        eng.submit(Request([1]))

    # closing mid-generation fails the request in its slot and the one still queued behind it
    eng = Engine(tiny_gpt("c2i", image_size=256), max_batch=1)  # 256 tokens: still running when closed
    try:
        running = eng.submit(Request([1], seed=0))
        queued = eng.submit(Request([2], seed=1))
        deadline = time.monotonic() + 30
        while eng.stats["steps"] < 1 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert eng.stats["steps"] >= 1
    finally:
        eng.close()
    for fut in (running, queued):
        with pytest.raises(ArgenError, match="closed"):
            fut.result(timeout=30)
    with pytest.raises(ArgenError, match="closed"):
        eng.submit(Request([1]))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_decode_step_gives_the_same_codes(c2i):
    labels = torch.tensor([3, 7])
    with Engine(c2i, max_batch=4, compile=True) as eng:
        for params in PARAMS[:3]:
            assert torch.equal(eng.generate(Request(labels, seed=9, **params))[0],
                               argen.generate(c2i, labels, seed=9, **params))
        assert eng.compiled  # not the eager fallback


def test_failing_compiled_step_falls_back_to_eager(c2i):
    with Engine(c2i, max_batch=2) as eng:
        def broken(*a, **k):
            raise RuntimeError("simulated compiler failure")
        eng._step_fn = broken
        got = eng.generate(Request([2], seed=1, cfg_scale=2.0), timeout=60)[0]
        assert not eng.compiled
    assert torch.equal(got, argen.generate(c2i, torch.tensor([2]), seed=1, cfg_scale=2.0))
