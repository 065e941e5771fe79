"""LPIPS-VGG perceptual distance (Zhang et al. 2018, v0.1 "vgg" weights), loaded from local files only.

Two files are needed, both given by path (nothing is downloaded at run time):
- the torchvision ImageNet VGG16 weights `vgg16-397923af.pth` (only the `features.*` convs are used, 14,714,688
  frozen parameters);
- the LPIPS v0.1 linear-calibration layers `vgg.pth` (keys `lin{0..4}.model.1.weight`, 1,472 values; LlamaGen ships
  it as tokenizer/tokenizer_image/cache/vgg.pth, the `lpips` PyPI package as lpips/weights/v0.1/vgg.pth).

The network always stays in eval mode: the reference flips its Dropout(0.5) in front of each linear layer into train
mode together with the loss module, which makes the perceptual loss random. Here `train()` is a no-op for LPIPS.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from argen.errors import ArgenError
from argen.model.io import load_state_strict, read_state_file

VGG16_FILE = "vgg16-397923af.pth"
LIN_FILE = "vgg.pth"
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_CHANNELS = [64, 128, 256, 512, 512]

HOW_TO_GET = (
    f"put both files in one directory and pass it as loss.lpips_dir: '{VGG16_FILE}' (torchvision's VGG16 ImageNet "
    f"weights, https://download.pytorch.org/models/{VGG16_FILE}, or ~/.cache/torch/hub/checkpoints/{VGG16_FILE} on a "
    f"machine that used torchvision) and '{LIN_FILE}' (LPIPS v0.1 linear layers, 7,289 bytes, MD5 "
    "d507d7349b931f0638a25a48a722f98a: LlamaGen's tokenizer/tokenizer_image/cache/vgg.pth or "
    "lpips/weights/v0.1/vgg.pth from the `lpips` package); or set loss.perceptual_weight=0 to train without LPIPS"
)


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features` layout (same indices, so its state_dict loads as is)."""
    layers: list[nn.Module] = []
    c = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
            c = v
    return nn.Sequential(*layers)


class _Lin(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        # Sequential(Dropout, Conv) only to keep the file's key names `linK.model.1.weight`
        self.model = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = vgg16_features()
        for k, c in enumerate(_CHANNELS):
            setattr(self, f"lin{k}", _Lin(c))
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "LPIPS":
        return self  # never leave eval mode: the lin dropout must stay off

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample distance (B,) between images in [-1, 1]."""
        hx, hy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for k, (a, b) in enumerate(_SLICES):
            block = self.features[a:b]
            hx, hy = block(hx), block(hy)
            fx = hx / (hx.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10).to(hx.dtype)
            fy = hy / (hy.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10).to(hy.dtype)
            lin = getattr(self, f"lin{k}").model[1]
            total = total + lin((fx - fy) ** 2).float().mean(dim=(1, 2, 3))
        return total

    @staticmethod
    def check_dir(directory: str | Path) -> Path:
        """The weight directory if both files are there; else an ArgenError naming the missing files."""
        if not directory:
            raise ArgenError(f"LPIPS needs local weights but loss.lpips_dir is empty; {HOW_TO_GET}")
        d = Path(directory)
        missing = [str(d / f) for f in (VGG16_FILE, LIN_FILE) if not (d / f).is_file()]
        if missing:
            raise ArgenError(f"LPIPS weight file(s) missing: {', '.join(missing)}; {HOW_TO_GET}")
        return d

    @classmethod
    def from_dir(cls, directory: str | Path) -> "LPIPS":
        """Load VGG16 features + LPIPS lin layers from `directory`; ArgenError naming any missing file."""
        d = cls.check_dir(directory)
        model = cls()
        vgg = read_state_file(d / VGG16_FILE, "VGG16 weights")
        feats = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")}
        load_state_strict(model.features, feats, str(d / VGG16_FILE))
        lin = read_state_file(d / LIN_FILE, "LPIPS weights")
        lin_expected = {f"lin{k}.model.1.weight" for k in range(5)}
        if set(lin) != lin_expected:
            raise ArgenError(f"{d / LIN_FILE}: expected keys {sorted(lin_expected)}, got {sorted(lin)[:8]}")
        for k in range(5):
            load_state_strict(getattr(model, f"lin{k}").model[1], {"weight": lin[f"lin{k}.model.1.weight"]},
                              str(d / LIN_FILE))
        return model


def save_random_weights(directory: str | Path, seed: int = 0) -> Path:
    """Write random-init files in the published formats (for tests and offline smoke runs; NOT a perceptual metric)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    feats = vgg16_features()
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, d / VGG16_FILE)
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) * 0.1 for k, c in enumerate(_CHANNELS)}, d / LIN_FILE)
    return d
