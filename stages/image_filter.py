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

With ``preprocess: {arch: ViT-B-32}`` the stage also prepares the images of
kept rows for a CLIP model, in the CPU actors that run ahead of the GPU
actors: every image is decoded (``decode: full`` is implied), converted to RGB
(transparency on white) and resized and centre-cropped exactly as open_clip
does for that architecture; the crop goes to the ``pixels`` column as uint8
HWC bytes, which ``clip_score`` normalizes on its device and then removes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field

from curate import clip
from curate.io.webdataset import image_size
from curate.models import local_path
from curate.stage import Filter, Requirement, StageConfig, Verdict, set_column


class PreprocessConfig(StageConfig):
    """Which model the crops are for: an open_clip architecture (and checkpoint,
    whose hub tag may bring its own preprocessing)."""

    arch: str
    #: JSON config (``<arch>.json``) of an architecture open_clip does not ship.
    arch_config: str | None = None
    checkpoint: str | None = None
    column: str = "pixels"


class ImageFilterConfig(StageConfig):
    min_side: int | None = Field(None, ge=1)
    max_side: int | None = Field(None, ge=1)
    max_aspect: float | None = Field(None, ge=1.0)
    #: Larger images are rejected from their header, never decoded (Pillow's default).
    max_pixels: int = Field(89_478_485, gt=0)
    decode: Literal["header", "full"] = "header"
    #: Prepare kept images for this CLIP model (see the module docstring).
    preprocess: PreprocessConfig | None = None


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

    crop: Any = None

    def reads(self) -> Sequence[str]:
        return ("image",)

    def writes(self) -> Mapping[str, pa.DataType]:
        pre = self.config.preprocess
        return {pre.column: pa.binary()} if pre is not None else {}

    def models(self) -> Mapping[str, str]:
        pre = self.config.preprocess
        return {"preprocess.arch_config": pre.arch_config} if pre and pre.arch_config else {}

    def _crop_spec(self) -> clip.CropSpec:
        pre = self.config.preprocess
        assert pre is not None
        config = local_path(pre.arch_config, self.context.base_dir) if pre.arch_config else None
        return clip.CropSpec(pre.arch, config, pre.checkpoint)

    def setup(self) -> None:
        if self.config.preprocess is not None and self.crop is None:
            spec = self._crop_spec()
            self.crop = (spec.transform(), spec.size)

    def decide(self, batch: pa.Table) -> Verdict:
        cfg = self.config
        n = batch.num_rows
        reason = np.full(n, None, dtype=object)
        value = np.full(n, None, dtype=object)
        # crops only: a decoded image is dropped as soon as its row is decided
        pixels: list[bytes | None] = [None] * n
        for i, payload in enumerate(batch.column("image").to_pylist()):
            measured = self._measure(payload, cfg)
            image = measured if isinstance(measured, Image.Image) else None
            size = image.size if image is not None else measured
            assert isinstance(size, tuple)
            if isinstance(size[0], str):
                reason[i] = f"{size[0]}:{size[1]}"
                continue
            width, height = int(size[0]), int(size[1])
            value[i] = f"{width}x{height}"
            short, long = min(width, height), max(width, height)
            if cfg.min_side is not None and short < cfg.min_side:
                reason[i] = "too_small"
            elif cfg.max_side is not None and long > cfg.max_side:
                reason[i] = "too_big"
            elif cfg.max_aspect is not None and long > cfg.max_aspect * short:
                reason[i] = "bad_aspect"
            elif image is not None:
                pixels[i] = self._crop(image)
                if pixels[i] is None:
                    reason[i] = "bad_image:crop is not square RGB"
        keep = np.asarray(reason == None, dtype=bool)  # noqa: E711 - elementwise
        value[keep] = None
        out = None
        if cfg.preprocess is not None:
            out = set_column(batch, cfg.preprocess.column, pa.array(pixels, pa.binary()))
        return Verdict(
            keep=keep,
            reason=pa.array(reason, pa.string()),
            value=pa.array(value, pa.string()),
            batch=out,
        )

    def _crop(self, image: Image.Image) -> bytes | None:
        """The model-ready crop's uint8 HWC bytes, or None when it is not size x size RGB."""
        if self.crop is None:
            self.setup()
        transform, size = self.crop
        crop = transform(image)
        if crop.mode != "RGB" or crop.size != (size, size):
            return None
        return bytes(crop.tobytes())

    def _measure(
        self, payload: bytes | None, cfg: ImageFilterConfig
    ) -> Image.Image | tuple[int, int] | tuple[str, str]:
        """The decoded RGB image (when preprocessing), (width, height), or (reason, detail)."""
        if cfg.preprocess is None or not payload:
            return _measure(payload, cfg)
        return clip.decode(payload, cfg.max_pixels)
