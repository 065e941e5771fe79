"""LlamaGen VQ import: strict 1:1 key map, the usage buffer, and identical codes and images."""
import argparse

import pytest
import torch

import argen.model
from argen.errors import ArgenError
from argen.model.convert_vq import convert_llamagen_vq
from argen.model.vq import VQ_SIZES, VQModel


def _reference_checkpoint(path, prefix=""):
    """A checkpoint laid out like LlamaGen's vq_train.py saves it (model/optimizer/steps/args)."""
    torch.manual_seed(0)
    src = VQModel(VQ_SIZES["VQ-micro"]).train()
    src(torch.rand(2, 3, 16, 16) * 2 - 1)  # fills part of the usage FIFO
    src.eval()
    state = {prefix + k: v.clone() for k, v in src.state_dict().items()}
    torch.save({"model": state, "optimizer": {}, "discriminator": {}, "optimizer_disc": {}, "steps": 123,
                "args": argparse.Namespace(vq_model="VQ-16", codebook_size=256)}, path)
    return src


def test_converted_model_gives_identical_codes_and_images(tmp_path):
    src = _reference_checkpoint(tmp_path / "vq.pt")
    out = convert_llamagen_vq(tmp_path / "vq.pt", tmp_path / "out", "VQ-micro")
    vq = argen.model.load(out)
    torch.manual_seed(1)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = vq.encode(x)
    assert torch.equal(codes, src.encode(x))
    assert torch.equal(vq.decode(codes), src.decode(codes))
    assert torch.equal(vq.quantize.codebook_used, src.quantize.codebook_used)
    for k, v in src.state_dict().items():
        assert torch.equal(vq.state_dict()[k], v), k


def test_wrapper_prefixes_and_missing_usage_buffer(tmp_path):
    src = _reference_checkpoint(tmp_path / "vq.pt", prefix="module.")
    ckpt = torch.load(tmp_path / "vq.pt", weights_only=False)
    del ckpt["model"]["module.quantize.codebook_used"]
    torch.save(ckpt, tmp_path / "vq2.pt")
    vq = argen.model.load(convert_llamagen_vq(tmp_path / "vq2.pt", tmp_path / "out", "VQ-micro"))
    assert (vq.quantize.codebook_used == -1).all()  # empty usage FIFO, not zeros
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(vq.encode(x), src.encode(x))


def test_wrong_model_or_file_is_a_clear_error(tmp_path):
    _reference_checkpoint(tmp_path / "vq.pt")
    with pytest.raises(ArgenError, match="does not match VQ-tiny"):
        convert_llamagen_vq(tmp_path / "vq.pt", tmp_path / "out", "VQ-tiny")
    with pytest.raises(ArgenError, match="checkpoint not found"):
        convert_llamagen_vq(tmp_path / "missing.pt", tmp_path / "out", "VQ-16")
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(2, 2)}}, tmp_path / "gpt.pt")
    with pytest.raises(ArgenError, match="is this a VQ checkpoint"):
        convert_llamagen_vq(tmp_path / "gpt.pt", tmp_path / "out", "VQ-16")
    assert not (tmp_path / "out" / "config.json").exists()

