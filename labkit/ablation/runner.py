"""Run a study's missing trials in parallel worker processes, writing each result into the study's SQLite file.

Each worker is a separate ``python -m labkit.ablation._worker`` process that runs one trial at a time and writes
its result itself, in one transaction, before it says it is done (:mod:`.store`). So:

* a trial that raises is stored as ``failed`` with its traceback, and the study goes on;
* a trial that kills its worker (a segfault, the out-of-memory killer, ``kill -9``) is stored as ``failed``
  ("the worker died ...") and a new worker takes the next trial; a trial over ``trial_timeout`` likewise;
* the study's own process dying (a kill, a power cut, the kernel restarted) loses nothing finished: the workers
  exit with it, and the next run marks the trials that were running as interrupted and runs them from their start.

Workers: ``N`` CPU workers with one thread each, unless the trial uses a GPU. A trial function says so with an
attribute, ``trial.uses_gpu = True`` (or the caller with ``run_study(..., gpus=True)``); then there is one worker per
visible GPU, each seeing only its own through ``CUDA_VISIBLE_DEVICES``: worker ``i`` gets the ``i``-th entry of this
process's own list (``"2,3"`` gives ``"2"`` and ``"3"``, not ``"0"`` and ``"1"``: a student pinned to GPUs 2 and 3 by
the classroom's spawner must not land on a classmate's GPU 0), or GPU ``i`` when the list is unset. Why a
declaration rather than "one per GPU whenever there are GPUs": the runner cannot see what a trial will do, and the
lab's own trial (:func:`labkit.ablation.training.run_trial`, a small CNN on the digits) never touches CUDA, so
capping its workers at the GPU count only made a one-GPU server run one trial at a time.
``shard=(i, n)`` runs only the trials whose hash falls in slice ``i`` of ``n``
(disjoint slices; one Slurm array task per slice, each into its own file, then :func:`labkit.ablation.store.merge`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from .._validate import ArgumentError, validate_int, validate_number
from .store import Store
from .study import Study, Trial

__all__ = ["run_study", "RunSummary", "parse_shard", "in_shard", "default_workers", "gpu_slots", "uses_gpu",
           "WorkerError"]

START_TIMEOUT = 300.0  # seconds a worker may take to start a trial it was given (imports on a loaded server)


class WorkerError(RuntimeError):
    """The worker processes cannot run any trial (the trial function does not load there): nothing was run."""


@dataclass
class RunSummary:
    """What one :func:`run_study` call did."""

    db: str
    total: int                    # trials in the study (in this shard)
    already_done: int             # finished before this run: not run again
    ran: int = 0                  # started in this run
    done: int = 0
    failed: int = 0
    interrupted: list = field(default_factory=list)   # keys that a previous run left running: run again
    skipped_failed: int = 0       # failed before, not retried (pass retry_failed=True)
    workers: int = 0
    device: str = "cpu"
    seconds: float = 0.0
    errors: dict = field(default_factory=dict)       # {label seed=s: error} of trials that failed in this run

    def __str__(self) -> str:
        s = (f"{self.done} done, {self.failed} failed in this run ({self.ran} started) in {self.seconds:.1f} s on "
             f"{self.workers} {self.device} worker(s); {self.already_done} were already done")
        if self.interrupted:
            s += (f"; {len(self.interrupted)} had been interrupted by a stopped study and were run again from their "
                  "start")
        if self.skipped_failed:
            s += f"; {self.skipped_failed} failed earlier and were not retried (retry_failed=True / --retry-failed)"
        return s


def parse_shard(shard) -> tuple[int, int] | None:
    """``"I/N"`` or ``(I, N)`` -> ``(I, N)`` with 0 <= I < N (``None`` stays ``None``)."""
    if shard is None:
        return None
    if isinstance(shard, str):
        a, sep, b = shard.partition("/")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit():
            raise ArgumentError(f"shard must look like I/N (for example 0/4: the first of four slices), got {shard!r}")
        shard = (int(a), int(b))
    try:
        i, n = shard
    except (TypeError, ValueError):
        raise ArgumentError(f"shard must be 'I/N' or a pair (I, N), got {shard!r}") from None
    n = validate_int("shard's N", n, minimum=1)
    i = validate_int("shard's I", i, minimum=0, maximum=n - 1, hint="slices are numbered 0 .. N-1")
    return i, n


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    """Whether trial ``key`` belongs to slice ``shard``: its hash modulo N (the same on every machine)."""
    return shard is None or int(key, 16) % shard[1] == shard[0]


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - no torch, broken driver
        return 0


def uses_gpu(trial) -> bool:
    """Whether ``trial`` declares that it trains on a GPU (``trial.uses_gpu = True``); undeclared means the CPU."""
    return bool(getattr(trial, "uses_gpu", False))


def default_workers(gpu: bool = False) -> int:
    """GPU trials: one worker per visible GPU. CPU trials: as many workers as cores (at most 4: a shared server),
    whatever GPUs the machine has."""
    cpus = max(1, min(4, len(os.sched_getaffinity(0))))
    return (_gpus() or cpus) if gpu else cpus


def gpu_slots(n: int) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` value for each of ``n`` GPU workers: the ``i``-th entry of this process's own
    list (indices, UUIDs or MIG names, as given), or ``"i"`` when the variable is unset. At most as many as the list
    names (CUDA stops at an entry it cannot use, and ``torch.cuda.device_count()`` counts only those before it)."""
    n = validate_int("n", n, minimum=0)
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(n)]
    return [e.strip() for e in listed.split(",") if e.strip()][:n]


class _Worker:
    def __init__(self, slot: int, db: str, payload: bytes, gpu: str | None):
        from ..runtime.launcher import child_env

        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        env = child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", LABKIT_PARENT_PID=str(os.getpid()),
                        LABKIT_ABLATION_DB=db, LABKIT_CMD_FD=str(cmd_r), LABKIT_RES_FD=str(res_w))
        if gpu is not None:  # this worker's GPU alone (an entry of the parent's list: see gpu_slots)
            env["CUDA_VISIBLE_DEVICES"] = gpu
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "labkit.ablation._worker"], env=env,
                                     stdin=subprocess.DEVNULL, pass_fds=(cmd_r, res_w), start_new_session=True)
        os.close(cmd_r)
        os.close(res_w)
        self.cmd = Connection(cmd_w, readable=False)
        self.res = Connection(res_r, writable=False)
        self.slot, self.trial, self.given, self.since = slot, None, 0.0, None
        self.cmd.send_bytes(payload)

    def give(self, t: Trial, study: str) -> None:
        self.trial, self.given, self.since = t, time.monotonic(), None  # since: when the trial itself started
        self.cmd.send(("trial", t.key, t.label, t.config, t.seed, t.code, study))

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        self.proc.wait()
        for c in (self.cmd, self.res):
            c.close()

    def stop(self) -> None:
        try:
            self.cmd.send(("stop",))
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def _death(rc: int | None) -> str:
    if rc is None:
        return "is unresponsive"
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def run_study(study: Study, db: str | os.PathLike, *, workers: int | None = None, shard=None,
              retry_failed: bool = False, trial_timeout: float | None = None, progress: bool = True,
              echo: bool = True, on_result=None, gpus: bool | None = None) -> RunSummary:
    """Run the trials of ``study`` that ``db`` does not hold finished; return a :class:`RunSummary`.

    Run it again to resume: finished trials are skipped, interrupted ones run from their start, failed ones are
    retried only with ``retry_failed=True``. ``on_result(row)`` is called after each finished or failed trial
    with ``{"key", "label", "seed", "status", "value" or "error"}`` (a notebook's live view). ``gpus``: one worker
    per GPU (True) or CPU workers (False); ``None`` asks the trial function (:func:`uses_gpu`). A GPU trial on a
    machine without a visible GPU runs on CPU workers, and the summary says so."""
    import cloudpickle

    if not isinstance(study, Study):
        raise ArgumentError(f"study must be a labkit.ablation.Study, got {type(study).__name__}; build one with "
                            "Study(...) or load_study('file.toml')")
    if gpus is not None and not isinstance(gpus, bool):
        raise ArgumentError(f"gpus must be True (one worker per GPU), False (CPU workers) or None (ask the trial "
                            f"function's uses_gpu attribute), got {gpus!r}")
    wants_gpu = uses_gpu(study.trial) if gpus is None else gpus
    n_gpus = _gpus() if wants_gpu else 0
    workers = default_workers(bool(n_gpus)) if workers is None else validate_int("workers", workers, minimum=1)
    if trial_timeout is not None:
        trial_timeout = validate_number("trial_timeout", trial_timeout, minimum=0, open_low=True, hint="seconds")
    shard = parse_shard(shard)
    db = os.fspath(db)
    store = Store(db)
    t0 = time.perf_counter()
    try:
        changed = store.save_study(study.name, study.spec())
        if changed and echo:
            print(f"study {study.name}: its specification changed since {db} was written ({', '.join(changed)}); "
                  "finished trials it still names are reused, the others stay in the file", flush=True)
        interrupted = store.recover()
        trials = [t for t in study.trials() if in_shard(t.key, shard)]
        status = store.statuses()
        todo = [t for t in trials if status.get(t.key) in (None, "interrupted")
                or (status.get(t.key) == "failed" and retry_failed)]
        summary = RunSummary(db=db, total=len(trials), already_done=sum(status.get(t.key) == "done" for t in trials),
                             interrupted=[k for k in interrupted if any(t.key == k for t in trials)],
                             skipped_failed=0 if retry_failed else sum(status.get(t.key) == "failed" for t in trials))
        n = min(workers, len(todo), n_gpus or workers) if todo else 0  # a GPU trial: at most one worker per GPU
        slots = gpu_slots(n) if n_gpus else None
        summary.workers, summary.device = n, ("gpu" if n_gpus else "cpu")
        if echo:
            where = (f"{n} GPU worker(s) (CUDA_VISIBLE_DEVICES {', '.join(slots)})" if n_gpus else
                     f"{n} CPU worker(s), 1 thread each" + (" (the trial asks for a GPU, but none is visible here)"
                                                              if wants_gpu else ""))
            part = f" (shard {shard[0]}/{shard[1]})" if shard else ""
            print(f"study {study.name}{part}: {len(trials)} trials, {summary.already_done} already done, "
                  f"{len(summary.interrupted)} interrupted earlier, {len(todo)} to run"
                  + (f" on {where}" if todo else ""),
                  flush=True)
        if todo:
            payload = cloudpickle.dumps((study.trial, study.registry, study.metric))
            _run(study, store, db, todo, n, payload, slots, trial_timeout, progress, on_result, summary)
    finally:
        store.close()
    summary.seconds = time.perf_counter() - t0
    if echo:
        print(f"study {study.name}: {summary}", flush=True)
    return summary


def _run(study, store, db, todo, n, payload, slots, trial_timeout, progress, on_result, summary) -> None:
    """Keep ``n`` workers busy until ``todo`` is done; worker ``i`` sees GPU ``slots[i]`` alone (``slots=None``: the
    CPU)."""
    from ..viz import progress as _progress

    queue = list(todo)
    pool: list[_Worker] = []
    bar = _progress(None, desc=study.name, total=len(todo), unit="trial") if progress else None
    bar = bar if hasattr(bar, "update") else None

    def post():
        if bar is not None:
            bar.set_postfix_str(f"done {summary.done} · running {sum(w.trial is not None for w in pool)} · "
                                f"failed {summary.failed}", refresh=False)

    def report(w, status, value=None, error=None):
        t = w.trial
        w.trial = None
        if status == "done":
            summary.done += 1
        else:
            summary.failed += 1
            summary.errors[f"{t.label} seed={t.seed}"] = error
        if bar is not None:
            bar.update(1)
        post()
        if on_result is not None:
            on_result({"key": t.key, "label": t.label, "seed": t.seed, "status": status,
                       **({"value": value} if status == "done" else {"error": error})})

    def replace(w, why):
        t = w.trial
        w.kill()
        try:
            store.fail(t.key, f"the worker process {why} while running this trial", "", pid=w.proc.pid)
        except Exception:  # the trial was never claimed (died before): nothing to mark
            pass
        report(w, "failed", error=f"worker {why}")
        pool[pool.index(w)] = _Worker(w.slot, db, payload, slots[w.slot] if slots else None)

    try:
        for i in range(n):
            pool.append(_Worker(i, db, payload, slots[i] if slots else None))
        for w in pool:
            if queue:
                w.give(queue.pop(0), study.name)
                summary.ran += 1
        post()
        while any(w.trial is not None for w in pool):
            busy = [w for w in pool if w.trial is not None]
            ready = wait([w.res for w in busy], timeout=0.5)
            for w in busy:
                if w.res in ready:
                    try:
                        msg = w.res.recv()
                    except (EOFError, OSError):
                        w.proc.wait()
                        replace(w, _death(w.proc.returncode))
                        msg = None
                    if msg is not None:
                        kind = msg[0]
                        if kind == "done":
                            report(w, "done", value=msg[2])
                        elif kind == "failed":
                            report(w, "failed", error=msg[2])
                        elif kind == "skip":  # finished meanwhile by someone else: nothing to do
                            w.trial = None
                            if bar is not None:
                                bar.update(1)
                        elif kind == "started":  # the timeout counts from here, not from the worker's start-up
                            w.since = time.monotonic()
                        elif kind == "fatal":
                            raise WorkerError(
                                "a worker process could not load the study's trial function and factors, so no "
                                "trial can run. Define them in an importable module (or make sure everything they "
                                f"use can be pickled by cloudpickle). The worker said:\n{msg[2]}")
                elif (trial_timeout is not None and w.since is not None
                      and time.monotonic() - w.since > trial_timeout):
                    replace(w, f"was stopped after the trial ran over trial_timeout={trial_timeout:g} s")
                elif w.since is None and time.monotonic() - w.given > START_TIMEOUT:
                    replace(w, f"did not start the trial within {START_TIMEOUT:g} s")
                if w.trial is None and queue:
                    w = pool[[p.slot for p in pool].index(w.slot)]
                    w.give(queue.pop(0), study.name)
                    summary.ran += 1
                    post()
    except BaseException:
        for w in pool:
            w.kill()
        pool = []
        store.recover(wait=0)  # what was running is interrupted: the next run starts it again
        raise
    finally:
        for w in pool:
            w.stop()
        if bar is not None:
            bar.close()
