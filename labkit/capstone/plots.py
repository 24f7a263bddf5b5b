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
