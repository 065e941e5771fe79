"""Save and load every argen model kind as `DIR/config.json` + `DIR/model.safetensors`.

config.json holds {"kind": ..., "config": {...the model's config dataclass...}, "meta": {...}}. Loading is strict:
every tensor in the file must be a parameter/buffer of the built model and vice versa, with equal shapes.
New model kinds register here with (module, config class, model class).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from argen.errors import ArgenError

# kind -> (module, config class name, model class name)
KINDS: dict[str, tuple[str, str, str]] = {
    "gpt": ("argen.model.gpt", "GPTConfig", "GPT"),
    "vq": ("argen.model.vq", "VQConfig", "VQModel"),
}


def _classes(kind: str) -> tuple[type, type]:
    if kind not in KINDS:
        raise ArgenError(f"unknown model kind '{kind}' (known: {', '.join(KINDS)})")
    module, cfg_name, model_name = KINDS[kind]
    mod = importlib.import_module(module)
    return getattr(mod, cfg_name), getattr(mod, model_name)


def config_from_dict(kind: str, data: dict) -> Any:
    cfg_cls, _ = _classes(kind)
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = set(data) - names
    if unknown:
        raise ArgenError(f"config.json has keys unknown to {cfg_cls.__name__}: {sorted(unknown)}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cfg_cls(**fixed)


def build(kind: str, config: Any) -> torch.nn.Module:
    _, model_cls = _classes(kind)
    return model_cls(config)


def state_dict_for_export(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Persistent parameters and buffers, contiguous and unshared (safetensors refuses shared storage)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def save(model: torch.nn.Module, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write config.json + model.safetensors for a model that has `.kind` and a dataclass `.config`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"kind": model.kind, "config": dataclasses.asdict(model.config), "meta": meta or {}}
    save_file(state_dict_for_export(model), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(record, indent=2))
    return out


def read_record(path: str | Path) -> dict:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise ArgenError(f"not an argen model directory: {path} (missing config.json)")
    try:
        record = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ArgenError(f"malformed {cfg_path}: {e}") from None
    if "kind" not in record or "config" not in record:
        raise ArgenError(f"malformed {cfg_path}: needs 'kind' and 'config'")
    return record


def read_state_file(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """A state dict from a published weights file: .safetensors, or a torch pickle (weights only, mapped to the
    CPU: some were saved from a GPU), unwrapped from {"state_dict": ...}. ArgenError naming the file otherwise."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt or truncated downloads surface as many exception types
        raise ArgenError(f"cannot read {what} {path}: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ArgenError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"shape mismatch for {k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}")
        raise ArgenError(f"{source}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load any argen model directory in eval mode."""
    record = read_record(path)
    config = config_from_dict(record["kind"], record["config"])
    model = build(record["kind"], config)
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise ArgenError(f"missing weights file: {weights}")
    state = read_state_file(weights)
    load_state_strict(model, state, str(weights))
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()
