"""VQ tokenizer model: reference sizes and keys, the encode/decode API, quantizer properties, save/load."""
import pytest
import torch
import torch.nn.functional as F

import argen.model
from argen.errors import ArgenError
from argen.model.discriminator import PatchGANDiscriminator
from argen.model.lpips import vgg16_features
from argen.model.vq import VQ_SIZES, VectorQuantizer, VQConfig, VQModel, _entropy_loss, count_parameters, vq_config




def _meta(name):
    with torch.device("meta"):
        return VQModel(VQ_SIZES[name])


@pytest.mark.parametrize("name,total,enc,dec,keys", [
    ("VQ-16", 71_883_403, 29_298_176, 42_449_795, 344),
    ("VQ-8", 70_109_835, 28_559_232, 41_415_171, 300),
])
def test_reference_parameter_counts_and_keys(name, total, enc, dec, keys):
    m = _meta(name)
    assert count_parameters(VQ_SIZES[name]) == total
    assert sum(p.numel() for p in m.encoder.parameters()) == enc
    assert sum(p.numel() for p in m.decoder.parameters()) == dec
    sd = m.state_dict()
    assert len(sd) == keys
    assert tuple(sd["quantize.embedding.weight"].shape) == (16384, 8)
    assert tuple(sd["quantize.codebook_used"].shape) == (65536,)
    assert tuple(sd["quant_conv.weight"].shape) == (8, 256, 1, 1)
    assert tuple(sd["post_quant_conv.weight"].shape) == (256, 8, 1, 1)
    n = len(VQ_SIZES[name].encoder_ch_mult)
    for k in ["encoder.conv_in.weight", "encoder.mid.1.proj_out.bias", "encoder.mid.2.conv2.weight",
              f"encoder.conv_blocks.{n - 1}.attn.1.q.weight", f"encoder.conv_blocks.{n - 2}.downsample.conv.weight",
              "decoder.conv_blocks.0.attn.2.v.weight", f"decoder.conv_blocks.{n - 2}.upsample.conv.bias",
              "decoder.conv_blocks.0.res.2.conv1.weight", "encoder.norm_out.weight", "decoder.conv_out.weight"]:
        assert k in sd, k
    assert f"encoder.conv_blocks.{n - 1}.downsample.conv.weight" not in sd
    assert f"decoder.conv_blocks.{n - 1}.upsample.conv.weight" not in sd
    assert "encoder.conv_blocks.0.attn.0.q.weight" not in sd  # attention only at the lowest resolution
    assert m.downsample == (16 if name == "VQ-16" else 8) and m.codebook_size == 16384 and m.code_dim == 8


def test_loss_network_sizes():
    assert sum(p.numel() for p in PatchGANDiscriminator().parameters()) == 2_765_633
    assert sum(p.numel() for p in vgg16_features().parameters()) == 14_714_688


def test_config_validation_names_the_problem():
    with pytest.raises(ArgenError, match="unknown VQ model 'VQ-32'"):
        vq_config("VQ-32")
    with pytest.raises(ValueError, match="norm_groups"):
        VQConfig(ch=24).validate()


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return VQModel(VQ_SIZES["VQ-micro"]).eval()


def test_encode_decode_api(micro):
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = micro.encode(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < micro.codebook_size
    img = micro.decode(codes)
    assert img.shape == (3, 3, 16, 16)
    assert torch.equal(img, micro.decode(codes.flatten(1)))
    assert torch.equal(micro.decode(codes[:, :4].flatten(1), shape=(4, 8)), micro.decode(codes[:, :4]))
    recon, q = micro(x)
    assert torch.equal(q.indices, codes)
    torch.testing.assert_close(recon, img, atol=1e-5, rtol=1e-5)
    with pytest.raises(ArgenError, match="multiple of the downsample"):
        micro.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ArgenError, match="out of range"):
        micro.decode(torch.full((1, 2, 2), micro.codebook_size))
    with pytest.raises(ArgenError, match="cannot infer"):
        micro.decode(torch.zeros(1, 6, dtype=torch.long))


def test_codes_are_nearest_normalised_codebook_rows():
    torch.manual_seed(1)
    q = VectorQuantizer(VQConfig(codebook_size=64, codebook_embed_dim=4)).eval()
    z = torch.randn(2, 4, 3, 5)
    out = q(z)
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    cos = flat @ F.normalize(q.embedding.weight, dim=-1).t()
    assert torch.equal(out.indices.reshape(-1), cos.argmax(1))
    # the output is the unit-norm codebook row
    torch.testing.assert_close(out.z_q.norm(dim=1), torch.ones(2, 3, 5))


def test_lookup_is_the_nearest_code_in_blocks_and_in_fp32_under_autocast():
    torch.manual_seed(3)
    q = VectorQuantizer(VQConfig(codebook_size=512, codebook_embed_dim=8, codebook_l2_norm=False)).eval()
    with torch.no_grad():
        q.embedding.weight.normal_()  # unnormalised rows: the |e|^2 term matters
    flat = torch.randn(1000, 8)
    nearest = torch.cdist(flat.double(), q.embedding.weight.double()).argmin(1)
    q.LOOKUP_ROWS = 96  # blocks that do not divide the rows
    assert torch.equal(q.lookup(flat), nearest)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q.lookup(flat), nearest)
    # the training forward picks its codes by the same rule
    z = flat.reshape(10, 10, 10, 8).permute(0, 3, 1, 2)
    assert torch.equal(q(z).indices.reshape(-1), nearest)


def test_straight_through_gradient_and_loss_targets():
    torch.manual_seed(2)
    q = VectorQuantizer(VQConfig(codebook_size=32, codebook_embed_dim=4)).train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    g = torch.randn(2, 4, 3, 3)
    (q(z).z_q * g).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=1) * g).sum().backward()  # identity through the quantizer, the normalisation stays
    torch.testing.assert_close(z.grad, z2.grad)
    assert q.embedding.weight.grad is None  # the straight-through output gives the codebook no gradient
    z.grad = None
    out = q(z)
    out.vq_loss.backward(retain_graph=True)
    assert z.grad is None and q.embedding.weight.grad.abs().sum() > 0  # codebook loss moves only the codebook
    q.embedding.weight.grad = None
    out.commit_loss.backward()
    assert q.embedding.weight.grad is None and z.grad.abs().sum() > 0  # commitment moves only the encoder side


def test_usage_monitor_counts_only_real_assignments():
    q = VectorQuantizer(VQConfig(codebook_size=16, codebook_embed_dim=4, usage_buffer_len=8))
    assert q.record_usage(torch.tensor([1, 2, 2, 3])) == 3 / 16  # empty slots (and code 0) are not counted
    assert q.record_usage(torch.tensor([5, 6, 7, 8])) == 7 / 16
    assert q.record_usage(torch.arange(20)) == 8 / 16  # more than the FIFO holds: the newest 8 remain
    assert q.codebook_used.tolist() == list(range(12, 20))
    q.eval()
    before = q.codebook_used.clone()
    out = q(torch.randn(1, 4, 2, 2))
    assert out.usage is None and torch.equal(before, q.codebook_used)
    q.train()
    assert q(torch.randn(1, 4, 2, 2)).usage is not None


def test_entropy_loss_is_optional():
    torch.manual_seed(3)
    cfg = VQConfig(codebook_size=32, codebook_embed_dim=4, entropy_loss_ratio=0.1)
    q = VectorQuantizer(cfg).train()
    z = torch.randn(2, 4, 4, 4)
    out = q(z)
    assert torch.isfinite(out.entropy_loss) and out.entropy_loss != 0
    # the reference's form: the entropy of softmax(-squared distance) between normalised latents and codes
    flat = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4).double(), dim=-1)
    dist = torch.cdist(flat, q.codebook().double()) ** 2
    assert out.entropy_loss.item() == pytest.approx(0.1 * _entropy_loss(-dist).item(), rel=1e-4, abs=1e-6)
    assert torch.equal(out.indices.reshape(-1), dist.argmin(1))
    out0 = VectorQuantizer(VQConfig(codebook_size=32, codebook_embed_dim=4)).train()(torch.randn(2, 4, 4, 4))
    assert out0.entropy_loss == 0


def test_save_load_roundtrip(micro, tmp_path):
    argen.model.save(micro, tmp_path / "vq", {"note": "test"})
    loaded = argen.model.load(tmp_path / "vq")
    assert loaded.kind == "vq" and loaded.config == micro.config
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(x), micro.encode(x))
