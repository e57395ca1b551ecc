"""CLIP scoring: a tiny open_clip architecture with random weights, saved and loaded
back through open_clip's own ``pretrained=<path>`` path; the stages on it; the
bundled DataComp-style pipeline on Ray."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
from conftest import REPO, user_files
from curate.stages.basic_filter import BasicFilter, BasicFilterConfig
from curate.stages.clip_score import ClipScore, ClipScoreConfig
from curate.stages.image_filter import ImageFilter, ImageFilterConfig
from curate.stages.score_filters import SCORE_PRESETS, ScoreFilterConfig
from PIL import Image
from pydantic import ValidationError
from wds_util import bomb_png, png

from curate import clip
from curate.api import check, run
from curate.config.yamlpos import ConfigError
from curate.stage import Resources, StageContext

ARCH = "test-tiny-clip"
#: A second tiny architecture, registered from a JSON file as a user would.
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip")
    config = root / f"{ARCH}.json"
    config.write_text(json.dumps(CONFIG))
    checkpoint = clip.build_checkpoint(ARCH, root / "tiny.pt", seed=3, arch_config=str(config))
    shipped = clip.build_checkpoint("curate-tiny-clip", root / "curate-tiny.pt", seed=0)
    return {"config": config, "checkpoint": checkpoint, "shipped": shipped}


def images(n: int) -> list[bytes]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        size = (40 + 7 * i, 30 + 5 * (i % 4))
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


CAPTIONS = ["a red box", "two dogs on grass", "an old map of Rome", "blue sky", "x y z", "tree"]


def batch(imgs: list[bytes], captions: list[str | None]) -> pa.Table:
    n = len(imgs)
    return pa.table({"id": [f"r{i}" for i in range(n)], "image": imgs, "text": captions})


def scorer_stage(tiny: dict[str, Path], **kw: Any) -> ClipScore:
    config = ClipScoreConfig(
        arch=ARCH, arch_config=str(tiny["config"]), checkpoint=str(tiny["checkpoint"]), **kw
    )
    return ClipScore(config, StageContext("clip", 0))


def plain_open_clip(tiny: dict[str, Path], imgs: list[bytes], captions: list[str]) -> np.ndarray:
    """What a user writes with open_clip alone: create_model_and_transforms, preprocess,
    encode, cosine."""
    model, _, preprocess = open_clip.create_model_and_transforms(
        ARCH, pretrained=str(tiny["checkpoint"])
    )
    model.eval()
    x = torch.stack([preprocess(clip.to_rgb(Image.open(io.BytesIO(b)))) for b in imgs])
    tokens = open_clip.get_tokenizer(ARCH)(captions)
    with torch.no_grad():
        a = model.encode_image(x, normalize=True)
        b = model.encode_text(tokens, normalize=True)
    return (a * b).sum(-1).numpy()


def test_checkpoint_is_deterministic_and_loads_through_open_clip(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    again = clip.build_checkpoint(ARCH, tmp_path / "again.pt", seed=3)
    assert again.read_bytes() == tiny["checkpoint"].read_bytes()
    other = clip.build_checkpoint(ARCH, tmp_path / "other.pt", seed=4)
    assert other.read_bytes() != tiny["checkpoint"].read_bytes()
    # the file is a real open_clip checkpoint: weights differ from a fresh random model
    loaded = open_clip.create_model(ARCH, pretrained=str(tiny["checkpoint"]))
    state = torch.load(tiny["checkpoint"], weights_only=True)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_unknown_architecture_and_misnamed_config(tmp_path: Path) -> None:
    with pytest.raises(clip.ClipError, match="unknown open_clip architecture"):
        clip.register("no-such-arch")
    wrong = tmp_path / "other-name.json"
    wrong.write_text(json.dumps(CONFIG))
    with pytest.raises(clip.ClipError, match="names an architecture after its config file"):
        clip.register(ARCH, str(wrong))


def test_scores_equal_a_plain_open_clip_loop(tiny: dict[str, Path]) -> None:
    imgs = images(6)
    stage = scorer_stage(tiny)
    verdict = stage.decide(batch(imgs, list(CAPTIONS)))
    assert verdict.keep.all() and verdict.batch is not None
    ours = np.array(verdict.batch.column("clip_score").to_pylist(), dtype=np.float32)
    expected = plain_open_clip(tiny, imgs, CAPTIONS)
    np.testing.assert_array_equal(ours, expected)  # bit for bit on CPU
    assert np.all(np.abs(ours) <= 1.0) and np.std(ours) > 0


def test_preprocessed_pixels_give_the_same_scores_and_are_dropped(tiny: dict[str, Path]) -> None:
    imgs = images(6)
    pre = ImageFilter(
        ImageFilterConfig(preprocess={"arch": ARCH, "arch_config": str(tiny["config"])}),
        StageContext("crop", 0),
    )
    assert pre.writes() == {"pixels": pa.binary()}
    cropped = pre.decide(batch(imgs, list(CAPTIONS)))
    assert cropped.keep.all() and cropped.batch is not None
    assert {len(p) for p in cropped.batch.column("pixels").to_pylist()} == {32 * 32 * 3}
    stage = scorer_stage(tiny)
    assert list(stage.drops()) == ["pixels"]
    with_pixels = stage.decide(cropped.batch)
    inline = stage.decide(batch(imgs, list(CAPTIONS)))
    assert with_pixels.batch is not None and inline.batch is not None
    assert "pixels" not in with_pixels.batch.column_names
    assert with_pixels.batch.column("clip_score").equals(inline.batch.column("clip_score"))


def test_crops_for_another_architecture_are_refused(tiny: dict[str, Path]) -> None:
    pre = ImageFilter(
        ImageFilterConfig(preprocess={"arch": "curate-tiny-clip"}), StageContext("crop", 0)
    )
    cropped = pre.decide(batch(images(2), ["a b c", "d e f"]))
    assert cropped.batch is not None
    with pytest.raises(ValueError, match=r"12288 bytes.* takes 32x32"):
        scorer_stage(tiny).decide(cropped.batch)


def test_rejects_bad_images_bombs_and_missing_captions(tiny: dict[str, Path]) -> None:
    imgs = images(4)
    imgs[1] = b"\x89PNG\r\n\x1a\n but not really"
    imgs[2] = bomb_png()
    captions: list[str | None] = ["a cat", "a dog", "a bird", "   "]
    verdict = scorer_stage(tiny).decide(batch(imgs, captions))
    reasons = verdict.reason.to_pylist()
    assert verdict.keep.tolist() == [True, False, False, False]
    assert reasons[0] is None
    assert reasons[1].startswith("bad_image:")
    assert reasons[2].startswith("image_too_large:")
    assert reasons[3] == "no_caption"
    assert verdict.batch is not None
    scores = verdict.batch.column("clip_score").to_pylist()
    assert np.isfinite(scores[0]) and all(np.isnan(s) for s in scores[1:])


def test_batch_size_scale_and_embeddings(tiny: dict[str, Path]) -> None:
    imgs = images(6)
    one = scorer_stage(tiny, batch_size=1, embeddings=True)
    many = scorer_stage(tiny, batch_size=64, scale="percent")
    a = one.decide(batch(imgs, list(CAPTIONS))).batch
    b = many.decide(batch(imgs, list(CAPTIONS))).batch
    assert a is not None and b is not None
    cos = np.array(a.column("clip_score").to_pylist())
    np.testing.assert_allclose(np.array(b.column("clip_score").to_pylist()), cos * 100, rtol=1e-5)
    assert one.writes()["clip_image_embedding"] == pa.list_(pa.float32(), 32)
    img = np.array(a.column("clip_image_embedding").to_pylist())
    txt = np.array(a.column("clip_text_embedding").to_pylist())
    assert img.shape == (6, 32)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose((img * txt).sum(1), cos, rtol=1e-5, atol=1e-6)


def test_basic_filter_rules_in_order() -> None:
    rows = [
        ("A big red car parked on the street", png(300, 250)),  # kept
        ("Una grande macchina rossa parcheggiata sulla strada", png(300, 250)),  # not English
        ("red car", png(300, 250)),  # two words
        ("a b c", png(300, 250)),  # three words, five characters
        ("A big red car parked on the street", png(150, 400)),  # shorter side 150
        ("A big red car parked on the street", png(900, 250)),  # aspect 3.6
        ("A big red car parked on the street", b"not an image"),
        ("A big red car parked on the street", bomb_png()),
    ]
    stage = BasicFilter(BasicFilterConfig(), StageContext("basic", 0))
    verdict = stage.decide(batch([r[1] for r in rows], [r[0] for r in rows]))
    assert verdict.reason.to_pylist() == [
        None,
        "basic_filter:not_english",
        "basic_filter:few_words",
        "basic_filter:few_chars",
        "basic_filter:too_small",
        "basic_filter:bad_aspect",
        "basic_filter:bad_image",
        "basic_filter:image_too_large",
    ]
    assert verdict.value is not None
    values = verdict.value.to_pylist()
    assert values[1] == "it" and values[2] == "2" and values[3] == "5" and values[4] == "150"
    assert values[5] == "3.6"
    # every rule can be switched off
    loose = BasicFilter(
        BasicFilterConfig(
            language=None, min_words=None, min_chars=None, min_side=None, max_aspect=None
        ),
        StageContext("basic", 0),
    )
    assert loose.decide(batch([r[1] for r in rows[:6]], [r[0] for r in rows[:6]])).keep.all()


def test_datacomp_presets() -> None:
    assert SCORE_PRESETS["datacomp_l14_30"] == ("clip_score", 0.243)
    assert SCORE_PRESETS["datacomp_b32_30"] == ("clip_score", 0.281)
    assert SCORE_PRESETS["laion2b"] == ("clip_score", 0.28)
    assert SCORE_PRESETS["open_qwen2vl_su"] == ("mlm_su", 85.0)
    cfg = ScoreFilterConfig.model_validate({"preset": "datacomp_b32_10"})
    assert (cfg.column, cfg.min, cfg.max) == ("clip_score", 0.325, None)
    own = ScoreFilterConfig.model_validate({"preset": "laion2b", "column": "b32"})
    assert own.column == "b32" and own.min == 0.28
    with pytest.raises(ValidationError, match="unknown preset"):
        ScoreFilterConfig.model_validate({"preset": "datacomp_b32_33"})


def test_auto_gpus() -> None:
    auto = Resources(num_gpus="auto")
    assert auto.gpus(0.0) == 0.0 and auto.gpus(4.0) == 1.0
    assert Resources(num_gpus=0.5).gpus(8.0) == 0.5
    # a GPU-capable stage never fuses with the CPU stages before it
    assert auto.fusion_key() != Resources().fusion_key()
    assert ClipScore.default_resources.num_gpus == "auto"


# --------------------------------------------------------------------------------------
# the bundled pipeline, on Ray


def bundled(tmp_path: Path, tiny: dict[str, Path]) -> Path:
    """pipelines/image_text_clip.yaml beside a copy of the bundled data and the model."""
    shutil.copytree(
        REPO / "pipelines" / "data" / "demo_image_text", tmp_path / "data" / "demo_image_text"
    )
    (tmp_path / "models").mkdir()
    shutil.copy(tiny["shipped"], tmp_path / "models" / "curate-tiny-clip.pt")
    pipe = tmp_path / "image_text_clip.yaml"
    shutil.copy(REPO / "pipelines" / "image_text_clip.yaml", pipe)
    return pipe


def test_missing_checkpoint_is_reported_at_its_line(tmp_path: Path) -> None:
    pipe = tmp_path / "p.yaml"
    shutil.copy(REPO / "pipelines" / "image_text_clip.yaml", pipe)
    (tmp_path / "data" / "demo_image_text").mkdir(parents=True)
    shutil.copy(
        REPO / "pipelines/data/demo_image_text/shard-000000.tar",
        tmp_path / "data/demo_image_text/shard-000000.tar",
    )
    with pytest.raises(ConfigError) as info:
        check(str(pipe), ["sources.clipart.uri=data/demo_image_text/shard-000000.tar"])
    text = str(info.value)
    assert "stages.clip.checkpoint" in text and "curate-tiny-clip.pt" in text


def test_bundled_pipeline_runs_and_is_deterministic(
    ray_local: None, tiny: dict[str, Path], tmp_path: Path
) -> None:
    pipe = bundled(tmp_path, tiny)
    first = run(str(pipe), str(tmp_path / "a"), overwrite=True).manifest
    stages = {s["name"]: s for s in first["stages"]}
    for s in first["stages"]:
        assert s["rows_in"] == s["kept"] + s["dropped"], s["name"]
    assert stages["basic"]["rows_in"] == stages["clipart"]["kept"]
    assert stages["crop"]["rows_in"] == stages["basic"]["kept"] > 0
    assert stages["clip"]["kept"] == stages["clip"]["rows_in"] == stages["crop"]["kept"]
    top = stages["keep"]
    assert 0 < top["kept"] < top["rows_in"]
    models = {(m["stage"], m["role"]): m for m in first["models"]}
    assert models["clip", "checkpoint"]["bytes"] == tiny["shipped"].stat().st_size

    # the output: WebDataset shards with the score, every kept score above the threshold
    threshold = top["summary"]["groups"][""]["lower_threshold"]
    scores = []
    for shard in sorted((tmp_path / "a" / "curated").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    scores.append(meta["clip_score"])
                    assert not any(k == "pixels" for k in meta)
    assert len(scores) == top["kept"] and min(scores) >= threshold

    run(str(pipe), str(tmp_path / "b"), overwrite=True)
    assert user_files(tmp_path / "a") == user_files(tmp_path / "b")


def test_extreme_aspect_is_cropped_to_a_window_first() -> None:
    """open_clip resizes the shorter side first: a 1 x 100,000 image would become a
    64 x 6.4 M intermediate; the window keeps the work bounded."""
    buf = io.BytesIO()
    Image.new("RGB", (100_000, 1), (10, 200, 10)).save(buf, format="PNG")
    spec = clip.CropSpec("curate-tiny-clip")
    got = clip.pixels_of(buf.getvalue(), spec.transform(), spec.size, 10**8)
    assert isinstance(got, bytes) and len(got) == 64 * 64 * 3
    assert clip.window(Image.new("RGB", (1, 100_000))).size == (1, 4)
    assert clip.window(Image.new("RGB", (900, 300))).size == (900, 300)  # within 4:1: untouched


def test_transparency_goes_on_white_and_errors_are_stable() -> None:
    img = Image.new("RGB", (4, 4), (0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=(0, 0, 0))  # a tRNS colour: all transparent
    decoded = clip.decode(buf.getvalue(), 10**6)
    assert isinstance(decoded, Image.Image) and decoded.getpixel((0, 0)) == (255, 255, 255)
    first = clip.decode(b"garbage" * 10, 10**6)
    again = clip.decode(b"garbage" * 10, 10**6)
    assert first == again and first[0] == "bad_image" and "0x" not in first[1]


def test_hub_checkpoints_are_refused_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from curate.models import ModelError, resolve

    monkeypatch.delenv("CURATE_ALLOW_DOWNLOADS", raising=False)
    with pytest.raises(ModelError, match="downloaded at run time"):
        resolve("hub:laion2b_s34b_b79k")
    monkeypatch.setenv("CURATE_ALLOW_DOWNLOADS", "1")
    assert resolve("hub:laion2b_s34b_b79k").sha256.startswith("unverified")
