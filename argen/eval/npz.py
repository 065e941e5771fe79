"""The sample-batch `.npz` format shared with the ADM evaluator: `arr_0` = N×H×W×3 uint8, optional float64 `mu`,
`sigma` (2048-d pool statistics) and `mu_s`, `sigma_s` (2023-d spatial statistics) in reference batches.

Batches of 50,000 images at 256 px are ~10 GB, so both directions stream: the reader walks the `arr_0.npy` member
chunk by chunk without loading it, and the writer appends chunks to a zip64 member of known shape.
"""
from __future__ import annotations

import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from argen.errors import ArgenError


def sidecar_path(samples: str | Path) -> Path:
    """The protocol JSON written beside a sample batch (`argen eval sample`, `argen eval reconstruct`)."""
    p = Path(samples)
    return p.with_name(p.name[:-4] + ".json" if p.name.endswith(".npz") else p.name + ".json")


STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _open_member(zf: zipfile.ZipFile, name: str, path: str):
    if name + ".npy" not in zf.namelist():
        raise ArgenError(f"{path} has no '{name}' array (has {sorted(n[:-4] for n in zf.namelist())})")
    f = zf.open(name + ".npy")
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    return f, tuple(shape), fortran, dtype


def npz_keys(path: str | Path) -> list[str]:
    """Names of the arrays in an .npz, without reading them."""
    if not Path(path).is_file():
        raise ArgenError(f"no such .npz file: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile:
        raise ArgenError(f"{path} is not a valid .npz (zip) file") from None


def load_stats(path: str | Path, spatial: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """Stored (mu, sigma), or (mu_s, sigma_s) when `spatial`, if the file holds them."""
    mu_key, sigma_key = ("mu_s", "sigma_s") if spatial else ("mu", "sigma")
    keys = npz_keys(path)
    if mu_key not in keys or sigma_key not in keys:
        return None
    with np.load(path) as data:
        return data[mu_key].astype(np.float64), data[sigma_key].astype(np.float64)


class NpzImages:
    """Streams `arr_0` of a sample-batch npz without loading it whole."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if not Path(self.path).is_file():
            raise ArgenError(f"no such .npz file: {self.path}")
        try:
            with zipfile.ZipFile(self.path) as zf:
                f, self.shape, fortran, self.dtype = _open_member(zf, "arr_0", self.path)
                f.close()
                self.keys = [n[:-4] for n in zf.namelist()]
        except zipfile.BadZipFile:
            raise ArgenError(f"{self.path} is not a valid .npz (zip) file") from None
        if fortran or len(self.shape) != 4 or self.shape[-1] != 3 or self.dtype != np.uint8:
            raise ArgenError(f"{self.path}: arr_0 must be an N×H×W×3 uint8 array in C order, got shape "
                             f"{self.shape} dtype {self.dtype}{' (Fortran order)' if fortran else ''}")

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """The images in file order, batch_size at a time; only the first `limit` when given."""
        per = int(np.prod(self.shape[1:]))
        total = self.shape[0] if limit is None else min(limit, self.shape[0])
        with zipfile.ZipFile(self.path) as zf:
            f, *_ = _open_member(zf, "arr_0", self.path)
            with f:
                for start in range(0, total, batch_size):
                    n = min(batch_size, total - start)
                    buf = f.read(n * per)
                    if len(buf) != n * per:
                        raise ArgenError(f"{self.path}: arr_0 is truncated at image {start}")
                    yield np.frombuffer(buf, np.uint8).reshape(n, *self.shape[1:])

    def read_all(self) -> np.ndarray:
        return np.concatenate(list(self.batches(4096)), axis=0) if len(self) else np.zeros(self.shape, np.uint8)

    def stats(self, spatial: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """The stored (mu, sigma), or (mu_s, sigma_s) when `spatial`, if the file holds them."""
        return load_stats(self.path, spatial)


@contextmanager
def npz_writer(path: str | Path, shape: tuple[int, ...], extra: dict[str, np.ndarray] | None = None):
    """Write an uncompressed npz whose `arr_0` (uint8, `shape`) arrives in chunks through `write(chunk)`.

    The file appears under its name only when complete (written beside it, then renamed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    written = 0
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                        "shape": tuple(shape)})

                def write(chunk: np.ndarray) -> None:
                    nonlocal written
                    chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
                    if chunk.shape[1:] != tuple(shape[1:]) or written + len(chunk) > shape[0]:
                        raise ValueError(f"chunk {chunk.shape} does not fit {shape} after {written} images")
                    f.write(chunk.tobytes())
                    written += len(chunk)

                yield write
            if written != shape[0]:
                raise ValueError(f"wrote {written} images into an npz declared for {shape[0]}")
            for key, value in (extra or {}).items():
                with zf.open(key + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(value))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_images(path: str | Path, images: np.ndarray, **extra: np.ndarray) -> None:
    with npz_writer(path, images.shape, extra) as write:
        write(images)
