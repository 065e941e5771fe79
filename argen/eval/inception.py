"""The FID Inception-V3 in plain torch: the network of the ADM/TF evaluator (`classify_image_graph_def.pb`,
2015-12-05) in the layout of pytorch-fid / torch-fidelity, so their ported weight file loads unchanged.

Outputs per image, as the ADM evaluator reads them from the TF graph:
- ``pool``    2048-d `pool_3` features (FID, precision/recall);
- ``spatial`` `mixed_6/conv` (= Mixed_6d.branch1x1 after its ReLU), first 7 channels of the 17×17 map, flattened
  in TF's NHWC order to 2023-d (sFID);
- ``logits``  pool @ fc.weightᵀ *without* the bias: ADM builds its softmax from the matmul alone (IS).

Input: uint8 (or float in [0,255]) images N×H×W×3. As in the TF graph they are resized to 299×299 with TF1's
bilinear resize (align_corners=False, no half-pixel centres) and normalised as (x − 128) / 128.

Weights: `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid release `fid_weights`) or the identical
`weights-inception-2015-12-05-6726825d.pth` (torch-fidelity v0.2.0), a .pth state dict or a .safetensors file.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from argen.data_pipeline.storage import sha256_file
from argen.errors import ArgenError
from argen.model.io import read_state_file

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
WEIGHTS_ENV = "ARGEN_INCEPTION_WEIGHTS"
SPATIAL_CHANNELS = 7


def default_weights_path() -> Path:
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "argen" / "weights" / WEIGHTS_NAME


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    # The TF graph's average pools exclude the padding from the count.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int, c=int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, c(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, c(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(c(48), c(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, c(pool_features), kernel_size=1)
        self.out_channels = c(64) + c(64) + c(96) + c(pool_features)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b1, b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int, c=int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, c(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), kernel_size=3, stride=2)
        self.out_channels = c(384) + c(96) + cin

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int, c=int):
        super().__init__()
        c7, c192 = c(c7), c(192)
        self.branch1x1 = BasicConv2d(cin, c192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, c192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, c192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, c192, kernel_size=1)
        self.out_channels = 4 * c192

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg_pool(x))], 1), b1


class InceptionD(nn.Module):
    def __init__(self, cin: int, c=int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, c(192), kernel_size=1)
        self.branch3x3_2 = BasicConv2d(c(192), c(320), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, c(192), kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(c(192), c(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(c(192), c(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(c(192), c(192), kernel_size=3, stride=2)
        self.out_channels = c(320) + c(192) + cin

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, max_pool: bool, c=int):
        super().__init__()
        # The last block of the TF graph pools with max instead of average (pytorch-fid's FIDInceptionE_2).
        self.max_pool = max_pool
        c384 = c(384)
        self.branch1x1 = BasicConv2d(cin, c(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, c384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(c384, c384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(c384, c384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, c(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(448), c384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c384, c384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(c384, c384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, c(192), kernel_size=1)
        self.out_channels = c(320) + 4 * c384 + c(192)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 `ResizeBilinear(align_corners=False)`: source = dest · in/out (no half-pixel offset), edge-clamped."""
    _, _, h, w = x.shape
    if (h, w) == (size, size):
        return x

    def axis(n_in: int):
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = x[:, :, y0, :] * (1 - fy)[:, None] + x[:, :, y1, :] * fy[:, None]
    return top[:, :, :, x0] * (1 - fx) + top[:, :, :, x1] * fx


class InceptionV3(nn.Module):
    """FID Inception-V3. `forward(images N×H×W×3 in [0,255])` returns {"pool", "spatial", "logits"}.

    `width` < 1 and a smaller `input_size` (≥ 75) build a scaled-down copy with the same wiring, used for tests
    and smoke runs; such a network is saved as .safetensors with its shape in the file's metadata.
    """

    def __init__(self, width: float = 1.0, input_size: int = 299):
        super().__init__()
        if input_size < 75:
            raise ArgenError(f"Inception input size must be at least 75, got {input_size}")
        self.width, self.input_size = width, input_size
        c = (lambda n: n) if width == 1.0 else (lambda n: max(SPATIAL_CHANNELS, int(round(n * width))))
        self.Conv2d_1a_3x3 = BasicConv2d(3, c(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(c(32), c(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(c(32), c(64), kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(c(64), c(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(c(80), c(192), kernel_size=3)
        blocks = [("Mixed_5b", InceptionA, dict(pool_features=32)), ("Mixed_5c", InceptionA, dict(pool_features=64)),
                  ("Mixed_5d", InceptionA, dict(pool_features=64)), ("Mixed_6a", InceptionB, {}),
                  ("Mixed_6b", InceptionC, dict(c7=128)), ("Mixed_6c", InceptionC, dict(c7=160)),
                  ("Mixed_6d", InceptionC, dict(c7=160)), ("Mixed_6e", InceptionC, dict(c7=192)),
                  ("Mixed_7a", InceptionD, {}), ("Mixed_7b", InceptionE, dict(max_pool=False)),
                  ("Mixed_7c", InceptionE, dict(max_pool=True))]
        cin = c(192)
        for name, cls, kw in blocks:
            block = cls(cin, c=c, **kw)
            setattr(self, name, block)
            cin = block.out_channels
        self.pool_dim = cin
        self.fc = nn.Linear(cin, 1008)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected N×H×W×3 images, got shape {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).to(self.fc.weight.dtype)
        x = resize_bilinear_tf1(x, self.input_size)
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x, _ = self.Mixed_6b(x)
        x, _ = self.Mixed_6c(x)
        x, mixed_6_conv = self.Mixed_6d(x)
        x, _ = self.Mixed_6e(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        spatial = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # NHWC order like TF
        logits = pool @ self.fc.weight.t()
        return {"pool": pool, "spatial": spatial, "logits": logits}


def save_inception(net: InceptionV3, path: str | Path) -> Path:
    """Save a (e.g. scaled-down test) network as .safetensors with its shape in the metadata."""
    from safetensors.torch import save_file
    path = Path(path)
    state = {k: v.contiguous() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(path), metadata={"argen_inception": json.dumps(
        {"width": net.width, "input_size": net.input_size})})
    return path


def _shape_meta(path: Path) -> dict:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("argen_inception", "{}"))


@lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float) -> tuple[InceptionV3, str]:
    p = Path(path)
    state = read_state_file(p, "Inception weights")
    # Older/other ports may carry BatchNorm step counters or a torchvision aux head; neither affects the output.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") and not k.startswith("AuxLogits.")}
    net = InceptionV3(**_shape_meta(p))
    expected = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ArgenError(f"{p} is not an FID Inception-V3 state dict: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]} (expected {WEIGHTS_NAME} from {WEIGHTS_URL})")
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ArgenError(f"{p}: shapes do not match the FID Inception-V3: {str(e).splitlines()[-1]}") from None
    return net.eval().requires_grad_(False), sha256_file(p)


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[InceptionV3, str]:
    """The FID Inception network from a local weight file, and that file's sha256."""
    p = Path(path) if path else default_weights_path()
    if not p.is_file():
        raise ArgenError(
            f"Inception weights not found at {p}. Download {WEIGHTS_URL} on a machine with internet, copy it there "
            f"(or pass --inception PATH, or set {WEIGHTS_ENV}); see the README, 'Weight files'")
    net, digest = _load_cached(str(p.resolve()), p.stat().st_mtime)
    return net.to(device), digest
