"""``score_filter`` with ``values`` (labels) and with ``any`` / ``all`` lists of conditions:
config checks, the keep decision against a plain re-implementation, and reasons that
name every failed condition."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from curate.stages.score_filters import ScoreCondition, ScoreFilter, ScoreFilterConfig
from pydantic import ValidationError

from curate.stage import StageContext

CTX = StageContext("keep", 0)


def stage(**config: object) -> ScoreFilter:
    return ScoreFilter(ScoreFilterConfig.model_validate(config), CTX)


OPEN_QWEN2VL = {"any": [{"column": "dfn_bucket", "values": ["top"]}, {"preset": "open_qwen2vl_su"}]}


def test_config_forms_and_presets_inside_conditions() -> None:
    cfg = ScoreFilterConfig.model_validate(OPEN_QWEN2VL)
    assert cfg.mode() == "any" and cfg.column is None
    su = cfg.conditions()[1]
    assert (su.column, su.min, su.max, su.values) == ("mlm_su", 85.0, None, None)
    # a worker rebuilds the config from its JSON dump: same config
    assert ScoreFilterConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    single = ScoreFilterConfig.model_validate({"column": "bucket", "values": ["head"]})
    assert single.mode() == "single" and single.conditions() == [
        ScoreCondition(column="bucket", values=["head"])
    ]
    for bad, message in (
        ({}, "got none"),
        ({"column": "s", "min": 1, "any": [{"column": "t", "min": 0}]}, "column and any"),
        ({"any": [{"column": "t", "min": 0}], "all": [{"column": "u", "min": 0}]}, "any and all"),
        ({"any": []}, "at least 1 item"),
        ({"any": [{"column": "t"}]}, "give min and/or max, or values"),
        ({"any": [{"column": "t", "min": 1, "values": ["a"]}]}, "not both"),
        ({"any": [{"column": "t", "min": 2, "max": 1}]}, "must not exceed"),
        ({"any": [{"column": "t", "min": 0}], "max": 3}, "go inside each condition"),
        ({"any": [{"preset": "datacomp_b32_33"}]}, "unknown preset"),
        ({"column": "s", "values": []}, "at least 1 item"),
        ({"all": [{"column": "t", "min": 0, "bogus": 1}]}, "Extra inputs"),
    ):
        with pytest.raises(ValidationError, match=message):
            ScoreFilterConfig.model_validate(bad)


def test_values_keep_listed_labels() -> None:
    s = stage(column="bucket", values=["head", "middle"])
    assert s.reads() == ("bucket",)
    v = s.decide(pa.table({"bucket": ["head", "tail", None, "middle"]}))
    assert list(v.keep) == [True, False, False, True]
    assert v.reason.to_pylist() == [None, "score_filter:not_in", "score_filter:missing", None]
    assert v.value is not None and v.value.to_pylist() == [None, "tail", None, None]
    # a label column of another type is compared as text
    ints = stage(column="k", values=["1"]).decide(pa.table({"k": pa.array([1, 2], pa.int32())}))
    assert list(ints.keep) == [True, False]


def test_any_is_a_union_with_reasons_for_every_condition() -> None:
    s = stage(**OPEN_QWEN2VL)
    assert s.reads() == ("dfn_bucket", "mlm_su")
    batch = pa.table(
        {
            "dfn_bucket": ["top", "rest", "rest", "top", None, "rest", None],
            "mlm_su": pa.array([10, 85, 84, None, 90, None, None], pa.int32()),
        }
    )
    v = s.decide(batch)
    assert list(v.keep) == [True, True, False, True, True, False, False]
    assert v.reason.to_pylist() == [
        None,
        None,
        "score_filter:any:dfn_bucket.not_in+mlm_su.below_min",
        None,
        None,
        "score_filter:any:dfn_bucket.not_in+mlm_su.missing",
        "score_filter:any:dfn_bucket.missing+mlm_su.missing",
    ]
    assert v.value is not None
    assert v.value.to_pylist()[2] == "dfn_bucket=rest; mlm_su=84"
    assert v.value.to_pylist()[6] == "dfn_bucket=null; mlm_su=null"


def test_all_is_an_intersection_and_names_only_the_failed() -> None:
    s = stage(
        all=[{"column": "a", "min": 0.5}, {"column": "b", "max": 2}, {"column": "a", "max": 0.9}]
    )
    assert s.reads() == ("a", "b")  # each column read once
    v = s.decide(pa.table({"a": [0.7, 0.2, 0.95, float("nan")], "b": [1.0, 3.0, 2.0, 2.5]}))
    assert list(v.keep) == [True, False, False, False]
    assert v.reason.to_pylist() == [
        None,
        "score_filter:all:a.below_min+b.above_max",
        "score_filter:all:a.above_max",
        "score_filter:all:a.missing+b.above_max",
    ]
    assert v.value is not None and v.value.to_pylist()[1] == "a=0.2; b=3"


@pytest.mark.parametrize("mode", ["any", "all"])
def test_keep_matches_a_plain_reimplementation(mode: str) -> None:
    rng = np.random.default_rng(4)
    n = 2000
    x = rng.normal(size=n)
    x[rng.random(n) < 0.05] = np.nan
    y = rng.integers(0, 100, size=n)
    label = rng.choice(np.array(["head", "middle", "tail"], dtype=object), size=n)
    conditions = [
        {"column": "x", "min": -0.5, "max": 1.0},
        {"column": "y", "min": 70},
        {"column": "label", "values": ["head"]},
    ]
    v = stage(**{mode: conditions}).decide(pa.table({"x": x, "y": y, "label": label}))
    passes = [
        [(-0.5 <= a <= 1.0), b >= 70, c == "head"]
        for a, b, c in zip(x.tolist(), y.tolist(), label.tolist(), strict=True)
    ]
    expected = [any(p) if mode == "any" else all(p) for p in passes]
    assert list(v.keep) == expected
    assert 0 < sum(expected) < n
    reasons = v.reason.to_pylist()
    for p, keep, reason in zip(passes, expected, reasons, strict=True):
        assert (reason is None) == keep
        if not keep:
            named = {part.split(".")[0] for part in reason.split(":", 2)[2].split("+")}
            assert named == {c for c, ok in zip(("x", "y", "label"), p, strict=True) if not ok}
