"""The launcher: results in rank order, errors with tracebacks, timeouts, no leftover processes,
concurrent launches, functions defined in __main__, pools, torchrun, bad input."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import labkit
from labkit.runtime.launcher import LaunchError, LaunchTimeout, Pool, RankError, choose_backend

pytestmark = pytest.mark.timeout(600)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def my_workers():
    """PIDs of live rank processes started by this test process."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            if b"labkit.runtime._worker" not in cmd:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"LABKIT_PARENT_PID={os.getpid()}".encode() in env and state != "Z":
            pids.append(int(pid))
    return pids


def rank_info(ctx, scale=1):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t)
    print(f"line 1 from {ctx.rank}")
    print(f"line 2 from {ctx.rank}")
    return {"rank": ctx.rank, "world": ctx.world_size, "sum": t.item() * scale, "device": str(ctx.device),
            "backend": ctx.backend, "dist_rank": dist.get_rank()}


def fail_on_rank_one(ctx):
    import torch.distributed as dist

    if ctx.rank == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()  # rank 0 waits for a rank that will never come


def mismatched_collective(ctx):
    import torch
    import torch.distributed as dist

    if ctx.rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never calls it
    return ctx.rank


def die_hard(ctx):
    if ctx.rank == 1:
        os._exit(3)
    return ctx.rank


def returns_unpicklable(ctx):
    return (x for x in range(3))  # a generator cannot be pickled


def test_results_in_rank_order_and_prefixed_output(capsys):
    res = labkit.launch(rank_info, 3, kwargs={"scale": 2}, quiet=True)
    assert [r["rank"] for r in res] == [0, 1, 2]
    assert all(r["world"] == 3 and r["dist_rank"] == r["rank"] for r in res)
    assert all(r["sum"] == 6.0 for r in res)  # (0+1+2)*2
    assert res.backend == "gloo" and all(r["device"] == "cpu" for r in res)
    out = capsys.readouterr().out
    for r in range(3):  # each rank's lines arrive prefixed, in order per rank
        assert out.index(f"[rank {r}] line 1 from {r}") < out.index(f"[rank {r}] line 2 from {r}")
        assert res.logs[r] == f"line 1 from {r}\nline 2 from {r}\n"


def test_world_size_one():
    assert labkit.launch(rank_info, 1, quiet=True, echo=False)[0]["sum"] == 0.0


def test_rank_error_names_rank_and_traceback_fast():
    """Rank 0 waits in a barrier forever, so only the launcher's reaction to rank 1's error can end the job before
    the (long) timeout: a RankError, not a LaunchTimeout, proves it did not wait (load cannot flip that)."""
    with pytest.raises(RankError) as e:
        labkit.launch(fail_on_rank_one, 2, quiet=True, echo=False, timeout=400)
    assert not isinstance(e.value, LaunchTimeout)
    assert e.value.rank == 1
    assert "deliberate failure on rank one" in str(e.value)
    assert "Traceback" in str(e.value) and "fail_on_rank_one" in str(e.value)
    assert my_workers() == []


def test_timeout_names_unfinished_ranks_and_leaves_nothing():
    t0 = time.perf_counter()
    with pytest.raises(LaunchTimeout) as e:
        labkit.launch(mismatched_collective, 2, timeout=10, quiet=True, echo=False)  # start-up is not counted
    assert e.value.unfinished == [0]
    assert "rank(s) [0] never returned" in str(e.value)
    assert time.perf_counter() - t0 < 500  # it ended: the timeout fired (start-up under load can take minutes)
    assert my_workers() == []


def test_rank_that_dies_is_reported():
    with pytest.raises(RankError) as e:
        labkit.launch(die_hard, 2, quiet=True, echo=False)
    assert e.value.rank == 1 and "exited with code 3" in str(e.value)
    assert my_workers() == []


def test_two_concurrent_launches_do_not_collide():
    results, errors = {}, []

    def go(name):
        try:
            results[name] = labkit.launch(rank_info, 2, quiet=True, echo=False)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [r["sum"] for r in results["a"]] == [1.0, 1.0] == [r["sum"] for r in results["b"]]


def test_function_defined_in_main_script_and_concurrent_students(tmp_path):
    """A function defined in a script's __main__ (as in a notebook cell) is serialised by value.
    Two such scripts at once are two students on one server."""
    script = tmp_path / "student.py"
    script.write_text(textwrap.dedent("""
        import labkit
        def my_fn(ctx, base):
            import torch, torch.distributed as dist
            t = torch.tensor([base + ctx.rank], device=ctx.device)
            dist.all_reduce(t)
            return int(t.item())
        print("RESULT", list(labkit.launch(my_fn, 2, args=(10,), quiet=True, echo=False)))
    """))
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=480) for p in procs]
    for (out, err), p in zip(outs, procs):
        assert p.returncode == 0, err
        assert "RESULT [21, 21]" in out


def _signal_state(pid) -> str:
    try:
        return " ".join(line.strip() for line in open(f"/proc/{pid}/status") if line.startswith(("SigBlk", "SigIgn")))
    except OSError:
        return "(gone)"


def test_keyboard_interrupt_stops_every_rank(tmp_path):
    script = tmp_path / "interrupt.py"
    script.write_text(textwrap.dedent("""
        import faulthandler, signal, sys
        # a kernel's own SIGINT handling, whatever this process inherited (a shell's background job starts with
        # SIGINT ignored); and a stack dump on SIGUSR1 if the interrupt is not handled in time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        import labkit
        def hang(ctx):
            import time
            print("started", flush=True)
            time.sleep(600)
        try:
            labkit.launch(hang, 2, timeout=None)
        except KeyboardInterrupt:
            print("INTERRUPTED", flush=True)
            sys.exit(0)
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait until both ranks run, then interrupt as Jupyter's "interrupt kernel" does (SIGINT)
    lines = []
    t_end = time.time() + 400
    while sum("started" in line for line in lines) < 2 and time.time() < t_end:
        lines.append(p.stdout.readline())
    state = _signal_state(p.pid)
    os.kill(p.pid, signal.SIGINT)
    try:
        out, err = p.communicate(timeout=90)
    except subprocess.TimeoutExpired as e:
        os.kill(p.pid, signal.SIGUSR1)   # its stacks, to say where it waits
        time.sleep(3)
        p.kill()
        out, err = p.communicate(timeout=30)
        raise AssertionError(f"not stopped 90 s after SIGINT; its signal state before: {state}; this test's: "
                             f"{_signal_state(os.getpid())}\nstdout: {out[-1000:]}\nstderr: {err[-6000:]}") from e
    assert "INTERRUPTED" in out, err
    leftover = subprocess.run(["pgrep", "-f", "labkit.runtime._worker"], capture_output=True, text=True).stdout.split()
    for pid in leftover:  # none of the leftovers may be children of the interrupted script
        try:
            env = open(f"/proc/{pid}/environ", "rb").read()
        except OSError:
            continue
        assert f"LABKIT_PARENT_PID={p.pid}".encode() not in env


def test_pool_is_fast_and_restarts_after_failure():
    t0 = time.perf_counter()
    with Pool(2, quiet=True, echo=False) as pool:
        assert [r["sum"] for r in pool.run(rank_info)] == [1.0, 1.0]
        first = time.perf_counter() - t0  # start-up (two Pythons importing torch) and one job
        first_pids = pool.pids
        t0 = time.perf_counter()
        for _ in range(5):
            pool.run(rank_info)
        assert (time.perf_counter() - t0) / 5 < first / 3  # no start-up on re-runs (a ratio: load slows both)
        assert pool.pids == first_pids and pool.starts == 1
        with pytest.raises(RankError):
            pool.run(fail_on_rank_one, timeout=30)
        assert my_workers() == []  # the failed pool's ranks are gone
        assert [r["rank"] for r in pool.run(rank_info)] == [0, 1]  # and it starts afresh
        assert pool.starts == 2 and pool.pids != first_pids
        ctx_cache = pool.run(_cache_counter)
        assert pool.run(_cache_counter) == [c + 1 for c in ctx_cache]  # ctx.cache survives between jobs
    assert my_workers() == []


def _cache_counter(ctx):
    ctx.cache["n"] = ctx.cache.get("n", 0) + 1
    return ctx.cache["n"]


def test_shared_pool_via_launch():
    a = labkit.launch(rank_info, 2, pool=True, echo=False)
    b = labkit.launch(rank_info, 2, pool=True, echo=False)
    assert list(a) == list(b)
    labkit.shutdown_pools()
    assert my_workers() == []


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        labkit.launch(rank_info, 0)
    with pytest.raises(ValueError, match="backend must be"):
        labkit.launch(rank_info, 2, backend="mpi")
    with pytest.raises(LaunchError, match="NCCL needs"):
        choose_backend(2, "nccl")
    with pytest.raises(TypeError, match="needs a function"):
        labkit.launch("not a function", 2)
    lock = threading.Lock()
    with pytest.raises(LaunchError, match="could not serialise"):
        labkit.launch(lambda ctx: lock, 2)
    with pytest.raises(RankError, match="cannot be pickled"):
        labkit.launch(returns_unpicklable, 2, quiet=True, echo=False)
    assert my_workers() == []


def test_backend_choice_says_why():
    backend, reason = choose_backend(2, "auto")
    assert backend in ("gloo", "nccl") and reason


def test_same_function_under_torchrun():
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed next to this Python")
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "-m", "labkit", "run",
                        "labkit.runtime.lab:hello_rank"],
                       capture_output=True, text=True, timeout=480, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "rank 0: 1.0" in p.stdout and "rank 1: 1.0" in p.stdout
    assert "hello from rank 1 of 2" in p.stdout


def test_cli_run_without_torchrun():
    p = subprocess.run([sys.executable, "-m", "labkit", "run", "labkit.runtime.lab:hello_rank", "-n", "2"],
                       capture_output=True, text=True, timeout=480, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "rank 1: 1.0" in p.stdout
    bad = subprocess.run([sys.executable, "-m", "labkit", "run", "labkit.tour"], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert bad.returncode != 0 and "module:function" in bad.stderr


def test_ranks_die_with_their_parent(tmp_path):
    """A kernel that is killed (not interrupted) takes its ranks with it."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import time, labkit
        pool = labkit.Pool(2, quiet=True, echo=False)
        pool.run(lambda ctx: ctx.rank)
        print("PIDS", *pool.pids, flush=True)
        time.sleep(600)
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("PIDS"), line
    pids = [int(x) for x in line.split()[1:]]
    p.kill()
    p.wait()
    deadline = time.time() + 10
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}") and
                 open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"ranks {alive} outlived their parent"


def test_start_here_check_refuses_shortcuts():
    """Lab 00's exercise check: right answer passes; stub, off-by-one, a table of the tested sizes, and a predict
    that runs the all-reduce itself all fail, each with a message that says why."""
    from labkit.runtime.lab import check_prediction, max_and_sum_rank

    def right(n):
        return n, n * (n + 1) / 2

    def stub(n):
        raise NotImplementedError

    def off_by_one(n):  # forgets that rank r holds r + 1
        return n - 1, n * (n - 1) / 2

    table = {1: (1, 1), 2: (2, 3), 3: (3, 6), 4: (4, 10)}

    def runs_it(n):
        return tuple(labkit.launch(max_and_sum_rank, n, pool=True, echo=False)[0])

    assert check_prediction(right, seed=0).passed
    assert not check_prediction(stub).attempted
    wrong = check_prediction(off_by_one, world_sizes=(2,), seed=0)
    assert not wrong.passed and "max with 2 ranks" in wrong.summary()
    hard = check_prediction(lambda n: table[n], world_sizes=(2,), seed=1)
    assert not hard.passed and "by rule" in hard.summary() and "KeyError" in hard.summary()
    cheat = check_prediction(runs_it, world_sizes=(2,), seed=2)  # also asked for 5-64 ranks: none may start
    assert not cheat.passed and "tried to run ranks itself" in cheat.summary()
    assert all("tried to run ranks itself" in c.detail for c in cheat.cases), cheat.summary()
    assert "rank r holds r + 1" in wrong.summary() or "rank r holds r + 1" in wrong.hint


def test_course_map_lists_every_lab_and_every_notebook():
    import json
    import tempfile
    from pathlib import Path

    from labkit.runtime.lab import course_map, notebook_title
    from labkit.tour import LABS

    rows = course_map()
    assert [r["lab"] for r in rows] == [lab.name for lab in LABS]
    on_disk = sorted(p.name for p in Path(REPO, "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert sorted(r["notebook"] for r in rows) == on_disk, "a notebook missing from labkit.tour.LABS (or a stale entry)"
    assert all(r["about"] and not r["about"].startswith(("#", "Lab")) for r in rows), rows
    assert rows[1]["about"].startswith("Collectives") and rows[1]["benchmark"] == "python -m labkit bench collectives"
    # the title comes from the notebook's first heading, whatever its style
    nb = {"cells": [{"cell_type": "code", "source": ["x = 1"]},
                    {"cell_type": "markdown", "source": ["# Lab 12 — Something new: and more\n", "text"]}]}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "12_new.ipynb").write_text(json.dumps(nb))
        assert notebook_title(Path(d) / "12_new.ipynb") == "Something new: and more"
        assert notebook_title(Path(d) / "missing.ipynb") == ""
        with pytest.raises(ValueError, match="notebooks="):
            course_map(Path(d) / "nowhere")
