"""Import LlamaGen GPT checkpoints into argen's format (config.json + model.safetensors).

The released files come in three wrappers: {"model": sd} (DDP runs), {"module": sd} (DeepSpeed) and raw state dicts
(FSDP consolidated: XXL, 3B). Key names already equal argen's module names (LlamaGen
`autoregressive/models/gpt.py`), so the map is the identity after stripping wrapper prefixes and dropping caches; it is strict all the same: every key used, none
missing, every shape checked. Converted models record rope_prefix='reference' because the weights were trained with
zeroed prefix RoPE rows.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from argen.errors import ArgenError
from argen.model.gpt import GPT, gpt_config, rope_2d_cache
from argen.model.io import load_state_strict, save

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP/DeepSpeed, torch.compile and wrapper-module saves
_DROP_SUFFIXES = ("freqs_cis", "causal_mask")     # sampler state that some saves carry


def read_llamagen_state(src: str | Path, keys: tuple[str, ...] = ("model", "module", "state_dict")
                        ) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a LlamaGen .pt/.pth and where they were found: the first of `keys` holding a dict, else a raw
    state dict (FSDP consolidated files). Wrapper prefixes are stripped, KV caches and RoPE tables dropped."""
    src = Path(src)
    if not src.is_file():
        raise ArgenError(f"checkpoint not found: {src}")
    try:
        # vq_train.py checkpoints carry the argparse Namespace under "args": allow exactly that class
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for truncated/foreign files
        raise ArgenError(f"cannot read checkpoint {src}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ArgenError(f"{src}: expected a dict checkpoint, got {type(obj).__name__}")
    for key in keys:
        if isinstance(obj.get(key), dict):
            state, where = obj[key], key
            break
    else:
        if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ArgenError(f"{src}: not a LlamaGen checkpoint (no weights under {', '.join(map(repr, keys))}; "
                             f"top-level keys: {sorted(obj)[:8]})")
        state, where = obj, "<raw state dict>"
    out = {}
    for key, value in state.items():
        while (p := next((p for p in _WRAPPER_PREFIXES if key.startswith(p)), None)) is not None:
            key = key[len(p):]  # wrappers nest in any order: DDP around compile, compile around a wrapper module
        if ".kv_cache." in key or key.endswith(_DROP_SUFFIXES):
            continue
        out[key] = value
    return out, where


def convert_llamagen_gpt(src: str | Path, out_dir: str | Path, model_name: str, image_size: int = 256,
                         t2i: bool = False, vocab_size: int | None = None) -> Path:
    state, _ = read_llamagen_state(src)
    if vocab_size is None:
        if "tok_embeddings.weight" not in state:
            raise ArgenError(f"{src}: missing 'tok_embeddings.weight'; is this a LlamaGen GPT checkpoint?")
        vocab_size = state["tok_embeddings.weight"].shape[0]
    overrides = dict(vocab_size=vocab_size, rope_prefix="reference")
    if t2i and "cls_embedding.cap_proj.fc1.weight" in state:
        overrides["caption_dim"] = state["cls_embedding.cap_proj.fc1.weight"].shape[1]
    if not t2i and "cls_embedding.embedding_table.weight" in state:
        rows = state["cls_embedding.embedding_table.weight"].shape[0]
        overrides["num_classes"] = rows - 1
    cfg = gpt_config(model_name, image_size=image_size, model_type="t2i" if t2i else "c2i", **overrides)
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu")
    load_state_strict(model, {k: v.float() for k, v in state.items()}, str(src))
    # to_empty left the non-persistent RoPE table uninitialised: rebuild it
    model.rope = rope_2d_cache(cfg.grid, cfg.head_dim, cfg.rope_base, cfg.cls_token_num, cfg.rope_prefix)
    return save(model, out_dir, meta={"source": str(src), "converted_from": "llamagen"})
