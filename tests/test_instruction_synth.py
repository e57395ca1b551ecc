"""Synthetic instructions: Instruction Pre-Training from documents, Genixer-style
questions from images, the judge, and the lineage of generated rows on Ray."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, user_files
from curate.stages.instruction_synth import InstructionSynth, InstructionSynthConfig
from curate.stages.judge_score import JudgeScore, JudgeScoreConfig
from pydantic import ValidationError
from wds_util import png

from curate.api import run
from curate.io.readers import record_id
from curate.mllm.backend import Answer, Backend, Request
from curate.mllm.serve import BackendServer, serve
from curate.mllm.tiny import build_tiny_vlm
from curate.stage import POS, UNIT, StageContext

DOCS = [
    "The Nile is the longest river in Africa. It flows north into the Mediterranean.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "Nothing useful here.",
    "Mount Everest is 8849 metres high and lies on the border of Nepal and China.",
]
#: What the scripted synthesizer answers for each document (by its first word).
SYNTH = {
    "The": (
        "<QUE> Which river is the longest in Africa? <ANS> The Nile. </END>\n\n"
        "<QUE> which river is the longest in africa? <ANS> A repeat. </END>\n\n"
        "<QUE> Where does it flow? <ANS> </END>\n\n"
        "<QUE> Into which sea does the Nile flow? <ANS> The Mediterranean"
    ),
    "Photosynthesis": (
        "<QUE> What does photosynthesis make? <ANS> Sugar and oxygen. </END>\n\n"
        "<QUE> What does it need? <ANS> Light, water and carbon dioxide. </END>"
    ),
    "Nothing": "I cannot find any question.",
    "Mount": "<QUE> How high is Mount Everest? <ANS> 8849 metres. </END>",
}


class Scripted(Backend):
    """A synthesizer and a judge in one: answers by what the prompt asks."""

    fingerprint = "scripted-synth"

    def __init__(self) -> None:
        self.prompts: list[Request] = []

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        out = []
        for r in requests:
            self.prompts.append(r)
            out.append(Answer(text=self.answer(r), prompt_tokens=3, completion_tokens=2))
        return out

    @staticmethod
    def answer(r: Request) -> str:
        if r.raw:
            current = r.prompt.rsplit("<CON> ", 1)[1]
            return SYNTH[current.split()[0]]
        if r.prompt.startswith("Rate how relevant"):
            return "2" if "repeat" in r.prompt or "Sugar" in r.prompt else "4"
        if "Question: <question>" in r.prompt:  # a multimodal instruction
            if r.image is None and "Image description:" not in r.prompt:
                return "no image"
            return "Question: What colour is the box?\nAnswer: Red."
        return "A follow-up answer."


def synth(config: dict[str, Any], backend: Backend | None = None) -> InstructionSynth:
    cfg = InstructionSynthConfig.model_validate(
        {"backend": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}, **config}
    )
    stage = InstructionSynth(cfg, StageContext("synth", 3))
    stage.backend = backend or Scripted()
    return stage


def seeds(texts: list[str], images: list[bytes | None] | None = None) -> pa.Table:
    n = len(texts)
    columns: dict[str, Any] = {
        "id": [f"doc{i}" for i in range(n)],
        "text": texts,
        "source": ["docs"] * n,
        "provenance": [{"uri": "docs.jsonl", "row": i} for i in range(n)],
    }
    if images is not None:
        columns["image"] = pa.array(images, pa.binary())
    columns[UNIT] = [0] * n
    columns[POS] = list(range(n))
    return pa.table(columns)


def test_text_pairs_are_parsed_and_filtered_like_the_paper() -> None:
    stage = synth({"mode": "text"})
    out = stage.generate(seeds(DOCS))
    rows = out.rows
    assert out.seed.tolist() == [0, 1, 1, 3]
    assert rows.column("instruction").to_pylist() == [
        "Which river is the longest in Africa?",
        "What does photosynthesis make?",
        "What does it need?",
        "How high is Mount Everest?",
    ]
    assert rows.column("response").to_pylist()[0] == "The Nile."
    assert rows.column("conversations").to_pylist()[0] == [
        {"role": "user", "content": "Which river is the longest in Africa?"},
        {"role": "assistant", "content": "The Nile."},
    ]
    assert rows.column("text").to_pylist()[0] == (
        "Which river is the longest in Africa?\n\nThe Nile."
    )
    assert out.reason.to_pylist() == [None, None, "instruction_synth:no_valid_pairs", None]
    assert out.value is not None and out.value.to_pylist()[2] == "I cannot find any question."
    counters = stage.counters()
    assert counters["pairs"] == 4
    assert counters["pairs_duplicate_question"] == 1
    assert counters["pairs_malformed"] == 1  # the empty answer
    assert counters["pairs_truncated"] == 2  # doc 0's last pair, and all of doc 2
    prompt = stage.backend.prompts[0]  # type: ignore[union-attr]
    assert prompt.raw and prompt.prompt == f"<s> <CON> {DOCS[0]} </CON>\n\n"
    assert prompt.temperature == 0 and prompt.max_tokens == 400


def test_pairs_with_control_characters_are_malformed() -> None:
    class Noisy(Scripted):
        @staticmethod
        def answer(r: Request) -> str:
            return "<QUE> Why\x07? <ANS> Bell. </END>\n\n<QUE> Fine? <ANS> Yes. </END>"

    stage = synth({"mode": "text"}, Noisy())
    out = stage.generate(seeds(DOCS[:1]))
    assert out.rows.column("instruction").to_pylist() == ["Fine?"]
    assert stage.counters()["pairs_malformed"] == 1


def test_rounds_prepend_the_previous_round_as_demonstrations() -> None:
    backend = Scripted()
    stage = synth({"mode": "text", "rounds": 2}, backend)
    stage.generate(seeds(DOCS))
    first, second = [r.prompt for r in backend.prompts[:2]], [r.prompt for r in backend.prompts[2:]]
    assert first == [f"<s> <CON> {d} </CON>\n\n" for d in DOCS[:2]]
    # round 2, slot 0 follows doc 0 (which gave a pair): demonstrated with its parsed pairs
    assert second[0] == (
        f"<s> <CON> {DOCS[0]} </CON>\n\n"
        "<QUE> Which river is the longest in Africa? <ANS> The Nile. </END></s>"
        f"<s> <CON> {DOCS[2]} </CON>\n\n"
    )
    assert second[1].startswith(f"<s> <CON> {DOCS[1]} </CON>\n\n<QUE> What does photosynthesis")
    assert stage.counters()["few_shot_prompts"] == 2
    rounds = stage.generate(seeds(DOCS)).rows.column("synth_round").to_pylist()
    assert rounds == [1, 1, 1, 2]


def test_augmented_keeps_every_seed_and_raw_text_without_pairs() -> None:
    out = synth({"mode": "text", "emit": "augmented"}).generate(seeds(DOCS))
    assert out.seed.tolist() == [0, 1, 2, 3]
    texts = out.rows.column("text").to_pylist()
    assert texts[2] == DOCS[2]
    assert texts[3] == DOCS[3] + "\n\nQuestion: How high is Mount Everest?\nAnswer: 8849 metres."
    assert out.reason.null_count == 4


def test_multimodal_questions_from_images() -> None:
    backend = Scripted()
    stage = synth({"mode": "multimodal", "per_seed": 2}, backend)
    out = stage.generate(seeds(["a", "b", "c"], [png(), None, png(30, 30)]))
    assert out.seed.tolist() == [0, 2]  # two identical questions per seed collapse to one
    assert out.reason.to_pylist() == [None, "instruction_synth:no_image", None]
    conv = out.rows.column("conversations").to_pylist()[0]
    assert conv[0]["content"] == "<image>\nWhat colour is the box?"
    assert stage.counters()["pairs_duplicate_question"] == 2
    prompt = backend.prompts[0].prompt
    assert prompt.endswith(
        "This is the Common VQA task.\nReply in the form:\nQuestion: <question>\nAnswer: <answer>"
    )
    templates = out.rows.column("synth_template").to_pylist()
    again = synth({"mode": "multimodal", "per_seed": 2}).generate(
        seeds(["a", "b", "c"], [png(), None, png(30, 30)])
    )
    assert again.rows.column("synth_template").to_pylist() == templates


def test_multimodal_caption_context_and_asked_answers() -> None:
    backend = Scripted()
    stage = synth({"mode": "multimodal", "context": "caption", "answer": "ask"}, backend)
    out = stage.generate(seeds(["a red box on a table"], [png()]))
    assert out.rows.column("response").to_pylist() == ["A follow-up answer."]
    asked = backend.prompts
    assert len(asked) == 2 and all(r.image is None for r in asked)
    assert asked[0].prompt.startswith("Image description: a red box on a table\n\n")
    assert asked[1].prompt == "Image description: a red box on a table\n\nWhat colour is the box?"


def test_config_errors() -> None:
    with pytest.raises(ValidationError, match="emit: augmented is for mode: text"):
        synth({"mode": "multimodal", "emit": "augmented"})
    with pytest.raises(ValidationError, match="needs scale"):
        JudgeScoreConfig.model_validate(
            {"backend": {"kind": "transformers", "model": "m"}, "template": "{question} {answer}?"}
        )


def test_judge_band_and_parsing() -> None:
    cfg = JudgeScoreConfig.model_validate(
        {"backend": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
         "keep": {"min": 3}}
    )  # fmt: skip
    judge = JudgeScore(cfg, StageContext("judge", 3))
    judge.backend = Scripted()
    batch = pa.table(
        {
            "id": ["a", "b", "c"],
            "instruction": ["Q1?", "Q2?", " "],
            "response": ["A fine answer.", "A repeat.", "x"],
        }
    )
    verdict = judge.decide(batch)
    assert verdict.keep.tolist() == [True, False, False]
    assert verdict.reason.to_pylist() == [None, "judge_score:below", "judge_score:no_pair"]
    assert verdict.batch is not None
    assert verdict.batch.column("judge_score").to_pylist() == [4, 2, None]
    assert judge.parse("7") == ("out_of_range", "7")
    assert judge.parse("4 stars") == ("unparseable", "4 stars")
    genixer = JudgeScore(
        JudgeScoreConfig.model_validate(
            {"backend": {"kind": "transformers", "model": "m"}, "template": "genixer"}
        ),
        StageContext("judge", 3),
    )
    assert genixer.parse("Yes, it is.") == 1 and genixer.parse("no") == 0
    assert genixer.parse("Maybe") == ("unparseable", "Maybe")
    assert genixer.prompt("Q?", "A.") == (
        "Here is a question and answer pair. Is 'Question: Q? Answer: A.' true for this "
        "image?\nPlease answer this question with Yes or No.\n"
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny", seed=3)


def test_tiny_model_guided_multimodal(model_dir: Path) -> None:
    cfg = InstructionSynthConfig.model_validate(
        {
            "backend": {"kind": "transformers", "model": str(model_dir)},
            "mode": "multimodal",
            "guided": True,
            "max_tokens": 48,
            "question_chars": 12,
            "answer_chars": 12,
        }
    )
    stage = InstructionSynth(cfg, StageContext("synth", 3))
    out = stage.generate(seeds(["a", "b"], [png(), png(20, 50, (0, 0, 255))]))
    assert out.seed.tolist() == [0, 1]
    for q in out.rows.column("instruction").to_pylist():
        assert 1 <= len(q) <= 12 and "\n" not in q


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[BackendServer]:
    server, thread = serve(Scripted(), model_name="synth")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


PIPE = """
name: synth
seed: 4
sources:
  docs: {{uri: data/*.jsonl, format: jsonl}}
stages:
  synth:
    type: instruction_synth
    mode: text
    backend: {{kind: openai, base_url: "{url}", model: synth}}
  dedup:
    type: exact_dedup
    column: instruction
  judge:
    type: judge_score
    backend: {{kind: openai, base_url: "{url}", model: synth}}
    keep: {{min: 3}}
  decontam:
    type: decontaminate
    eval_sets:
      quiz: {{path: evals/quiz.jsonl, format: jsonl, fields: [question]}}
    columns: [instruction]
    min_tokens: 4
sinks:
  instructions: {{input: decontam, format: parquet}}
"""


def test_generated_rows_trace_back_to_their_seeds_on_ray(
    ray_local: None, scripted_server: BackendServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "a.jsonl", "w") as f:
        for d in [*DOCS, DOCS[0]]:  # the repeated document repeats its questions
            f.write(json.dumps({"text": d}) + "\n")
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "quiz.jsonl").write_text(
        json.dumps({"question": "How high is Mount Everest?"}) + "\n"
    )
    spec = tmp_path / "p.yaml"
    spec.write_text(PIPE.format(url=scripted_server.base_url))
    for out in ("a", "b"):
        run(str(spec), output=str(tmp_path / out))
    assert user_files(tmp_path / "a") == user_files(tmp_path / "b")
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    stages = {s["name"]: s for s in m["stages"]}
    synth_row = stages["synth"]
    assert (synth_row["rows_in"], synth_row["kept"], synth_row["dropped"]) == (5, 4, 1)
    assert synth_row["rows_out"] == 5
    assert synth_row["reasons"] == {"instruction_synth:no_valid_pairs": 1}
    assert stages["dedup"]["rows_in"] == 5 and stages["dedup"]["dropped"] == 1
    assert stages["judge"]["reasons"] == {"judge_score:below": 1}  # "Sugar" is rated 2
    assert stages["decontam"]["reasons"] == {"contaminated:quiz": 1}
    table = pq.read_table(next((tmp_path / "a" / "instructions").glob("*.parquet")))
    assert table.column("instruction").to_pylist() == [
        "Which river is the longest in Africa?",
        "What does it need?",
    ]
    ids = table.column("id").to_pylist()
    seed_ids = table.column("seed_id").to_pylist()
    for rid, seed_id in zip(ids, seed_ids, strict=True):
        assert re.fullmatch(re.escape(seed_id) + r"/synth/\d+", rid)
    provenance = table.column("provenance").to_pylist()
    assert [p["row"] for p in provenance] == [0, 1]
    for seed_id, p in zip(seed_ids, provenance, strict=True):  # the seed's own id
        assert seed_id == record_id("docs", p["uri"], p["row"], DOCS[p["row"]])


def test_bundled_pipeline_runs(ray_local: None, model_dir: Path, tmp_path: Path) -> None:
    """pipelines/instruction_synth.yaml on its bundled data, with the tiny model."""
    pipeline = REPO / "pipelines" / "instruction_synth.yaml"
    out = tmp_path / "out"
    models = [f"stages.{s}.backend.model={model_dir}" for s in ("ipt", "genixer", "judge")]
    run(str(pipeline), str(out), overrides=models)
    m = json.loads((out / "manifest.json").read_text())
    stages = {s["name"]: s for s in m["stages"]}
    assert stages["doc_seeds"]["kept"] == 12 and stages["image_seeds"]["kept"] == 12
    made = stages["ipt"]["rows_out"] + stages["genixer"]["rows_out"]
    assert made > 0 and stages["questions"]["rows_in"] == made
    assert stages["ipt"]["counters"]["pairs"] >= stages["ipt"]["rows_out"]
    table = pq.read_table(sorted((out / "instructions").glob("*.parquet")))
    assert table.num_rows == stages["decontam"]["kept"] > 0
    for rid, seed_id in zip(
        table.column("id").to_pylist(), table.column("seed_id").to_pylist(), strict=True
    ):
        assert rid.startswith(seed_id + "/")
    entries = [e for f in (out / "llava").glob("*.json") for e in json.loads(f.read_text())]
    assert len(entries) == table.num_rows
    for text in table.column("text").to_pylist():  # guided text holds no control characters
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text)
