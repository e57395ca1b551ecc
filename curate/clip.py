"""CLIP models through open_clip: architecture, checkpoint, preprocessing, scoring.

A CLIP model is an open_clip *architecture* (``ViT-B-32``, ``ViT-L-14``, ...,
or one registered from a JSON config with ``arch_config``) plus a
*checkpoint*: a local path, an ``s3://`` URI (fetched once into the model
cache), or ``hub:<tag>`` (an open_clip pretrained tag such as
``hub:laion2b_s34b_b79k``, downloaded by open_clip, so only on a machine that
is online).  Files are loaded through open_clip's own ``pretrained=<path>``
path; the manifest fingerprints them.

Preprocessing is split where the cost is: :func:`pixels_of` does the CPU work
(decode with the decompression-bomb guard, RGB, open_clip's own resize and
centre crop) and yields the crop as uint8 HWC bytes, which CPU actors compute
ahead of the GPU actors; :class:`ClipScorer` turns those bytes into the
normalized float tensor on the device (``/255``, mean, std: what open_clip's
``ToTensor`` + ``Normalize`` do, bit for bit on CPU) and runs the model.

Images with transparency are composited on white before the crop: open_clip's
own ``convert("RGB")`` would paint transparent areas black, which hides the
black line art of clip-art and icons.

``clip_score`` is the cosine similarity of the L2-normalized embeddings, as in
DataComp's metadata (``clip_b32_similarity_score``, thresholds like 0.28);
``scale: percent`` multiplies by 100 (torchmetrics' CLIPScore, without its clamp
at 0).  The stage records which in the manifest.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from curate.io.webdataset import FORMATS, pil_error, pixel_limit

#: Architectures shipped with curate (JSON configs in ``curate/clip_configs``).
CONFIG_DIR = Path(__file__).parent / "clip_configs"
HUB_PREFIX = "hub:"

Precision = Literal["auto", "fp32", "fp16", "bf16"]


class ClipError(ValueError):
    """A CLIP architecture or checkpoint that cannot be used."""


def _open_clip() -> Any:
    import open_clip

    return open_clip


def register(arch: str, arch_config: str | None = None) -> dict[str, Any]:
    """Make ``arch`` known to open_clip and return its model config.

    ``arch_config`` is a JSON file named ``<arch>.json`` (open_clip takes the
    architecture's name from the file name); curate's own architectures are
    registered from ``curate/clip_configs``.
    """
    open_clip = _open_clip()
    if arch_config is not None:
        path = Path(arch_config)
        if not path.is_file():
            raise ClipError(f"arch_config {arch_config!r}: no such file")
        if path.stem != arch:
            raise ClipError(
                f"arch_config {arch_config!r} registers architecture {path.stem!r}, "
                f"not {arch!r}: open_clip names an architecture after its config file"
            )
        open_clip.add_model_config(str(path))
    elif open_clip.get_model_config(arch) is None and (CONFIG_DIR / f"{arch}.json").is_file():
        open_clip.add_model_config(str(CONFIG_DIR / f"{arch}.json"))
    config = open_clip.get_model_config(arch)
    if config is None:
        known = ", ".join(sorted(open_clip.list_models())[:12])
        raise ClipError(
            f"unknown open_clip architecture {arch!r} (known: {known}, ...); "
            f"give arch_config: <path to {arch}.json> for a custom one"
        )
    return dict(config)


def embed_dim(arch: str, arch_config: str | None = None) -> int:
    return int(register(arch, arch_config)["embed_dim"])


def image_size(arch: str, arch_config: str | None = None) -> int:
    size = register(arch, arch_config)["vision_cfg"].get("image_size", 224)
    if isinstance(size, list | tuple):
        if size[0] != size[1]:
            raise ClipError(f"{arch}: non-square image_size {size} is not supported")
        size = size[0]
    return int(size)


def build_checkpoint(
    arch: str, out: str | Path, seed: int = 0, arch_config: str | None = None
) -> Path:
    """Save a randomly initialized ``arch`` as an open_clip checkpoint (a state dict).

    Random weights give honest speed figures and let tests and the demo run
    offline; the same seed gives the same file.
    """
    import torch

    register(arch, arch_config)
    torch.manual_seed(seed)
    model = _open_clip().create_model(arch, pretrained=None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmp = out.with_name(out.name + ".part")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, out)
    return out


# --- CPU side: decode and crop -----------------------------------------------------


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited on white."""
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")  # a palette or tRNS transparent colour
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(payload: bytes, max_pixels: int) -> Image.Image | tuple[str, str]:
    """The decoded RGB image, or (reason, detail); the size is checked on the header
    before any pixel is decoded."""
    try:
        with pixel_limit(max_pixels), Image.open(io.BytesIO(payload), formats=FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                return "image_too_large", f"{width}x{height} pixels > the limit of {max_pixels}"
            img.load()
            return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return "image_too_large", str(exc)
    except Exception as exc:  # Pillow raises many types for garbage
        return "bad_image", pil_error(exc)


@dataclass(frozen=True)
class CropSpec:
    """How an architecture's images are cropped: open_clip's resize and centre crop,
    with the preprocessing config open_clip would use for this checkpoint."""

    arch: str
    arch_config: str | None = None
    #: A ``hub:<tag>`` checkpoint may bring its own preprocessing (mean, resize mode).
    checkpoint: str | None = None

    @property
    def size(self) -> int:
        return image_size(self.arch, self.arch_config)

    def config(self) -> Any:
        """open_clip's ``PreprocessCfg`` for this architecture and checkpoint."""
        from dataclasses import asdict

        from open_clip.pretrained import get_pretrained_cfg
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        register(self.arch, self.arch_config)
        cfg = asdict(PreprocessCfg())
        if self.checkpoint is not None and self.checkpoint.startswith(HUB_PREFIX):
            tag = get_pretrained_cfg(self.arch, self.checkpoint[len(HUB_PREFIX) :])
            cfg = merge_preprocess_dict(cfg, tag or {})
        cfg["size"] = self.size
        return PreprocessCfg(**cfg)

    def transform(self) -> Callable[[Image.Image], Image.Image]:
        """open_clip's eval transform up to (not including) ToTensor and Normalize."""
        from open_clip.transform import image_transform_v2

        full = image_transform_v2(self.config(), is_train=False)
        skip = ("MaybeToTensor", "ToTensor", "Normalize")
        steps = [t for t in full.transforms if type(t).__name__ not in skip]

        def apply(img: Image.Image) -> Image.Image:
            img = window(img)
            for step in steps:
                img = step(img)
            return img

        return apply


#: Longest side / shortest side beyond which an image is first cut to a centred
#: window of this ratio (see :func:`window`).
WINDOW_ASPECT = 4.0


def window(img: Image.Image) -> Image.Image:
    """A very long or tall image cut to its centred ``WINDOW_ASPECT`` window.

    open_clip resizes the *shorter* side to the model's size before the centre
    crop, so a 1 x 100,000 image would become a 224 x 22,400,000 intermediate
    (tens of GB).  The centre crop only ever keeps the middle square, which lies
    well inside the window, so only images beyond the ratio are touched (their
    crop may differ from open_clip's by the rounding of the crop offset).
    """
    width, height = img.size
    short, long = min(width, height), max(width, height)
    if long <= WINDOW_ASPECT * short:
        return img
    keep = int(WINDOW_ASPECT * short)
    start = (long - keep) // 2
    box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
    return img.crop(box)


def pixels_of(
    payload: bytes | None, crop: Callable[[Image.Image], Image.Image], size: int, max_pixels: int
) -> bytes | tuple[str, str]:
    """The model-ready crop as uint8 HWC bytes (``size * size * 3``), or (reason, detail)."""
    if not payload:
        return "bad_image", "no image bytes"
    img = decode(payload, max_pixels)
    if isinstance(img, tuple):
        return img
    out = crop(img)
    if out.size != (size, size) or out.mode != "RGB":
        return "bad_image", f"crop gave {out.mode} {out.size[0]}x{out.size[1]}, not {size}x{size}"
    return out.tobytes()


# --- device side: the model ----------------------------------------------------------


def pick_device(device: str) -> str:
    """``auto``: the GPU Ray gave this actor (or the only visible one), else the CPU."""
    import torch

    if device != "auto":
        return device
    if not torch.cuda.is_available():
        return "cpu"
    try:
        import ray

        if ray.is_initialized() and not ray.get_gpu_ids():
            return "cpu"  # running in a Ray worker that was given no GPU
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return "cuda"


def pick_precision(precision: Precision, device: str) -> str:
    """open_clip's precision name for ``precision`` on ``device``."""
    import torch

    if precision == "auto":
        if device.startswith("cuda"):
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    return precision


def checkpoint_arg(checkpoint: str | None, local: str | None) -> str | None:
    """What open_clip's ``pretrained=`` gets: a local file, or a hub tag."""
    if checkpoint is None:
        return None
    if checkpoint.startswith(HUB_PREFIX):
        return checkpoint[len(HUB_PREFIX) :]
    return local


class ClipScorer:
    """An open_clip model on one device, scoring (crop, caption) batches."""

    def __init__(
        self,
        arch: str,
        pretrained: str | None,
        *,
        arch_config: str | None = None,
        device: str = "auto",
        precision: Precision = "auto",
    ) -> None:
        import torch

        open_clip = _open_clip()
        register(arch, arch_config)
        self.device = pick_device(device)
        self.precision = pick_precision(precision, self.device)
        self.model = open_clip.create_model(
            arch, pretrained=pretrained, precision=self.precision, device=self.device
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.size = image_size(arch, arch_config)
        self.embed_dim = embed_dim(arch, arch_config)
        vision = self.model.visual
        mean = getattr(vision, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(vision, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.precision, torch.float32
        )

    def images(self, pixels: Sequence[bytes]) -> Any:
        """uint8 HWC crops -> the normalized NCHW tensor open_clip's transform would give."""
        import torch

        n, s = len(pixels), self.size
        raw = np.frombuffer(bytearray(b"".join(pixels)), dtype=np.uint8).reshape(n, s, s, 3)
        batch = torch.from_numpy(raw).to(self.device, non_blocking=True)
        batch = batch.permute(0, 3, 1, 2).float().div(255)
        return ((batch - self.mean) / self.std).to(self.dtype)

    def embed(self, pixels: Sequence[bytes], captions: Sequence[str]) -> tuple[Any, Any]:
        """L2-normalized float32 (image, text) embeddings."""
        import torch

        with torch.inference_mode():
            tokens = self.tokenizer(list(captions)).to(self.device)
            image = self.model.encode_image(self.images(pixels), normalize=True)
            text = self.model.encode_text(tokens, normalize=True)
        return image.float(), text.float()

    def score(self, pixels: Sequence[bytes], captions: Sequence[str]) -> np.ndarray[Any, Any]:
        image, text = self.embed(pixels, captions)
        return (image * text).sum(dim=-1).cpu().numpy().astype(np.float32)  # type: ignore[no-any-return]


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe(arch: str, arch_config: str | None) -> str:
    """A one-line JSON description of an architecture (for errors and the manifest)."""
    return json.dumps({"arch": arch, **register(arch, arch_config)}, sort_keys=True)
