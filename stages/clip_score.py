"""``clip_score``: CLIP image-text similarity with open_clip, batched on a GPU or the CPU.

Reads ``image`` (bytes) and the caption (``text``).  When an upstream
``image_filter`` with ``preprocess:`` wrote the ``pixels`` column, the
decoding and cropping already happened in CPU actors ahead of this one and
this stage only normalizes the crops on its device and runs the model;
without it, the stage decodes and crops itself.  It then removes ``pixels``.

Writes ``clip_score`` (float32): the cosine similarity of the L2-normalized
image and text embeddings, DataComp's convention (thresholds like B/32 ≥ 0.28),
or with ``scale: percent`` cosine × 100 (torchmetrics' CLIPScore convention,
without its clamp at 0).  ``embeddings: true`` also writes
``clip_image_embedding`` and ``clip_text_embedding`` (float32 × embed_dim).

Resources default to ``num_gpus: auto``: one GPU per actor where the cluster has
GPUs, the CPU where it has none.  ``precision: auto`` is bf16 (fp16 where bf16
is unsupported) on a GPU and fp32 on the CPU.  Without ``batch_size`` the
stage starts at 512 images per forward pass on a GPU (64 on the CPU) and
halves it on a CUDA out-of-memory error until a pass fits.

Rows dropped: ``bad_image`` (undecodable, no bytes), ``image_too_large`` (a
decompression bomb, rejected from its header) and ``no_caption``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate import clip
from curate.models import local_path
from curate.stage import Filter, Requirement, Resources, StageConfig, Verdict, set_column


class ClipScoreConfig(StageConfig):
    #: open_clip architecture: ViT-B-32, ViT-L-14, ... or one given by ``arch_config``.
    arch: str = "ViT-B-32"
    #: JSON config (``<arch>.json``) of an architecture open_clip does not ship.
    arch_config: str | None = None
    #: Weights: a local path, an ``s3://`` URI, or ``hub:<open_clip tag>`` (needs network).
    checkpoint: str
    precision: clip.Precision = "auto"
    #: ``auto``: the GPU Ray assigned to the actor, else the CPU; or ``cpu``, ``cuda:0``, ...
    device: str = "auto"
    #: Images per forward pass; None chooses one (see the module docstring).
    batch_size: int | None = Field(None, gt=0)
    scale: Literal["cosine", "percent"] = "cosine"
    embeddings: bool = False
    #: Column of preprocessed crops written by ``image_filter``'s ``preprocess``.
    pixels: str = "pixels"
    #: Images decoded here (no ``pixels`` column): larger ones are rejected from the header.
    max_pixels: int = Field(89_478_485, gt=0)


class ClipScore(Filter):
    """Adds ``clip_score`` (and optionally the embeddings)."""

    Config: ClassVar[type[StageConfig]] = ClipScoreConfig
    config: ClipScoreConfig
    requires = (Requirement("open_clip", "open-clip-torch"), Requirement("torch", "torch"))
    default_resources: ClassVar[Resources] = Resources(num_gpus="auto")
    cache_default: ClassVar[bool] = True
    scorer: Any = None
    crop: Any = None

    def reads(self) -> Sequence[str]:
        return ("image", self.context.text_column)

    def writes(self) -> Mapping[str, pa.DataType]:
        out: dict[str, pa.DataType] = {"clip_score": pa.float32()}
        if self.config.embeddings:
            dim = clip.embed_dim(self.config.arch, self._arch_config())
            out["clip_image_embedding"] = pa.list_(pa.float32(), dim)
            out["clip_text_embedding"] = pa.list_(pa.float32(), dim)
        return out

    def drops(self) -> Sequence[str]:
        return (self.config.pixels,)

    def models(self) -> Mapping[str, str]:
        cfg = self.config
        refs = {"checkpoint": cfg.checkpoint}  # a hub: tag is checked, not fingerprinted
        if cfg.arch_config:
            refs["arch_config"] = cfg.arch_config
        return refs

    def _arch_config(self) -> str | None:
        ref = self.config.arch_config
        return local_path(ref, self.context.base_dir) if ref else None

    def setup(self) -> None:
        if self.scorer is not None:
            return
        cfg = self.config
        local = None
        if not cfg.checkpoint.startswith(clip.HUB_PREFIX):
            local = local_path(cfg.checkpoint, self.context.base_dir)
        self.scorer = clip.ClipScorer(
            cfg.arch,
            clip.checkpoint_arg(cfg.checkpoint, local),
            arch_config=self._arch_config(),
            device=cfg.device,
            precision=cfg.precision,
        )
        spec = clip.CropSpec(cfg.arch, self._arch_config(), cfg.checkpoint)
        self.crop = spec.transform()
        self.batch_size = cfg.batch_size or (512 if self.scorer.device != "cpu" else 64)

    def decide(self, batch: pa.Table) -> Verdict:
        self.setup()
        cfg = self.config
        n = batch.num_rows
        captions = batch.column(self.context.text_column).to_pylist()
        pixels, reason = self._pixels(batch, captions)
        keep = np.asarray(reason == None, dtype=bool)  # noqa: E711 - elementwise
        rows = np.flatnonzero(keep)
        cosine, image, text = self._embed(rows, pixels, captions)
        score = np.full(n, np.nan, dtype=np.float32)
        score[rows] = cosine
        if cfg.scale == "percent":
            score *= 100
        out = set_column(batch, "clip_score", pa.array(score, pa.float32()))
        if cfg.embeddings:
            for column, values in (("clip_image_embedding", image), ("clip_text_embedding", text)):
                full = np.zeros((n, values.shape[1]), dtype=np.float32)
                full[rows] = values
                out = set_column(out, column, _fixed_list(full))
        if cfg.pixels in out.column_names:
            out = out.drop_columns([cfg.pixels])
        return Verdict(keep=keep, reason=pa.array(reason, pa.string()), batch=out)

    def _pixels(
        self, batch: pa.Table, captions: list[str | None]
    ) -> tuple[list[bytes | None], np.ndarray[Any, Any]]:
        """Each row's crop (from the ``pixels`` column, or decoded here) and the drop
        reason of rows that have none or no caption."""
        cfg = self.config
        n, size = batch.num_rows, self.scorer.size
        reason = np.full(n, None, dtype=object)
        given = cfg.pixels in batch.column_names
        pixels = batch.column(cfg.pixels).to_pylist() if given else [None] * n
        images = batch.column("image").to_pylist()
        for i in range(n):
            caption, crop = captions[i], pixels[i]
            if not caption or not caption.strip():
                reason[i] = "no_caption"
            elif crop is None:
                got = clip.pixels_of(images[i], self.crop, size, cfg.max_pixels)
                if isinstance(got, tuple):
                    reason[i] = f"{got[0]}:{got[1]}"
                else:
                    pixels[i] = got
            elif len(crop) != size * size * 3:
                raise ValueError(
                    f"column {cfg.pixels!r} holds crops of {len(crop)} bytes, but "
                    f"{cfg.arch} takes {size}x{size} RGB ({size * size * 3} bytes): give "
                    "image_filter's preprocess the same arch as clip_score"
                )
        return pixels, reason

    def _embed(
        self, rows: np.ndarray[Any, Any], pixels: list[bytes | None], captions: list[str | None]
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """Cosines, image and text embeddings of ``rows``, in forward passes of
        ``batch_size`` (halved on a CUDA out-of-memory error)."""
        scores, images, texts = [], [], []
        start = 0
        while start < len(rows):
            chunk = rows[start : start + self.batch_size]
            try:
                img, txt = self.scorer.embed(
                    [pixels[i] for i in chunk], [captions[i] for i in chunk]
                )
            except RuntimeError as exc:
                if not clip.is_oom(exc) or self.batch_size == 1:
                    raise
                clip.empty_cache()
                self.batch_size //= 2
                continue
            scores.append((img * txt).sum(dim=-1).cpu().numpy())
            if self.config.embeddings:
                images.append(img.cpu().numpy())
                texts.append(txt.cpu().numpy())
            start += len(chunk)
        dim = self.scorer.embed_dim
        empty = np.zeros((0, dim), dtype=np.float32)
        return (
            np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32),
            np.concatenate(images) if images else empty,
            np.concatenate(texts) if texts else empty,
        )


def _fixed_list(values: np.ndarray[Any, Any]) -> pa.Array:
    flat = pa.array(values.reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
