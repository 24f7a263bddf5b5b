"""Device work is timed through :mod:`labkit.devices`, which synchronises the device before it reads the clock.

CUDA kernels and NCCL calls return when they are queued: a ``time.perf_counter()`` around them measures the
queueing. A CPU cannot show the difference (nothing is queued), so two checks stand in for a GPU:

- **static**: every clock read (``time.perf_counter``/``time``/``monotonic``...) and every ``torch.cuda``
  synchronise or event in ``labkit/`` is either in :mod:`labkit.devices` or listed below with the reason it is not
  device timing (``WALL_CLOCK``) or as device timing still to convert, in a file outside this change (``PENDING``).
  A new bare clock around device work fails here; so does a listed entry that is gone (keep the lists true).
- **dynamic**: ``labkit.devices.synchronize`` is replaced by a recorder (inside the rank, for rank functions) and
  each timed function must call it, with the device it computes on, at both ends of every timed region.
"""
import ast
import pathlib

import pytest
import torch

import labkit
import labkit.devices

ROOT = pathlib.Path(__file__).resolve().parents[1] / "labkit"
CLOCKS = {"perf_counter", "perf_counter_ns", "time", "time_ns", "monotonic", "monotonic_ns", "process_time"}
LABKIT_DEVICE_CHECK = True  # this module's rank functions are held to the device check too (ctx.device is its
#                             stand-in, cpu:0): what they time and send must be on the rank's device

# (file, function) -> why its clock is not timing device work
_LAUNCH = "a launch's wall time seen from the parent (start-up included), printed beside the result"
_COMMAND = "the whole command's wall time, printed at the end; the ranks time their work with labkit.devices"
_SUPERVISE = "process supervision (deadlines, time-outs, idle detection), not a measurement"
WALL_CLOCK = {
    ("zero/stage3.py", "Zero3._clock"): "on a GPU, when the host queued a gather (synchronising there would wait "
                                        "for the prefetch it records); on a CPU it reads labkit.devices.now",
    ("ablation/bench.py", "throughput"): "trials per minute of a whole study run by worker processes (CPU trials)",
    ("ablation/bench.py", "store_overhead"): "SQLite transactions, no tensors",
    ("ablation/lab.py", "wait_for"): _SUPERVISE,
    ("ablation/runner.py", "_Worker.give"): _SUPERVISE,
    ("ablation/runner.py", "_run"): _SUPERVISE,
    ("ablation/runner.py", "run_study"): "a study's wall time (its trials run in worker processes)",
    ("ablation/store.py", "Store._settle"): _SUPERVISE,
    ("ablation/store.py", "Store.claim"): "a trial's claim time stamp in the store",
    ("ablation/store.py", "Store.recover"): "time stamps and a lock deadline in the store",
    ("ablation/store.py", "Store.save_study"): "a study's time stamp in the store",
    ("ablation/store.py", "merge"): "time stamps in the store",
    ("ablation/training.py", "train"): "a trial's wall time; lab 08's trials train on the CPU only (issue 25, 8.)",
    ("balance/lab.py", "tour.sleeping"): _LAUNCH,
    ("capstone/bench.py", "main"): "each part's wall time, printed after it (the runs time their steps themselves)",
    ("capstone/bench.py", "single_step_seconds"): "the one-process baseline: built and run on the CPU, one thread",
    ("capstone/lab.py", "tour.grid"): _LAUNCH,
    ("classroom.py", "measure"): "a classroom run's wall time (notebooks in kernels)",
    ("collectives/bench.py", "main"): _COMMAND,
    ("context_expert/bench.py", "main"): _COMMAND,
    ("context_expert/bench.py", "_ring_part.exchange"): "the host's time posting the ring's messages, subtracted from "
                                                        "the rank's now()-timed step (a synchronise there would "
                                                        "serialise the overlap the ring makes; the bench says so)",
    ("context_expert/bench.py", "_TimedWork.wait"): "the host's time waiting for a ring message (as above; on NCCL a "
                                                    "wait returns when queued, and the bench prints that compute "
                                                    "is then the step)",
    ("ddp/bench.py", "main"): _COMMAND,
    ("ddp/lab.py", "tour.ran"): _LAUNCH,
    ("ddp/wrappers.py", "OverlappedDDP._launch"): "bucket spans read in autograd hooks and completion callbacks: a "
                                                  "synchronise there would stall the backward the all-reduce overlaps",
    ("ddp/wrappers.py", "OverlappedDDP.sync_grads"): "the wait starts when the host arrives (a synchronise first "
                                                     "would wait for the all-reduces it measures); it ends with now()",
    ("hardware/loading.py", "DecodeLikeDataset.__getitem__"): "NumPy work in a DataLoader worker: no device",
    ("hardware/timing.py", "_timer.run"): "CUDA events around the call on a GPU (the other right way), the clock on "
                                          "the CPU",
    ("kmeans/bench.py", "_accuracy"): _COMMAND,
    ("kmeans/bench.py", "compare.theirs"): "scikit-learn's KMeans: NumPy on the CPU",
    ("kmeans/bench.py", "main"): _COMMAND,
    ("pipeline/reference.py", "time_in_process"): "the one-process CPU baseline (stages built here, on the CPU)",
    ("pseudo_label/bench.py", "main"): _COMMAND,
    ("pseudo_label/consistency.py", "train_cnn"): "the CNN is built and trained on the CPU only",
    ("pseudo_label/lab.py", "tour.ranks"): _LAUNCH,
    ("book/build.py", "build"): _COMMAND,
    ("book/build.py", "run_jobs.one"): "a notebook's wall time in its own process, to order the next build's jobs",
    ("book/run_one.py", "main"): "a notebook's wall time, printed on its chapter beside the machine that ran it",
    ("runtime/bench.py", "measure"): "launch latency: the parent's wall time of starting ranks",
    ("runtime/doctor.py", "_check_backend"): _LAUNCH,
    ("runtime/launcher.py", "Pool._collect"): _SUPERVISE,
    ("runtime/launcher.py", "Pool.close"): _SUPERVISE,
    ("runtime/launcher.py", "Pool.run"): _LAUNCH,
    ("runtime/lab.py", "tour.first"): _LAUNCH,
    ("runtime/lab.py", "tour.again"): _LAUNCH,
    ("runtime/stress.py", "Session._diagnose"): _SUPERVISE,
    ("runtime/stress.py", "Session.run"): _SUPERVISE,
    ("runtime/stress.py", "main"): _COMMAND,
    ("runtime/stress.py", "_execute_watched"): _SUPERVISE,
    ("runtime/stress.py", "_main_fresh"): _COMMAND,
    ("semisup.py", "_evaluate"): "fit_predict methods take and return NumPy arrays (the protocol is CPU-side)",
    ("slides.py", "build"): "building decks, no tensors",
    ("tour.py", "run_tour"): _LAUNCH,
    ("zero/bench.py", "main"): _COMMAND,
    ("zero/lab.py", "tour.ran"): _LAUNCH,
}
# (file, function) -> what to change: device timing with a bare clock or an ad-hoc synchronise, in files owned by
# other changes of issue 25. Converting one makes this test fail until its entry is deleted.
PENDING: dict = {}


def _clock_reads(path: pathlib.Path) -> dict[str, list[int]]:
    """``{function qualname: [lines]}`` of clock reads and torch.cuda synchronises/events in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: dict[str, list[int]] = {}
    stack: list[str] = []

    class Visitor(ast.NodeVisitor):
        def visit_FunctionDef(self, node):
            stack.append(node.name)
            self.generic_visit(node)
            stack.pop()

        visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

        def visit_ImportFrom(self, node):  # `from time import perf_counter` would hide the reads below
            if node.module == "time" and any(a.name in CLOCKS for a in node.names):
                found.setdefault(".".join(stack) or "<module>", []).append(node.lineno)

        def visit_Call(self, node):
            f = node.func
            if isinstance(f, ast.Attribute) and (
                    (isinstance(f.value, ast.Name) and f.value.id == "time" and f.attr in CLOCKS)
                    or (f.attr in ("synchronize", "Event") and ast.unparse(f.value).endswith("cuda"))):
                found.setdefault(".".join(stack) or "<module>", []).append(node.lineno)
            self.generic_visit(node)

    Visitor().visit(tree)
    return found


def test_device_work_is_timed_through_labkit_devices(tmp_path):
    found = {}
    for p in sorted(ROOT.rglob("*.py")):
        rel = str(p.relative_to(ROOT))
        if rel == "devices.py":
            continue
        for fn, lines in _clock_reads(p).items():
            found[(rel, fn)] = lines
    unlisted = {f"{path}:{lines[0]} in {fn}()" for (path, fn), lines in found.items()
                if (path, fn) not in WALL_CLOCK and (path, fn) not in PENDING}
    assert not unlisted, (
        "a bare clock or torch.cuda synchronise: time device work with labkit.devices.now(device) or "
        "Stopwatch(device) (they synchronise the device first: CUDA and NCCL calls return when queued); if this "
        "is not device timing, add it to WALL_CLOCK with the reason:\n" + "\n".join(sorted(unlisted)))
    stale = sorted(f"{p}:{fn}" for p, fn in list(WALL_CLOCK) + list(PENDING) if (p, fn) not in found)
    assert not stale, f"no clock read there any more: delete these entries from WALL_CLOCK / PENDING: {stale}"
    assert not set(WALL_CLOCK) & set(PENDING)
    bad = tmp_path / "bad.py"  # the check can fail
    bad.write_text("import time\n\nclass Step:\n    def run(self, f):\n        t0 = time.perf_counter()\n        f()\n"
                   "        torch.cuda.synchronize()\n        return time.perf_counter() - t0\n")
    assert _clock_reads(bad) == {"Step.run": [5, 7, 8]}


# ------------------------------------------------------------------ dynamic: the timed functions synchronise
class _Recorder:
    """Stands in for ``labkit.devices.synchronize``: counts calls per device (``now`` and ``Stopwatch`` call it)."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def __call__(self, device=None):
        d = str(labkit.devices.as_device(device))
        self.calls[d] = self.calls.get(d, 0) + 1

    def total(self) -> int:
        return sum(self.calls.values())


@pytest.fixture
def synchronize(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(labkit.devices, "synchronize", rec)
    return rec


def test_the_recorder_sees_now_and_stopwatch(synchronize):
    labkit.devices.now("cpu")
    with labkit.devices.Stopwatch(torch.device("cpu")):
        pass
    assert synchronize.calls == {"cpu": 3}


def test_kmeans_iterations_are_synchronised(synchronize):
    from labkit.kmeans.loop import lloyd

    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 3, generator=g, dtype=torch.float64)
    res = lloyd(X, X[:4].clone(), max_iter=3, tol_abs=-1.0)
    assert len(res.iter_seconds) == 3
    assert synchronize.calls == {"cpu": 2 * 3}  # before and after every iteration, on X's device


def test_layer_profile_is_synchronised(synchronize):
    from labkit.balance.profile import profile_layers

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    profile_layers(model, torch.randn(5, 4), repeats=2, warmup=1)
    assert synchronize.calls == {"cpu": 4 * 3 * 3}  # 4 reads per layer (forward and backward ends), 3 layers x 3 runs


def test_ddp_steps_and_timeline_are_synchronised(synchronize):
    from labkit.ddp.training import train_steps
    from labkit.ddp.wrappers import Timeline

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [[(torch.randn(4, 3), torch.randint(0, 2, (4,)))] for _ in range(2)]
    tl = Timeline(0)
    times = train_steps(model, opt, batches, timeline=tl)
    assert len(times) == 2 and tl.device == torch.device("cpu")  # the timeline took the model's device
    spans = len(tl.events)
    assert spans == 2 * 3  # forward, backward, optimizer per step
    assert synchronize.calls == {"cpu": 2 * 2 + 2 * spans}
    before = synchronize.total()
    train_steps(model, opt, batches)  # no timeline: only the step times are synchronised
    assert synchronize.total() - before == 2 * 2


def test_work_size_for_the_input_pipeline_is_timed_synchronised(synchronize):
    from labkit.hardware.loading import _time

    calls = []
    assert len(_time(lambda: calls.append(1), 3, "cpu")) == 3
    assert synchronize.calls == {"cpu": 2 * 3}


def _timed_ranks(ctx):
    """Each rank function of labs 01, 02, 03 and 04 that times device work, with the recorder in place."""
    import torch.distributed as dist

    import labkit.devices as devices
    from labkit.collectives.bench import pingpong_rank, time_collectives_rank
    from labkit.ddp.wrappers import BucketedDDP, NaiveDDP, Timeline
    from labkit.pipeline import ModelStages
    from labkit.pipeline.executor import pipeline_rank
    from labkit.sliced.stages import stage_rank

    saved = devices.synchronize
    out = {"device": str(ctx.device)}  # the device check's stand-in (cpu:0) when it is on
    try:
        rec = _Recorder()
        devices.synchronize = rec
        pingpong_rank(ctx, sizes=(4, 64, 256), repeats=2)
        out["pingpong"] = dict(rec.calls)

        rec = _Recorder()
        devices.synchronize = rec
        time_collectives_rank(ctx, algorithms=("ring", "library"), sizes=(64,), repeats=2, warmup=1, paired=False)
        out["collectives"] = dict(rec.calls)

        for cls in (NaiveDDP, BucketedDDP):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(ctx.device)
            tl = Timeline(ctx.rank)
            ddp = cls(model, timeline=tl)
            model(torch.randn(2, 3, device=ctx.device)).sum().backward()
            rec = _Recorder()
            devices.synchronize = rec
            ddp.sync_grads()
            out[cls.__name__] = (dict(rec.calls), len(tl.events), str(tl.device))

        rec = _Recorder()
        devices.synchronize = rec
        g = torch.Generator().manual_seed(0)
        batch = (torch.randn(4, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
        run = pipeline_rank(ctx, ModelStages("mlp", n_stages=ctx.world_size), batch, n_micro=2, warmup=0, repeats=1)
        out["pipeline"] = (dict(rec.calls), len(run["events"]))

        rec = _Recorder()
        devices.synchronize = rec
        x, y = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g)
        stage_rank(ctx, "small", [5], x, y)
        out["stage"] = dict(rec.calls)
    finally:
        devices.synchronize = saved
    dist.barrier()
    return out


def test_rank_functions_synchronise_their_device_around_every_timed_region():
    """Fails while lab 01's ping-pong, its collective timings, lab 02's wrappers, lab 03's stages or lab 04's
    executor read the clock without synchronising ``ctx.device``."""
    res = labkit.launch(_timed_ranks, world_size=2, timeout=300)
    for _rank, out in enumerate(res):
        dev = out["device"]  # every synchronise names the rank's device
        assert out["pingpong"] == {dev: 2 * 3 * (2 + 1)}  # ranks 0 and 1: both ends of every bounce, warm-up too
        assert out["collectives"] == {dev: 2 * 2 * (2 + 1)}  # 2 algorithms x (warm-up + 2 repeats), both ends
        for name in ("NaiveDDP", "BucketedDDP"):
            calls, spans, device = out[name]
            assert device == dev and spans >= 1
            assert calls == {dev: 2 + 2 * spans}, (name, calls, spans)  # sync_seconds, then each all-reduce span
        calls, events = out["pipeline"]
        assert set(calls) == {dev} and calls[dev] >= 2 * events  # every event's start and end
        assert out["stage"] == {dev: 6}  # the six marks of the stage's timeline
