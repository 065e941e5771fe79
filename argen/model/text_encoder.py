"""The T5 text encoder for text-conditional models: caption cleaning, tokenization and transformers' T5EncoderModel.

Weights come from a local directory only (the reference expects `pretrained_models/t5-ckpt/flan-t5-xl`): a directory
written by `save_pretrained` for both the model (config.json + model.safetensors / pytorch_model.bin, possibly
sharded) and the tokenizer (spiece.model or tokenizer.json). Nothing is downloaded; a missing file is named.

Features follow the reference (LlamaGen language/t5.py): captions cleaned twice (`clean_caption`: the tokenize job
cleans before it stores, argen.serve.text.PromptEncoder before it encodes a prompt), tokenized to at most
`max_length` (120) tokens with EOS, encoder last_hidden_state; unlike the reference, only the valid prefix
(EOS included) is returned, never padded, in `dtype` (bf16 by default).
"""
from __future__ import annotations

import html
import re
import urllib.parse
from pathlib import Path

import torch

from argen.errors import ArgenError

DEFAULT_T5 = "pretrained_models/t5-ckpt/flan-t5-xl"
MAX_LENGTH = 120

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")

# ------------------------------------------------------------------------------------------- caption cleaning
# A dependency-free subset of the DeepFloyd/PixArt `clean_caption` the reference applies (it also uses ftfy and
# BeautifulSoup; here HTML is unescaped and tags stripped with regexes, which covers what captions contain).
_URL = re.compile(r"\b((?:https?:|www\.)\S+)", re.IGNORECASE)
_TAG = re.compile(r"<[^>]{0,200}>")
_HANDLE = re.compile(r"@[\w\d]+\b")
_CJK = re.compile(r"[\u31c0-\u31ef\u31f0-\u31ff\u3200-\u32ff\u3300-\u33ff\u3400-\u4dbf\u4dc0-\u4dff\u4e00-\u9fff]+")
_DASHES = re.compile(r"[\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030"
                     r"\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d]+")
_QUOTES_D = re.compile(r"[`´«»“”¨]")
_QUOTES_S = re.compile(r"[‘’]")
_IP = re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")
_FILENAME = re.compile(r"\b\S+\.(?:png|jpg|jpeg|bmp|webp|gif|eps|svg)\b", re.IGNORECASE)
_LONG_ID = re.compile(r"\b[0-9a-f]{20,}\b|\b(?=[a-z]*\d)(?=\d*[a-z])[a-z0-9]{12,}\b", re.IGNORECASE)
_BAD_PUNCT = re.compile(r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]")
_REPEAT_PUNCT = re.compile(r"([.,!?;:\-])\1+")
_SPACES = re.compile(r"\s+")


def _clean_once(text: str) -> str:
    text = urllib.parse.unquote_plus(str(text)).strip().lower()
    text = html.unescape(text)
    text = _TAG.sub(" ", text)
    text = _URL.sub("", text)
    text = _HANDLE.sub("", text)
    text = _CJK.sub("", text)
    text = _DASHES.sub("-", text)
    text = _QUOTES_D.sub('"', text)
    text = _QUOTES_S.sub("'", text)
    text = _IP.sub(" ", text)
    text = _FILENAME.sub("", text)
    text = _LONG_ID.sub("", text)
    text = _BAD_PUNCT.sub(" ", text)
    text = _REPEAT_PUNCT.sub(r"\1", text)
    text = _SPACES.sub(" ", text).strip()
    # the reference's edge trimming: one leading ' _ , - : ; and one trailing ' _ , - : +
    text = re.sub(r"^['_,\-:;]", "", text)
    text = re.sub(r"['_,\-:+]$", "", text)
    return text.strip()


def clean_caption(text: str | None) -> str:
    """Normalised caption ("" when nothing is left); applied twice like the reference."""
    if text is None:
        return ""
    return _clean_once(_clean_once(text))


# ------------------------------------------------------------------------------------------------- encoder

def check_t5_dir(path: str | Path) -> Path:
    """The local T5 directory, or an ArgenError naming what is missing."""
    p = Path(path)
    hint = ("place a T5 encoder saved with save_pretrained there (e.g. google/flan-t5-xl: config.json, "
            "model*.safetensors, spiece.model or tokenizer.json); argen never downloads weights")
    if not p.is_dir():
        raise ArgenError(f"T5 model directory not found: {p} — {hint}")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any((p / f).is_file() for f in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES))
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        missing.append(" or ".join(_TOKENIZER_FILES))
    if missing:
        raise ArgenError(f"T5 model directory {p} is missing: {'; '.join(missing)} — {hint}")
    return p


class T5TextEncoder:
    """Captions -> list of (L_valid, d_model) feature tensors (EOS included), in `dtype`, on CPU."""

    def __init__(self, path: str | Path = DEFAULT_T5, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.bfloat16, max_length: int = MAX_LENGTH):
        from transformers import AutoTokenizer, T5EncoderModel

        p = check_t5_dir(path)
        self.path = str(p)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_length = max_length
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(self.path, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise ArgenError(f"cannot load T5 from {p}: {e}") from None
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        if not captions:
            return []
        tok = self.tokenizer(list(captions), max_length=self.max_length, padding="longest", truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = mask.sum(dim=1).tolist()
        return [hidden[i, : int(n)].to(self.dtype).cpu() for i, n in enumerate(lengths)]

    def identity(self) -> dict:
        return {"model": self.path, "dim": self.dim, "max_length": self.max_length}
