"""Import a LlamaGen VQ checkpoint (`vq_ds16_c2i.pt`, `vq_ds8_c2i.pt`, `vq_ds16_t2i.pt`, or a vq_train.py checkpoint).

argen's VQModel uses the reference's module names, so the key map is the identity, applied strictly: every tensor of
the model must come from the file and every tensor of the file must land in the model (the reference loaders use
strict=False, which silently leaves random weights behind a wrong key). The usage FIFO `quantize.codebook_used` is
monitoring state, not a weight: it is copied when present and left empty (-1) when the file has none.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from argen.errors import ArgenError
from argen.model.io import load_state_strict, save
from argen.model.vq import VQModel, vq_config

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_BUFFERS = ("quantize.codebook_used",)


def read_llamagen_state(src_path: str | Path, prefer_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The weight dict of a LlamaGen .pt (`ema` if present and preferred, else `model`/`module`/`state_dict`/raw)."""
    p = Path(src_path)
    if not p.is_file():
        raise ArgenError(f"checkpoint not found: {src_path}")
    try:
        # vq_train.py checkpoints carry the argparse Namespace under "args": allow exactly that class
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArgenError(f"cannot read {src_path} as a torch checkpoint: {e}") from None
    if not isinstance(ckpt, dict):
        raise ArgenError(f"{src_path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    order = (("ema", "model") if prefer_ema else ("model", "ema")) + ("module", "state_dict")
    for key in order:
        if isinstance(ckpt.get(key), dict):
            state, where = ckpt[key], key
            break
    else:
        if not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise ArgenError(f"{src_path}: no weights under 'model', 'ema', 'module' or 'state_dict' "
                             f"(top-level keys: {sorted(ckpt)[:8]})")
        state, where = ckpt, "<raw state dict>"
    out = {}
    for k, v in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out, where


def convert_llamagen_vq(src_path: str | Path, out_dir: str | Path, model_name: str = "VQ-16",
                        prefer_ema: bool = True) -> Path:
    """Convert a LlamaGen VQ checkpoint into an argen model directory (config.json + model.safetensors)."""
    state, where = read_llamagen_state(src_path, prefer_ema)
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
