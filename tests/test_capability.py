"""mmSSR capability scoring and budgeted selection: prompts, parsing, rejects, the
request cache, both backends (a tiny in-process LLaVA, and a scripted model behind
the real OpenAI-compatible server on 127.0.0.1), and the selection stage on Ray."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, user_files
from curate.stages.capability_score import CapabilityScore, CapabilityScoreConfig
from curate.stages.capability_select import CapabilitySelectConfig
from pydantic import ValidationError
from wds_util import png

from curate.api import run
from curate.conversations import CONVERSATION_TYPE
from curate.mllm import mmssr
from curate.mllm.backend import Answer, Backend, Request
from curate.mllm.serve import BackendServer, serve
from curate.mllm.tiny import build_tiny_vlm
from curate.selection import Bins, mmssr_select, style_bins
from curate.stage import StageContext

QUESTIONS = [
    "<image>\nWhat color is the box?",
    "<image>\nHow many dogs are there",
    "<image>\nHint: look at the legend.\nWhich river is longest?",
    "<image>\nIs the sky blue?",
    "<image>\nDescribe the woman's hat.",
    "<image>\nWhat is on the board?",
]


def conversations(n: int) -> list[list[dict[str, str]]]:
    return [
        [
            {"role": "user", "content": QUESTIONS[i % 6]},
            {"role": "assistant", "content": f"answer {i}"},
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "Because."},
        ]
        for i in range(n)
    ]


def rows(n: int = 6) -> pa.Table:
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 0), (0, 90, 160), (9, 9, 9)]
    return pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "text": [f"text {i}" for i in range(n)],
            "conversations": pa.array(conversations(n), CONVERSATION_TYPE),
            "image": [png(40 + i, 30, colors[i % 6]) for i in range(n)],
            "image_source": [f"src{i % 2}" for i in range(n)],
        }
    )


class ScriptedBackend(Backend):
    """Answers like a scorer would, decided by the prompt: scores from a hash of the
    conversation and capability, styles by question; ``overrides`` maps (question
    number, query) to a fixed answer."""

    fingerprint = "scripted"

    def __init__(self, overrides: dict[tuple[int, str], str] | None = None) -> None:
        self.overrides = overrides or {}
        self.asked: list[str] = []

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        out = []
        for r in requests:
            self.asked.append(r.prompt)
            row = next(i for i, q in enumerate(QUESTIONS) if q.split("\n")[-1][:12] in r.prompt)
            if "Interaction style candidates" in r.prompt:
                query = "styles"
                text = ["yes/no", "word/short-phrase, yes/no", "multi-choice"][row % 3]
            elif "JSON object" in r.prompt:
                query = "fused"
                caps = re.findall(r"^- (\w+):", r.prompt, re.M)
                text = json.dumps({**{c: (row + len(c)) % 6 for c in caps}, "styles": ["yes/no"]})
            else:
                query = next(k for k, v in mmssr.CAPABILITIES if f"for {v}?" in r.prompt)
                text = str(int(hashlib.sha256(f"{row}{query}".encode()).hexdigest(), 16) % 6)
            out.append(
                Answer(
                    text=self.overrides.get((row, query), text),
                    prompt_tokens=5,
                    completion_tokens=1,
                )
            )
        return out


def stage(backend: dict[str, Any], tmp: Path | None = None, **kw: Any) -> CapabilityScore:
    config = CapabilityScoreConfig.model_validate({"backend": backend, **kw})
    return CapabilityScore(config, StageContext("cap", 7, state_dir=str(tmp) if tmp else None))


def test_prompts_are_mmssr_strings() -> None:
    """The queries of ``config/ss.py`` and ``format_convs`` of ``model_ss.py``, quirk included."""
    assert mmssr.CAP_QUERY == (
        "On a scale of 0 to 5, how do you rate the helpfulness of the VQA instance in "
        "training a Multimodal Large Language Model for {cap_keyword}?"
    )
    assert mmssr.STYLE_QUERY == (
        "Interaction style candidates: [multi-choice, coordinate, yes/no, word/short-phrase, "
        "short description, detailed description, comparison, chain-of-thought "
        "(step-by-step), specified style]\nStyles: "
    )
    assert [k for k, _ in mmssr.CAPABILITIES][:3] == ["spatial", "attribute", "logical"]
    assert len(mmssr.CAPABILITIES) == 14 and len(mmssr.STYLES) == 9
    turns = conversations(3)[1]
    # 'How many dogs are there' loses its final 'e' to strip('Question: ')'s character set
    assert mmssr.format_convs(turns) == (
        "Question: How many dogs are ther Answer: answer 1\nQuestion: Why? Answer: Because."
    )
    assert mmssr.format_convs(turns, quirk=False).startswith(
        "Question: How many dogs are there Answer:"
    )
    hint = conversations(3)[2]
    assert mmssr.format_convs(hint).startswith(
        "Hint: look at the legend.\nWhich river is longest? Answer: answer 2"
    )
    prompt = mmssr.capability_prompt("C", "ocr")
    assert prompt == "C\n" + mmssr.CAP_QUERY.replace(
        "{cap_keyword}", "optical character recognition"
    )


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("3", 3), (" 5\n", 5), ("0", 0), ("7", "out_of_range"), ("-1", "out_of_range"),
     ("3.5", "unparseable"), ("three", "unparseable"), ("", "empty"), ("  ", "empty")],
)  # fmt: skip
def test_parse_score(answer: str, expected: int | str) -> None:
    got = mmssr.parse_score(answer)
    assert (got if isinstance(got, int) else got.reason) == expected


def test_parse_styles_and_fused() -> None:
    assert mmssr.parse_styles("yes/no, comparison,yes/no, ") == ["yes/no", "comparison"]
    bad = mmssr.parse_styles("yes/no, sarcasm")
    assert isinstance(bad, mmssr.ParseError) and bad.reason == "unknown_style"
    caps = ["spatial", "ocr"]
    assert mmssr.parse_fused('{"spatial": 2, "ocr": 5, "styles": ["yes/no"]}', caps) == (
        {"spatial": 2, "ocr": 5},
        ["yes/no"],
    )
    for text, reason in [
        ('{"spatial": 2, "styles": ["yes/no"]}', "missing_key"),
        ('{"spatial": 2, "ocr": 9, "styles": ["yes/no"]}', "out_of_range"),
        ('{"spatial": true, "ocr": 1, "styles": ["yes/no"]}', "unparseable"),
        ('{"spatial": 2, "ocr": 1, "styles": ["poetry"]}', "unknown_style"),
        ("spatial 2", "unparseable"),
    ]:
        got = mmssr.parse_fused(text, caps)
        assert isinstance(got, mmssr.ParseError) and got.reason == reason, text
    assert re.fullmatch(
        mmssr.fused_regex(caps), '{"spatial": 2, "ocr": 5, "styles": ["yes/no", "comparison"]}'
    )
    assert not re.fullmatch(mmssr.fused_regex(caps), '{"spatial": 6, "ocr": 5, "styles": []}')


def test_config() -> None:
    cfg = CapabilityScoreConfig.model_validate(
        {
            "backend": {"kind": "transformers", "model": "m"},
            "capabilities": ["ocr", "stem knowledge"],
        }
    )
    assert cfg.capabilities == ["ocr", "stem"]
    with pytest.raises(ValidationError, match="unknown capability 'poetry'"):
        CapabilityScoreConfig.model_validate(
            {"backend": {"kind": "transformers", "model": "m"}, "capabilities": ["poetry"]}
        )
    with pytest.raises(ValidationError, match="exactly one of fraction and rows"):
        CapabilitySelectConfig.model_validate({"fraction": 0.3, "rows": 5})
    with pytest.raises(ValidationError, match="top_k needs column"):
        CapabilitySelectConfig.model_validate({"method": "top_k", "fraction": 0.3})


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[tuple[BackendServer, ScriptedBackend]]:
    backend = ScriptedBackend(
        {(1, "ocr"): "7", (2, "styles"): "yes/no, sarcasm", (4, "stem"): "4."}
    )
    server, thread = serve(backend, model_name="scorer")
    try:
        yield server, backend
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def http(server: BackendServer) -> dict[str, Any]:
    return {"kind": "openai", "base_url": server.base_url, "model": "scorer", "concurrency": 4}


def test_faithful_over_http_rejects_with_raw_answers(
    scripted_server: tuple[BackendServer, ScriptedBackend],
) -> None:
    server, backend = scripted_server
    s = stage(http(server), request_cache=False)
    before = len(backend.asked)
    verdict = s.decide(rows())
    assert len(backend.asked) - before == 6 * 15  # 14 capabilities and the styles
    assert verdict.keep.tolist() == [True, False, False, True, False, True]
    assert verdict.reason.to_pylist() == [
        None,
        "capability_score:ocr:out_of_range",
        "capability_score:styles:unknown_style",
        None,
        "capability_score:stem:unparseable",
        None,
    ]
    assert verdict.value is not None
    assert verdict.value.to_pylist()[1:3] == ["7", "yes/no, sarcasm"]
    out = verdict.batch
    assert out is not None
    assert out.column("mmssr_styles").to_pylist()[0] == ["yes/no"]
    assert out.column("mmssr_styles").to_pylist()[3] == ["yes/no"]
    assert out.column("mmssr_styles").to_pylist()[5] == ["multi-choice"]
    raw = out.column("mmssr_spatial_raw").to_pylist()
    assert [str(v) for v in out.column("mmssr_spatial").to_pylist()] == raw
    assert s.run_counters()["requests"] == 90
    assert s.counters()["parse_errors:ocr:out_of_range"] == 1


def test_on_parse_error_null_keeps_the_row_with_a_null_score(
    scripted_server: tuple[BackendServer, ScriptedBackend],
) -> None:
    server, _ = scripted_server
    s = stage(http(server), request_cache=False, on_parse_error="null")
    verdict = s.decide(rows())
    assert verdict.keep.all()
    out = verdict.batch
    assert out is not None
    assert out.column("mmssr_ocr").to_pylist()[1] is None
    assert out.column("mmssr_ocr_raw").to_pylist()[1] == "7"
    assert out.column("mmssr_styles").to_pylist()[2] is None
    assert out.column("mmssr_stem").to_pylist()[4] is None
    assert s.counters()["parse_errors:styles:unknown_style"] == 1


def test_fused_mode_asks_once_per_sample(
    scripted_server: tuple[BackendServer, ScriptedBackend],
) -> None:
    server, backend = scripted_server
    s = stage(http(server), request_cache=False, mode="fused", capabilities=["spatial", "ocr"])
    before = len(backend.asked)
    verdict = s.decide(rows())
    assert len(backend.asked) - before == 6
    assert verdict.keep.all()
    out = verdict.batch
    assert out is not None
    assert out.column("mmssr_spatial").to_pylist() == [(i + 7) % 6 for i in range(6)]
    assert out.column("mmssr_ocr").to_pylist() == [(i + 3) % 6 for i in range(6)]
    assert set(s.writes()) == {"mmssr_spatial", "mmssr_ocr", "mmssr_styles", "mmssr_raw"}


def test_request_cache_spares_every_question_on_resume(
    scripted_server: tuple[BackendServer, ScriptedBackend], tmp_path: Path
) -> None:
    server, backend = scripted_server
    first = stage(http(server), tmp_path, capabilities=["ocr", "stem"])
    expected = first.decide(rows()).batch
    before = len(backend.asked)
    second = stage(http(server), tmp_path, capabilities=["ocr", "stem"])
    assert second.decide(rows()).batch == expected
    assert len(backend.asked) == before
    assert second.run_counters()["cached_answers"] == 18
    # another capability is a new question; the cached ones are not asked again
    third = stage(http(server), tmp_path, capabilities=["ocr", "stem", "scene"])
    third.decide(rows())
    assert len(backend.asked) - before == 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny", seed=2)


@pytest.mark.parametrize("mode", ["faithful", "fused"])
def test_in_process_guided_answers_always_parse(model_dir: Path, mode: str) -> None:
    caps = ["spatial", "ocr", "stem"]
    backend = {"kind": "transformers", "model": str(model_dir)}
    s = stage(backend, request_cache=False, guided=True, mode=mode, capabilities=caps)
    verdict = s.decide(rows(4))
    assert verdict.keep.all(), verdict.reason.to_pylist()
    out = verdict.batch
    assert out is not None
    for cap in caps:
        assert all(0 <= v <= 5 for v in out.column(f"mmssr_{cap}").to_pylist())
    for styles in out.column("mmssr_styles").to_pylist():
        assert styles and set(styles) <= set(mmssr.STYLES)
    again = stage(backend, request_cache=False, guided=True, mode=mode, capabilities=caps)
    assert again.decide(rows(4)).batch == out  # deterministic on CPU


def write_pool(folder: Path, n: int) -> None:
    """A Parquet pool of conversations with images, in two files."""
    folder.mkdir(parents=True, exist_ok=True)
    base = rows(6)
    for part in range(2):
        idx = [i % 6 for i in range(part * n // 2, (part + 1) * n // 2)]
        table = pa.table(
            {
                "sample_id": [f"s{part}-{j}" for j in range(len(idx))],
                "text": [base.column("text")[i].as_py() for i in idx],
                "conversations": base.column("conversations").take(idx),
                "image": base.column("image").take(idx),
                "image_source": [f"src{j % 3}" for j in range(len(idx))],
            }
        )
        pq.write_table(table, folder / f"pool-{part}.parquet")


PIPE = """
name: mmssr
seed: 5
sources:
  pool: {{uri: data/*.parquet, format: parquet, id_column: sample_id}}
stages:
  score:
    type: capability_score
    backend: {{kind: openai, base_url: "{url}", model: scorer}}
    capabilities: [spatial, ocr, stem]
  select:
    type: capability_select
    fraction: 0.3
    capabilities: [spatial, ocr, stem]
sinks:
  selected: {{input: select, format: parquet}}
  scored: {{input: score, format: parquet}}
"""


def test_score_then_select_on_ray(
    ray_local: None, scripted_server: tuple[BackendServer, ScriptedBackend], tmp_path: Path
) -> None:
    server, _ = scripted_server
    write_pool(tmp_path / "data", 40)
    spec = tmp_path / "p.yaml"
    spec.write_text(PIPE.format(url=server.base_url))
    manifests = []
    for out in ("a", "b"):
        run(str(spec), output=str(tmp_path / out))
        manifests.append(json.loads((tmp_path / out / "manifest.json").read_text()))
    assert user_files(tmp_path / "a") == user_files(tmp_path / "b")
    # again over the first run: --overwrite keeps _state, so every answer is cached
    before = user_files(tmp_path / "a")
    again = run(str(spec), output=str(tmp_path / "a"), overwrite=True).manifest
    traffic = again["run"]["stage_counters"]["score"]
    assert traffic["cached_answers"] == traffic["requests"] == 40 * 4
    assert user_files(tmp_path / "a") == before
    m = manifests[0]
    stages = {s["name"]: s for s in m["stages"]}
    # questions 1 (ocr 7), 2 (unknown style) and 4 (stem '4.') are rejected: 20 of 40 remain
    assert stages["score"]["rows_in"] == 40
    assert stages["score"]["reasons"] == {
        "capability_score:ocr:out_of_range": 7,
        "capability_score:stem:unparseable": 6,
        "capability_score:styles:unknown_style": 7,
    }
    assert m["run"]["stage_counters"]["score"]["requests"] == 40 * 4
    select = stages["select"]
    assert select["rows_in"] == 20 and select["kept"] == 6
    assert select["reasons"] == {"capability_select:not_selected": 14}
    summary = select["summary"]
    assert summary["pool"] == 20 and summary["budget"] == 6 and summary["selected"] == 6
    assert sum(c["selected_for"] for c in summary["per_capability"].values()) == 6
    assert sum(v["selected"] for v in summary["sources"].values()) == 6
    table = pq.read_table(next((tmp_path / "a" / "selected").glob("*.parquet")))
    assert table.num_rows == 6
    assert set(table.column("selected_by").to_pylist()) <= {"spatial", "ocr", "stem"}
    for by, b, styles, source in zip(
        table.column("selected_by").to_pylist(),
        table.column("selection_bin").to_pylist(),
        table.column("mmssr_styles").to_pylist(),
        table.column("image_source").to_pylist(),
        strict=True,
    ):
        style, _, src = b.partition("+")
        assert style in styles and src == source and by
    # the same choice as the selection run directly on the scored rows, in input order
    scored = pq.read_table(sorted((tmp_path / "a" / "scored").glob("*.parquet")))
    order = sorted(
        range(scored.num_rows),
        key=lambda i: (
            scored.column("provenance")[i].as_py()["uri"]
            + f"{scored.column('provenance')[i].as_py()['row']:06d}"
        ),
    )
    scored = scored.take(order)
    caps = {
        c: np.array(scored.column(f"mmssr_{c}").to_pylist(), float)
        for c in ("spatial", "ocr", "stem")
    }
    bins = style_bins(
        scored.column("mmssr_styles").to_pylist(), scored.column("image_source").to_pylist()
    )
    direct = mmssr_select(caps, Bins.of(bins), 6)
    ids = scored.column("id").to_pylist()
    assert sorted(ids[i] for i in direct.chosen) == sorted(table.column("id").to_pylist())


def test_bundled_recipe_runs(ray_local: None, model_dir: Path, tmp_path: Path) -> None:
    """pipelines/recipes/mmssr_select.yaml on its bundled data, with the tiny model."""
    recipe = REPO / "pipelines" / "recipes" / "mmssr_select.yaml"
    out = tmp_path / "out"
    run(str(recipe), str(out), overrides=[f"stages.score.backend.model={model_dir}"])
    m = json.loads((out / "manifest.json").read_text())
    stages = {s["name"]: s for s in m["stages"]}
    assert stages["pool"]["kept"] == 80
    assert stages["score"]["kept"] == 80  # guided answers always parse
    assert stages["select"]["kept"] == 24  # int(80 * 0.3)
    assert m["run"]["stage_counters"]["score"]["requests"] == 80 * 15
    entries = json.loads(next((out / "selected").glob("*.json")).read_text())
    assert len(entries) == 24
    for entry in entries:
        assert (out / "selected" / entry["image"]).is_file()
        assert entry["conversations"][0]["from"] == "human"
