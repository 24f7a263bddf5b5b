"""Load balancing, measured: predicted vs measured stage times, and real pipeline steps of even and
balanced splits of a ResNet (the exact solvers are in :mod:`.solvers`, the profiler in :mod:`.profile`).

    cmp = compare_splits(model="small", n_stages=2, batch=16, n_micro=4)  # profiles, solves, measures, runs
    cmp.table()                   # per split: cuts, predicted / measured stage ms, predicted / measured step ms
    cmp.runs["balanced"].gantt()  # the measured timeline

Three numbers per split, from cheap to real:

* **predicted stage time**: the sum of the profiled layer times (forward + backward, one micro-batch);
* **measured stage time**: the stage (the layers as one module) timed the same way in this process;
* **pipeline step**: one GPipe training step on ``n_stages`` real ranks (:func:`labkit.pipeline.run_pipeline`),
  next to the step a GPipe timeline predicts from the measured stage times
  (:func:`labkit.balance.gpipe_timeline`). Its steady state delivers one micro-batch per
  ``max_s(stage time)``: the slowest stage sets the pace.
"""
from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass, field

import torch

from .._compat import renamed_kwargs
from .._validate import validate_int
from ..partition import even_cuts, stage_ranges, stage_sums, validate_cuts
from .profile import LayerProfile, as_layers, balance_by_time, profile_layers, sleep_layers
from .solvers import gpipe_timeline

__all__ = ["lab_model", "micro_sample", "measure_stages", "stage_profile_gap", "compare_splits", "sleep_pipeline",
           "Comparison"]

MODELS = ("small", "resnet18", "mlp")


def lab_model(name: str = "small", seed: int = 0) -> torch.nn.Sequential:
    """The flattened model the lab balances: ``"small"`` ResNet (11 layers), ``"resnet18"`` (15) or ``"mlp"``.

    The same one :class:`labkit.pipeline.ModelStages` builds on each rank (same name and seed, same weights).
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    from ..pipeline import ModelStages

    return ModelStages(name, n_stages=1, seed=seed).full()


def micro_sample(model: str, rows: int, seed: int = 0) -> torch.Tensor:
    """A random input batch of ``rows`` rows shaped for ``model`` (32x32 images, or 32 features for the MLP)."""
    rows = validate_int("rows", rows, minimum=1)
    g = torch.Generator().manual_seed(seed)
    shape = (rows, 32) if model == "mlp" else (rows, 3, 32, 32)
    return torch.randn(*shape, generator=g)


def measure_stages(layers, cuts, sample: torch.Tensor, repeats: int = 3, warmup: int = 1) -> list[LayerProfile]:
    """Time each *stage* (its layers run as one module) forward + backward, like :func:`profile_layers` does layers."""
    layers = as_layers(layers)
    cuts = validate_cuts(cuts, len(layers))
    edges = [0, *cuts, len(layers)]
    stages = [torch.nn.Sequential(*layers[a:b]) for a, b in zip(edges, edges[1:])]
    return profile_layers(stages, sample, repeats=repeats, warmup=warmup)


def stage_profile_gap(layers, cuts, sample: torch.Tensor, rounds: int = 5, warmup: int = 1) -> dict:
    """Why a stage's predicted time (the sum of its layers, each profiled alone) differs from the stage measured whole.

    Both are timed in the same ``rounds``, one right after the other (the order alternating), so that a load spike
    on a shared machine hits both; a profile and a stage timed seconds apart can differ by the load alone. Also
    times a layer that does nothing (``nn.Identity``) the way :func:`profile_layers` times every layer: the fixed
    cost of timing a layer on its own (timers, the saved-tensor hooks, one autograd call), which a stage of k
    layers pays k times in the sum but once measured whole. Returns per stage (lists): ``layer_sum_ms`` and
    ``stage_ms`` (medians over the rounds), ``ratio`` (median of the per-round ratios sum / stage),
    ``n_layers``, ``fixed_excess_ms`` ((k - 1) x the fixed cost), and ``overhead_ms`` (the fixed cost).
    """
    layers = as_layers(layers)
    cuts = validate_cuts(cuts, len(layers))
    rounds = validate_int("rounds", rounds, minimum=1)
    warmup = validate_int("warmup", warmup, minimum=0)
    edges = [0, *cuts, len(layers)]
    n_layers = [b - a for a, b in zip(edges, edges[1:])]
    noop = [torch.nn.Identity()]
    sums: list[list[float]] = [[] for _ in n_layers]
    whole: list[list[float]] = [[] for _ in n_layers]
    ratios: list[list[float]] = [[] for _ in n_layers]
    fixed: list[float] = []
    for k in range(warmup + rounds):
        def by_layer():
            times = [p.time_ms for p in profile_layers(layers, sample, repeats=1, warmup=0)]
            return [sum(times[a:b]) for a, b in zip(edges, edges[1:])]

        def by_stage():
            return [s.time_ms for s in measure_stages(layers, cuts, sample, repeats=1, warmup=0)]

        if k % 2:
            st, sm = by_stage(), by_layer()
        else:
            sm, st = by_layer(), by_stage()
        empty = profile_layers(noop, sample, repeats=1, warmup=0)[0].time_ms
        if k >= warmup:
            fixed.append(empty)
            for i in range(len(n_layers)):
                sums[i].append(sm[i])
                whole[i].append(st[i])
                ratios[i].append(sm[i] / st[i] if st[i] > 0 else float("inf"))
    overhead = statistics.median(fixed)
    return {"layer_sum_ms": [statistics.median(v) for v in sums], "stage_ms": [statistics.median(v) for v in whole],
            "ratio": [statistics.median(v) for v in ratios], "n_layers": n_layers,
            "fixed_excess_ms": [(n - 1) * overhead for n in n_layers], "overhead_ms": overhead}


@renamed_kwargs(k="n_stages", m="n_micro")
@dataclass
class Comparison:
    """What :func:`compare_splits` found; ``rows`` is one dict per split."""

    model: str
    n_stages: int
    batch: int
    n_micro: int
    profile: list  # LayerProfile per layer, at micro-batch size
    splits: dict  # name -> cuts
    rows: list = field(default_factory=list)
    runs: dict = field(default_factory=dict)  # name -> labkit.pipeline.PipelineRun (if pipeline=True)
    predicted_events: dict = field(default_factory=dict)  # name -> GPipe timeline predicted from measured stages
    device: str = "cpu"  # where the profile, the stage measurements and the pipeline's ranks ran

    def table(self) -> list[dict]:
        """Rows for ``labkit.viz.format_table`` / ``table_html`` (times in ms, lists rounded)."""
        out = []
        for r in self.rows:
            row = {"split": r["split"], "cuts": str(r["cuts"]), "sizes": str(r["sizes"]),
                   "predicted stage ms": _fmt(r["predicted_stage_ms"]),
                   "measured stage ms": _fmt(r["measured_stage_ms"]),
                   "predicted step ms": r["predicted_step_ms"]}
            if "pipeline_step_ms" in r:
                row["pipeline step ms"] = r["pipeline_step_ms"]
                row["samples/s"] = r["samples_per_s"]
            out.append(row)
        return out

    def plot(self, axes=None):
        """Bars of predicted and measured stage times per split (one panel per split)."""
        import matplotlib.pyplot as plt

        if axes is None:
            _, axes = plt.subplots(1, len(self.rows), figsize=(4 * len(self.rows), 3), sharey=True, squeeze=False)
            axes = axes[0]
        for ax, r in zip(axes, self.rows):
            xs = range(len(r["cuts"]) + 1)
            ax.bar([x - 0.2 for x in xs], r["predicted_stage_ms"], 0.4, label="predicted (sum of layers)",
                   color="#9ecae9")
            ax.bar([x + 0.2 for x in xs], r["measured_stage_ms"], 0.4, label="measured (stage)", color="#4c78a8")
            ax.axhline(max(r["measured_stage_ms"]), color="#c33", lw=1, ls="--")
            ax.set_xticks(list(xs))
            ax.set_xticklabels([f"stage {s}\n{n} layers" for s, n in zip(xs, r["sizes"])])
            ax.set_title(f"{r['split']}: cuts {r['cuts']}")
        axes[0].set_ylabel("forward+backward ms per micro-batch")
        axes[0].legend(fontsize=7)
        return axes


def _fmt(xs) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in xs) + "]"


def _pipeline_device(device, n_stages: int, pipeline: bool = True) -> tuple[torch.device, str]:
    """``(device, backend)``: where :func:`compare_splits` profiles and measures, and the backend its
    ``n_stages``-rank pipeline launches with, so that both run on one kind of device (see its docstring)."""
    from ..runtime.launcher import choose_backend

    auto, reason = choose_backend(n_stages)
    ranks_on = "cuda" if auto == "nccl" else "cpu"
    if device is None:
        return torch.device(ranks_on), "auto"
    device = torch.device(device)
    if not pipeline or device.type == ranks_on:
        return device, "auto"
    if device.type == "cpu":
        return device, "gloo"  # asked for the CPU on a GPU machine: the ranks too
    raise ValueError(f"device={str(device)!r}, but a pipeline of n_stages={n_stages} stages runs its ranks on the "
                     f"CPU here ({reason}), and a profile on one device predicts nothing about a run on another: "
                     f"pass device='cpu', n_stages <= the number of GPUs, or pipeline=False to profile on "
                     f"{device.type} alone")


@renamed_kwargs(k="n_stages", m="n_micro")
def compare_splits(model: str = "small", n_stages: int = 2, batch: int = 16, n_micro: int = 4,
                   splits: dict | None = None, repeats: int = 3, pipeline: bool = True, schedule: str = "gpipe",
                   seed: int = 0, profile: list | None = None, timeout: float = 120, baselines: bool = True,
                   stage_repeats: int = 5, device: str | None = None) -> Comparison:
    """Even vs time-balanced (and any ``splits`` you add) for ``model`` cut into ``n_stages`` stages.

    Profiles the layers at micro-batch size ``batch // n_micro`` (or reuses ``profile``), solves the
    exact time balance, measures each stage, predicts a GPipe step from the measured stage times,
    and (``pipeline=True``) runs ``repeats`` real GPipe steps on ``n_stages`` ranks per split.
    ``splits`` adds named cuts of your own; ``baselines=False`` keeps only those. Each stage is
    timed ``stage_repeats`` times (median); that is cheap, a few ms per stage. ``device``: where the
    profile and the stage measurements run; the pipeline's ranks run there too, so that the prediction and
    the run it is compared with time the same hardware. Default: where ``backend="auto"`` puts ``n_stages`` ranks,
    ``cuda`` when there is a GPU per stage (NCCL), else ``cpu`` (gloo; one GPU cannot hold two NCCL ranks).
    ``device="cpu"`` on a GPU machine runs the pipeline on gloo; ``device="cuda"`` with fewer GPUs than stages
    is refused (the pipeline could not run there). ``Comparison.device`` says where it all ran.
    """
    n_stages = validate_int("n_stages (stages, one rank each)", n_stages, minimum=1)
    n_micro = validate_int("n_micro (micro-batches)", n_micro, minimum=1)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < n_micro:
        raise ValueError(f"batch must be an int >= n_micro={n_micro} (every micro-batch needs a row), got {batch!r}")
    if batch % n_micro:
        raise ValueError(f"a batch of {batch} does not divide into {n_micro} equal micro-batches; the pipeline would "
                         f"run micro-batches of different sizes, which the stage profile (one micro-batch size) "
                         f"cannot predict. Pass a batch that is a multiple of n_micro, e.g. "
                         f"{batch - batch % n_micro or n_micro}")
    device, backend = _pipeline_device(device, n_stages, pipeline)
    layers = lab_model(model, seed).to(device)
    extra = {name: validate_cuts(cuts, len(layers), n_stages) for name, cuts in (splits or {}).items()}
    micro = micro_sample(model, batch // n_micro, seed).to(device)
    if profile is None:
        profile = profile_layers(layers, micro, repeats=repeats)
    elif len(profile) != len(layers):
        raise ValueError(f"profile has {len(profile)} layers but {model} has {len(layers)}; profile this model")
    plan = ({"even": even_cuts(len(layers), n_stages), "balanced": balance_by_time(profile, n_stages).cuts}
            if baselines else {})
    plan.update(extra)
    if not plan:
        raise ValueError("nothing to compare: pass splits={'name': cuts} or keep baselines=True")
    cmp = Comparison(model, n_stages, batch, n_micro, profile, plan, device=str(device))
    times = [p.time_ms for p in profile]
    x_full = micro_sample(model, batch, seed + 1)
    y_full = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(seed + 2))
    for name, cuts in plan.items():
        stages = measure_stages(layers, cuts, micro, repeats=stage_repeats)
        f, b = [s.forward_ms for s in stages], [s.backward_ms for s in stages]
        step_ms, events = gpipe_timeline(f, b, n_micro)
        row = {"split": name, "cuts": cuts, "sizes": [len(x) for x in stage_ranges(cuts, len(layers))],
               "predicted_stage_ms": stage_sums(times, cuts),
               "measured_stage_ms": [s.time_ms for s in stages], "predicted_step_ms": step_ms}
        cmp.predicted_events[name] = events
        if pipeline:
            from ..pipeline import ModelStages, run_pipeline

            run = run_pipeline(ModelStages(model, cuts=cuts, seed=seed), n_stages, (x_full, y_full), n_micro,
                               schedule=schedule, repeats=repeats, timeout=timeout, pool=True, backend=backend)
            cmp.runs[name] = run
            row["pipeline_step_ms"] = run.seconds * 1e3
            row["samples_per_s"] = batch / run.seconds
            row["loss"] = run.loss
        cmp.rows.append(row)
    return cmp


@renamed_kwargs(k="n_stages", m="n_micro")
def sleep_pipeline(forward_ms=(10, 20, 30, 40, 50, 60), n_stages: int = 2, n_micro: int = 4,
                   backward_ratio: float = 1.0, splits: dict | None = None, repeats: int = 1,
                   timeout: float = 120) -> Comparison:
    """Even vs balanced split of layers that *sleep* (known costs, no CPU used), run as a real GPipe pipeline.

    Sleeping needs no CPU, so the measured step matches the GPipe prediction even on a busy 2-core
    machine: the cleanest way to see the slowest stage set the pace. Measured stage times are
    each rank's busy time (forward + backward) divided by ``n_micro``.
    """
    from ..pipeline import ModelStages, run_pipeline

    costs = [f * (1 + backward_ratio) for f in forward_ms]
    n = len(costs)
    plan = {"even": even_cuts(n, n_stages), "balanced": balance_by_time(costs, n_stages).cuts}
    for name, cuts in (splits or {}).items():
        plan[name] = validate_cuts(cuts, n, n_stages)
    cmp = Comparison("sleep", n_stages, 2 * n_micro, n_micro, None, plan)
    build = functools.partial(sleep_layers, list(forward_ms), backward_ratio)
    x, y = torch.ones(2 * n_micro, 3), torch.zeros(2 * n_micro, 3)
    for name, cuts in plan.items():
        f = stage_sums(list(forward_ms), cuts)
        step_ms, events = gpipe_timeline(f, [v * backward_ratio for v in f], n_micro)
        cmp.predicted_events[name] = events
        run = run_pipeline(ModelStages(build, cuts=cuts), n_stages, (x, y), n_micro, schedule="gpipe",
                           repeats=repeats, timeout=timeout, pool=True)
        cmp.runs[name] = run
        cmp.rows.append({"split": name, "cuts": cuts, "sizes": [len(r) for r in stage_ranges(cuts, n)],
                         "predicted_stage_ms": stage_sums(costs, cuts),
                         "measured_stage_ms": [b * 1e3 / n_micro for b in run.busy], "predicted_step_ms": step_ms,
                         "pipeline_step_ms": run.seconds * 1e3, "samples_per_s": 2 * n_micro / run.seconds,
                         "loss": run.loss})
    return cmp
