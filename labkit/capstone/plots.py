"""Pictures for lab 11: the mesh, the bytes per group beside the formulas, loss curves, the planner's choices."""
from __future__ import annotations

from ..runtime.mesh import coords_of, layout, members_of

COLOURS = {"dp": "tab:blue", "pp": "tab:orange", "tp": "tab:green"}


def mesh_picture(dp: int, pp: int, tp: int, rank: int = 0, ax=None):
    """The grid of global ranks: one panel per dp replica, stages down, tensor-parallel ranks across; ``rank``'s
    dp, pp and tp groups outlined in their colours."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    grid = layout(dp, pp, tp)
    if ax is None:
        _, ax = plt.subplots(figsize=(min(2.0 + 1.3 * dp * (tp + 0.6), 11), 0.9 + 0.7 * pp))
    mem = members_of(rank, dp, pp, tp)
    for d in range(dp):
        x0 = d * (tp + 0.6)
        ax.text(x0 + tp / 2, pp + 0.15, f"dp replica {d}", ha="center", va="bottom", fontsize=9)
        for p in range(pp):
            for t in range(tp):
                g = grid[d][p][t]
                y = pp - 1 - p
                face = "#fde9a9" if g == rank else "white"
                ax.add_patch(Rectangle((x0 + t, y), 0.92, 0.86, facecolor=face, edgecolor="grey"))
                ax.text(x0 + t + 0.46, y + 0.43, str(g), ha="center", va="center", fontsize=10)
                for k, dim in enumerate(("dp", "pp", "tp")):
                    if g in mem[dim] and mem[dim] != [rank]:
                        ax.plot(x0 + t + 0.15 + 0.3 * k, y + 0.12, "s", color=COLOURS[dim], ms=5)
    for dim in ("dp", "pp", "tp"):
        ax.plot([], [], "s", color=COLOURS[dim], label=f"{dim} group of rank {rank}: {mem[dim]}")
    c = coords_of(rank, dp, pp, tp)
    ax.set_xlim(-0.2, dp * (tp + 0.6))
    ax.set_ylim(-0.2, pp + 0.6)
    ax.set_yticks([pp - 1 - p + 0.43 for p in range(pp)], [f"stage {p}" for p in range(pp)])
    ax.set_xticks([])
    ax.set_title(f"{dp}×{pp}×{tp} mesh: rank = (dp·{pp} + pp)·{tp} + tp; rank {rank} is at "
                 f"dp={c['dp']}, pp={c['pp']}, tp={c['tp']}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    return ax


def bytes_bars(runs: list, predicted: list, ax=None):
    """Payload per rank per step of each group, measured (bars) and predicted by the formulas (black ticks)."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.4))
    groups = ("dp", "pp", "tp")
    x = np.arange(len(runs))
    w = 0.26
    for k, g in enumerate(groups):
        meas = [sum(r.bytes.get(g, {}).values()) / 1e3 for r in runs]
        pred = [sum(p.get(g, {}).values()) / 1e3 for p in predicted]
        ax.bar(x + (k - 1) * w, meas, w, color=COLOURS[g], label=f"{g} measured")
        ax.scatter(x + (k - 1) * w, pred, marker="_", s=300, color="black", zorder=3,
                   label="formula" if k == 0 else None)
    ax.set_xticks(x, [r.shape for r in runs])
    ax.set_ylabel("kB per rank per step (payload)")
    ax.set_title("Bytes each group carries, measured against the formulas")
    ax.legend(fontsize=8, ncol=2)
    return ax


def planner_chart(candidates: list, gpu_memory_gb: float, top: int = 12, ax=None):
    """Memory per GPU of the planner's candidates (feasible in colour, ruled out in grey) against the GPU."""
    import matplotlib.pyplot as plt

    cands = candidates[:top]
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.2))
    names = [f"{c.dp}×{c.pp}×{c.tp}" for c in cands]
    ax.bar(names, [c.memory_gb for c in cands], color=["tab:green" if not c.reasons else "lightgrey" for c in cands])
    ax.axhline(gpu_memory_gb, color="tab:red", ls="--", label=f"GPU memory {gpu_memory_gb:g} GB")
    ax.set_ylabel("GB per GPU")
    ax.set_xlabel("dp × pp × tp, best first")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
    return ax


def published_bars(table: list, ax=None):
    """Narayanan et al. 2021, Table 1: TFLOP/s per GPU published (grey) beside predicted (blue), one pair per row
    of :func:`labkit.capstone.published.megatron_table`; the row the constants were fitted on is hatched, and each
    pair carries its error (predicted / published - 1)."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.2))
    x = np.arange(len(table))
    w = 0.38
    ax.bar(x - w / 2, [r["published"] for r in table], w, color="lightgrey", edgecolor="grey",
           label="published (Table 1)")
    pred = ax.bar(x + w / 2, [r["predicted"] for r in table], w, color="tab:blue", label="predicted")
    for bar, r in zip(pred, table):
        if r.get("fit"):
            bar.set_hatch("//")
            bar.set_edgecolor("white")
        top = max(r["published"], r["predicted"])
        ax.annotate(f"{100 * r['error']:+.0f}%" + (" (fit)" if r.get("fit") else ""), (bar.get_x(), top),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"{r['params B']:g}B\n{r['GPUs']}" for r in table], fontsize=8)
    ax.set_xlabel("parameters, GPUs")
    ax.set_ylabel("TFLOP/s per GPU")
    ax.set_ylim(0, 1.3 * max(max(r["published"], r["predicted"]) for r in table))
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    return ax


def step_timeline(events: list, ax=None, title: str | None = None, sends: bool = False, lane_name: str = "stage"):
    """One step's Gantt chart (:attr:`labkit.capstone.simulator.StepResult.events`), drawn fast: one collection of
    rectangles per kind, in :data:`labkit.viz.KIND_COLOURS` (:func:`labkit.viz.gantt` draws one bar per event, which
    takes minutes for a 64-stage pipeline's tens of thousands). The pipeline messages' lanes (``"<rank> send"``) are
    left out unless ``sends``. Time in seconds."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.collections import PolyCollection

    from ..viz import KIND_COLOURS

    shown = [e for e in events if sends or e.get("kind") != "send"]
    if not shown:
        raise ValueError("step_timeline() got no events to draw: pass simulator.predict(...).events")
    lanes = sorted({e["lane"] for e in shown}, key=lambda x: (str(type(x)), x))
    y_of = {lane: i for i, lane in enumerate(lanes)}
    boxes = {}
    for e in shown:
        boxes.setdefault(e.get("kind", "compute"), []).append((e["start"], e["end"], y_of[e["lane"]]))
    if ax is None:
        _, ax = plt.subplots(figsize=(10, min(7.0, 1.0 + 0.3 * len(lanes))))
    for kind, b in boxes.items():
        x0, x1, y = (np.array(v, dtype=float) for v in zip(*b))
        verts = np.stack([np.stack([x0, y - 0.45], 1), np.stack([x0, y + 0.45], 1),
                          np.stack([x1, y + 0.45], 1), np.stack([x1, y - 0.45], 1)], 1)
        ax.add_collection(PolyCollection(verts, facecolors=KIND_COLOURS.get(kind, "#888888"), linewidths=0,
                                         antialiaseds=False, label=kind))
    every = max(1, len(lanes) // 16)
    ax.set_yticks(range(0, len(lanes), every), [f"{lane_name} {lanes[i]}" for i in range(0, len(lanes), every)],
                  fontsize=8)
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_xlim(0, max(e["end"] for e in shown))
    ax.set_xlabel("time (s)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def mfu_sweeps(sweeps: dict, axes=None):
    """One small line plot per sweep, ``{title: {"x": [...], "mfu": [...], "fits": [...], "xlabel": str}}``: the
    model FLOPs utilisation (percent) against the swept value (log scale), a hollow marker where the layout does not
    fit in the GPU's memory. Returns the axes."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, len(sweeps), figsize=(2.6 * len(sweeps), 2.6), sharey=True, squeeze=False)
        axes = axes[0]
    for ax, (title, s) in zip(axes, sweeps.items()):
        x, mfu = s["x"], [100 * v for v in s["mfu"]]
        ax.plot(x, mfu, "o-", color="tab:blue", ms=4)
        out = [(a, b) for a, b, fits in zip(x, mfu, s["fits"]) if not fits]
        if out:
            ax.scatter(*zip(*out), s=30, facecolor="white", edgecolor="tab:red", zorder=3,
                       label="does not fit")
            ax.legend(fontsize=7, loc="lower left")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel(s["xlabel"], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MFU (%)")
    return axes
