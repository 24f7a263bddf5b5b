"""Where a study's results live: one SQLite file (Python's ``sqlite3``: an embedded database, no server).

Every trial is one row of ``trials``, keyed by the trial's hash (its configuration, its seed and the version of
the code it runs: :func:`labkit.ablation.study.trial_key`). Its ``status`` goes ``running`` (a worker claimed it)
-> ``done`` (the result, in the same transaction) or ``failed`` (the error and its traceback). ``events`` keeps
every start, finish, failure and interruption with its time and process id, and ``studies`` the specification of
each study written into the file, so that a report can be made from the file alone.

Why nothing finished is lost:

* Each state change is one transaction, committed before the worker says it is done. SQLite's journal makes a
  transaction all or nothing, whether the writer is killed (``kill -9``) or the machine loses power.
* ``journal_mode=WAL`` lets readers (the progress bar, a report, a notebook) read while workers write, and
  ``synchronous=FULL`` syncs the log on every commit, so a committed result survives a power cut too (with
  ``NORMAL`` WAL stays consistent but may lose the last commits: https://www.sqlite.org/pragma.html#pragma_synchronous).
* Writers wait for each other (``busy_timeout``) instead of failing: several workers write into one file.
* Nothing is ever deleted or overwritten: a finished trial is never run again, and :meth:`Store.recover` turns a
  trial left ``running`` by a study that died into an ``interrupted`` one (counted, reported) that the next run
  starts again from its beginning.

One file on one machine. SQLite's locking relies on the file system's locks, which network file systems (NFS,
many cluster home directories) implement badly or not at all, and WAL needs shared memory between the processes
that open the file, which processes on different machines do not have (https://www.sqlite.org/wal.html,
https://www.sqlite.org/faq.html#q5). Studies spread over machines therefore write one file per shard
(``--shard I/N``) on each machine's local disk and :func:`merge` them afterwards.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from typing import Iterable, Iterator

__all__ = ["Store", "StoreError", "MergeConflict", "SCHEMA_VERSION", "merge", "comparable"]

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS studies (name TEXT PRIMARY KEY, spec TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY,
    study TEXT NOT NULL,
    label TEXT NOT NULL,
    config TEXT NOT NULL,
    seed INTEGER NOT NULL,
    code TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
    value REAL,
    result TEXT,
    error TEXT,
    traceback TEXT,
    starts INTEGER NOT NULL DEFAULT 0,
    interrupted INTEGER NOT NULL DEFAULT 0,
    started REAL,
    finished REAL,
    pid INTEGER,
    host TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, event TEXT NOT NULL, time REAL NOT NULL,
    pid INTEGER, detail TEXT
);
"""
_TIMING = ("seconds",)  # result keys that legitimately differ between two runs of one trial


class StoreError(RuntimeError):
    """The results file cannot be used: the message names the file, the cause and what to do."""


class MergeConflict(StoreError):
    """Two files hold one trial (same hash) with different results."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


def comparable(result: dict | None) -> dict | None:
    """A result without its timings: what must agree between two runs of the same trial."""
    if result is None:
        return None
    return {k: v for k, v in result.items() if k not in _TIMING}


def _explain(path: str, err: sqlite3.Error) -> StoreError:
    msg = str(err)
    low = msg.lower()
    if "readonly" in low or "read-only" in low:
        hint = "the file or its folder is read-only: pass --db (db=) a path in a folder you can write"
    elif "disk is full" in low or "disk i/o" in low:
        hint = "the disk is full (or failing): free space and run again; finished trials are kept"
    elif "not a database" in low or "malformed" in low:
        hint = "this file is not a labkit results database (or is damaged): pass another --db path"
    elif "unable to open" in low:
        hint = "the folder does not exist or cannot be written: create it or pass another --db path"
    else:
        hint = "see the SQLite message"
    return StoreError(f"results file {path}: {msg}; {hint}")


class Store:
    """A study's results file. ``Store(path)`` creates it (and its schema) or opens it, checking the schema version.

    The same file may be opened by many processes at once (the runner and its workers): every method is one
    short transaction.
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise StoreError(f"results file {self.path}: the folder {folder} does not exist; create it or pass "
                             "another --db path")
        try:
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous = FULL")
            self._check_schema()
        except sqlite3.Error as e:
            raise _explain(self.path, e) from None
        self.journal_mode = mode

    def _check_schema(self) -> None:
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "schema_version" not in tables:
            raise StoreError(f"results file {self.path} is an SQLite database but not one labkit wrote (tables: "
                             f"{sorted(tables)}); pass another --db path, nothing in it was changed")
        if "schema_version" in tables:
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
            if row is None or row[0] != SCHEMA_VERSION:
                raise StoreError(
                    f"results file {self.path} was written with schema version {row and row[0]}; this labkit reads "
                    f"version {SCHEMA_VERSION}. Use the labkit that wrote it, or pass another --db path; nothing in "
                    "it was changed")
            return
        try:
            self._db.executescript("BEGIN IMMEDIATE;" + _SCHEMA
                                   + f"INSERT INTO schema_version VALUES ({SCHEMA_VERSION}); COMMIT;")
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: ``BEGIN IMMEDIATE`` (take the write lock now, wait for it if another holds it),
        ``COMMIT`` when the block ends, ``ROLLBACK`` if it raises; SQLite's errors become :class:`StoreError`."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise _explain(self.path, e) from None

    def _write(self, statements: Iterable[tuple[str, tuple]]) -> None:
        with self._tx() as db:
            for sql, args in statements:
                db.execute(sql, args)

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ studies
    def save_study(self, name: str, spec: dict) -> list[str]:
        """Record a study's specification. A study of that name already in the file with another specification
        (more seeds, another factor, changed code) is updated: its trials are keyed by configuration, seed and code,
        so every finished trial stays in the file, and those the new specification still names are reused. Returns
        the keys of the specification that changed (empty for a new or unchanged study)."""
        text = json.dumps(spec, sort_keys=True)
        row = self._db.execute("SELECT spec FROM studies WHERE name = ?", (name,)).fetchone()
        if row is not None and row[0] == text:
            return []
        changed = []
        if row is not None:
            old = json.loads(row[0])
            changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        self._write([("INSERT OR REPLACE INTO studies VALUES (?, ?, ?)", (name, text, time.time()))])
        return changed

    def studies(self) -> dict[str, dict]:
        return {n: json.loads(s) for n, s in self._db.execute("SELECT name, spec FROM studies ORDER BY created")}

    # ------------------------------------------------------------------ trials
    def claim(self, key: str, *, study: str, label: str, config: dict, seed: int, code: str,
              pid: int | None = None) -> bool:
        """Mark a trial running (a new row, or a failed/interrupted one run again). False if it is already done."""
        now, pid = time.time(), pid or os.getpid()
        host = os.uname().nodename
        with self._tx() as db:
            row = db.execute("SELECT status FROM trials WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] == "done":
                return False
            if row is None:
                db.execute("INSERT INTO trials (key, study, label, config, seed, code, status, starts, started, pid, "
                           "host) VALUES (?, ?, ?, ?, ?, ?, 'running', 1, ?, ?, ?)",
                           (key, study, label, json.dumps(config, sort_keys=True), seed, code, now, pid, host))
            else:
                db.execute("UPDATE trials SET status = 'running', starts = starts + 1, started = ?, pid = ?, host = ?, "
                           "error = NULL, traceback = NULL WHERE key = ?", (now, pid, host, key))
            db.execute("INSERT INTO events (key, event, time, pid) VALUES (?, 'start', ?, ?)", (key, now, pid))
        return True

    def finish(self, key: str, value: float, result: dict) -> bool:
        """Store a finished trial's result (its metric ``value`` and the whole ``result``): one transaction.

        Only the process that claimed the trial may finish it: a worker orphaned by a killed study, whose trial
        was meanwhile claimed again, changes nothing (returns False)."""
        return self._settle(key, "done", "UPDATE trials SET status = 'done', value = ?, result = ?, finished = ? "
                            "WHERE key = ? AND pid = ? AND status = 'running'", (float(value), json.dumps(result)))

    def fail(self, key: str, error: str, tb: str = "", *, pid: int | None = None) -> bool:
        """Store a failed trial with its error and traceback (the study goes on). ``pid``: the claimant's
        process id (default: this process; the runner passes a dead worker's)."""
        return self._settle(key, "failed", "UPDATE trials SET status = 'failed', error = ?, traceback = ?, "
                            "finished = ? WHERE key = ? AND pid = ? AND status = 'running'", (error, tb),
                            detail=error[:500], pid=pid)

    def _settle(self, key: str, event: str, sql: str, args: tuple, detail: str | None = None,
                pid: int | None = None) -> bool:
        """Run ``sql`` (ending in ``finished = ? WHERE key = ? AND pid = ?``) and log ``event`` if it changed a row."""
        now, pid = time.time(), pid or os.getpid()
        with self._tx() as db:
            n = db.execute(sql, args + (now, key, pid)).rowcount
            if n:
                db.execute("INSERT INTO events (key, event, time, pid, detail) VALUES (?, ?, ?, ?, ?)",
                           (key, event, now, pid, detail))
        return bool(n)

    def recover(self, wait: float = 30.0) -> list[str]:
        """Trials left ``running`` by a study that died: mark them ``interrupted`` (they run again from their
        start). A trial whose worker is still alive on this machine is waited for (up to ``wait`` seconds: an
        orphaned worker notices its study died within half a second and exits, later on a loaded server); if it
        stays alive, another run is using this file, and :class:`StoreError` says so."""
        host = os.uname().nodename
        deadline = time.monotonic() + wait
        while True:
            alive = [(k, pid) for k, pid, h in self._db.execute("SELECT key, pid, host FROM trials WHERE status = "
                                                                "'running'") if h == host and _alive(pid)]
            if not alive:
                break
            if time.monotonic() > deadline:
                raise StoreError(f"results file {self.path}: trial {alive[0][0]} is being run by process "
                                 f"{alive[0][1]} on this machine: another run of a study is using this file. Wait "
                                 "for it to finish (or stop it), or pass another --db path")
            time.sleep(0.1)
        now = time.time()
        with self._tx() as db:
            keys = [r[0] for r in db.execute("SELECT key FROM trials WHERE status = 'running'")]
            for k in keys:
                db.execute("UPDATE trials SET status = 'interrupted', interrupted = interrupted + 1, error = ? "
                           "WHERE key = ?", ("interrupted: the study stopped while this trial ran", k))
                db.execute("INSERT INTO events (key, event, time) VALUES (?, 'interrupted', ?)", (k, now))
        return keys

    def statuses(self) -> dict[str, str]:
        """``{key: status}`` of every trial in the file."""
        return dict(self._db.execute("SELECT key, status FROM trials"))

    def rows(self, study: str | None = None, status: str | None = None) -> list[dict]:
        """Every trial as a dict (config and result decoded), in the order they were first started."""
        sql, args = "SELECT * FROM trials", []
        where = []
        if study is not None:
            where.append("study = ?")
            args.append(study)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        cur = self._db.execute(sql + " ORDER BY rowid", args)
        names = [d[0] for d in cur.description]
        out = []
        for r in cur:
            row = dict(zip(names, r))
            row["config"] = json.loads(row["config"])
            row["result"] = json.loads(row["result"]) if row["result"] else None
            out.append(row)
        return out

    def events(self, key: str | None = None) -> list[dict]:
        sql = "SELECT key, event, time, pid, detail FROM events" + (" WHERE key = ?" if key else "") + " ORDER BY id"
        names = ("key", "event", "time", "pid", "detail")
        return [dict(zip(names, r)) for r in self._db.execute(sql, (key,) if key else ())]

    def counts(self, study: str | None = None) -> dict[str, int]:
        """Trials per status (``done``, ``failed``, ``running``, ``interrupted``: waiting to run again) and
        ``ever_interrupted``: trials that were running when a study stopped, at some point."""
        sql = "SELECT status, COUNT(*), SUM(interrupted > 0) FROM trials" + (" WHERE study = ?" if study else "")
        got = {"done": 0, "failed": 0, "running": 0, "interrupted": 0, "ever_interrupted": 0}
        for status, n, intr in self._db.execute(sql + " GROUP BY status", (study,) if study else ()):
            got[status] = n
            got["ever_interrupted"] += intr or 0
        return got


def _alive(pid: int | None) -> bool:
    if not pid or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running anything
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def merge(out: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> dict[str, int]:
    """Combine shard files into ``out`` (created if missing). A finished trial is copied when ``out`` does not have
    it finished; one already there with the same hash must have the same result (timings aside), else
    :class:`MergeConflict` lists the keys and nothing is written. Failed trials are copied only where ``out`` has
    nothing for them; trials still running are skipped. Returns counts of what was added and skipped."""
    inputs = [os.fspath(p) for p in inputs]
    for p in inputs:
        if not os.path.exists(p):
            raise StoreError(f"merge input {p} does not exist; pass the shard files to combine")
        if os.path.abspath(p) == os.path.abspath(os.fspath(out)):
            raise StoreError(f"merge input {p} is also the output; pass another output file")
    dest = Store(out)
    mine = {r["key"]: r for r in dest.rows()}
    plan, conflicts, specs = [], [], dest.studies()
    counts = {"added": 0, "same": 0, "failed_added": 0, "skipped_running": 0}
    for p in inputs:
        with Store(p) as src:
            for name, spec in src.studies().items():
                if name in specs and specs[name] != spec:
                    raise MergeConflict(f"{p} holds study {name!r} with a specification different from {out}'s; "
                                        "merge only shards of the same study", [])
                specs[name] = spec
            for r in src.rows():
                have = mine.get(r["key"])
                if r["status"] == "running":
                    counts["skipped_running"] += 1
                    continue
                if r["status"] in ("failed", "interrupted"):
                    if have is None:
                        plan.append(r)
                        mine[r["key"]] = r
                        counts["failed_added"] += 1
                    continue
                if have is not None and have["status"] == "done":
                    if comparable(have["result"]) != comparable(r["result"]) or have["value"] != r["value"]:
                        conflicts.append(r["key"])
                    else:
                        counts["same"] += 1
                    continue
                plan.append(r)
                mine[r["key"]] = r
                counts["added"] += 1
    if conflicts:
        dest.close()
        raise MergeConflict(f"{len(conflicts)} trial(s) have the same hash but different results in the inputs "
                            f"(first: {conflicts[0]}); the code or the machine was not deterministic. Nothing was "
                            "merged; look at those trials, or merge the files separately", conflicts)
    cols = ("key", "study", "label", "config", "seed", "code", "status", "value", "result", "error", "traceback",
            "starts", "interrupted", "started", "finished", "pid", "host")
    stmts = [("INSERT OR IGNORE INTO studies VALUES (?, ?, ?)", (n, json.dumps(s, sort_keys=True), time.time()))
             for n, s in specs.items()]
    for r in plan:
        vals = dict(r, config=json.dumps(r["config"], sort_keys=True),
                    result=json.dumps(r["result"]) if r["result"] is not None else None)
        stmts.append((f"INSERT OR REPLACE INTO trials ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                      tuple(vals[c] for c in cols)))
    dest._write(stmts)
    dest.close()
    return counts
