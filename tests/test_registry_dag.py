"""Registry (built-ins, entry points, plugins, collisions) and the DAG check."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from curate import registry
from curate.api import check
from curate.config import ConfigError

PLUGIN = """
from typing import ClassVar
import pyarrow as pa
from curate.registry import register_stage
from curate.stage import Annotator, Requirement, StageConfig


class UpperConfig(StageConfig):
    column: str = "text"


@register_stage("upper_case")
class Upper(Annotator):
    Config: ClassVar[type[StageConfig]] = UpperConfig

    def reads(self):
        return (self.config.column,)

    def writes(self):
        return {"upper": pa.string()}

    def process_batch(self, batch):
        import pyarrow.compute as pc
        return batch.append_column("upper", pc.utf8_upper(batch.column(self.config.column)))


@register_stage("needs_missing_module")
class NeedsMissing(Upper):
    requires = (Requirement("surely_not_installed_xyz", "surely-not-installed-xyz==1.0"),)
"""


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Iterator[Path]:
    """A real plugin module and a real installed distribution with an entry point."""
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    (tmp_path / "ep_stages.py").write_text(
        PLUGIN.replace("upper_case", "ep_upper")
        .replace('@register_stage("needs_missing_module")', "")
        .replace(
            "from curate.registry import register_stage",
            "def register_stage(n):\n    return lambda c: c",
        )
    )
    dist = tmp_path / "ep_stages-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-stages\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[curate.stages]\nep_upper = ep_stages:Upper\n")
    sys.path.insert(0, str(tmp_path))
    saved = (dict(registry._refs), dict(registry._classes), registry._state["loaded"])
    registry._refs.clear()
    registry._classes.clear()
    registry._state["loaded"] = False
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for mod in ("my_plugin", "ep_stages", "readme_stage", "broken_one"):
            sys.modules.pop(mod, None)
        registry._refs.clear()
        registry._refs.update(saved[0])
        registry._classes.clear()
        registry._classes.update(saved[1])
        registry._state["loaded"] = saved[2]


def test_builtins_are_known_and_lazy() -> None:
    assert {"text_stats", "length_filter", "exact_dedup"} <= set(registry.known_types())
    assert registry.get_stage_class("exact_dedup").kind == "global"


def test_unknown_type_lists_closest_names() -> None:
    with pytest.raises(registry.RegistryError, match="did you mean 'length_filter'"):
        registry.get_stage_class("lenght_filter")


def test_entry_point_stage_is_found(plugin_dir: Path) -> None:
    cls = registry.get_stage_class("ep_upper")
    assert cls.__module__ == "ep_stages"


def test_plugin_module_named_in_yaml_registers(
    plugin_dir: Path, pipeline_file: Callable[[str], Path]
) -> None:
    (plugin_dir / "d.jsonl").write_text('{"text": "a"}\n')
    plan = check(
        str(
            pipeline_file(
                textwrap.dedent("""\
        name: p
        plugins: [my_plugin]
        sources: {docs: {uri: d.jsonl}}
        stages: {up: {type: upper_case}}
        sinks: {out: {input: up}}
    """)
            )
        )
    )
    assert plan.columns["up"]["upper"].equals(__import__("pyarrow").string())


def test_collisions_are_refused(plugin_dir: Path) -> None:
    import importlib

    importlib.import_module("my_plugin")
    with pytest.raises(registry.RegistryError, match="registered twice"):
        registry.register_stage("text_stats")(registry.get_stage_class("upper_case"))


DAG_ERRORS = """\
name: dag
plugins: [my_plugin]
sources:
  docs: {uri: d.jsonl}
  unused: {uri: d.jsonl}
stages:
  a: {type: text_stats, input: c}
  b: {type: length_filter, input: a, min_words: 1}
  c: {type: text_stats, input: b}
  filt: {type: length_filter, input: docs, min_words: 1}
  ghost: {type: text_stats, input: nowhere}
  dep: {type: needs_missing_module, input: docs}
sinks:
  out: {input: filt}
  out2: {input: dep}
"""


def test_dag_errors_all_reported_together(
    plugin_dir: Path, pipeline_file: Callable[[str], Path]
) -> None:
    (plugin_dir / "d.jsonl").write_text('{"text": "a"}\n')
    path = pipeline_file(DAG_ERRORS)
    with pytest.raises(ConfigError) as info:
        check(str(path))
    text = str(info.value)
    assert f"{path}:11: stages.ghost.input: expected the name of a source or stage" in text
    assert "cycle in the graph: a -> c -> b -> a" in text
    assert "unused: output is never used" in text
    assert "stages.filt: reads column 'n_words', which no upstream stage writes" in text
    assert "pip install surely-not-installed-xyz==1.0" in text
    assert len(info.value.issues) == 6  # ghost is also unused


BRANCHY = """\
name: branchy
sources:
  web: {uri: d.jsonl}
  books: {uri: d.jsonl}
stages:
  stats: {type: text_stats, input: web}
  length: {type: length_filter, input: stats, min_words: 1}
  heavy:
    type: length_filter
    input: length
    max_words: 100
    resources: {num_cpus: 2}
  dedup: {type: exact_dedup, input: heavy}
  both: {type: text_stats, input: [dedup, books]}
sinks:
  main: {input: both}
  also: {input: length}
"""


def test_segments_fuse_and_materialize(
    tmp_path: Path, pipeline_file: Callable[[str], Path]
) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    plan = check(str(pipeline_file(BRANCHY)))
    seg = [(s.inputs, s.apply, s.groups, s.targets) for s in plan.segments]
    assert seg[0] == (("web",), None, (("stats", "length"),), (("materialize", "length"),))
    assert (("length",), None, (), (("sink", "also"),)) in seg
    assert (("length",), None, (("heavy",),), (("materialize", "heavy"),)) in seg
    assert (("heavy",), "dedup", (), (("materialize", "dedup"),)) in seg
    assert (("books",), None, (), (("materialize", "books"),)) in seg
    assert seg[-1] == (("dedup", "books"), None, (("both",),), (("sink", "main"),))
    assert plan.materialized == {"length", "heavy", "dedup", "books"}


def test_readme_stage_example_runs(plugin_dir: Path, pipeline_file: Callable[[str], Path]) -> None:
    """The README's 'Writing a stage' example, executed as written."""
    import pyarrow as pa

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Writing a stage") :]
    code = section[section.index("```python\n") + 10 : section.index("```\n", 10)]
    (plugin_dir / "readme_stage.py").write_text(code)
    (plugin_dir / "d.jsonl").write_text('{"text": "a"}\n')
    plan = check(
        str(
            pipeline_file(
                textwrap.dedent("""\
        name: readme
        plugins: [readme_stage]
        sources: {docs: {uri: d.jsonl}}
        stages:
          stats: {type: text_stats}
          digits: {type: digit_filter, max_fraction: 0.5}
        sinks: {out: {input: digits}}
    """)
            )
        )
    )
    stage = plan.stages["digits"]
    verdict = stage.decide(pa.table({"text": ["abcd", "a123", ""], "n_chars": [4, 4, 0]}))
    assert verdict.keep.tolist() == [True, False, True]
    assert verdict.reason.to_pylist() == [None, "too_many_digits", None]
    assert verdict.value is not None and verdict.value.to_pylist()[1] == "0.75"


def test_union_of_branches_of_one_source_is_refused(
    tmp_path: Path, pipeline_file: Callable[[str], Path]
) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    path = pipeline_file("""\
name: u
sources: {docs: {uri: d.jsonl}}
stages:
  stats: {type: text_stats, input: docs}
  short: {type: length_filter, input: stats, max_words: 5}
  long: {type: length_filter, input: stats, min_words: 6}
  both: {type: exact_dedup, input: [short, long]}
sinks: {out: {input: both}}
""")
    with pytest.raises(
        ConfigError, match=r"stages.both.input: inputs 'short' and 'long' both carry"
    ):
        check(str(path))


def test_unreadable_or_colliding_parquet_schema_is_reported(
    tmp_path: Path, pipeline_file: Callable[[str], Path]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"text": ["a"], "source": ["web"]}), tmp_path / "clash.parquet")
    path = pipeline_file("""\
name: p
sources:
  bad: {uri: bad.parquet}
  clash: {uri: clash.parquet}
sinks: {a: {input: bad}, b: {input: clash}}
""")
    with pytest.raises(ConfigError) as info:
        check(str(path))
    text = str(info.value)
    assert "sources.bad.uri: bad.parquet: not a readable Parquet file" in text
    assert "sources.clash: its Parquet shards (first: clash.parquet) have a column 'source'" in text


def test_parquet_schema_is_unified_over_all_shards(
    tmp_path: Path, pipeline_file: Callable[[str], Path]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p").mkdir()
    pq.write_table(
        pa.table({"text": ["a"], "url": pa.nulls(1), "n": pa.array([1], pa.int32())}),
        tmp_path / "p" / "a.parquet",
    )
    pq.write_table(
        pa.table({"text": ["b"], "url": ["u"], "n": pa.array([2**40], pa.int64())}),
        tmp_path / "p" / "b.parquet",
    )
    plan = check(str(pipeline_file("name: s\nsources: {d: {uri: p}}\nsinks: {o: {input: d}}\n")))
    assert plan.columns["d"]["url"] == pa.string() and plan.columns["d"]["n"] == pa.int64()


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            "sources: {d: {uri: mixed}}\nsinks: {o: {input: d}}",
            "sources.d.uri: one source, one format: found jsonl, parquet",
        ),
        (
            "sources: {d: {uri: mixed/a.parquet, columns: {m: json}}}\nsinks: {o: {input: d}}",
            "sources.d.columns: type 'json' is for JSONL sources",
        ),
        (
            "sources: {d: {uri: mixed/b.jsonl}}\nstages: {s: {type: text_stats, input: [d, d]}}\n"
            "sinks: {o: {input: s}}",
            "stages.s.input: an input is listed twice",
        ),
        (
            "sources: {d: {uri: mixed/b.jsonl}}\nsinks: {rejects: {input: d}}",
            "sinks.rejects: sink name 'rejects' is reserved",
        ),
    ],
    ids=["mixed_formats", "json_for_parquet", "input_twice", "sink_named_rejects"],
)
def test_shapes_that_would_lose_or_mix_rows_are_refused(
    tmp_path: Path, pipeline_file: Callable[[str], Path], yaml_text: str, message: str
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "mixed").mkdir()
    pq.write_table(pa.table({"text": ["a"], "m": ["x"]}), tmp_path / "mixed" / "a.parquet")
    (tmp_path / "mixed" / "b.jsonl").write_text('{"text": "b"}\n')
    with pytest.raises(ConfigError, match=message):
        check(str(pipeline_file("name: x\n" + yaml_text + "\n")))


def test_one_broken_plugin_hides_no_other(
    plugin_dir: Path, pipeline_file: Callable[[str], Path]
) -> None:
    (plugin_dir / "broken_one.py").write_text("raise RuntimeError('boom')\n")
    (plugin_dir / "d.jsonl").write_text('{"text": "a"}\n')
    path = pipeline_file(
        "name: p\nplugins: [broken_one, my_plugin]\nsources: {d: {uri: d.jsonl}}\n"
        "stages: {u: {type: upper_case}}\nsinks: {o: {input: u}}\n"
    )
    with pytest.raises(ConfigError) as info:
        check(str(path))
    assert len(info.value.issues) == 1
    assert "plugins.0: cannot import plugin module 'broken_one': RuntimeError: boom" in str(
        info.value
    )
