"""Config loading: safe YAML, every error at once with file and line, overrides."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from curate.config import ConfigError, load_pipeline
from curate.config.load import parse_override

GOOD = """\
name: t
sources:
  docs: {uri: "*.jsonl"}
stages:
  stats: {type: text_stats}
  length:
    type: length_filter
    min_words: 3
sinks:
  out: {input: length}
"""

BROKEN = """\
name: broken
seed: not-a-number
sources:
  docs:
    uri: "*.jsonl"
    colour: red
stages:
  stats:
    type: text_stat
  length:
    type: length_filter
    min_words: many
    max_wrds: 10
sinks:
  out: {input: length, compression: lz4}
"""


def test_good_file_loads_with_defaults(pipeline_file: Callable[[str], Path]) -> None:
    p = load_pipeline(pipeline_file(GOOD))
    assert p.stages["stats"].inputs == ("docs",)
    assert p.stages["length"].inputs == ("stats",)
    assert p.stages["length"].config.model_dump()["min_words"] == 3
    assert len(p.spec_hash()) == 64


def test_every_error_reported_with_file_line_and_path(pipeline_file: Callable[[str], Path]) -> None:
    path = pipeline_file(BROKEN)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    lines = str(info.value).splitlines()
    expected = {
        2: "seed: expected a valid integer, unable to parse string as an integer, "
        "got 'not-a-number'",
        6: "sources.docs.colour: unknown key 'colour'",
        9: "stages.stats.type: unknown stage type 'text_stat'; did you mean 'text_stats'",
        12: "stages.length.min_words: expected a valid integer",
        13: "stages.length.max_wrds: unknown key 'max_wrds'",
        15: "sinks.out.compression: expected 'zstd', 'snappy', 'gzip' or 'none', got 'lz4'",
    }
    assert len(lines) == len(expected), lines
    for line_no, text in expected.items():
        assert any(line.startswith(f"{path}:{line_no}: ") and text in line for line in lines), (
            line_no,
            lines,
        )


def test_duplicate_keys_are_errors(pipeline_file: Callable[[str], Path]) -> None:
    path = pipeline_file(GOOD + "seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"pipe.yaml:12: seed: duplicate key 'seed'"):
        load_pipeline(path)


@pytest.mark.parametrize(
    "text",
    ["!!python/object/apply:os.system ['echo pwned']\n", "name: !!python/name:os.system\n"],
)
def test_yaml_cannot_execute_code(pipeline_file: Callable[[str], Path], text: str) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_pipeline(pipeline_file(text))


def test_invalid_yaml_syntax_has_a_line(pipeline_file: Callable[[str], Path]) -> None:
    path = pipeline_file("name: x\nsources: [a, b\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: <root>: invalid YAML"):
        load_pipeline(path)


def test_overrides_set_any_field(pipeline_file: Callable[[str], Path], tmp_path: Path) -> None:
    p = load_pipeline(
        pipeline_file(GOOD),
        ["stages.length.min_words=50", "seed=7", "sources.docs.uri=other/*.jsonl"],
    )
    assert p.stages["length"].config.model_dump()["min_words"] == 50
    assert p.spec.seed == 7
    rebased = os.path.relpath(Path("other/*.jsonl").absolute(), p.base_dir)
    assert p.spec.sources["docs"].uri == rebased


def test_override_errors_name_the_command_line(pipeline_file: Callable[[str], Path]) -> None:
    with pytest.raises(
        ConfigError, match=r"--set: stages.length.min_words: expected a valid integer"
    ):
        load_pipeline(pipeline_file(GOOD), ["stages.length.min_words=lots"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("no-equals-sign")


def test_stage_config_cross_field_check(pipeline_file: Callable[[str], Path]) -> None:
    bad = GOOD.replace("min_words: 3", "min_words: 30\n    max_words: 3")
    with pytest.raises(
        ConfigError, match=r"pipe.yaml:6: stages.length: expected min_words \(30\) must not exceed"
    ):
        load_pipeline(pipeline_file(bad))


def test_cli_validate_prints_all_errors_and_fails(pipeline_file: Callable[[str], Path]) -> None:
    path = pipeline_file(BROKEN)
    proc = subprocess.run(
        [sys.executable, "-m", "curate.cli", "validate", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "6 problem(s) found" in proc.stderr
    assert f"{path}:13: stages.length.max_wrds" in proc.stderr.replace("\n", "")


def test_every_bundled_pipeline_validates() -> None:
    from curate.api import check

    root = Path(__file__).resolve().parents[1] / "pipelines"
    files = sorted(root.glob("*.yaml"))
    assert files
    for path in files:
        text = path.read_text()
        if "../bench/data/" in text or " models/" in text:
            # runs on fetched data or self-built models (`make demo` builds them):
            # validated and run in their own tests with stand-ins
            continue
        check(str(path))


def test_duplicate_keys_do_not_hide_other_errors(pipeline_file: Callable[[str], Path]) -> None:
    path = pipeline_file(GOOD.replace("name: t", "name: t\nname: u\nseed: x\nbogus: 1"))
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    text = str(info.value)
    assert "pipe.yaml:2: name: duplicate key 'name'" in text
    assert "pipe.yaml:3: seed: expected a valid integer" in text
    assert "pipe.yaml:4: bogus: unknown key 'bogus'" in text


def test_recursive_and_exponential_aliases_are_harmless(
    pipeline_file: Callable[[str], Path],
) -> None:
    with pytest.raises(ConfigError, match="description"):
        load_pipeline(pipeline_file(GOOD + "description: &a [*a]\n"))
    laughs = "".join(
        f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}]\n" for i in range(1, 30)
    )
    with pytest.raises(ConfigError, match="unknown key 'l1'"):
        load_pipeline(pipeline_file(GOOD + "l0: &l0 lol\n" + laughs, "laughs.yaml"))


def test_a_broken_plugin_is_a_config_error(
    pipeline_file: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_plugin.py").write_text("def oops(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"plugins.0: cannot import plugin module 'broken_plugin': SyntaxError"
    ):
        load_pipeline(pipeline_file(GOOD + "plugins: [broken_plugin]\n"))


def test_set_with_a_list_of_paths_is_relative_to_the_current_folder(
    pipeline_file: Callable[[str], Path],
) -> None:
    p = load_pipeline(pipeline_file(GOOD), ["sources.docs.uri=[a.jsonl, /abs/b.jsonl]"])
    rebased = os.path.relpath(Path("a.jsonl").absolute(), p.base_dir)
    assert p.spec.sources["docs"].uri == [rebased, "/abs/b.jsonl"]


def test_reserved_column_names_are_refused(pipeline_file: Callable[[str], Path]) -> None:
    bad = GOOD.replace(
        'docs: {uri: "*.jsonl"}', 'docs: {uri: "*.jsonl", columns: {source: string}}'
    )
    with pytest.raises(
        ConfigError, match=r"sources.docs.columns: expected column names not reserved"
    ):
        load_pipeline(pipeline_file(bad))


def test_bad_inputs_are_reported_with_config_errors(pipeline_file: Callable[[str], Path]) -> None:
    bad = GOOD.replace("    min_words: 3", "    min_words: 3\n    input: statz\n    colour: red")
    with pytest.raises(ConfigError) as info:
        load_pipeline(pipeline_file(bad))
    text = str(info.value)
    assert "stages.length.colour: unknown key 'colour'" in text
    assert (
        "stages.length.input: expected the name of a source or stage (docs, stats), got 'statz'"
        in text
    )


def test_an_endpoint_url_with_credentials_is_refused_without_echoing_them(
    pipeline_file: Callable[[str], Path], tmp_path: Path
) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    for url in (
        "http://AKIAXX:topsecret1@127.0.0.1:9",
        "AKIAXX:topsecret2@127.0.0.1:9",
        "http://127.0.0.1:9/?X-Amz-Security-Token=topsecret3",
    ):
        path = pipeline_file(
            "name: p\nsources: {d: {uri: d.jsonl}}\nsinks: {o: {input: d}}\n"
            f"storage: {{s3: {{endpoint_url: '{url}'}}}}\n"
        )
        with pytest.raises(ConfigError) as info:
            load_pipeline(str(path))
        assert "topsecret" not in str(info.value)
        assert "storage.s3.endpoint_url" in str(info.value)


@pytest.mark.parametrize("name", ["stats", "rejects", "_work", ".hidden", "a/b"])
def test_sink_names_that_are_curate_folders_are_refused(
    pipeline_file: Callable[[str], Path], name: str
) -> None:
    text = GOOD.replace("  out: {input: length}", f"  '{name}': {{input: length}}")
    with pytest.raises(ConfigError, match=f"sinks.{re.escape(name)}: sink name '{name}'"):
        load_pipeline(pipeline_file(text))


def test_set_rebases_model_files_and_mappings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from curate.config.load import _rebase

    here = tmp_path / "cwd"
    (here / "m").mkdir(parents=True)
    (here / "m" / "clip.pt").write_bytes(b"x")
    monkeypatch.chdir(here)
    base = tmp_path / "recipes"
    assert _rebase("checkpoint", "m/clip.pt", base) == "../cwd/m/clip.pt"
    assert _rebase("checkpoint", "hub:openai", base) == "hub:openai"  # a tag, not a path
    assert _rebase("tokenizer", "cl100k_base", base) == "cl100k_base"
    assert _rebase("cache_dir", "cache", base) == "../cwd/cache"  # need not exist yet
    backend = {"kind": "transformers", "model": "m", "batch_size": 8}
    assert _rebase("backend", backend, base) == {**backend, "model": "../cwd/m"}
    served = {"kind": "openai", "model": "org/served-name"}
    assert _rebase("backend", served, base) == served
