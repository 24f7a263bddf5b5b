"""A class on one server: each student's share of the machine, the plan for a roster, and the hand-out on first login.

This module is long because the plan a teacher reads, the shares the hub's spawner hook applies and the machine both
are computed from are one story, kept in one file so that what the plan promises is what the hub does.

The JupyterHub configuration (``classroom/jupyterhub_config.py``) calls :func:`share_for` and
:func:`spawner_environment` in its ``pre_spawn_hook`` and :func:`copy_handout` to give a student the labs; the teacher
runs ``python -m labkit classroom plan --students N`` before the class. Nothing here starts a process except
:func:`measure`, which runs notebooks to find what each lab needs.

How the machine is shared (:func:`shares`):
- GPUs: with at least as many GPUs as students, each student gets ``G // N`` of their own (a student with two or more
  runs the multi-rank labs on NCCL, one GPU per rank); with fewer, students take turns round-robin and share one GPU
  each (``CUDA_VISIBLE_DEVICES`` names it). NCCL refuses two ranks on one GPU, so a student with one GPU runs the
  multi-rank labs on gloo (the launcher picks it: ``choose_backend``) and uses the GPU inside one process.
- CPU threads: ``cores // N`` each (at least 1) for the notebook's own process (``OMP_NUM_THREADS``,
  ``MKL_NUM_THREADS``; torch reads them at start-up); each rank a lab starts takes one thread (the launcher's default).
- Memory and CPU limits (``Spawner.mem_limit``, ``Spawner.cpu_limit``): a fair share of the machine. JupyterHub's
  local process spawners do not enforce them (they only pass ``MEM_LIMIT`` / ``CPU_LIMIT`` to the server);
  ``systemdspawner`` (cgroups), ``dockerspawner`` and ``kubespawner`` do.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

GIB = 1 << 30
MEASURED = Path(__file__).resolve().parent / "classroom_memory.json"
SYSTEM_RESERVE = 0.10  # of the host's memory, kept back for the hub, the proxy and the system


@dataclass
class Gpu:
    index: int
    name: str
    memory: int  # bytes


@dataclass
class Machine:
    cpus: int
    memory: int  # bytes of RAM
    gpus: list[Gpu] = field(default_factory=list)
    read: str = "read from this machine"  # or what was assumed

    @property
    def n_gpus(self) -> int:
        return len(self.gpus)


@dataclass
class Share:
    """One student's part of the machine."""
    student: str
    gpus: list[int]           # GPU indices for CUDA_VISIBLE_DEVICES ([] = CPU only)
    gpu_shared_with: int      # students on each of those GPUs (1 = their own)
    threads: int              # CPU threads for the notebook process
    cpu_limit: float          # cores (a spawner that enforces it: systemd, docker, kubernetes)
    mem_limit: int            # bytes (same)

    @property
    def nccl_ranks(self) -> int:
        """The most ranks this student can run on NCCL: one GPU per rank, none shared."""
        return len(self.gpus) if self.gpu_shared_with == 1 and len(self.gpus) >= 2 else 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS says is free now (for the hub's own loopback ports)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proxy_command() -> str | None:
    """JupyterHub's proxy (configurable-http-proxy, from npm): the course environment's own
    (``.ci/install_proxy.sh`` puts it in ``<venv>/node``), else the one on PATH, else ``None``."""
    local = Path(sys.executable).parent.parent / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
    return str(local) if local.exists() else shutil.which("configurable-http-proxy")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _gpus() -> list[Gpu]:
    try:
        import torch

        if torch.cuda.is_available():
            return [Gpu(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
                    for i in range(torch.cuda.device_count())]
    except Exception:  # a broken driver must not stop the plan; nvidia-smi may still answer
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout
            rows = [r.split(", ") for r in out.strip().splitlines() if r.strip()]
            return [Gpu(int(i), name, int(float(mib)) << 20) for i, name, mib in rows]
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return []


def read_machine(gpus: int | None = None, gpu_memory_gib: float = 80.0, cpus: int | None = None,
                 memory_gib: float | None = None) -> Machine:
    """This machine's CPUs, RAM and GPUs; any of them can be given instead, to plan for another server."""
    assumed = []
    m = Machine(_cpus() if cpus is None else cpus, _memory() if memory_gib is None else int(memory_gib * GIB))
    if gpus is None:
        m.gpus = _gpus()
    else:
        if gpus < 0:
            raise ValueError(f"gpus={gpus}: pass 0 or more GPUs to assume")
        m.gpus = [Gpu(i, "assumed GPU", int(gpu_memory_gib * GIB)) for i in range(gpus)]
        assumed.append(f"{gpus} GPUs of {gpu_memory_gib:g} GiB")
    if cpus is not None:
        if cpus < 1:
            raise ValueError(f"cpus={cpus}: pass 1 or more")
        assumed.append(f"{cpus} CPUs")
    if memory_gib is not None:
        if memory_gib <= 0:
            raise ValueError(f"memory_gib={memory_gib}: pass the server's RAM in GiB")
        assumed.append(f"{memory_gib:g} GiB of RAM")
    if assumed:
        m.read = "assumed: " + ", ".join(assumed) + "; the rest read from this machine"
    return m


def share_for(index: int, n_students: int, machine: Machine, student: str = "",
              gpus: list[int] | None = None, gpu_shared_with: int | None = None) -> Share:
    """The share of student number ``index`` (0-based and stable: the hub uses the user's id) of ``n_students``.

    ``gpus`` (a roster's entry) replaces the round-robin choice; ``gpu_shared_with`` then says how many students
    hold each of them (:func:`shares` counts it over the roster).
    """
    if n_students < 1:
        raise ValueError(f"n_students={n_students}: pass the number of students in the class (1 or more)")
    if index < 0:
        raise ValueError(f"index={index}: pass the student's 0-based position (or user id)")
    g = machine.n_gpus
    if gpus is not None:
        bad = [i for i in gpus if not 0 <= i < g]
        if bad:
            raise ValueError(f"gpus={gpus} for {student or index}: this machine has "
                             + (f"GPUs 0..{g - 1}" if g else "no GPU") + "; fix the roster's gpus column")
        mine, shared = list(gpus), (gpu_shared_with or 1) if gpus else 0
    elif g == 0:
        mine, shared = [], 0
    elif g >= n_students:
        each = g // n_students
        slot = index % n_students
        mine, shared = list(range(slot * each, slot * each + each)), 1
    else:  # round-robin: GPU j holds students j, j + g, j + 2g, ...
        j = index % g
        mine, shared = [j], len(range(j, n_students, g))
    cores = machine.cpus
    usable = int(machine.memory * (1 - SYSTEM_RESERVE))
    return Share(student=student or f"student {index}", gpus=mine, gpu_shared_with=shared,
                 threads=max(1, cores // n_students), cpu_limit=round(max(cores / n_students, 0.1), 2),
                 mem_limit=usable // n_students)


def shares(n_students: int, machine: Machine, roster: dict[str, list[int] | None] | None = None) -> list[Share]:
    """Every student's share; with a roster, its GPUs where it names them, round-robin where it does not."""
    if not roster:
        return [share_for(i, n_students, machine, f"student{i + 1:02d}") for i in range(n_students)]
    n = len(roster)
    first = [share_for(i, n, machine, name, gpus) for i, (name, gpus) in enumerate(roster.items())]
    holders: dict[int, int] = {}
    for s in first:
        for i in s.gpus:
            holders[i] = holders.get(i, 0) + 1
    for s in first:
        if s.gpus:
            s.gpu_shared_with = max(holders[i] for i in s.gpus)
    return first


def spawner_environment(share: Share) -> dict[str, str]:
    """The environment a student's server starts with: their GPUs and their CPU threads."""
    t = str(share.threads)
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(map(str, share.gpus)),  # "" = no GPU: torch sees none, labs use gloo
        "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
        "LABKIT_STUDENT_THREADS": t,
        "LABKIT_SHARE": json.dumps(asdict(share)),
    }


def read_roster(path: str | Path) -> dict[str, list[int] | None]:
    """A roster CSV with a ``username`` column and an optional ``gpus`` column (``0`` or ``0;1``; empty = round-robin).
    """
    path = Path(path)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "username" not in rows[0]:
        raise ValueError(f"{path}: a roster needs a header line with a 'username' column (and optionally 'gpus')")
    out: dict[str, list[int] | None] = {}
    for n, row in enumerate(rows, start=2):
        name = (row.get("username") or "").strip()
        if not name:
            raise ValueError(f"{path}, line {n}: empty username")
        if name in out:
            raise ValueError(f"{path}, line {n}: {name!r} appears twice")
        spec = (row.get("gpus") or "").replace(";", ",").strip()
        try:
            out[name] = [int(x) for x in spec.split(",") if x.strip()] if spec else None
        except ValueError:
            raise ValueError(f"{path}, line {n}: gpus={spec!r} for {name}; write GPU indices such as "
                             "0 or 0;1") from None
    return out


def copy_handout(release: str | Path, home: str | Path, uid: int | None = None, gid: int | None = None) -> list[Path]:
    """Copy the student versions (``release/<lab>/...``, from ``python -m labkit handout``) into ``home/<lab>/``.

    That is where nbgrader's own Fetch would put them, so the Assignments tab can submit them. A file already in the
    home is never overwritten (it is the student's work). Returns the files copied.
    """
    release, home = Path(release), Path(home)
    if not release.is_dir():
        raise FileNotFoundError(f"release={str(release)!r} is not a folder; make it with "
                                "`python -m labkit handout DIR` and point the hub at DIR/release")
    copied = []
    for src in sorted(p for p in release.rglob("*") if p.is_file() and ".ipynb_checkpoints" not in p.parts):
        dst = home / src.relative_to(release)
        if dst.exists():
            continue
        new_dirs = [d for d in reversed(dst.relative_to(home).parents) if str(d) != "." and not (home / d).exists()]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        if uid is not None:
            for d in new_dirs:
                os.chown(home / d, uid, gid if gid is not None else -1)
            os.chown(dst, uid, gid if gid is not None else -1)
        copied.append(dst)
    return copied


def give_handout(release: str | Path, user: str, home: str | Path | None = None) -> list[Path]:
    """The hub's first-login copy for ``user``: into ``home`` as it is (the test spawner's folder per name), or into
    the Unix user's own home, owned by them (the home made if missing). Returns the files copied."""
    if home is not None:
        Path(home).mkdir(parents=True, exist_ok=True)
        return copy_handout(release, home)
    import pwd

    pw = pwd.getpwnam(user)
    home = Path(pw.pw_dir)
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    return copy_handout(release, home, pw.pw_uid, pw.pw_gid)


# --- what each lab needs ---------------------------------------------------------------------------------------------

def _pss(pid: int) -> int | None:
    """Proportional set size (Linux): a page shared by k processes counts 1/k in each, so the sum over a process
    tree is what it really holds (torch's libraries are mapped once, shared by every rank)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _tree_memory(proc) -> tuple[int, int, int]:
    """(summed RSS, summed PSS, processes) of ``proc`` and all its descendants; PSS falls back to RSS."""
    import psutil

    rss = pss = count = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0, 0
    for p in procs:
        try:
            r = p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        rss += r
        pss += _pss(p.pid) or r
        count += 1
    return rss, pss, count


def measure(notebooks: list[Path], interval: float = 0.2, timeout: float = 900, log=None) -> dict[str, dict]:
    """Run each notebook in a fresh kernel and sample the memory of the kernel and every process it starts.

    Returns ``{stem: {"peak_pss": bytes, "peak_rss": bytes, "peak_processes": n, "seconds": s}}``. ``peak_pss`` is
    the peak of the tree's summed proportional set size: what the lab holds, shared pages (torch's libraries, mapped
    by every rank) counted once. ``peak_rss`` counts them once per process: an upper bound.
    """
    import threading

    import psutil

    from .runtime.stress import run_notebook

    out = {}
    for path in notebooks:
        peak = {"rss": 0, "pss": 0, "n": 0}
        stop, kernel = threading.Event(), {}

        def sample():
            while not stop.is_set():
                pid = kernel.get("pid")
                if pid:
                    try:
                        rss, pss, n = _tree_memory(psutil.Process(pid))
                        peak["rss"], peak["pss"], peak["n"] = (max(peak["rss"], rss), max(peak["pss"], pss),
                                                               max(peak["n"], n))
                    except psutil.NoSuchProcess:
                        pass
                stop.wait(interval)

        t0 = time.perf_counter()
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            cells = run_notebook(Path(path), timeout=timeout, on_start=lambda s: kernel.update(pid=s.pid))
        finally:
            stop.set()
            th.join()
        bad = [c for c in cells if c["state"] != "ok"]
        if bad:
            raise RuntimeError(f"{path}: cell {bad[0]['cell']} {bad[0]['state']}: {bad[0]['detail'][:2000]}; "
                               "measure a notebook that runs")
        out[Path(path).stem] = v = {"peak_pss": peak["pss"], "peak_rss": peak["rss"], "peak_processes": peak["n"],
                                    "seconds": round(time.perf_counter() - t0, 1)}
        if log is not None:
            log(f"{Path(path).stem:>28}: peak {v['peak_pss'] / GIB:.2f} GiB (PSS; RSS summed {v['peak_rss'] / GIB:.2f})"
                f" over {v['peak_processes']} processes, {v['seconds']} s")
    return out


def lab_memory(path: Path = MEASURED) -> dict:
    """The measured needs shipped with the course (``python -m labkit classroom measure`` wrote them)."""
    if not path.is_file():
        return {"labs": {}, "measured_on": "never: run python -m labkit classroom measure"}
    return json.loads(path.read_text())


# --- the plan --------------------------------------------------------------------------------------------------------

def plan(n_students: int, machine: Machine, needs: dict | None = None,
         roster: dict[str, list[int] | None] | None = None) -> dict:
    """What each student gets and what the class can run at once. Never refuses: too many students share more."""
    if roster is not None:
        n_students = len(roster)
    if n_students < 1:
        raise ValueError(f"students={n_students}: pass the number of students (1 or more), or a roster")
    needs = lab_memory() if needs is None else needs
    sh = shares(n_students, machine, roster)
    usable = int(machine.memory * (1 - SYSTEM_RESERVE))
    labs = []
    for name, need in sorted(needs.get("labs", {}).items()):
        per = need.get("peak_pss") or need["peak_rss"]
        at_once = int(max(0, usable // per)) if per else n_students
        labs.append({"lab": name, "per_student": per, "processes": need.get("peak_processes"),
                     "ranks": max(0, (need.get("peak_processes") or 1) - 1),
                     "all_at_once": per * n_students, "fits_all": per * n_students <= usable,
                     "students_at_once": min(n_students, at_once)})
    notes = []
    g = machine.n_gpus
    if g == 0:
        notes.append("no GPU: every lab runs on CPU processes with gloo (as on a laptop)")
    elif g < n_students:
        notes.append(f"{n_students} students on {g} GPUs: up to {math.ceil(n_students / g)} students per GPU; "
                     "multi-rank labs run on gloo (NCCL needs one GPU per rank), single-process GPU work shares "
                     "the GPU's memory and time")
    else:
        each = g // n_students
        notes.append(f"{each} GPU(s) per student" + (f" (GPUs {each * n_students}..{g - 1} left over)"
                                                     if g % n_students else "")
                     + ("; multi-rank labs run on NCCL up to " + f"{each} ranks, beyond that on gloo" if each >= 2
                        else "; one GPU each: multi-rank labs run on gloo"))
    if machine.cpus < n_students:
        notes.append(f"{n_students} students on {machine.cpus} cores: CPU shared, 1 thread each; when everyone runs a "
                     f"lab at once, expect it about {n_students / machine.cpus:.1f}x slower than alone "
                     "(every check and notebook cell is written to pass under load, only slower)")
    tight = [row["lab"] for row in labs if not row["fits_all"]]
    if tight:
        notes.append("memory: " + ", ".join(f"{row['lab']} fits {row['students_at_once']} of {n_students} at once"
                                            for row in labs if not row["fits_all"])
                     + "; stagger those labs, or cap each server (mem_limit) with a spawner that enforces it")
    return {"students": n_students, "machine": machine, "shares": sh, "labs": labs, "notes": notes,
            "measured_on": needs.get("measured_on", "")}


def format_plan(p: dict) -> str:
    m: Machine = p["machine"]
    kinds: dict[str, int] = {}
    for x in m.gpus:
        key = f"{x.name} ({x.memory / GIB:.0f} GiB)"
        kinds[key] = kinds.get(key, 0) + 1
    lines = [f"Machine ({m.read}): {m.cpus} CPU cores, {m.memory / GIB:.1f} GiB RAM, "
             + (", ".join(f"{n} x {k}" for k, n in kinds.items()) or "no GPU"),
             f"Students: {p['students']}", ""]
    head = (f"{'student':>12}  {'GPUs':>8}  {'shared by':>9}  {'GPU mem':>8}  {'threads':>7}  {'cpu_limit':>9}  "
            f"{'mem_limit':>9}  NCCL up to")
    lines.append(head)
    shown = p["shares"] if len(p["shares"]) <= 12 else p["shares"][:6] + [None] + p["shares"][-3:]
    for s in shown:
        if s is None:
            lines.append(f"{'...':>12}")
            continue
        gpus = ",".join(map(str, s.gpus)) or "none"
        gmem = (sum(m.gpus[i].memory for i in s.gpus) / max(1, s.gpu_shared_with) / GIB) if s.gpus else 0
        lines.append(f"{s.student:>12}  {gpus:>8}  {s.gpu_shared_with or '-':>9}  "
                     f"{(f'{gmem:.0f}Gi' if s.gpus else '-'):>8}  {s.threads:>7}  {s.cpu_limit:>9g}  "
                     f"{s.mem_limit / GIB:>7.1f}Gi  {(str(s.nccl_ranks) + ' ranks') if s.nccl_ranks else 'gloo only'}")
    lines.append("")
    if p["labs"]:
        lines.append(f"Host memory each lab needs (peak PSS of the notebook's kernel and its ranks, measured "
                     f"{p['measured_on']}; GPU memory not measured yet):")
        lines.append(f"{'lab':>28}  {'per student':>11}  {'ranks at once':>13}  {'whole class':>11}  fits at once")
        for row in p["labs"]:
            lines.append(f"{row['lab']:>28}  {row['per_student'] / GIB:>9.2f}Gi  {row['ranks']:>13}  "
                         f"{row['all_at_once'] / GIB:>9.1f}Gi  "
                         + ("all" if row["fits_all"] else f"{row['students_at_once']} of {p['students']}"))
        lines.append("")
    lines += [f"- {n}" for n in p["notes"]]
    lines.append("- a launch of k ranks uses NCCL when the student has k GPUs of their own, else gloo "
                 "(labkit.launch chooses; NCCL refuses two ranks on one GPU)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit classroom {plan,measure}``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m labkit classroom")
    sub = parser.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("plan", help="what each student gets on this machine, and which labs fit at once")
    pl.add_argument("--students", type=int, default=None, help="class size (or --roster)")
    pl.add_argument("--roster", default=None, help="CSV with username[,gpus] columns")
    pl.add_argument("--gpus", type=int, default=None, help="assume this many GPUs instead of reading them")
    pl.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of each assumed GPU")
    pl.add_argument("--cpus", type=int, default=None, help="assume this many cores")
    pl.add_argument("--memory-gib", type=float, default=None, help="assume this much RAM")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    me = sub.add_parser("measure", help="run notebooks and record the memory each lab needs")
    me.add_argument("notebooks", nargs="*", help="default: every notebooks/NN_*.ipynb")
    me.add_argument("--out", default=str(MEASURED))
    args = parser.parse_args(argv)
    if args.cmd == "plan":
        if args.students is None and args.roster is None:
            parser.error("pass --students N or --roster FILE")
        roster = read_roster(args.roster) if args.roster else None
        machine = read_machine(args.gpus, args.gpu_memory_gib, args.cpus, args.memory_gib)
        p = plan(args.students or 0, machine, roster=roster)
        if args.json:
            print(json.dumps({**p, "machine": asdict(machine), "shares": [asdict(s) for s in p["shares"]]}, indent=1))
        else:
            print(format_plan(p))
        return 0
    from .grading import REPO_NOTEBOOKS

    nbs = [Path(n) for n in args.notebooks] or sorted(REPO_NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    print(f"running {len(nbs)} notebooks, one at a time, sampling their memory every 0.2 s", flush=True)
    res = measure(nbs, log=lambda line: print(line, flush=True))
    m = read_machine()
    doc = {"measured_on": f"{time.strftime('%Y-%m-%d')}, {m.cpus} cores, {m.memory / GIB:.0f} GiB, "
                          f"{'no GPU' if not m.gpus else m.gpus[0].name}", "labs": res}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print("written to", args.out)
    return 0
