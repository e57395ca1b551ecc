"""``image_filter``: drop images that do not decode or whose size or shape is off.

Reads ``image`` (bytes).  Dimensions come from the image header, parsed
without decoding pixels (``curate.io.webdataset.image_size``, the same check
the WebDataset source makes), so a decompression bomb is rejected before any
pixel is decoded.  With ``decode: full`` every image that passes the size
rules is also decoded completely, which catches truncated or corrupt pixel
data that a header check cannot see.

Rules, checked in this order (the first failing rule is the reason; the
rejects ``value`` is ``WIDTHxHEIGHT`` when known):

* ``bad_image``: the header cannot be read, or (``decode: full``) the pixels
  cannot be decoded; the detail says what Pillow reported.
* ``image_too_large``: more than ``max_pixels`` pixels (a decompression bomb guard).
* ``too_small``: the shorter side is below ``min_side``.
* ``too_big``: the longer side is above ``max_side``.
* ``bad_aspect``: the longer side is more than ``max_aspect`` times the shorter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.io.webdataset import image_size
from curate.stage import Filter, Requirement, StageConfig, Verdict


class ImageFilterConfig(StageConfig):
    min_side: int | None = Field(None, ge=1)
    max_side: int | None = Field(None, ge=1)
    max_aspect: float | None = Field(None, ge=1.0)
    #: Larger images are rejected from their header, never decoded (Pillow's default).
    max_pixels: int = Field(89_478_485, gt=0)
    decode: Literal["header", "full"] = "header"


def _measure(payload: bytes | None, cfg: ImageFilterConfig) -> tuple[int, int] | tuple[str, str]:
    """(width, height), or (reason, detail)."""
    if not payload:
        return "bad_image", "no image bytes"
    return image_size(payload, cfg.max_pixels, decode=cfg.decode == "full")


class ImageFilter(Filter):
    """Keeps images that decode and whose sides and aspect ratio are within bounds."""

    Config: ClassVar[type[StageConfig]] = ImageFilterConfig
    config: ImageFilterConfig
    requires = (Requirement("PIL", "pillow"),)

    def reads(self) -> Sequence[str]:
        return ("image",)

    def decide(self, batch: pa.Table) -> Verdict:
        cfg = self.config
        n = batch.num_rows
        reason = np.full(n, None, dtype=object)
        value = np.full(n, None, dtype=object)
        for i, payload in enumerate(batch.column("image").to_pylist()):
            measured = _measure(payload, cfg)
            if isinstance(measured[0], str):
                reason[i] = f"{measured[0]}:{measured[1]}"
                continue
            width, height = int(measured[0]), int(measured[1])
            value[i] = f"{width}x{height}"
            short, long = min(width, height), max(width, height)
            if cfg.min_side is not None and short < cfg.min_side:
                reason[i] = "too_small"
            elif cfg.max_side is not None and long > cfg.max_side:
                reason[i] = "too_big"
            elif cfg.max_aspect is not None and long > cfg.max_aspect * short:
                reason[i] = "bad_aspect"
        keep = reason == None  # noqa: E711 - elementwise
        value[keep] = None
        return Verdict(
            keep=np.asarray(keep, dtype=bool),
            reason=pa.array(reason, pa.string()),
            value=pa.array(value, pa.string()),
        )
