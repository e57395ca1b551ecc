"""Atomic commits, shard cutting and the unit trailer."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.io import files
from curate.io.sink import cut, row_sizes
from curate.lineage.accounting import AccountingError, reports_of, with_reports
from curate.runner import split_trailer, with_trailer
from curate.stage import POS, UNIT


def test_a_crash_mid_write_leaves_no_file_under_the_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out" / "part-000000-0000.parquet"

    def crash(fd: int) -> None:
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk vanished"):
        files.write_parquet_atomic(pa.table({"x": [1, 2, 3]}), str(target))
    assert not target.exists()
    # the failed writer removed its temporary file (a killed one leaves it hidden:
    # storage.abort_stale clears it on --resume/--overwrite)
    assert list(target.parent.iterdir()) == []


def test_committed_file_matches_its_checksum_and_drops_run_metadata(tmp_path: Path) -> None:
    table = with_reports(pa.table({"x": ["a", "b"]}), [{"seconds": 1.23}])
    written = files.write_parquet_atomic(table, str(tmp_path / "f.parquet"))
    data = (tmp_path / "f.parquet").read_bytes()
    assert (written.rows, written.bytes) == (2, len(data))
    assert written.sha256 == hashlib.sha256(data).hexdigest()
    assert b"curate.reports" not in (pq.read_schema(tmp_path / "f.parquet").metadata or {})


def test_same_table_same_bytes_whatever_the_chunking(tmp_path: Path) -> None:
    rows = [f"doc {i}" for i in range(100)]
    one = pa.table({"t": rows})
    many = pa.Table.from_batches(pa.table({"t": rows}).to_batches(max_chunksize=7))
    assert files.parquet_bytes(one) == files.parquet_bytes(many)


def test_cut_points_follow_cumulative_size() -> None:
    sizes = np.array([5, 5, 5, 5, 5, 20, 1], dtype=np.int64)
    assert cut(sizes, 10) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert cut(np.zeros(0, np.int64), 10) == []
    assert cut(sizes, 1000) == [(0, 7)]


def test_row_sizes_count_string_bytes() -> None:
    table = pa.table({"s": ["ab", "ünï", None], "n": [1, 2, 3]})
    assert row_sizes(table).tolist() == [2 + 8, 5 + 8, 0 + 8]


def test_trailer_keeps_unit_and_reports_through_an_emptied_block() -> None:
    table = pa.table({"id": ["a"], "text": ["x"], UNIT: [4], POS: [0]}).slice(0, 0)
    block = with_trailer(with_reports(table, [{"stage": "s", "unit": 4}]), 4)
    assert block.num_rows == 1
    live, unit, reports = split_trailer(block)
    assert (live.num_rows, unit, reports) == (0, 4, [{"stage": "s", "unit": 4}])
    assert reports_of(live) == []


def test_a_block_mixing_units_is_refused() -> None:
    table = pa.table({"id": ["a", "b"], UNIT: [1, 2], POS: [0, 0]})
    with pytest.raises(AccountingError, match="several units"):
        split_trailer(with_trailer(table, 1))
