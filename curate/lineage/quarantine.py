"""Poisoned rows: a map stage that raises on a few rows loses those rows, not the run.

The runner calls a map stage once per batch, with no per-row guard.  When that
call raises an ordinary exception (an :class:`Exception`; an
:class:`~curate.lineage.accounting.AccountingError` is a broken contract of the
stage and still fails the run, and so do ``KeyboardInterrupt`` and the other
``BaseException`` kinds), :meth:`Quarantine.recover` calls the stage again on each
half of the batch, then on each half of a half that raised, down to single rows.
A single row that still raises is quarantined: a reject of the stage with the reason
``<type>:error`` (counted in full in the manifest, whatever the stage's
``reason_details``) and, as its ``value``, its traceback (:func:`format_error`).
Every other row gets what the call on its part of the batch gave, so for a stage
whose rows do not depend on each other the run is the run without the poisoned
rows.  The search is deterministic: two runs quarantine the same rows with the same
tracebacks.

A stage that raises on many rows is broken, not fed bad data: more quarantined rows
in one unit than ``execution.max_errors`` allows fail the run (:class:`QuarantineLimitError`,
which quotes the first traceback); ``max_errors: 0`` fails on the first error, with
the stage's own exception, as if there were no quarantine.

A stage that kills its process on a row (a segfault) cannot be caught here; a unit
that did so runs its stages in a sandbox process (:mod:`curate.sandbox`), whose
failures reach the search as :class:`RemoteError`: a Python exception with the
traceback the worker would have written, or the death of the process, which the
search treats alike (a sandbox that cannot run at all, :class:`SandboxError`, fails
the run).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from curate.config.model import error_limit
from curate.lineage.accounting import AccountingError, build_rejects

log = logging.getLogger(__name__)

#: The detail of the reason a quarantined row gets: ``<type>:error``.
ERROR = "error"
#: The traceback a quarantined row keeps: its last characters (the innermost frames
#: and the exception), cut at a line start.
TRACEBACK_CHARS = 4000
#: The exception's message in a log line or in the run's failure, at most.
MESSAGE_CHARS = 200
#: ``<X object at 0x7f...>``: an address differs from run to run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

#: The folder holding the ``curate`` package: its frames read ``curate/runner.py``.
_CURATE_ROOT = str(Path(__file__).resolve().parents[2])

Call = Callable[[pa.Table], tuple[pa.Table, pa.Table]]


class QuarantineLimitError(RuntimeError):
    """A map stage raised on more rows of a unit than ``execution.max_errors`` allows."""


class SandboxError(RuntimeError):
    """A sandbox (:mod:`curate.sandbox`) that cannot run its stage: its process died in
    the stage's ``setup()``, the setup failed there, or the stage raised a
    non-``Exception`` error.  No row's fault: never quarantined."""


class RemoteError(Exception):
    """A stage's failure on a part of a unit in another process (its sandbox), as text:
    ``trace`` is what :func:`format_error` gives (a quarantined row's ``value``) and
    ``message`` what :func:`error_message` gives; ``original`` is the stage's own
    exception where it could travel, raised in this one's place when nothing is
    quarantined (``max_errors: 0``)."""

    def __init__(
        self, text: str, trace: str, message: str, original: BaseException | None = None
    ) -> None:
        super().__init__(text)
        self.trace = trace
        self.message = message
        self.original = original


@dataclass(frozen=True)
class OnError:
    """What a map stage's exception on a row makes of the row: its reason, and how many
    such rows of a unit the run tolerates (``execution.max_errors``)."""

    reason: str
    max_errors: int | str


#: What a call may raise that is no row's fault: the stage's broken contract (wrong row
#: counts), a sandbox that cannot run the stage.  These fail the run.
NEVER_QUARANTINED = (AccountingError, SandboxError)


def error_reason(stage_type: str) -> str:
    """The reason of a row a stage of type ``stage_type`` raised on."""
    return f"{stage_type}:{ERROR}"


def format_error(
    exc: BaseException, limit: int = TRACEBACK_CHARS, frame: traceback.FrameSummary | None = None
) -> str:
    """``exc``'s traceback as Python prints it, the same in every run on any machine:
    file names relative to the ``sys.path`` entry they were imported from (so
    ``curate/runner.py``, ``my_plugin.py``, ``pyarrow/compute.py``), object addresses
    masked, at most the last ``limit`` characters.  ``frame`` replaces the outermost
    frame (the one that caught ``exc``): in a sandbox, the frame of its caller in the
    worker, so that the text is the one the worker would have written."""
    if isinstance(exc, RemoteError):
        return exc.trace
    error = traceback.TracebackException.from_exception(exc)
    if frame is not None and error.stack:
        error.stack[0] = frame
    paths = [p for p in sys.path if isinstance(p, str) and p]  # '' (the cwd) varies
    paths.append(_CURATE_ROOT)  # an editable install need not put it on sys.path
    roots = sorted({os.path.join(os.path.abspath(p), "") for p in paths}, key=len, reverse=True)
    _relative(error, roots, set())
    text = _ADDRESS.sub(" at 0x…", "".join(error.format()))
    if len(text) <= limit:
        return text
    tail = text[len(text) - limit :]
    start = tail.find("\n") + 1
    return "…\n" + (tail[start:] if 0 < start < len(tail) else tail)


def _relative(error: traceback.TracebackException, roots: list[str], seen: set[int]) -> None:
    """Make the file names of ``error``'s frames (and of its causes) relative."""
    if id(error) in seen:
        return
    seen.add(id(error))
    for frame in error.stack:  # source lines were read already: renaming loses none
        name = os.path.abspath(frame.filename) if os.path.isabs(frame.filename) else None
        root = next((r for r in roots if name and name.startswith(r)), None)
        if name and root:
            frame.filename = name[len(root) :]
    for nested in (error.__cause__, error.__context__, *(error.exceptions or ())):
        if nested is not None:
            _relative(nested, roots, seen)


def error_message(exc: BaseException) -> str:
    """One line: the exception's type and message (cut), as the traceback ends."""
    if isinstance(exc, RemoteError):
        return exc.message
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    text = " ".join(_ADDRESS.sub(" at 0x…", text).split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


@dataclass
class Quarantine:
    """The rows of one stage and one unit quarantined so far, against the unit's limit.

    ``call`` runs the stage on a part of the unit (kept rows, rejects), ``counters``
    reads the stage's deterministic counters.
    """

    stage: str
    reason: str
    unit: int
    rows: int
    max_errors: int | str
    call: Call
    counters: Callable[[], Mapping[str, int]]
    quarantined: int = 0
    #: Traceback and record id of the first row quarantined, for :class:`QuarantineLimitError`.
    first: tuple[str, str] | None = None
    #: How much the stage's ``counters()`` grew during calls that raised.  A call that
    #: raised half-way may have counted some of its rows, which the calls on its halves
    #: count again: the report leaves these increases out, so its counters are those of
    #: the calls whose rows it reports (those of a run without the poisoned rows).
    #: ``run_counters()`` (requests sent, retries) keep them: that work was done.
    wasted: Counter[str] = field(default_factory=Counter)

    @property
    def limit(self) -> int:
        return error_limit(self.max_errors, self.rows)

    def recover(
        self,
        part: pa.Table,
        exc: Exception,
        mark: Mapping[str, int],
        kept: list[pa.Table],
        rejects: list[pa.Table],
    ) -> None:
        """Append what ``part`` gives, in row order, to ``kept`` and ``rejects``: its
        call raised ``exc`` after the stage's counters were ``mark``."""
        self._waste(mark)
        if part.num_rows == 0 or self.limit == 0:
            raise exc.original if isinstance(exc, RemoteError) and exc.original is not None else exc
        if part.num_rows == 1:
            rejects.append(self._quarantine(part, exc))
            return
        middle = part.num_rows // 2
        for half in (part.slice(0, middle), part.slice(middle)):
            before = dict(self.counters())
            try:
                out, dropped = self.call(half)
            except NEVER_QUARANTINED:
                raise
            except Exception as raised:
                error = raised
            else:
                kept.append(out)
                rejects.append(dropped)
                continue
            # Outside the handler: an exception raised in there would carry this one as
            # its context, and its traceback every level of the search.
            self.recover(half, error, before, kept, rejects)

    def _waste(self, mark: Mapping[str, int]) -> None:
        now = self.counters()
        for key in set(now) | set(mark):
            grown = now.get(key, 0) - mark.get(key, 0)
            if grown:
                self.wasted[key] += grown

    def _quarantine(self, row: pa.Table, exc: Exception) -> pa.Table:
        trace = format_error(exc)
        record = str(row.column("id")[0].as_py())
        self.quarantined += 1
        if self.first is None:
            self.first = (trace, record)
        log.warning(
            "stage %r, unit %d: quarantined record %s (%s): %s",
            self.stage,
            self.unit,
            record,
            self.reason,
            error_message(exc),
        )
        if self.quarantined > self.limit:
            first_trace, first_record = self.first
            raise QuarantineLimitError(
                f"stage {self.stage!r} raised on {self.quarantined} of the {self.rows} rows "
                f"of unit {self.unit}, more than execution.max_errors ({self.max_errors!r}: "
                f"{self.limit} row(s)) allows; a stage failing on this many rows is broken, "
                f"not fed bad data. The first error, on record {first_record}:\n{first_trace}"
            )
        return build_rejects(
            self.stage, row, pa.array([self.reason], pa.string()), pa.array([trace], pa.string())
        )
