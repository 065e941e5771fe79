"""The GPT family: exact sizes, RoPE, shapes and masks, cached decoding, sampling, conversion parity."""
import math

import pytest
import torch

from argen.errors import ArgenError
from argen.model.generate import cfg_scale_at, generate
from argen.model.sampling import candidates, draw, sample, uniforms
from argen.model.gpt import GPT, GPTConfig, apply_rope, count_parameters, gpt_config, gpt_loss, rope_2d_cache
from tests.llamagen_reference import ModelArgs, Transformer
from tests.llamagen_reference import generate as reference_generate

EXPECTED_C2I = {"GPT-B": 110_888_448, "GPT-L": 342_910_976, "GPT-XL": 774_699_520, "GPT-XXL": 1_410_972_672,
                "GPT-XXXL": 3_893_027_840, "GPT-1B": 1_199_616_000, "GPT-3B": 3_096_659_200, "GPT-7B": 6_614_589_440}
EXPECTED_T2I = {"GPT-B": 112_282_368, "GPT-XL": 777_678_080, "GPT-3B": 3_110_249_600}


def meta_count(name, model_type="c2i"):
    with torch.device("meta"):
        return count_parameters(GPT(gpt_config(name, model_type=model_type)))


@pytest.mark.parametrize("name", list(EXPECTED_C2I))
def test_c2i_parameter_counts_equal_reference(name):
    assert meta_count(name) == EXPECTED_C2I[name]


@pytest.mark.parametrize("name", list(EXPECTED_T2I))
def test_t2i_parameter_counts_equal_reference(name):
    assert meta_count(name, "t2i") == EXPECTED_T2I[name]


def test_rope_matches_explicit_formula():
    grid, hd, T = 4, 16, 1
    cache = rope_2d_cache(grid, hd, 10000.0, T, "reference")
    assert cache.shape == (T + grid * grid, hd // 2, 2)
    assert torch.all(cache[:T] == 0)  # reference: zeroed prefix rows
    quarter = hd // 4
    for cell in range(grid * grid):
        i, j = divmod(cell, grid)
        for m in range(hd // 2):
            k = m % quarter
            freq = 10000.0 ** (-2 * k / (hd // 2))
            angle = (i if m < quarter else j) * freq
            assert cache[T + cell, m, 0].item() == pytest.approx(math.cos(angle), abs=1e-6)
            assert cache[T + cell, m, 1].item() == pytest.approx(math.sin(angle), abs=1e-6)
    ident = rope_2d_cache(grid, hd, 10000.0, 2, "identity")
    assert torch.all(ident[:2, :, 0] == 1) and torch.all(ident[:2, :, 1] == 0)
    x = torch.randn(1, 2, 1, hd)
    assert torch.allclose(apply_rope(x, ident[:2]), x)  # identity prefix leaves q, k unrotated


def test_rope_interleaved_pairs_rotate():
    hd = 8
    x = torch.zeros(1, 1, 1, hd)
    x[..., 0] = 1.0  # pair 0 = (x0, x1) = (1, 0)
    rope = torch.zeros(1, hd // 2, 2)
    rope[0, :, 0] = math.cos(0.3)
    rope[0, :, 1] = math.sin(0.3)
    y = apply_rope(x, rope)
    assert y[0, 0, 0, 0].item() == pytest.approx(math.cos(0.3), abs=1e-6)
    assert y[0, 0, 0, 1].item() == pytest.approx(math.sin(0.3), abs=1e-6)


def tiny(model_type="c2i", **kw):
    cfg = gpt_config("GPT-tiny", image_size=64, model_type=model_type, vocab_size=97, caption_dim=32, **kw)
    torch.manual_seed(0)
    m = GPT(cfg)
    for p in m.output.parameters():
        torch.nn.init.normal_(p, std=0.05)  # the zero-init head would make every test trivially pass
    return m.eval()


def test_initial_loss_is_log_vocab():
    m = GPT(gpt_config("GPT-tiny", image_size=64, vocab_size=97)).eval()
    codes = torch.randint(0, 97, (2, 16))
    loss = gpt_loss(m(codes, torch.tensor([1, 2])), codes)
    assert loss.item() == pytest.approx(math.log(97), abs=1e-5)


def test_c2i_shapes_and_causality():
    m = tiny()
    codes = torch.randint(0, 97, (3, 16))
    logits = m(codes, torch.tensor([0, 5, 9]))
    assert logits.shape == (3, 16, 97) and logits.dtype == torch.float32
    changed = codes.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 97
    logits2 = m(changed, torch.tensor([0, 5, 9]))
    assert torch.allclose(logits[:, :11], logits2[:, :11], atol=1e-6)  # logits[:, k] sees codes[:, :k] only
    assert not torch.allclose(logits[:, 11:], logits2[:, 11:])


def test_t2i_padded_caption_tokens_have_no_effect():
    m = tiny("t2i", rope_prefix="identity")
    feats = torch.randn(2, 120, 32)
    mask = torch.zeros(2, 120, dtype=torch.bool)
    mask[0, 100:] = True
    mask[1, 50:] = True
    codes = torch.randint(0, 97, (2, 16))
    a = m(codes, feats * mask[..., None], mask)
    noisy = feats.clone()
    noisy[~mask] = torch.randn_like(noisy[~mask]) * 10
    b = m(codes, noisy, mask)
    assert torch.allclose(a, b, atol=1e-5)
    c = m(codes, feats * mask[..., None])  # without the mask the padding is visible
    assert not torch.allclose(a, c, atol=1e-5)


def test_t2i_validity_weights():
    logits = torch.randn(3, 4, 10)
    codes = torch.randint(0, 10, (3, 4))
    valid = torch.tensor([1.0, 0.0, 1.0])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]].reshape(-1, 10), codes[[0, 2]].reshape(-1))
    assert gpt_loss(logits, codes, valid).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_kv_cached_decoding_equals_full_forward(model_type):
    m = tiny(model_type)
    codes = torch.randint(0, 97, (2, 16))
    if model_type == "c2i":
        cond, mask = torch.tensor([3, 4]), None
    else:
        cond, mask = torch.randn(2, 120, 32), torch.ones(2, 120, dtype=torch.bool)
        mask[0, :30] = False
    full = m(codes, cond, mask)
    T = m.config.cls_token_num
    m.setup_kv_cache(2, T + 15)
    steps = [m.output(m.hidden_cached(m.embed_condition(cond), 0, m.prefix_mask(mask, T) if mask is not None else None))]
    for k in range(15):
        km = None
        if mask is not None:
            km = torch.ones(2, 1, 1, T + k + 1, dtype=torch.bool)
            km[:, 0, 0, :T] = mask
        steps.append(m.output(m.hidden_cached(m.tok_embeddings(codes[:, k:k + 1]), T + k, km)))
    m.clear_kv_cache()
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


def test_cfg_scale_one_equals_conditional_logits():
    m = tiny()
    labels = torch.tensor([1, 2])
    a = generate(m, labels, cfg_scale=1.0, greedy=True)
    # greedy without CFG follows the conditional argmax of the full forward, token by token
    codes = a
    logits = m(codes, labels)
    assert torch.equal(logits.argmax(-1), codes)


def test_sampling_is_reproducible_and_seed_dependent():
    m = tiny()
    labels = torch.tensor([1, 2, 3])
    a = generate(m, labels, cfg_scale=2.0, top_k=20, top_p=0.9, temperature=1.2, seed=7)
    b = generate(m, labels, cfg_scale=2.0, top_k=20, top_p=0.9, temperature=1.2, seed=7)
    c = generate(m, labels, cfg_scale=2.0, top_k=20, top_p=0.9, temperature=1.2, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 16) and int(a.max()) < 97


def test_candidates_top_k_top_p_temperature():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    probs, index = candidates(logits, top_k=2)
    assert sorted(index[0].tolist()) == [1, 3] and torch.allclose(probs.sum(-1), torch.ones(1))
    probs, index = candidates(logits, top_p=0.6)  # 0.5 < 0.6: the token crossing p (0.3) is kept, the rest not
    assert index[0, :2].tolist() == [1, 3] and (probs[0, :2] > 0).all() and (probs[0, 2:] == 0).all()
    probs, index = candidates(logits, temperature=0.5)  # p^2, renormalised, over the whole vocabulary
    expected = torch.tensor([0.05, 0.5, 0.15, 0.3]) ** 2
    assert index is None and torch.allclose(probs[0], expected / expected.sum())


@pytest.mark.parametrize("top_k, top_p, temp", [(0, 1.0, 1.0), (4, 1.0, 1.0), (4, 1.0, 0.5), (6, 0.7, 1.0),
                                                (3, 1.0, 2.0), (0, 0.8, 1.3)])
def test_sampler_draws_the_filtered_distribution(top_k, top_p, temp):
    """Frequencies of 40,000 draws equal the reference filter (temperature, top-k, HF top-p, softmax)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.5, 0.2, 0.0, -1.0])
    p = (logits / temp).softmax(-1)
    keep = torch.ones(8, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    if top_p < 1:
        q = p * keep / (p * keep).sum()
        keep &= (q.cumsum(0) - q) <= top_p
    expected = p * keep / (p * keep).sum()
    m = 40000
    g = torch.Generator().manual_seed(0)
    toks = sample(logits.expand(m, -1), uniforms(m, g, "cpu"), temp, top_k, top_p)
    freq = torch.bincount(toks, minlength=8).float() / m
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


def test_draw_never_picks_a_removed_candidate():
    probs = torch.tensor([[0.7, 0.3, 0.0, 0.0]])
    assert draw(probs, None, torch.tensor([1.0 - 2 ** -53], dtype=torch.float64)).item() == 1
    assert draw(probs, None, torch.tensor([0.0], dtype=torch.float64)).item() == 0
    # the largest uniforms below 1, over totals that are and are not powers of two, never land on a zero
    g = torch.Generator().manual_seed(0)
    p = torch.rand(500, 37, generator=g) * (torch.rand(500, 37, generator=g) < 0.3)
    p[:, 0] += 1e-3
    p[:250] /= p[:250].sum(-1, keepdim=True)
    for u in (1 - 2 ** -53, 1 - 2 ** -52, 1 - 2 ** -24):
        picked = draw(p, None, torch.full((500,), u, dtype=torch.float64))
        assert (p.gather(1, picked[:, None]) > 0).all()


def test_cfg_schedules():
    assert cfg_scale_at(5, 10, 4.0, None) == 4.0
    assert cfg_scale_at(0, 10, 4.0, "linear") == 1.0 and cfg_scale_at(9, 10, 4.0, "linear") == 4.0
    assert cfg_scale_at(3, 10, 4.0, 2) == 4.0 and cfg_scale_at(4, 10, 4.0, 2) == 1.0


def test_bad_conditions_are_named():
    m = tiny()
    with pytest.raises(ArgenError, match="out of range"):
        generate(m, torch.tensor([1000]))
    mt = tiny("t2i")
    with pytest.raises(ArgenError, match="shape"):
        generate(mt, torch.randn(1, 10, 32))


def test_config_validation():
    with pytest.raises(ValueError, match="square"):
        GPTConfig(n_layer=1, n_head=2, dim=64, block_size=15).validate()
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_layer=1, n_head=3, dim=64).validate()
    with pytest.raises(ArgenError, match="did you mean 'GPT-XXL'"):
        gpt_config("GPT-XXLL")
    assert gpt_config("gpt-b").name == "GPT-B"


# ---- parity with the reference implementation ------------------------------------------------------------------

def reference_pair(model_type):
    kw = dict(vocab_size=97, block_size=16, n_layer=2, n_head=4, dim=128, model_type=model_type,
              caption_dim=32, cls_token_num=120 if model_type == "t2i" else 1)
    torch.manual_seed(1)
    ref = Transformer(ModelArgs(**kw)).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return ref, kw


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod.", "model._orig_mod.",
                                    "_orig_mod.module."])
def test_reader_strips_wrapper_key_prefixes(tmp_path, prefix):
    from argen.model.convert_llamagen import read_llamagen_state
    sd = reference_pair("c2i")[0].state_dict()
    torch.save({"model": {prefix + k: v for k, v in sd.items()}}, tmp_path / "wrapped.pt")
    state, where = read_llamagen_state(tmp_path / "wrapped.pt")
    assert where == "model" and sorted(state) == sorted(sd)


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
@pytest.mark.parametrize("wrapper", ["model", "module", "raw"])
def test_conversion_parity_with_reference(tmp_path, model_type, wrapper):
    from argen.model import load
    from argen.model.convert_llamagen import convert_llamagen_gpt
    ref, kw = reference_pair(model_type)
    sd = ref.state_dict()
    obj = sd if wrapper == "raw" else {wrapper: sd, "steps": 10}
    torch.save(obj, tmp_path / "ref.pt")
    out = convert_llamagen_gpt(tmp_path / "ref.pt", tmp_path / "conv", "GPT-tiny", image_size=64,
                               t2i=model_type == "t2i")
    m = load(out)
    assert m.config.rope_prefix == "reference"
    codes = torch.randint(0, 97, (3, 16))
    if model_type == "c2i":
        cond, mask, attn = torch.tensor([0, 7, 99]), None, None
    else:
        mask = torch.zeros(3, 120, dtype=torch.bool)
        mask[0, 90:] = True
        mask[1, 10:] = True
        mask[2, :] = True
        cond = torch.randn(3, 120, 32) * mask[..., None]
        attn = m.prefix_mask(mask, 120 + 15)
    expected, _ = ref(codes[:, :-1], cond, mask=attn)
    got = m(codes, cond, mask)
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel.item() <= 1e-5
    ref_codes = reference_generate(ref, cond, 16, emb_masks=mask, cfg_scale=2.0, sample_logits=False)
    ours = generate(m, cond, cond_mask=mask, cfg_scale=2.0, greedy=True)
    assert torch.equal(ref_codes.long(), ours)


def test_conversion_strict_key_errors(tmp_path):
    from argen.model.convert_llamagen import convert_llamagen_gpt
    ref, _ = reference_pair("c2i")
    sd = dict(ref.state_dict())
    sd.pop("layers.1.ffn_norm.weight")
    sd["layers.0.attention.extra.weight"] = torch.zeros(1)
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(1)  # caches are dropped, not errors
    torch.save({"model": sd}, tmp_path / "bad.pt")
    with pytest.raises(ArgenError) as e:
        convert_llamagen_gpt(tmp_path / "bad.pt", tmp_path / "out", "GPT-tiny", image_size=64)
    assert "layers.1.ffn_norm.weight" in str(e.value) and "layers.0.attention.extra.weight" in str(e.value)
    assert "kv_cache" not in str(e.value)
    with pytest.raises(ArgenError, match="shape mismatch"):
        convert_llamagen_gpt(_save(tmp_path, ref), tmp_path / "o2", "GPT-tiny", image_size=64)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArgenError, match="cannot read checkpoint"):
        convert_llamagen_gpt(tmp_path / "junk.pt", tmp_path / "o3", "GPT-tiny")


def _save(tmp_path, ref):
    path = tmp_path / "wrong_shape.pt"
    sd = dict(ref.state_dict())
    sd["norm.weight"] = torch.ones(64)
    torch.save({"model": sd}, path)
    return path
