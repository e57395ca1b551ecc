"""The decontaminate stage: n-gram matching against evaluation sets, its errors, a real run."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl
from curate.stages.decontaminate import Decontaminate, DecontaminateConfig
from pydantic import ValidationError

from curate.api import check, run
from curate.config.yamlpos import ConfigError
from curate.stage import StageContext, Verdict
from curate.synth import decontam
from curate.synth.decontam import EvalIndex, EvalSetError, normalize, tokenize

#: 20 words; its 13-grams are what a long eval item contributes.
LONG = (
    "Natalia sold clips to forty-eight of her friends in April, and then she sold "
    "half as many clips in May."
)
LONG_WORDS = normalize(pa.array([LONG])).to_pylist()[0].split()
#: 9 words: shorter than 13, indexed whole.
SHORT = "Which planet in our solar system has the most moons?"
#: 5 words: under min_tokens (8), not indexed.
TINY = "What is two plus two?"


def stage(tmp_path: Path, sets: dict[str, Any], **params: Any) -> Decontaminate:
    """A set-up stage whose eval files (name -> rows of JSONL, or str for txt) are
    written into tmp_path; relative paths resolve against tmp_path."""
    eval_sets: dict[str, Any] = {}
    for name, content in sets.items():
        if isinstance(content, str):
            (tmp_path / f"{name}.txt").write_text(content, encoding="utf-8")
            eval_sets[name] = {"path": f"{name}.txt", "format": "txt"}
        else:
            write_jsonl(tmp_path / f"{name}.jsonl", content)
            eval_sets[name] = {"path": f"{name}.jsonl", "format": "jsonl", "fields": ["q", "a"]}
    config = DecontaminateConfig.model_validate({"eval_sets": eval_sets, **params})
    s = Decontaminate(config, StageContext(name="decon", seed=0, base_dir=str(tmp_path)))
    s.setup()
    return s


def decide(s: Decontaminate, **columns: list[str | None]) -> Verdict:
    return s.decide(pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()}))


def outcome(verdict: Verdict) -> list[tuple[str | None, str | None]]:
    assert verdict.value is not None
    return list(zip(verdict.reason.to_pylist(), verdict.value.to_pylist(), strict=True))


def test_drops_rows_sharing_a_13_gram_with_reason_and_value(tmp_path: Path) -> None:
    s = stage(tmp_path, {"gsm8k": [{"q": LONG, "a": "72"}]})
    texts = [
        "Intro text. " + " ".join(LONG_WORDS[3:16]) + " and more words after it",
        "An unrelated document about clips, friends and April showers in the garden.",
        None,
        "",
    ]
    verdict = decide(s, text=texts)
    assert verdict.keep.tolist() == [False, True, True, True]
    assert outcome(verdict) == [
        ("contaminated:gsm8k", " ".join(LONG_WORDS[3:16])),
        (None, None),
        (None, None),
        (None, None),
    ]
    kept = s.process_batch(pa.table({"text": pa.array(texts, pa.string()), "n": [0, 1, 2, 3]}))
    assert kept.column("n").to_pylist() == [1, 2, 3]  # kept rows unchanged, in order
    assert kept.column("text").to_pylist() == texts[1:]


def test_12_gram_overlap_is_kept_at_13_and_dropped_at_12(tmp_path: Path) -> None:
    twelve = "before " + " ".join(LONG_WORDS[2:14]) + " after"
    assert decide(stage(tmp_path, {"e": [{"q": LONG, "a": None}]}), text=[twelve]).keep.all()
    at12 = stage(tmp_path, {"e": [{"q": LONG, "a": None}]}, ngram=12)
    assert outcome(decide(at12, text=[twelve])) == [("contaminated:e", " ".join(LONG_WORDS[2:14]))]


def test_normalization_is_nfkc_lowercase_punctuation_deleted_whitespace_split() -> None:
    text = "  Ｆｕｌｌ-width “Quotes”, don’t\tSTOP…\n\u00a0e.g. $5+3=8 «fin» ﬁne  "
    assert normalize(pa.array([text, None])).to_pylist() == [
        "  fullwidth quotes dont\tstop\n eg 538 fin fine  ",  # NFKC turned U+00A0 into " "
        None,
    ]
    tokens = tokenize(pa.array([text, None, "", " \n "]))
    assert tokens.words(0, 8) == ["fullwidth", "quotes", "dont", "stop", "eg", "538", "fin", "fine"]
    assert tokens.offsets.tolist() == [0, 8, 8, 8, 8]


def test_case_punctuation_and_unicode_variants_still_match(tmp_path: Path) -> None:
    s = stage(tmp_path, {"gsm8k": [{"q": LONG, "a": None}]})
    variant = (
        "NATALIA  sold   ‘clips’ to FORTY-EIGHT of her friends — in April; and then, she "
        "SOLD HALF as many"
    )
    fullwidth = "Ｎａｔａｌｉａ sold clips to forty‐eight of her friends in April and then she sold"
    spaced_hyphen = "Natalia sold clips to forty - eight of her friends in April and then she sold"
    verdict = decide(s, text=[variant, fullwidth, spaced_hyphen])
    # punctuation is deleted, not turned into a space: "forty - eight" stays two words
    # while the eval item has "fortyeight"
    assert verdict.keep.tolist() == [False, False, True]
    assert outcome(verdict)[0] == ("contaminated:gsm8k", " ".join(LONG_WORDS[:13]))


def test_short_items_match_whole_and_tiny_items_are_not_indexed(tmp_path: Path) -> None:
    s = stage(tmp_path, {"quiz": [{"q": SHORT, "a": TINY}]})
    assert s.index is not None
    assert s.index.stats["quiz"] == decontam.SetStats(items=2, long=0, whole=1, skipped=1)
    whole = normalize(pa.array([SHORT])).to_pylist()[0]
    verdict = decide(
        s,
        text=[
            f"Quiz night! {SHORT.upper()} Answer: Saturn.",  # the whole item, inside a row
            "which planet in our solar system has the most",  # 8 of its 9 words
            f"{TINY} Four.",  # under min_tokens: never indexed
        ],
    )
    assert outcome(verdict) == [("contaminated:quiz", whole), (None, None), (None, None)]
    # min_tokens lowers the floor: the 5-word item is now matched whole too
    low = stage(tmp_path, {"quiz": [{"q": SHORT, "a": TINY}]}, min_tokens=5)
    assert outcome(decide(low, text=[f"{TINY} Four."])) == [
        ("contaminated:quiz", "what is two plus two")
    ]


def test_multiple_eval_sets_name_the_set_that_matched(tmp_path: Path) -> None:
    other = "The mitochondria is the powerhouse of the cell and makes most of its chemical energy"
    s = stage(
        tmp_path,
        {
            "gsm8k": [{"q": LONG, "a": None}],
            "biology": [{"q": other, "a": None}, {"q": LONG, "a": None}],
            "lambada": f"{SHORT}\n\n{other}\n",
        },
    )
    assert Decontaminate.reason_details is True
    verdict = decide(s, text=[f"x {other} y", f"{LONG}", SHORT, "clean text only"])
    reasons = verdict.reason.to_pylist()
    # `other` is in biology and lambada: the first in config order names the reason;
    # LONG is in gsm8k and biology: gsm8k comes first
    assert reasons == [
        "contaminated:biology",
        "contaminated:gsm8k",
        "contaminated:lambada",
        None,
    ]


def test_columns_are_checked_in_order(tmp_path: Path) -> None:
    s = stage(tmp_path, {"gsm8k": [{"q": LONG, "a": SHORT}]}, columns=["question", "answer"])
    assert s.reads() == ("question", "answer")
    verdict = decide(
        s,
        question=["clean question here", LONG, None, "also clean"],
        answer=[f"{SHORT}", f"It is {SHORT}", LONG, None],
    )
    short = normalize(pa.array([SHORT])).to_pylist()[0]
    assert (
        outcome(verdict)
        == [
            ("contaminated:gsm8k", short),
            ("contaminated:gsm8k", " ".join(LONG_WORDS[:13])),  # question wins over answer
            ("contaminated:gsm8k", " ".join(LONG_WORDS[:13])),
            (None, None),
        ]
    )


def test_first_match_is_the_earliest_position(tmp_path: Path) -> None:
    s = stage(tmp_path, {"e": [{"q": LONG, "a": SHORT}]})
    row = f"{' '.join(LONG_WORDS[5:18])} filler {SHORT} {' '.join(LONG_WORDS[:13])}"
    assert outcome(decide(s, text=[row])) == [("contaminated:e", " ".join(LONG_WORDS[5:18]))]


def test_hash_collisions_never_drop_a_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every token hashed to the same value every window of a length collides;
    verification against the eval text still decides exactly."""

    class Constant:
        @staticmethod
        def xxh3_64_intdigest(data: bytes) -> int:
            return 12345

    monkeypatch.setattr(decontam, "xxhash", Constant)
    s = stage(tmp_path, {"gsm8k": [{"q": LONG, "a": SHORT}]})
    assert s.index is not None and len(set(s.index.hashes.tolist())) == 2  # 13 and 9 tokens
    words = " ".join(f"w{i}" for i in range(40))
    verdict = decide(s, text=[words, f"{words} {LONG}", f"{words} {SHORT}"])
    assert verdict.reason.to_pylist() == [None, "contaminated:gsm8k", "contaminated:gsm8k"]


def test_hashes_are_the_same_in_every_process() -> None:
    code = (
        "import pyarrow as pa\n"
        "from curate.synth.decontam import EvalIndex\n"
        f"i = EvalIndex.build([('e', [{LONG!r}, {SHORT!r}])], 13, 8)\n"
        "print(i.hashes.tolist())\n"
    )
    here = EvalIndex.build([("e", [LONG, SHORT])], 13, 8).hashes.tolist()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout) == here
    assert len(here) == len(LONG_WORDS) - 13 + 1 + 1
    assert here == sorted(here)


def test_parquet_lists_gzip_jsonl_and_txt_are_read(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"question": [LONG, None], "choices": [["x", SHORT], []]}), tmp_path / "m.parquet"
    )
    with gzip.open(tmp_path / "g.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"q": SHORT, "n": 7}) + "\n\n")
    (tmp_path / "l.txt").write_text(f"\n{LONG}\r\n", encoding="utf-8")
    fields = ["question", "choices"]
    parquet = decontam.read_items("m", "m", str(tmp_path / "m.parquet"), "parquet", fields)
    assert parquet == [LONG, "x", SHORT]
    assert decontam.read_items("g", "g", str(tmp_path / "g.jsonl.gz"), "jsonl", ["q", "n"]) == [
        SHORT,
        "7",
    ]
    assert decontam.read_items("l", "l", str(tmp_path / "l.txt"), "txt", []) == [LONG]


@pytest.mark.parametrize(
    ("content", "fields", "message"),
    [
        (
            '{"q": "fine"}\n{"q": broken\n',
            ["q"],
            r"eval set 'bad': bad.jsonl line 2: invalid JSON: Expecting value \(column 7\)",
        ),
        ('{"q": "fine"}\n\n{"a": "x"}\n', ["q"], r"bad.jsonl line 3: no 'q' field \(fields: a\)"),
        ('["q"]\n', ["q"], r"bad.jsonl line 1: expected a JSON object, got list"),
        ('{"q": {"x": 1}}\n', ["q"], r"line 1: field 'q' is dict holding more than text"),
        (b'{"q": "caf\xe9"}\n', ["q"], r"bad.jsonl line 1: invalid UTF-8 at byte 10"),
        ('{"q": "\\ud800 x"}\n', ["q"], r"line 1: a \\u escape encodes a lone UTF-16 surrogate"),
        ('{"q": "too short"}\n', ["q"], r"'bad': none of its 1 item\(s\) in bad.jsonl has 8 words"),
    ],
)
def test_bad_eval_file_names_file_and_line(
    tmp_path: Path, content: str | bytes, fields: list[str], message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    config = DecontaminateConfig.model_validate(
        {"eval_sets": {"bad": {"path": "bad.jsonl", "format": "jsonl", "fields": fields}}}
    )
    s = Decontaminate(config, StageContext(name="d", seed=0, base_dir=str(tmp_path)))
    with pytest.raises(EvalSetError, match=message):
        s.setup()


def test_bad_parquet_txt_and_missing_files(tmp_path: Path) -> None:
    pq.write_table(pa.table({"question": ["x"]}), tmp_path / "m.parquet")
    (tmp_path / "t.txt").write_bytes(b"ok line\nbad \xff line\n")
    (tmp_path / "folder").mkdir()
    cases = [
        (
            "m.parquet",
            "parquet",
            ["answer"],
            r"m.parquet: no column 'answer' \(columns: question\)",
        ),
        ("t.txt", "parquet", ["q"], r"t.txt: not a readable Parquet file"),
        ("t.txt", "txt", [], r"t.txt line 2: invalid UTF-8 at byte 4"),
        ("folder", "txt", [], r"folder is a folder; give one txt file"),
        ("nowhere.jsonl", "jsonl", ["q"], r"cannot open nowhere.jsonl: .*no such file"),
    ]
    for ref, fmt, fields, message in cases:
        config = DecontaminateConfig.model_validate(
            {"eval_sets": {"e": {"path": ref, "format": fmt, "fields": fields}}}
        )
        s = Decontaminate(config, StageContext(name="d", seed=0, base_dir=str(tmp_path)))
        with pytest.raises(EvalSetError, match=message):
            s.setup()


def test_config_is_strict() -> None:
    ok = {"path": "e.jsonl", "format": "jsonl", "fields": ["q"]}
    bad: list[tuple[dict[str, Any], str]] = [
        ({"eval_sets": {}}, "at least 1 item"),
        (
            {"eval_sets": {"e": {"path": "e.txt", "format": "txt", "fields": ["q"]}}},
            "no fields for a txt file",
        ),
        (
            {"eval_sets": {"e": {"path": "e.jsonl", "format": "jsonl"}}},
            "fields: the jsonl fields to index",
        ),
        ({"eval_sets": {"e": {**ok, "format": "csv"}}}, "'jsonl', 'parquet' or 'txt'"),
        ({"eval_sets": {"e": {**ok, "colour": 1}}}, "Extra inputs are not permitted"),
        ({"eval_sets": {"a:b": ok}}, r"contaminated:<name>\), not 'a:b'"),
        ({"eval_sets": {"e": ok}, "ngram": 5, "min_tokens": 8}, r"min_tokens \(8\) <= ngram \(5\)"),
        ({"eval_sets": {"e": ok}, "columns": []}, "at least 1 item"),
        ({"eval_sets": {"e": ok}, "columns": ["text", "text"]}, "each column listed once"),
        ({"eval_sets": {"e": {**ok, "fields": ["q", "q"]}}}, "each field listed once"),
        ({"eval_sets": {"e": ok}, "bogus": 1}, "Extra inputs are not permitted"),
    ]
    for params, message in bad:
        with pytest.raises(ValidationError, match=message):
            DecontaminateConfig.model_validate(params)
    config = DecontaminateConfig.model_validate({"eval_sets": {"e": ok}})
    assert (config.ngram, config.min_tokens, config.columns) == (13, 8, ["text"])


PIPELINE = """\
name: decon
seed: 3
sources:
  docs: {uri: data/*.jsonl}
stages:
  decon:
    type: decontaminate
    eval_sets:
      gsm8k: {path: evals/gsm8k.jsonl, format: jsonl, fields: [question, answer]}
      lambada: {path: evals/lambada.txt, format: txt}
sinks:
  out: {input: decon}
"""


def test_pipeline_run_counts_reasons_and_fingerprints_eval_files(
    ray_local: None, tmp_path: Path, pipeline_file: Callable[[str], Path]
) -> None:
    evals = tmp_path / "evals"
    write_jsonl(evals / "gsm8k.jsonl", [{"question": LONG, "answer": "She sold 72 clips."}])
    (evals / "lambada.txt").write_text(f"{SHORT}\n", encoding="utf-8")
    texts = [f"doc {i}: nothing to see here" for i in range(6)]
    texts[1] = f"Copied: {LONG}"
    texts[4] = f"quiz: {SHORT.lower()}"
    write_jsonl(tmp_path / "data" / "docs.jsonl", [{"text": t} for t in texts])
    pipe = pipeline_file(PIPELINE)

    pipe_missing = pipeline_file(PIPELINE.replace("lambada.txt", "nope.txt"), "missing.yaml")
    with pytest.raises(ConfigError, match=r"stages\.decon\.eval_sets\.lambada\.path: .*nope.txt"):
        check(str(pipe_missing))

    m = run(str(pipe), str(tmp_path / "out")).manifest
    (decon,) = [s for s in m["stages"] if s["name"] == "decon"]
    assert decon["rows_in"] == decon["kept"] + decon["dropped"] == 6
    assert decon["reasons"] == {"contaminated:gsm8k": 1, "contaminated:lambada": 1}
    models = {(e["stage"], e["role"]): e for e in m["models"]}
    assert set(models) == {("decon", "eval_sets.gsm8k.path"), ("decon", "eval_sets.lambada.path")}
    for (_, role), entry in models.items():
        data = (evals / ("gsm8k.jsonl" if "gsm8k" in role else "lambada.txt")).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)
    assert models["decon", "eval_sets.gsm8k.path"]["ref"] == "evals/gsm8k.jsonl"

    out = pq.read_table(tmp_path / "out" / "out")
    rejects = pq.read_table(tmp_path / "out" / "rejects" / "decon").to_pylist()
    assert sorted(out.column("text").to_pylist()) == sorted(
        t for i, t in enumerate(texts) if i not in (1, 4)
    )
    assert sorted((r["provenance"]["row"], r["reason"], r["value"]) for r in rejects) == [
        (1, "contaminated:gsm8k", " ".join(LONG_WORDS[:13])),
        (4, "contaminated:lambada", normalize(pa.array([SHORT])).to_pylist()[0]),
    ]


def test_cli_shows_a_bad_eval_file_as_one_error_line(tmp_path: Path) -> None:
    """A stage's setup error (here: an eval file that is not JSON) reaches the user as
    its own message, not as Ray's ActorDiedError or UserCodeException traceback."""
    import os
    import subprocess
    import sys

    (tmp_path / "docs.jsonl").write_text('{"text": "one small document"}\n')
    (tmp_path / "ev.jsonl").write_text('{"question": "fine"}\n{broken\n')
    (tmp_path / "p.yaml").write_text(
        "name: bad\nsources:\n  d: {uri: docs.jsonl}\nstages:\n  dc:\n"
        "    type: decontaminate\n"
        "    eval_sets: {ev: {path: ev.jsonl, format: jsonl, fields: [question]}}\n"
        "sinks:\n  out: {input: dc}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.run(
        [sys.executable, "-m", "curate.cli", "run", str(tmp_path / "p.yaml"),
         "--output", str(tmp_path / "out"), "--num-cpus", "1"],
        check=False, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 1
    # Ray Data logs the failed task itself; curate's own last words are the error
    tail = proc.stderr.strip().splitlines()[-2:]
    assert tail[0].startswith("error: eval set 'ev': ev.jsonl line 2: invalid JSON")
    assert tail[1].startswith("the output folder holds a partial run")
    assert "ActorDiedError" not in proc.stderr and "UserCodeException" not in proc.stderr
