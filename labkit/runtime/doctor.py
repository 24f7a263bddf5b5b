"""``python -m labkit doctor`` / ``labkit.doctor()``: what this machine can run, and how to fix what it cannot.

It reports versions, CPUs, GPUs (name, memory), whether a private rendezvous can be made, which
backends really work (a 2-rank all-reduce on gloo; on NCCL a 2-rank one with two GPUs or more, a 1-rank one with a
single GPU), which backend ``backend="auto"`` picks for 1, 2 and 4 ranks (the launcher's own
:func:`~labkit.runtime.launcher.choose_backend`), and the world sizes the labs will use here. The command exits
non-zero when something the labs need is broken; NCCL is needed wherever ``auto`` picks it, which is on any machine
with a GPU (a 1-rank launch there is NCCL).
"""
from __future__ import annotations

import importlib
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field

NEEDED = ["torch", "torchvision", "numpy", "matplotlib", "sklearn", "cloudpickle", "tqdm"]
OPTIONAL = ["ipywidgets", "jupyterlab", "nbval", "nbconvert", "playwright"]


@dataclass
class Finding:
    what: str
    ok: bool
    detail: str
    fix: str = ""
    needed: bool = True


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings if f.needed)

    def add(self, *a, **k) -> Finding:
        f = Finding(*a, **k)
        self.findings.append(f)
        return f

    def text(self) -> str:
        lines = ["labkit doctor", "============="]
        for k, v in self.info.items():
            lines.append(f"{k:>18}: {v}")
        lines.append("")
        for f in self.findings:
            mark = "ok  " if f.ok else ("FAIL" if f.needed else "warn")
            lines.append(f"[{mark}] {f.what}: {f.detail}")
            if not f.ok and f.fix:
                lines.append(f"       fix: {f.fix}")
        lines.append("")
        lines.append("All that the labs need works." if self.ok else
                     "Something the labs need is broken: see the FAIL lines and their fixes.")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()


def _allreduce_rank(ctx):
    import torch
    import torch.distributed as dist

    t = torch.ones(4, device=ctx.device) * (ctx.rank + 1)
    dist.all_reduce(t)
    return float(t[0].item())


def _check_backend(report: Report, backend: str, world_size: int, needed: bool) -> bool:
    from .launcher import launch

    expected = world_size * (world_size + 1) / 2
    t0 = time.perf_counter()
    try:
        got = launch(_allreduce_rank, world_size, backend=backend, timeout=120, echo=False, quiet=True)
        ok = list(got) == [expected] * world_size
        report.add(f"{backend} all-reduce, {world_size} ranks", ok,
                   f"got {list(got)} in {time.perf_counter() - t0:.1f} s (expected {expected:g} on every rank)",
                   fix="" if ok else ("the backend computed a wrong sum: report this with "
                                      "`python -m labkit doctor` output"),
                   needed=needed)
        return ok
    except Exception as e:
        first = str(e).strip().splitlines()
        report.add(f"{backend} all-reduce, {world_size} ranks", False,
                   f"{type(e).__name__}: {first[0] if first else ''}"[:300],
                   fix=("gloo binds to loopback (GLOO_SOCKET_IFNAME=lo); if that interface is missing set "
                        "GLOO_SOCKET_IFNAME to one that exists (see `ip addr`)" if backend == "gloo" else
                        "check `nvidia-smi`, the driver version and that torch was built with CUDA and NCCL "
                        "(torch.distributed.is_nccl_available()); until then launch with backend='gloo' (the "
                        "labs run on CPU processes)"),
                   needed=needed)
        return False


def doctor(backends: bool = True, echo: bool = True) -> Report:
    report = Report()
    report.info["python"] = f"{platform.python_version()} ({sys.executable})"
    report.info["platform"] = f"{platform.system()} {platform.machine()}"
    cpus = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = cpus
    report.info["CPUs"] = f"{usable} usable of {cpus}"
    for name in NEEDED + OPTIONAL:
        try:
            mod = importlib.import_module(name)
            report.info[name] = getattr(mod, "__version__", "installed")
        except Exception as e:
            needed = name in NEEDED
            report.add(f"import {name}", False, f"{type(e).__name__}: {e}",
                       fix="pip install -r requirements.txt (from the repository root)", needed=needed)
    try:
        import torch
    except Exception:
        if echo:
            print(report.text())
        return report

    from .launcher import choose_backend

    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    report.info["torch CUDA build"] = torch.version.cuda or "none (CPU build)"
    if n_gpu:
        for i in range(n_gpu):
            p = torch.cuda.get_device_properties(i)
            report.info[f"GPU {i}"] = f"{p.name}, {p.total_memory / 2**30:.1f} GiB"
    else:
        report.info["GPUs"] = "none visible (labs run on CPU processes with gloo)"

    # rendezvous: a private folder for the FileStore
    try:
        d = tempfile.mkdtemp(prefix="labkit-doctor-")
        mode = oct(os.stat(d).st_mode & 0o777)
        os.rmdir(d)
        report.add("private rendezvous folder", mode == "0o700", f"{tempfile.gettempdir()} gives mode {mode}",
                   fix="set TMPDIR to a folder you own")
    except OSError as e:
        report.add("private rendezvous folder", False, str(e), fix="set TMPDIR to a writable folder you own")

    # What a launch with the default backend="auto" runs here, from the launcher's own rule: the NCCL check is
    # needed exactly when that rule picks NCCL for the world size it checks (any GPU: 1 rank on NCCL, and 2 when
    # there are 2 GPUs), so a broken NCCL fails the doctor on every machine where the labs would use it.
    report.info["backend='auto'"] = (", ".join(f"{n} rank(s) {choose_backend(n)[0]}" for n in (1, 2, 4))
                                     + f" ({n_gpu} GPU(s) here; NCCL needs one GPU per rank)")
    if backends:
        _check_backend(report, "gloo", 2, needed=True)
        if n_gpu:
            ws = min(n_gpu, 2)
            _check_backend(report, "nccl", ws, needed=choose_backend(ws)[0] == "nccl")
    ws_cpu = "1, 2, 4 (gloo processes; with %d core(s), more than %d ranks share cores)" % (usable, usable)
    report.info["world sizes (CPU)"] = ws_cpu
    if n_gpu:
        report.info["world sizes (GPU)"] = f"up to {n_gpu} on NCCL (one rank per GPU); more ranks fall back to gloo"
    if usable < 2:
        report.add("CPU cores", False,
                   "only 1 usable core: multi-rank labs run, but slowly and without parallel speed-up",
                   needed=False)
    if echo:
        print(report.text())
    return report
