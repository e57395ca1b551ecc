"""Build the bundled LLaVA-format instruction demo set from the bundled Open Clip Art shards.

Every image comes from ``demo_image_text/`` (Debian ``openclipart-png``, public domain; see
``demo_image_text/LICENSE-OPENCLIPART.txt``).  Each sample gets one conversation built from
the image's own metadata, in one of four interaction styles, each style its own
``image_source`` (the way LLaVA-OneVision's pool is made of many source datasets):

* ``clipart-caption``: "Describe this clip art briefly." → the title;
* ``clipart-yesno``: "Is this picture in the '<category>' category?" → Yes / No
  (half the questions name another sample's category);
* ``clipart-choice``: which of three keywords fits, as lettered options → the letter;
* ``clipart-keyword``: the main subject in a word or short phrase → the last keyword,
  with a follow-up turn asking for the category.

Samples without a title, damaged images and images under 32 pixels a side are left out.
The choice of samples and of styles is seeded, so the output is byte for byte the same on
every run:

    python pipelines/data/make_demo_llava.py

It writes ``demo_llava/llava.json`` (one JSON array, LLaVA's layout: ``id``, ``image``
relative to the file, ``conversations`` of ``{from, value}``, ``image_source``) and the
images under ``demo_llava/images/``.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent
SOURCE = HERE / "demo_image_text"
OUT = HERE / "demo_llava"
SAMPLES = 80
SEED = 20261124
STYLES = ("caption", "yesno", "choice", "keyword")


def members() -> list[dict[str, object]]:
    """Every usable (key, title, metadata, png bytes) of the bundled shards, in key order."""
    found: dict[str, dict[str, object]] = {}
    for shard in sorted(SOURCE.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                key, _, ext = info.name.partition(".")
                handle = tar.extractfile(info)
                assert handle is not None
                found.setdefault(key, {})[ext] = handle.read()
    out = []
    for key in sorted(found):
        parts = found[key]
        if "txt" not in parts or "png" not in parts:
            continue
        meta = json.loads(parts["json"])  # type: ignore[arg-type]
        if meta.get("damaged"):
            continue
        try:
            with Image.open(io.BytesIO(parts["png"])) as im:  # type: ignore[arg-type]
                if min(im.size) < 32:
                    continue
        except OSError:
            continue
        title = parts["txt"].decode("utf-8").strip()  # type: ignore[union-attr]
        if title:
            out.append({"key": key, "title": title, "meta": meta, "png": parts["png"]})
    return out


def conversation(
    style: str, sample: dict[str, object], other: dict[str, object], rng: random.Random
) -> list[dict[str, str]]:
    meta = sample["meta"]
    assert isinstance(meta, dict)
    keywords = list(meta["keywords"])
    category = str(meta["category"])
    if style == "caption":
        return [
            {"from": "human", "value": "<image>\nDescribe this clip art briefly."},
            {"from": "gpt", "value": str(sample["title"])},
        ]
    if style == "yesno":
        other_meta = other["meta"]
        assert isinstance(other_meta, dict)
        asked = category if rng.random() < 0.5 else str(other_meta["category"])
        return [
            {
                "from": "human",
                "value": f"<image>\nIs this picture in the '{asked}' category? Answer yes or no.",
            },
            {"from": "gpt", "value": "Yes" if asked == category else "No"},
        ]
    if style == "choice":
        pool = sorted({str(k) for k in other["meta"]["keywords"]} - set(keywords))  # type: ignore[index]
        options = [keywords[-1], *pool[:2]]
        while len(options) < 3:
            options.append(["landscape", "vehicle", "music"][len(options)])
        rng.shuffle(options)
        letters = "ABC"
        lines = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
        answer = letters[options.index(keywords[-1])]
        return [
            {
                "from": "human",
                "value": f"<image>\nWhich keyword fits this picture best?\n{lines}\n"
                "Answer with the option's letter from the given choices directly.",
            },
            {"from": "gpt", "value": answer},
        ]
    return [
        {
            "from": "human",
            "value": "<image>\nWhat is the main subject? Use a word or a short phrase.",
        },
        {"from": "gpt", "value": str(keywords[-1])},
        {"from": "human", "value": "And which category does the picture belong to?"},
        {"from": "gpt", "value": f"It belongs to the {category} category."},
    ]


def main() -> None:
    rng = random.Random(SEED)
    usable = members()
    chosen = sorted(rng.sample(range(len(usable)), SAMPLES))
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    for old in (OUT / "images").glob("*.png"):
        old.unlink()
    records = []
    for n, index in enumerate(chosen):
        sample = usable[index]
        other = usable[(index * 7 + 3) % len(usable)]
        style = STYLES[rng.randrange(len(STYLES))]
        name = f"images/{sample['key']}.png"
        (OUT / name).write_bytes(sample["png"])  # type: ignore[arg-type]
        records.append(
            {
                "id": f"clipart-{n:04d}",
                "image": name,
                "conversations": conversation(style, sample, other, rng),
                "image_source": f"clipart-{style}",
            }
        )
    text = json.dumps(records, indent=2, ensure_ascii=False) + "\n"
    (OUT / "llava.json").write_text(text, encoding="utf-8")
    (OUT / "LICENSE-OPENCLIPART.txt").write_bytes((SOURCE / "LICENSE-OPENCLIPART.txt").read_bytes())
    print(f"wrote {len(records)} samples to {OUT}")


if __name__ == "__main__":
    main()
