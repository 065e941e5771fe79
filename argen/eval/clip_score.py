"""CLIP score for text-to-image samples, as the reference's GigaGAN-derived evaluator computes it.

Each image is resized to `eval_res` (256) with LANCZOS, then CLIP-preprocessed (bicubic resize of the short side
to the model's input size, centre crop, CLIP mean/std). Each caption is prefixed with "A photo depicts " and
truncated to the text model's length with the end token kept. The score is the mean raw cosine similarity of the
image and text embeddings (not ×100, not clipped at 0).

The model loads from a local directory in Hugging Face `save_pretrained` layout (config.json, weights, tokenizer
files), e.g. `openai/clip-vit-base-patch32` (the reference's ViT-B/32) fetched on a machine with internet.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from argen.errors import ArgenError

PREFIX = "A photo depicts "
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HOW_TO = ("fetch it on a machine with internet, e.g. `huggingface-cli download openai/clip-vit-base-patch32 "
          "--local-dir DIR`, copy DIR here and pass --clip DIR")


def _dir_digest(path: Path) -> str:
    """sha256 over the weight files (sorted by name) so results name the exact network."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


class ClipScorer:
    def __init__(self, path: str | Path, device: str | torch.device = "cpu", eval_res: int = 256):
        from transformers import CLIPModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ArgenError(f"no CLIP model at {self.path} (missing config.json); {HOW_TO}")
        weights = list(self.path.glob("*.safetensors")) + list(self.path.glob("*.bin"))
        if not weights:
            raise ArgenError(f"CLIP directory {self.path} has no weight file (*.safetensors or *.bin); {HOW_TO}")
        if not (self.path / "vocab.json").is_file() and not (self.path / "tokenizer.json").is_file():
            raise ArgenError(f"CLIP directory {self.path} has no tokenizer files (vocab.json + merges.txt or "
                             f"tokenizer.json); {HOW_TO}")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.model = CLIPModel.from_pretrained(str(self.path), local_files_only=True).eval().to(device)
            self.tokenizer = CLIPTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ArgenError(f"cannot load CLIP from {self.path}: {e}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        self.device, self.eval_res = device, eval_res
        self.input_size = self.model.config.vision_config.image_size
        self.mean, self.std = OPENAI_MEAN, OPENAI_STD
        pre = self.path / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            self.mean, self.std = tuple(cfg.get("image_mean", self.mean)), tuple(cfg.get("image_std", self.std))
        self.sha256 = _dir_digest(self.path)

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        out = []
        for img in images:
            im = Image.fromarray(img)
            if im.size != (self.eval_res, self.eval_res):
                im = im.resize((self.eval_res, self.eval_res), Image.LANCZOS)
            w, h = im.size
            scale = self.input_size / min(w, h)
            im = im.resize((max(self.input_size, round(w * scale)), max(self.input_size, round(h * scale))),
                           Image.BICUBIC)
            w, h = im.size
            left, top = (w - self.input_size) // 2, (h - self.input_size) // 2
            im = im.crop((left, top, left + self.input_size, top + self.input_size))
            out.append(np.asarray(im, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    @staticmethod
    def _embeds(out) -> torch.Tensor:
        # transformers 4 returns the projected tensor; 5 returns an output whose pooler_output is projected.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def similarities(self, images: np.ndarray, captions: list[str]) -> np.ndarray:
        if len(images) != len(captions):
            raise ArgenError(f"{len(images)} images but {len(captions)} captions")
        max_len = self.model.config.text_config.max_position_embeddings
        tok = self.tokenizer([PREFIX + c for c in captions], padding=True, truncation=True, max_length=max_len,
                             return_tensors="pt").to(self.device)
        img = self._embeds(self.model.get_image_features(pixel_values=self._pixels(images)))
        txt = self._embeds(self.model.get_text_features(input_ids=tok["input_ids"],
                                                        attention_mask=tok["attention_mask"]))
        return torch.nn.functional.cosine_similarity(img.float(), txt.float()).cpu().numpy()

    def score(self, batches, captions: list[str], total: int) -> float:
        """Mean cosine similarity of image i and caption i over `batches` of uint8 N×H×W×3 images."""
        sims, start = [], 0
        with tqdm(total=total, desc="CLIP score", unit="img", disable=None) as bar:
            for batch in batches:
                sims.append(self.similarities(batch, captions[start:start + len(batch)]))
                start += len(batch)
                bar.update(len(batch))
        return float(np.concatenate(sims).mean())


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt (one per line), a .csv/.tsv with a 'Prompt' column (COCO/Parti files), or an .npz
    holding a 'prompts' array (the t2i captions file of `argen eval sample`)."""
    p = Path(path)
    if not p.is_file():
        raise ArgenError(f"no such prompts file: {p}")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as data:
            if "prompts" not in data.files:
                raise ArgenError(f"{p} has no 'prompts' array")
            return [str(s) for s in data["prompts"]]
    if p.suffix in (".csv", ".tsv"):
        import csv
        with open(p, newline="") as f:
            head = f.readline()
            f.seek(0)
            delim = "\t" if "\t" in head else ","
            rows = list(csv.DictReader(f, delimiter=delim))
        if not rows or "Prompt" not in rows[0]:
            raise ArgenError(f"{p} needs a 'Prompt' column")
        return [r["Prompt"] for r in rows]
    return [line.rstrip("\n") for line in p.read_text().splitlines() if line.strip()]
