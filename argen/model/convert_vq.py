"""Import a LlamaGen VQ checkpoint (`vq_ds16_c2i.pt`, `vq_ds8_c2i.pt`, `vq_ds16_t2i.pt`, or a vq_train.py checkpoint).

argen's VQModel uses the reference's module names, so the key map is the identity, applied strictly: every tensor of
the model must come from the file and every tensor of the file must land in the model (the reference loaders use
strict=False, which silently leaves random weights behind a wrong key). The usage FIFO `quantize.codebook_used` is
monitoring state, not a weight: it is copied when present and left empty (-1) when the file has none.
"""
from __future__ import annotations

from pathlib import Path

from argen.errors import ArgenError
from argen.model.convert_llamagen import read_llamagen_state
from argen.model.io import load_state_strict, save
from argen.model.vq import VQModel, vq_config

_BUFFERS = ("quantize.codebook_used",)


def convert_llamagen_vq(src_path: str | Path, out_dir: str | Path, model_name: str = "VQ-16",
                        prefer_ema: bool = True) -> Path:
    """Convert a LlamaGen VQ checkpoint into an argen model directory (config.json + model.safetensors)."""
    keys = ("ema", "model") if prefer_ema else ("model", "ema")
    state, where = read_llamagen_state(src_path, keys + ("module", "state_dict"))
    emb = state.get("quantize.embedding.weight")
    if emb is None:
        raise ArgenError(f"{src_path}: no 'quantize.embedding.weight' under '{where}'; is this a VQ checkpoint?")
    cfg = vq_config(model_name, codebook_size=int(emb.shape[0]), codebook_embed_dim=int(emb.shape[1]))
    model = VQModel(cfg)
    expected = model.state_dict()
    # the usage monitor is optional in released files: start it empty rather than failing
    usage_missing = [b for b in _BUFFERS if b in expected and b not in state]
    state = {**{b: expected[b] for b in usage_missing},
             **{k: v.to(expected[k].dtype) if k in expected else v for k, v in state.items()}}
    load_state_strict(model, state, f"{src_path} does not match {model_name} (wrong --model? VQ-16 has 344 keys, "
                                    "VQ-8 300)")
    return save(model.eval(), out_dir, {"source": str(src_path), "converted_from": "llamagen", "weights": where,
                                        "usage_buffer": "empty" if usage_missing else "copied"})
