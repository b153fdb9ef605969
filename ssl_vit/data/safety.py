"""Safe decoding of WebDataset samples: a whitelist, never pickle, and counted skips.

webdataset's own `.decode(...)` always appends its default handlers, which unpickle `.pyd`, `.pkl`
and `.pickle` payloads and `torch.load` `.pth` without `weights_only`: a shard from an untrusted
source could run code in every worker. `WDS_SECURE=1` is no answer (it also blocks local paths and
`pipe:`). So ssl-vit never calls webdataset's decoders: it reads raw bytes and decodes only images
(through PIL), `.cls` (ASCII integer) and `.npy` (with `allow_pickle=False`). A sample that carries
a pickle payload is rejected before anything touches its bytes.

A bad sample (pickle payload, undecodable image, missing image, bad label, unreadable or truncated
shard) is skipped and counted per reason, or, with `data.strict`, stops the run with a one-line
`DataError` naming the shard and key. webdataset's `warn_and_continue` is not used: it sleeps 0.5 s
per bad sample.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from ssl_vit.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "tif", "tiff")
PICKLE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib", "dill"})
REASONS = ("pickle_payload", "bad_image", "missing_image", "bad_label", "bad_shard")


class BadSample(Exception):
    """Raised inside the pipeline for one bad sample or shard; the `SkipCounter` decides its fate."""

    def __init__(self, reason: str, where: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{where}: {detail}")
        self.reason, self.where, self.detail = reason, where, detail


@dataclass
class SkipCounter:
    """Counts skipped samples per reason (one per worker); in strict mode the first one is fatal.

    `notes` keeps the first message of each reason so the main process can log it once.
    """

    strict: bool = False
    counts: Counter[str] = field(default_factory=Counter)
    notes: dict[str, str] = field(default_factory=dict)
    shard: str = "?"  # the shard being read, for errors raised below webdataset's handlers
    shard_failed: bool = False  # one failure per shard visit is counted, however it surfaces

    def start_shard(self, url: str) -> None:
        self.shard, self.shard_failed = url, False

    def skip(self, bad: BadSample) -> None:
        if self.strict:
            raise DataError(f"{bad} (data.strict=true; set it to false to skip and count such samples)")
        self.counts[bad.reason] += 1
        self.notes.setdefault(bad.reason, str(bad))

    def handler(self, exn: Exception) -> bool:
        """A webdataset exception handler: count the error against the current shard and go on."""
        if isinstance(exn, DataError):
            raise exn
        if isinstance(exn, BadSample):
            self.skip(exn)
        elif not self.shard_failed:
            self.shard_failed = True
            first = str(exn.args[0]) if exn.args else ""
            first = first.split(" @ ")[0]  # webdataset appends the stream's repr
            self.skip(BadSample("bad_shard", self.shard, f"unreadable shard ({type(exn).__name__}: {first})"))
        return True

    def take(self) -> tuple[dict[str, int], dict[str, str]]:
        """Counts and notes gathered since the last call (what travels with the next batch)."""
        counts, notes = dict(self.counts), dict(self.notes)
        self.counts.clear()
        self.notes.clear()
        return counts, notes


def _extensions(key: str) -> set[str]:
    return set(key.lower().split("."))


def _where(sample: dict[str, object]) -> str:
    return f"{sample.get('__url__', '?')}: sample '{sample.get('__key__', '?')}'"


def pil_to_tensor(image: Image.Image, in_chans: int) -> Tensor:
    """A PIL image -> (C, H, W) uint8, converted to `in_chans` channels (1: luminance, 3: RGB)."""
    array = np.array(image.convert("L" if in_chans == 1 else "RGB"), dtype=np.uint8)  # (H, W[, C])
    if array.ndim == 2:
        array = array[:, :, None]
    return rearrange(torch.from_numpy(array), "h w c -> c h w")  # (C, H, W)


def _npy_to_tensor(data: bytes, in_chans: int) -> Tensor:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype != np.uint8:
        array = np.clip(np.asarray(array, dtype=np.float32) * 255.0, 0, 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    return pil_to_tensor(Image.fromarray(array.squeeze()), in_chans)


def image_member(exts: list[str], where: str) -> str:
    """The extension whose bytes hold a sample's image, from the names of its members alone (the
    exact stream screens samples with it before reading any byte). Raises `BadSample` for a
    pickle payload or a sample without an image."""
    pickled = sorted(k for k in exts if _extensions(k) & PICKLE_EXTS)
    if pickled:
        raise BadSample("pickle_payload", where, f"carries '.{pickled[0]}' (pickle); never unpickled")
    image_key = next((e for e in (*IMAGE_EXTS, "npy") if e in exts), None)
    if image_key is None:
        raise BadSample("missing_image", where, f"no image among {sorted(exts)}")
    return image_key


def decode_sample(sample: dict[str, object], in_chans: int) -> tuple[Tensor, int]:
    """A raw sample (bytes per extension) -> image (C, H, W) uint8 and label (-1 if unlabelled).

    Raises `BadSample`. Bytes of extensions outside the whitelist are never looked at.
    """
    image_key = image_member([k for k in sample if not k.startswith("__")], _where(sample))
    try:
        data = sample[image_key]
        assert isinstance(data, bytes)
        if image_key == "npy":
            image = _npy_to_tensor(data, in_chans)
        else:
            with Image.open(io.BytesIO(data)) as img:
                image = pil_to_tensor(img, in_chans)
    except Exception as exn:
        raise BadSample("bad_image", _where(sample), f"undecodable image ({type(exn).__name__})") from None
    label = -1
    if "cls" in sample:
        raw = sample["cls"]
        try:
            assert isinstance(raw, bytes)
            label = int(raw.decode("ascii").strip())
        except Exception:
            raise BadSample("bad_label", _where(sample), f".cls is not an integer: {raw!r:.40}") from None
    return image, label


# Totals of this process, fed by the loader from the counts each batch carries back from its worker.
_TOTALS: Counter[str] = Counter()
_LOGGED: set[str] = set()


def record(counts: dict[str, int], notes: dict[str, str]) -> None:
    """Add a worker's counts to this process's totals; log the first sample of each reason once."""
    _TOTALS.update(counts)
    for reason, note in notes.items():
        if reason not in _LOGGED:
            _LOGGED.add(reason)
            log.warning("skipped a bad sample (%s): %s; further ones are only counted", reason, note)


def skip_counts() -> dict[str, int]:
    """Samples skipped so far in this process, per reason (every reason present, zeros included)."""
    return {reason: int(_TOTALS[reason]) for reason in REASONS}


def reset_skip_counts() -> None:
    _TOTALS.clear()
    _LOGGED.clear()
