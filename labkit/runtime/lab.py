"""Lab 00 (start here): the rank function the first notebook and ``python -m labkit run`` use, its exercise check,
and the tour.

``hello_rank`` is the smallest real job: every rank prints, then all ranks all-reduce their rank numbers.
``check_prediction`` checks the notebook's exercise (predict an all-reduce's max and sum).
``tour(world_size)`` checks a real launch, a pooled re-run, and the shared data helpers.
``course_map()`` lists every lab of the course, from ``labkit.tour.LABS`` and each notebook's own title.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from ..checks import CheckResult, expect_close, refusing_launches, rng_for, run_cases
from ..data import labelled_split, load_digits, semi_supervised_targets, shard_indices, train_test_split_digits
from ..tour import LABS, lab_name, run_check
from .launcher import Pool, launch

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"  # the course's notebooks, in a source checkout


def notebook_title(path) -> str:
    """What a lab notebook is about, from its first heading: ``"# Lab 04 — Pipeline parallelism: ..."`` gives
    ``"Pipeline parallelism: ..."``. ``""`` when the notebook is not there (an installed wheel has no notebooks)."""
    path = Path(path)
    if not path.is_file():
        return ""
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        first = "".join(cell["source"]).strip().splitlines()[0] if "".join(cell["source"]).strip() else ""
        if first.startswith("# "):  # drop "# ", "Lab 04", "00" and the separator after them
            title = re.sub(r"^#\s+(Lab\s+)?\d+\s*[—:·-]?\s*", "", first).strip()
            return title[:1].upper() + title[1:] if title[:2] != "k-" else title  # "k-means" keeps its k
    return ""


def course_map(notebooks=None) -> list[dict]:
    """One row per lab of the course, in order, from :data:`labkit.tour.LABS` (the list the tour runs, so no lab
    can be missing): ``{"lab", "about", "notebook", "benchmark"}``. ``about`` is the notebook's own title (read
    from ``notebooks``, the course's folder by default); ``benchmark`` the command that measures the lab on a
    bigger machine, or ``""``."""
    folder = NOTEBOOKS if notebooks is None else Path(notebooks)
    if not folder.is_dir():
        raise ValueError(f"notebooks={str(notebooks)!r} is not a folder; pass the course's notebooks folder, "
                         f"or None for {NOTEBOOKS}")
    return [{"lab": lab.name, "about": notebook_title(folder / lab.notebook) if lab.notebook else "",
             "notebook": lab.notebook or "",
             "benchmark": f"python -m labkit bench {lab.bench}" if lab.bench else ""} for lab in LABS]


def hello_rank(ctx):
    """Every rank says hello, then all ranks all-reduce their rank numbers (the result is 0+1+...+(n-1))."""
    import torch
    import torch.distributed as dist

    print(f"hello from rank {ctx.rank} of {ctx.world_size} on {ctx.device} ({ctx.backend})")
    t = torch.tensor([float(ctx.rank)], device=ctx.device)
    dist.all_reduce(t)
    return t.item()


def max_and_sum_rank(ctx):
    """Rank r contributes r + 1; returns the all-reduced (max, sum)."""
    import torch
    import torch.distributed as dist

    a = torch.tensor([ctx.rank + 1.0], device=ctx.device)
    b = a.clone()
    dist.all_reduce(a, op=dist.ReduceOp.MAX)
    dist.all_reduce(b, op=dist.ReduceOp.SUM)
    return a.item(), b.item()


def check_prediction(predict, world_sizes=(1, 2, 3, 4), seed: int | None = None) -> CheckResult:
    """Lab 00 exercise: ``predict(world_size) -> (max, sum)`` after each rank r contributes r + 1.

    Each prediction for 1-4 ranks is compared with a real all-reduce; two more world sizes drawn at check time (5 to
    64, too many ranks to start here) are compared with the rule those runs confirm, so a table of the four tested
    answers fails. A ``predict`` that runs ranks itself (calls ``labkit.launch``) fails before it starts any process:
    the exercise is to work the values out.
    """
    extra = sorted(rng_for(seed).sample(range(5, 65), 2))

    def guess(n):
        why = (f"predict({n}) tried to run ranks itself (it called labkit.launch or a Pool); work the values out "
               f"from what each rank holds instead: the check runs the real all-reduce")
        with refusing_launches(why):  # before any process starts, however many ranks it asked for
            g = predict(n)  # first, so a stub is "not attempted" without starting ranks
        try:
            g_max, g_sum = g
        except (TypeError, ValueError):
            raise AssertionError(f"return a pair (max_value, sum_value), got {g!r}") from None
        return g_max, g_sum

    def real(n):
        def thunk():
            g_max, g_sum = guess(n)
            got = launch(max_and_sum_rank, n, pool=True, echo=False)[0]
            expect_close(g_max, got[0], what=f"max with {n} ranks")
            expect_close(g_sum, got[1], what=f"sum with {n} ranks")
        return thunk

    def rule(n):
        def thunk():
            g_max, g_sum = guess(n)
            expect_close(g_max, n, what=f"max with {n} ranks (not run: the rule the real runs confirm)")
            expect_close(g_sum, n * (n + 1) / 2, what=f"sum with {n} ranks (not run: the rule the real runs confirm)")
        return thunk

    cases = ([(f"world size {n}", real(n)) for n in world_sizes]
             + [(f"world size {n} (by rule)", rule(n)) for n in extra])
    return run_cases("predict all-reduce results", cases,
                     hint="rank r holds r + 1, so the values are 1, 2, ..., n: write max and sum as formulas in n")


def tour(world_size: int = 2) -> list[dict]:
    """The start-here lab's quick path: a real launch and all-reduce, a pooled re-run, then the data helpers."""
    expected = world_size * (world_size - 1) / 2
    state = {}

    def first():
        t0 = time.perf_counter()
        got = state["pool"].run(hello_rank, timeout=120)
        state["got"] = list(got)
        return list(got) == [expected] * world_size, f"got {list(got)}, {time.perf_counter() - t0:.1f} s incl. start-up"

    def again():
        t0 = time.perf_counter()
        got = state["pool"].run(hello_rank, timeout=60)
        return list(got) == state.get("got"), f"{(time.perf_counter() - t0) * 1e3:.1f} ms"

    with Pool(world_size, quiet=True, echo=False) as pool:
        state["pool"] = pool
        rows = [run_check(lab_name(__package__), f"{world_size}-rank all-reduce of ranks = {expected:g}", first),
                run_check(lab_name(__package__), "pooled re-run gives the same result", again)]
    return rows + data_rows()


def data_rows() -> list[dict]:
    """Quick self-checks of the shared data helpers (no processes, no network, about a second)."""
    from torch.utils.data import DistributedSampler

    rows = []

    def check(name, fn):
        rows.append(run_check("00 data", name, fn))

    def digits():
        X, y = load_digits()
        Xi, _ = load_digits(as_="images")
        ok = X.shape == (1797, 64) and tuple(Xi.shape) == (1797, 1, 8, 8) and 0 <= X.min() and X.max() <= 1
        return ok, f"X {X.shape} in [{X.min():.0f}, {X.max():.0f}], images {tuple(Xi.shape)}, {len(set(y))} classes"

    def sharding():
        cases = 0
        for n in (10, 17):
            for w in (2, 3, 4):
                for drop_last in (False, True):
                    for epoch in (0, 1):
                        for r in range(w):
                            s = DistributedSampler(range(n), num_replicas=w, rank=r, seed=3, drop_last=drop_last)
                            s.set_epoch(epoch)
                            if shard_indices(n, r, w, seed=3, epoch=epoch, drop_last=drop_last) != list(s):
                                return False, f"differs at n={n}, world={w}, rank={r}, drop_last={drop_last}"
                            cases += 1
        return True, f"{cases} (n, world, rank, drop_last, epoch) cases identical"

    def labelled():
        _, _, ytr, _ = train_test_split_digits(0.5, seed=0)
        lab, unlab = labelled_split(ytr, 5, seed=0)
        counts = np.bincount(ytr[lab], minlength=10)
        y_semi = semi_supervised_targets(ytr, 5, seed=0)
        ok = (counts == 5).all() and len(lab) + len(unlab) == len(ytr) and (y_semi == -1).sum() == len(unlab)
        return ok, f"{len(lab)} labelled (5 per class), {len(unlab)} unlabelled (-1)"

    check("digits: (1797, 64) arrays and (1797, 1, 8, 8) images", digits)
    check("shard_indices == DistributedSampler", sharding)
    check("labelled_split: K=5 per class, rest -1", labelled)
    return rows
