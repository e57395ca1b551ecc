"""Crash isolation: a unit whose map stages keep killing their process runs in a sandbox.

A stage that kills its worker process on some row (a segfault in a native library,
``os._exit``, the OOM killer) raises nothing the quarantine
(:mod:`curate.lineage.quarantine`) could catch: Ray restarts the pool's actor and runs
the unit again, without limit.  So a group of map stages records every attempt at a
unit before it starts (:func:`begin_attempt`: one empty object per attempt under
``_work/_attempts/``, counted by listing, so no read-modify-write races on S3), and a
unit that arrives with ``execution.isolate_after`` earlier attempts (default 2: the
process or its node died twice on it) runs in isolation: each stage of the group
runs in a :class:`Sandbox`, a child process that builds the stage from its
:class:`~curate.runner.StageRef`, runs its ``setup()`` once and then runs the parts of
the unit it is sent.

The worker drives the same search as for an exception (:func:`curate.runner.run_stage`),
calling the sandbox instead of the stage.  A child that dies on a part is a
:class:`ProcessDiedError` for that part: the search calls a new child on each half, and
so on down to the rows that kill it, quarantined as ``<type>:error`` with a text saying
how the process died (no pid, no address: the same in every run).  A Python exception in
the child comes back as the traceback the worker would have written (its outermost
frame is the worker's frame that called the sandbox), and the stage's counters come
back after every call.  So a unit gives the same bytes in isolation as in its worker:
a unit isolated after node deaths is only slower.

Children start from a fork server (multiprocessing's ``forkserver``: the Ray worker is
multi-threaded and must not fork itself), which imports curate and Ray once per worker,
so that a child started again after a crash costs a fork, plugin imports and the
stage's ``setup()``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Mapping
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from curate.io import storage
from curate.io.layout import Layout
from curate.lineage.accounting import AccountingError
from curate.lineage.quarantine import RemoteError, SandboxError, error_message, format_error

if TYPE_CHECKING:
    from curate.runner import StageRef

log = logging.getLogger(__name__)

#: What the fork server imports before it forks children: curate's runner (and Ray).
PRELOAD = ["curate.runner"]
#: Seconds a child gets to exit when its sandbox closes, or to be reaped once it died.
EXIT_SECONDS = 30.0
#: The two kinds of counters a stage keeps (``Stage.counters``, ``Stage.run_counters``).
KINDS = ("counters", "run_counters")

Counts = dict[str, int]


class ProcessDiedError(RemoteError):
    """The sandbox's process died while its stage ran on a part of a unit."""


def begin_attempt(layout: Layout, segment: int, group: str, unit: int) -> int:
    """Record an attempt of the map stages ``group`` at ``unit``; return how many
    attempts began before it (none finished unless a node's loss made Ray run the unit
    again after it had)."""
    folder = layout.attempts(segment, group, unit)
    names = [f.uri.rsplit("/", 1)[-1] for f in storage.list_prefix(folder, layout.opts)]
    earlier = sum(n.startswith("attempt-") for n in names)
    layout.write(storage.join(folder, f"attempt-{earlier:03d}"), b"")
    return earlier


def clear_attempts(layout: Layout) -> None:
    """Remove every marker of attempts (at the end of a run: every unit is committed)."""
    root = layout.attempts_root()
    storage.remove_tree(root, layout.opts)
    if not storage.is_s3(root):
        with contextlib.suppress(OSError):  # absent
            os.rmdir(root)


def death(exitcode: int | None) -> str:
    """How a process ended: ``signal 11: SIGSEGV`` or ``exit code 3``."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown"
        return f"signal {-exitcode}: {name}"
    return f"exit code {exitcode}"


class Sandbox:
    """One map stage in a child process, called like the stage on a part of a unit
    (kept rows, rejects); ``counters()`` and ``run_counters()`` are the stage's, summed
    over the children it started (a dead child's last call is not counted: it gave no
    rows).  A child that died is replaced by the next call."""

    def __init__(
        self, ref: StageRef, seed: int, layout: Layout, plugins: list[tuple[str, str | None]]
    ) -> None:
        self.ref = ref
        self.seed = seed
        self.layout = layout
        self.plugins = plugins
        #: Children started so far.
        self.started = 0
        self._child: tuple[BaseProcess, Connection] | None = None
        #: A kind's counters are its offset plus what the live child last reported.
        self._offset: dict[str, Counts] = {k: {} for k in KINDS}
        self._last: dict[str, Counts] = {k: {} for k in KINDS}

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def counters(self) -> Counts:
        return _add(self._offset["counters"], self._last["counters"])

    def run_counters(self) -> Counts:
        return _add(self._offset["run_counters"], self._last["run_counters"])

    def __call__(self, part: pa.Table) -> tuple[pa.Table, pa.Table]:
        caller = _frame(sys._getframe(1))
        process, conn = self._start()
        reply = _ask(process, conn, (caller, part))
        if reply is None:
            raise self._died(part.num_rows)
        kind, body, tally = reply
        self._tally(tally)
        if kind == "ok":
            kept, rejects = body
            return kept, rejects
        if kind == "raised":
            trace, message, original = body
            raise RemoteError(message, trace, message, _unpickle(original))
        if kind == "accounting":
            raise AccountingError(body)
        raise SandboxError(f"stage {self.ref.name!r} in its sandbox process: {body}")

    def close(self) -> None:
        """Stop the child, if one runs."""
        if self._child is None:
            return
        process, conn = self._child
        self._child = None
        with contextlib.suppress(OSError):
            conn.send(None)
        _reap(process)
        conn.close()

    def _start(self) -> tuple[BaseProcess, Connection]:
        if self._child is not None:
            return self._child
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)  # no effect once the server runs
        conn, theirs = context.Pipe()
        process = context.Process(
            target=_serve,
            args=(theirs, self.ref, self.seed, self.layout, self.plugins),
            name=f"curate-sandbox-{self.ref.name}",
        )
        process.start()
        theirs.close()
        self.started += 1
        reply = _ask(process, conn, None)
        if reply is None:
            conn.close()
            raise SandboxError(
                f"stage {self.ref.name!r}: its sandbox process died "
                f"({death(_reap(process))}) in setup()"
            )
        kind, body, tally = reply
        if kind != "ready":  # the child ends after saying so
            _reap(process)
            conn.close()
            raise SandboxError(f"stage {self.ref.name!r}: setup() failed in its sandbox:\n{body}")
        for k, ready in zip(KINDS, tally, strict=True):
            self._offset[k] = _add(self._offset[k], ready, -1)  # counted from here
        self._tally(tally)
        self._child = (process, conn)
        return self._child

    def _tally(self, tally: tuple[Counts, Counts]) -> None:
        for k, now in zip(KINDS, tally, strict=True):
            self._last[k] = now

    def _died(self, rows: int) -> ProcessDiedError:
        assert self._child is not None
        process, conn = self._child
        self._child = None
        conn.close()
        how = death(_reap(process))
        for k in KINDS:  # what the dead child had counted before the fatal call stays
            self._offset[k] = _add(self._offset[k], self._last[k])
            self._last[k] = {}
        log.info(
            "stage %r: its sandbox process died (%s) on %d row(s); starting another",
            self.ref.name,
            how,
            rows,
        )
        return ProcessDiedError(
            f"stage {self.ref.name!r}: its process died ({how}) while processing {rows} row(s)",
            f"worker process died ({how}) while processing this row",
            f"worker process died ({how})",
        )


def _add(a: Mapping[str, int], b: Mapping[str, int], sign: int = 1) -> Counts:
    return {k: a.get(k, 0) + sign * b.get(k, 0) for k in sorted({*a, *b})}


def _ask(process: BaseProcess, conn: Connection, request: Any) -> Any:
    """Send ``request`` (None: only wait) and return the child's answer, or None when
    the child died first."""
    try:
        if request is not None:
            conn.send(request)
        if conn not in wait([conn, process.sentinel]):
            return None
        return conn.recv()
    except (OSError, EOFError):  # a broken pipe, or an answer cut short
        return None


def _reap(process: BaseProcess) -> int | None:
    """Wait for ``process`` to end (killing it if it will not) and return its exit code."""
    process.join(EXIT_SECONDS)
    if process.is_alive():
        process.kill()
        process.join()
    return process.exitcode


def _frame(frame: FrameType) -> tuple[str, int, str, int | None, int | None, int | None]:
    """Where ``frame`` stands, as a traceback passing through it would record it."""
    code = frame.f_code
    start, end, col, end_col = next(
        itertools.islice(code.co_positions(), frame.f_lasti // 2, None), (None,) * 4
    )
    return code.co_filename, start or frame.f_lineno, code.co_name, end, col, end_col


def _unpickle(data: bytes | None) -> BaseException | None:
    if data is None:
        return None
    try:
        original = pickle.loads(data)
    except Exception:  # a class that does not unpickle here: the text says it all
        return None
    return original if isinstance(original, BaseException) else None


def _pickled(exc: BaseException) -> bytes | None:
    try:
        return pickle.dumps(exc)
    except Exception:
        return None


# --- in the child --------------------------------------------------------------------------


def _serve(
    conn: Connection,
    ref: StageRef,
    seed: int,
    layout: Layout,
    plugins: list[tuple[str, str | None]],
) -> None:
    """The child: build and set up the stage, then answer each part until told to stop
    (or until the worker is gone)."""
    from curate.registry import load_plugins

    try:
        load_plugins(plugins)
        stage = ref.build(seed, layout)
        stage.setup()
    except Exception as exc:
        conn.send(("setup", format_error(exc), ({}, {})))
        return
    conn.send(("ready", None, _counts(stage)))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        (filename, lineno, name, end, col, end_col), part = request
        caller = traceback.FrameSummary(
            filename, lineno, name, end_lineno=end, colno=col, end_colno=end_col
        )
        kind, body = _call(ref.name, stage, part, caller)
        conn.send((kind, body, _counts(stage)))


def _call(name: str, stage: Any, part: pa.Table, caller: traceback.FrameSummary) -> Any:
    from curate.runner import _run_one

    try:
        kept, rejects = _run_one(name, stage, part)
    except AccountingError as exc:
        return "accounting", str(exc)
    except Exception as exc:
        return "raised", (format_error(exc, frame=caller), error_message(exc), _pickled(exc))
    except BaseException as exc:
        return "fatal", error_message(exc)
    return "ok", (kept, rejects)


def _counts(stage: Any) -> tuple[Counts, Counts]:
    return dict(stage.counters()), dict(stage.run_counters())
