"""Live progress of a run: per-stage rows in / kept / dropped and their rates.

The runner feeds :class:`Progress` every unit's reports as the unit finishes
(Ray Data streams them back), and the start and end of every pass and global
stage.  Each update is passed to a listener (the CLI's live table) and written,
at most once a second and always at the end, to ``OUT/_progress.json`` (local or
S3), so the same numbers can be read while the run is in flight:
``curate progress OUT/`` or :func:`read_progress`.

The granularity is the unit of work (``execution.unit_bytes``): a stage's
counts grow when a unit has passed it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from curate.io import storage
from curate.io.files import atomic_write_bytes
from curate.io.storage import LOCAL, StorageOptions

PROGRESS_FILE = "_progress.json"
Listener = Callable[[dict[str, Any]], None]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Progress:
    """Running totals of a run, published to a listener and a file."""

    def __init__(
        self,
        root: str | None,
        opts: StorageOptions = LOCAL,
        listener: Listener | None = None,
        every: float = 1.0,
    ) -> None:
        self.path = storage.join(root, PROGRESS_FILE) if root else None
        self.opts = opts
        self.listener = listener
        self.every = every
        self.t0 = time.perf_counter()
        self._written = 0.0
        self.state: dict[str, Any] = {
            "state": "running",
            "started_at": _now(),
            "phase": "starting",
            "passes": {"done": 0, "total": 0},
            "units": {"done": 0, "total": 0},
            "stages": {},
        }

    def plan(self, passes: int) -> None:
        self.state["passes"]["total"] = passes
        self._publish(force=True)

    def begin_pass(self, index: int, stages: list[str], units: int) -> None:
        self.state["phase"] = f"pass {index}: {', '.join(stages) or 'write'}"
        self.state["units"] = {"done": 0, "total": units}
        self._publish(force=True)

    def end_pass(self) -> None:
        self.state["passes"]["done"] += 1
        self._publish(force=True)

    def global_stage(self, name: str, what: str) -> None:
        self.state["phase"] = f"global stage {name}: {what}"
        self._publish(force=True)

    def add(self, reports: list[dict[str, Any]], unit_done: bool = True) -> None:
        """Count a finished unit's stage and source reports."""
        for r in reports:
            if r.get("kind") not in ("stage", "source"):
                continue
            s = self.state["stages"].setdefault(
                r["stage"], {"rows_in": 0, "kept": 0, "dropped": 0, "seconds": 0.0}
            )
            for key in ("rows_in", "kept", "dropped"):
                s[key] += int(r[key])
            s["seconds"] += float(r.get("seconds", 0.0))
            if r.get("rows_out") is not None:
                s["rows_out"] = s.get("rows_out", 0) + int(r["rows_out"])
        if unit_done:
            self.state["units"]["done"] += 1
        self._publish()

    def finish(self, ok: bool = True) -> None:
        self.state["state"] = "finished" if ok else "failed"
        self.state["phase"] = "done" if ok else "failed"
        self._publish(force=True)

    def snapshot(self) -> dict[str, Any]:
        """The current totals with rates (rows per second of wall time so far)."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        out: dict[str, Any] = json.loads(json.dumps(self.state))
        out["updated_at"] = _now()
        out["elapsed_s"] = round(elapsed, 3)
        for s in out["stages"].values():
            s["rows_in_per_s"] = round(s["rows_in"] / elapsed, 1)
            s["kept_per_s"] = round(s["kept"] / elapsed, 1)
            s["dropped_per_s"] = round(s["dropped"] / elapsed, 1)
        return out

    def _publish(self, force: bool = False) -> None:
        now = time.perf_counter()
        snap = self.snapshot()
        if self.listener is not None:
            self.listener(snap)
        if self.path is not None and (force or now - self._written >= self.every):
            self._written = now
            data = (json.dumps(snap, indent=1, sort_keys=True) + "\n").encode()
            atomic_write_bytes(self.path, data, self.opts)


def read_progress(out: str, opts: StorageOptions = LOCAL) -> dict[str, Any]:
    """The progress a run in ``out`` last published (in flight or finished)."""
    path = storage.join(out, PROGRESS_FILE)
    if not storage.exists(path, opts):
        raise FileNotFoundError(f"{out}: no {PROGRESS_FILE}; is it the output folder of a run?")
    data: dict[str, Any] = json.loads(storage.read_bytes(path, opts))
    return data
