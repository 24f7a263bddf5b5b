"""``python -m labkit bench context_expert``: lab 12's ring attention and mixture of experts, measured beside formulas.

Each round launches 1, 2 and 4 ranks in turn (:func:`bench_rank`), so the one-process baselines and the parallel
runs share the machine's noise; medians over the rounds are printed. On each launch:

1. **Ring attention** (forward + backward, float32, both layouts): every rank times its steps and the part of them
   spent in the ring's sends and waits (``ring._exchange`` wrapped while it runs); the rest is its *compute time*.
   The busiest and the least busy rank's compute, beside the same ranks' forward blocks run one after the other in
   the 1-rank process (no contention, no messages) and :func:`~labkit.context_expert.ring.work_each_rank` (the
   (query, key) pairs each computes): contiguous's imbalance against zigzag's. The bytes each rank sent (the
   ring's ``stats``) beside :func:`~labkit.context_expert.ring.ring_bytes`; the step time against one process's
   ``scaled_dot_product_attention`` on the whole sequence (the 1-rank launch).
2. **Activation memory per rank** (:func:`~labkit.context_expert.measure.cp_memory_rank`: lab 11's TinyGPT with its
   sequence split) against sequence length and cp, with its ratio to one process (1/cp expected).
3. **Mixture of experts**: tokens per expert after training with and without Switch's balance loss (lab 12's
   ``balance_run``, in this process); the assignments dropped against the capacity factor (k = 1 and 2, those
   routers); the all-to-all bytes each rank sent, counted at ``dist.all_to_all_single``
   (:func:`~labkit.context_expert.measure.count_all_to_all`), beside
   :func:`~labkit.context_expert.moe.all_to_all_bytes` of the rows the routing sends; the expert-parallel step time
   on 2 and 4 ranks (each rank 1/ep of the tokens) against the same MoE in one process on all of them.

``--torch-cp`` adds a comparison with PyTorch's own context parallelism (:func:`torch_cp_compare`), on CUDA only.

The module is long because it holds three benches' rank code and tables (the ring, the memory, the experts) and
the comparison with torch's context parallelism, which must live beside them to reuse the same inputs.

On the 2-core CPU machine 4 ranks share 2 cores, so the times show the ring's shape (who waits for whom), not what
it gains on GPUs; the bytes and pair counts do not depend on the machine.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ..devices import now
from ..viz import format_table
from . import ring
from .measure import balance_run, count_all_to_all, cp_memory_rank, expected_a2a_rows
from .moe import ExpertParallelMoE, MoE, all_to_all_bytes, capacity, route

__all__ = ["bench_rank", "ring_rows", "memory_rows", "moe_rows", "balance_rows", "drop_rows", "torch_cp_rank",
           "torch_cp_compare", "measure", "main"]


def _qkv(batch, heads, seq, head_dim, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, head_dim, generator=g).to(device) for _ in range(4)]


class _TimedWork:
    def __init__(self, work, clock):
        self.work, self.clock = work, clock

    def wait(self):
        t0 = time.perf_counter()
        out = self.work.wait()
        self.clock["comm"] += time.perf_counter() - t0
        return out


def _ring_step(q, k, v, dout, layout, device, clock):
    """One forward + backward of ring attention on this rank: (seconds, comm seconds, stats)."""
    mine = [t.clone().requires_grad_(True) for t in (q, k, v)]
    stats: dict = {}
    clock["comm"] = 0.0
    t0 = now(device)
    out = ring.ring_attention(*mine, layout=layout, stats=stats)
    out.backward(dout)
    t1 = now(device)
    return t1 - t0, clock["comm"], stats


def _blocks_alone(q, k, v, cp, layout, device, repeats) -> list[float]:
    """Per rank of ``cp``: the seconds of its forward blocks (:func:`ring.block` over the sub-blocks the ring computes
    for it, every step), run one rank after the other in this process: its compute with no other rank on the cores
    and no message."""
    seq, scale = q.shape[-2], 1 / math.sqrt(q.shape[-1])
    pos = [ring.positions(seq, cp, r, layout).to(q.device) for r in range(cp)]
    loc = [[ring.shard(t, cp, r, layout) for t in (q, k, v)] for r in range(cp)]
    times: list[list[float]] = [[] for _ in range(cp)]
    for rep in range(repeats + 1):
        for r in range(cp):   # the ranks interleaved, so that a burst of load does not land on one rank only
            t0 = now(device)
            for s in range(cp):
                src = (r - s) % cp
                for (a, b), (c, d) in ring._pairs(pos[r], pos[src], layout):
                    ring.block(loc[r][0][..., a:b, :], loc[src][1][..., c:d, :], loc[src][2][..., c:d, :],
                               pos[r][a:b], pos[src][c:d], scale)
            if rep:
                times[r].append(now(device) - t0)
    return [statistics.median(t) for t in times]


def _ring_part(ctx, seq, heads, head_dim, batch, steps, alone_cps=(2, 4)):
    cp, r = ctx.world_size, ctx.rank
    q, k, v, dout = _qkv(batch, heads, seq, head_dim, ctx.device)
    out = {}
    if cp == 1:  # the baseline: one process's attention on the whole sequence (torch's kernel), and labkit's ring
        alone = {f"{c} {lay}": _blocks_alone(q, k, v, c, lay, ctx.device, max(7, steps)) for c in alone_cps
                 for lay in ring.LAYOUTS}
        times = {"sdpa": [], "ring": []}
        for s in range(steps + 1):
            full = [t.clone().requires_grad_(True) for t in (q, k, v)]
            t0 = now(ctx.device)
            F.scaled_dot_product_attention(*full, is_causal=True).backward(dout)
            t1 = now(ctx.device)
            sec, _, _ = _ring_step(q, k, v, dout, "zigzag", ctx.device, {"comm": 0.0})
            if s:  # the first step warms up
                times["sdpa"].append(t1 - t0)
                times["ring"].append(sec)
        return {"sdpa s": statistics.median(times["sdpa"]), "ring1 s": statistics.median(times["ring"]),
                "alone": alone}
    clock = {"comm": 0.0}
    orig = ring._exchange

    def exchange(*a, **kw):
        t0 = time.perf_counter()
        got, works = orig(*a, **kw)
        clock["comm"] += time.perf_counter() - t0
        return got, [_TimedWork(w, clock) for w in works]

    ring._exchange = exchange   # counted while this launch's ring runs; put back below
    try:
        shards = {lay: [ring.shard(t, cp, r, lay) for t in (q, k, v, dout)] for lay in ring.LAYOUTS}
        got = {lay: {"step": [], "compute": []} for lay in ring.LAYOUTS}
        for s in range(steps + 1):
            for lay in ring.LAYOUTS:   # the layouts alternate, so both see the same noise
                ctx.barrier()
                sec, comm, stats = _ring_step(*shards[lay], lay, ctx.device, clock)
                if s:
                    got[lay]["step"].append(sec)
                    got[lay]["compute"].append(sec - comm)
                got[lay]["stats"] = stats
    finally:
        ring._exchange = orig
    for lay in ring.LAYOUTS:
        out[lay] = {"step s": statistics.median(got[lay]["step"]), "compute s": statistics.median(got[lay]["compute"]),
                    "sent": got[lay]["stats"],
                    "formula": ring.ring_bytes(batch, heads, seq, head_dim, cp, q.element_size())}
    return out


def _moe_part(ctx, tokens, width, ffn, experts, k, cf, steps):
    """Expert parallelism on this launch (1 rank: the plain MoE on every token, the baseline): step time, the bytes
    counted at all_to_all_single and the formula's."""
    ws, r = ctx.world_size, ctx.rank
    torch.manual_seed(0)
    moe = MoE(width, ffn, experts, k=k, capacity_factor=cf).to(ctx.device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, width, generator=g).to(ctx.device)
    # the layer's input needs its gradient, as inside a network: else the dispatch has no backward
    mine = x[r * tokens // ws:(r + 1) * tokens // ws]
    layer = moe if ws == 1 else ExpertParallelMoE(moe)
    times, counted = [], None
    for s in range(steps + 1):
        with count_all_to_all(ws, r) as count:
            t0 = now(ctx.device)
            y = layer(mine.clone().requires_grad_(True))
            count.phase = "backward"
            y.square().mean().backward()
            t1 = now(ctx.device)
        if s:
            times.append(t1 - t0)
        counted = count.bytes
    res = {"step s": statistics.median(times), "dropped": layer.last.dropped}
    if ws > 1:
        rows = expected_a2a_rows(layer.last, layer.per_rank, ws, r)
        res.update(counted=counted, sent_attr=layer.sent,
                   formula=all_to_all_bytes(rows["dispatch"], width, mine.element_size())
                   + all_to_all_bytes(rows["combine"], width, mine.element_size()), rows=rows)
    return res


def bench_rank(ctx, ring_cfg: dict, moe_cfg: dict, mem_seqs=(), steps: int = 3) -> dict:
    """One launch's measurements on this rank (see the module's docstring): ``{"ring", "moe", "memory"}``."""
    torch.set_num_threads(1)
    res = {"rank": ctx.rank, "backend": ctx.backend, "device": str(ctx.device),
           "ring": _ring_part(ctx, steps=steps, **ring_cfg), "moe": _moe_part(ctx, steps=steps, **moe_cfg)}
    if mem_seqs:
        res["memory"] = cp_memory_rank(ctx, seqs=tuple(mem_seqs))
    return res


# ----------------------------------------------------------------------------- tables
def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _table(rows: list[dict]) -> str:
    """format_table with every row given every column (it takes the columns from the first row)."""
    cols: list = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    return format_table([{c: r.get(c, "") for c in cols} for r in rows], floatfmt="{:.3g}")


def ring_rows(runs: dict, ring_cfg: dict) -> list[dict]:
    """Per (cp, layout): compute of the busiest and least busy rank (medians over rounds), their ratio beside the
    ratio of the ranks' forward blocks run alone in one process (``alone``) and the pair counts', the step time
    against one process, and the bytes each rank sent against ring_bytes."""
    base = [res[0]["ring"] for res in runs[1]]
    sdpa, ring1 = _median([b["sdpa s"] for b in base]), _median([b["ring1 s"] for b in base])
    rows = [{"cp": 1, "layout": "sdpa, 1 proc", "step ms": sdpa * 1e3, "vs 1 proc": 1.0},
            {"cp": 1, "layout": "ring, 1 rank", "step ms": ring1 * 1e3, "vs 1 proc": ring1 / sdpa}]
    for cp in sorted(w for w in runs if w > 1):
        for lay in ring.LAYOUTS:
            per = [[res[r]["ring"][lay] for res in runs[cp]] for r in range(cp)]   # per rank, per round
            comp = [_median([x["compute s"] for x in p]) for p in per]
            alone = [_median([b["alone"][f"{cp} {lay}"][i] for b in base]) for i in range(cp)]
            step = _median([max(res[r]["ring"][lay]["step s"] for r in range(cp)) for res in runs[cp]])
            work = ring.work_each_rank(ring_cfg["seq"], cp, lay)
            sent = [p[-1]["sent"] for p in per]
            formula = per[0][-1]["formula"]
            same = all(s.get("forward", 0) == formula["forward"] and s.get("backward", 0) == formula["backward"]
                       for s in sent)
            rows.append({"cp": cp, "layout": lay, "step ms": step * 1e3, "vs 1 proc": step / sdpa,
                         "compute max ms": max(comp) * 1e3, "min ms": min(comp) * 1e3,
                         "max/min": max(comp) / min(comp), "alone max/min": max(alone) / min(alone),
                         "pairs max/min": max(work) / min(work),
                         "pairs per rank": " ".join(map(str, work)),
                         "sent fwd kB": sent[0].get("forward", 0) / 1e3, "bwd kB": sent[0].get("backward", 0) / 1e3,
                         "= ring_bytes": "yes" if same else "NO"})
    return rows


def memory_rows(runs: dict) -> list[dict]:
    """Activation bytes per rank (the busiest rank) against seq and cp, as a ratio to one process's."""
    one = {m["seq"]: m["activation bytes"] for m in runs[1][0][0]["memory"]}
    rows = []
    for cp in sorted(runs):
        mem = [res["memory"] for res in runs[cp][0]]
        for i, seq in enumerate(one):
            act = max(m[i]["activation bytes"] for m in mem)
            same = all(m[i]["sent forward"] == m[i]["formula forward"] and m[i]["sent backward"] ==
                       m[i]["formula backward"] for m in mem)
            rows.append({"seq": seq, "cp": cp, "activation kB per rank": act / 1e3, "vs 1 proc": act / one[seq],
                         "1/cp": 1 / cp, "ring sent kB": mem[0][i]["sent forward"] / 1e3
                         + mem[0][i]["sent backward"] / 1e3, "= ring_bytes": "yes" if same else "NO"})
    return sorted(rows, key=lambda r: (r["seq"], r["cp"]))


def moe_rows(runs: dict) -> list[dict]:
    """Expert parallelism: step time against one process; all-to-all bytes counted against the formula."""
    base = _median([res[0]["moe"]["step s"] for res in runs[1]])
    rows = [{"ranks": 1, "setup": "MoE, 1 proc", "step ms": base * 1e3, "vs 1 proc": 1.0}]
    for ws in sorted(w for w in runs if w > 1):
        last = runs[ws][-1]
        step = _median([max(res[r]["moe"]["step s"] for r in range(ws)) for res in runs[ws]])
        fwd = [x["moe"]["counted"].get("forward", 0) for x in last]
        bwd = [x["moe"]["counted"].get("backward", 0) for x in last]
        formula = [x["moe"]["formula"] for x in last]
        rows.append({"ranks": ws, "setup": f"expert parallel, ep={ws}", "step ms": step * 1e3,
                     "vs 1 proc": step / base, "a2a fwd kB (rank 0)": fwd[0] / 1e3, "bwd kB": bwd[0] / 1e3,
                     "formula kB": formula[0] / 1e3,
                     "= all_to_all_bytes": "yes" if fwd == formula == bwd else "NO",
                     "index kB": last[0]["moe"]["counted"].get("forward meta", 0) / 1e3,
                     "dropped": sum(x["moe"]["dropped"] for x in last)})
    return rows


def balance_rows(steps: int = 200) -> tuple[list[dict], dict]:
    """Lab 12's balance_run with alpha 0 and 0.01: tokens per expert, max over mean, aux loss, mse; the routers'
    logits (for :func:`drop_rows`)."""
    rows, logits = [], {}
    for alpha in (0.0, 0.01):
        out = balance_run(alpha, steps=steps)
        tpe = out["tokens_per_expert"]
        rows.append({"balance loss": f"alpha {alpha:g}", "tokens per expert": " ".join(map(str, tpe)),
                     "max/mean": max(tpe) / (sum(tpe) / len(tpe)), "aux": out["aux"], "mse": out["mse"]})
        logits[alpha] = out["logits"]
    return rows, logits


def drop_rows(logits: dict, factors=(0.5, 1.0, 1.25, 1.5, 2.0)) -> list[dict]:
    """Assignments dropped by :func:`~labkit.context_expert.moe.route` for each router, k and capacity factor."""
    rows = []
    for alpha, lg in logits.items():
        t, e = lg.shape
        for k in (1, 2):
            for cf in factors:
                r = route(lg, k, cf)
                rows.append({"router": f"alpha {alpha:g}", "k": k, "capacity factor": cf,
                             "capacity C": capacity(t, e, k, cf), "dropped": r.dropped,
                             "dropped %": 100 * r.dropped / (t * k)})
    return rows


# ----------------------------------------------------------------------------- torch's context parallelism
def torch_cp_rank(ctx, seq: int = 256, heads: int = 4, head_dim: int = 64, batch: int = 2) -> dict:
    """On CUDA ranks (NCCL): PyTorch's ``context_parallel`` (torch >= 2.7) against labkit's ring attention on the same
    q, k, v, dout. Both results are gathered to whole sequences (torch's ``context_parallel_unshard``; labkit's
    :func:`~labkit.context_expert.ring.unshard_index`) and compared with one process's attention in float64.

    torch's ring maps only CUDA's flash, memory-efficient and cuDNN SDPA kernels (``_sdpa_handler``), so it runs in
    bfloat16 under each of those kernels in turn (one that fails is reported, the others still run); labkit's ring
    runs in float32. The sequence is cut the same way by both: torch's default head-tail load balancer (2·cp chunks,
    rank r holding r and 2cp-1-r) is labkit's zigzag layout, which this checks too."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cp, r, dev = ctx.world_size, ctx.rank, ctx.device
    mesh = init_device_mesh(torch.device(dev).type, (cp,), mesh_dim_names=("cp",))
    q, k, v, dout = _qkv(batch, heads, seq, head_dim, dev)
    full = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*full, is_causal=True)
    ref.backward(dout.double())
    want = [ref.detach(), *(t.grad for t in full)]

    def err(got, ref=want):   # the largest difference over output and gradients, relative to each one's largest value
        return max(float((g.double() - w.double()).abs().max() / w.double().abs().max()) for g, w in zip(got, ref))

    out = {"rank": r, "cp": cp, "device": str(dev), "torch": torch.__version__}
    # labkit's ring, zigzag, float32, gathered back to sequence order
    mine = [ring.shard(t, cp, r, "zigzag").clone().requires_grad_(True) for t in (q, k, v)]
    o = ring.ring_attention(*mine, layout="zigzag")
    o.backward(ring.shard(dout, cp, r, "zigzag"))
    order = ring.unshard_index(seq, cp, "zigzag").to(dev)
    gathered = []
    for t in (o.detach(), *(m.grad for m in mine)):
        parts = [torch.empty_like(t) for _ in range(cp)]
        dist.all_gather(parts, t.contiguous())
        gathered.append(torch.cat(parts, dim=2).index_select(2, order))
    out["labkit fp32 err"] = err(gathered)
    labkit_full = gathered
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        try:
            cq, ck, cv, cd = (t.to(torch.bfloat16).clone() for t in (q, k, v, dout))
            with context_parallel(mesh, buffers=[cq, ck, cv, cd], buffer_seq_dims=[2, 2, 2, 2]):
                # the local shards torch chose: labkit's zigzag rows of the whole tensors?
                same_cut = bool(torch.equal(cq, ring.shard(q.to(torch.bfloat16), cp, r, "zigzag")))
                try:
                    for t in (cq, ck, cv):
                        t.requires_grad_(True)
                    with sdpa_kernel(getattr(SDPBackend, name)):
                        co = F.scaled_dot_product_attention(cq, ck, cv, is_causal=True)
                        co.backward(cd)
                    local = [co.detach(), cq.grad, ck.grad, cv.grad]
                finally:   # the context resizes its buffers back on exit, which a tensor requiring grad refuses
                    for t in (cq, ck, cv):
                        t.requires_grad_(False)
            got = context_parallel_unshard(mesh, local, [2, 2, 2, 2])
            out[name] = {"ok": True, "err vs fp64": err(got), "zigzag cut": same_cut,
                         "vs labkit": err(got, labkit_full)}
        except Exception as e:   # one kernel failing (not built, not supported here) must not hide the others
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    return out


def torch_cp_compare(ranks: int | None = None, seq: int = 256, log=print) -> int:
    """Run :func:`torch_cp_rank` on as many CUDA ranks as this machine has GPUs (at most ``ranks``, default 4) and
    print the comparison; on a machine without CUDA, say it is skipped and why. Errors are the largest absolute
    difference over the output and the three gradients, each over that tensor's largest value. Returns 0 when it
    ran and every kernel that ran agreed (3e-2 in bfloat16; labkit's float32 ring 1e-4), 1 when something failed or
    no kernel ran (reported, never raised); a kernel that raises is reported in its row."""
    if not torch.cuda.is_available():
        log("torch context_parallel comparison: SKIPPED: no CUDA GPU here. torch's context parallelism maps only "
            "CUDA's flash, memory-efficient and cuDNN SDPA kernels (torch/distributed/tensor/experimental/"
            "_context_parallel/_attention.py, _sdpa_handler), so it cannot run on the CPU.")
        return 0
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 7):
        log(f"torch context_parallel comparison: SKIPPED: torch {torch.__version__} < 2.7")
        return 0
    import labkit

    n = max(1, min(ranks or 4, torch.cuda.device_count()))
    try:
        res = labkit.launch(torch_cp_rank, world_size=n, kwargs=dict(seq=seq), backend="nccl", echo=False,
                            quiet=True, timeout=300)
    except Exception as e:
        log(f"torch context_parallel comparison: FAILED to run: {type(e).__name__}: {e}")
        return 1
    log(f"torch context_parallel (torch {res[0]['torch']}) on {n} CUDA rank(s), NCCL, seq {seq}, bf16, against "
        f"float64 attention; labkit's ring (zigzag, float32) on the same ranks: largest relative error "
        f"{res[0]['labkit fp32 err']:.1e}" + (" (1 GPU: a 1-rank ring, the dispatch path only)" if n == 1 else ""))
    rows, bad = [], False
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        per = [x[name] for x in res]
        if all(p["ok"] for p in per):
            e, vs = max(p["err vs fp64"] for p in per), max(p["vs labkit"] for p in per)
            ok = e < 3e-2 and vs < 3e-2   # bfloat16 keeps 8 bits of mantissa: about 0.4% per value
            bad |= not ok
            rows.append({"kernel": name, "ran": "yes", "rel err vs fp64": e, "rel diff vs labkit": vs,
                         "zigzag cut": "yes" if all(p["zigzag cut"] for p in per) else "no",
                         "agrees": "yes" if ok else "NO"})
        else:
            rows.append({"kernel": name, "ran": "no", "error": next(p["error"] for p in per if not p["ok"])})
    log(_table(rows))
    bad |= res[0]["labkit fp32 err"] > 1e-4 or not any(r["ran"] == "yes" for r in rows)
    return 1 if bad else 0


# ----------------------------------------------------------------------------- the run
def measure(world_sizes=(2, 4), rounds: int = 3, steps: int = 3, ring_cfg=None, moe_cfg=None, mem_seqs=(64, 128, 256),
            timeout: float = 600, log=print) -> dict:
    """``rounds`` interleaved rounds of launches on 1 rank (the baselines) and on each of ``world_sizes``:
    ``{world size: [per-round list of per-rank results]}``. The memory is measured in the first round only (it does
    not vary)."""
    from ..runtime.launcher import Pool

    runs: dict = {}
    pools: dict = {}
    try:
        for rd in range(rounds):
            for ws in (1, *world_sizes):   # one pool of ranks per size, started once: later rounds pay no start-up
                pool = pools.get(ws) or pools.setdefault(ws, Pool(ws, "auto", 1, echo=False, quiet=True))
                res = pool.run(bench_rank, (), dict(ring_cfg=ring_cfg, moe_cfg=moe_cfg, steps=steps,
                                                    mem_seqs=mem_seqs if rd == 0 else ()), timeout=timeout)
                runs.setdefault(ws, []).append(list(res))
            log(f"round {rd + 1}/{rounds} done")
    finally:
        for pool in pools.values():
            pool.close()
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit bench context_expert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="shorter sequences, 1 round (about 35 s on 2 loaded cores, most of it starting the 7 ranks)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1); medians")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per launch (default 3, quick 2)")
    ap.add_argument("--seq", type=int, default=None, help="ring attention's sequence length (default 1024, quick 256)")
    ap.add_argument("--balance-steps", type=int, default=None,
                    help="training steps of each balance-loss run (default 200, quick 50)")
    ap.add_argument("--torch-cp", action="store_true",
                    help="also compare with torch's context_parallel (CUDA only; skipped, saying why, elsewhere)")
    ap.add_argument("--torch-cp-only", action="store_true", help="only the comparison with torch's context_parallel")
    args = ap.parse_args(argv)
    for name in ("rounds", "steps", "seq", "balance_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq is not None and args.seq % 8:
        ap.error("--seq must be a multiple of 8 (the zigzag layout cuts it into 2·cp chunks on cp = 4)")
    code = 0
    if args.torch_cp or args.torch_cp_only:
        try:
            code = torch_cp_compare()
        except Exception as e:   # reported, not raised: the rest of the bench still runs
            print(f"torch context_parallel comparison: FAILED: {type(e).__name__}: {e}")
            code = 1
        if args.torch_cp_only:
            return code
        print()
    quick = args.quick
    rounds, steps = args.rounds or (1 if quick else 3), args.steps or (2 if quick else 3)
    seq = args.seq or (256 if quick else 1024)
    ring_cfg = dict(seq=seq, heads=4, head_dim=32, batch=1)
    moe_cfg = dict(tokens=512 if quick else 2048, width=64, ffn=256, experts=8, k=2, cf=1.25)
    mem_seqs = (64, 128) if quick else (64, 128, 256)
    t0 = time.perf_counter()
    print(f"context_expert: {rounds} interleaved round(s) of launches on 1, 2 and 4 ranks (one thread each, "
          f"backend auto), {steps} timed steps each after one warm-up; float32")
    runs = measure(rounds=rounds, steps=steps, ring_cfg=ring_cfg, moe_cfg=moe_cfg, mem_seqs=mem_seqs)
    print(f"backend {runs[2][0][0]['backend']}, ranks' device {runs[2][0][0]['device']}; one process's device "
          f"{runs[1][0][0]['device']}\n")
    print(f"1. Ring attention, forward + backward: batch 1, {ring_cfg['heads']} heads, seq {seq}, head_dim "
          f"{ring_cfg['head_dim']}. compute = a rank's step less its time in the ring's sends and waits (median "
          f"over steps and rounds); alone: each rank's forward blocks run one rank after the other in the 1-rank "
          f"process (no contention, no messages); pairs: ring.work_each_rank; sent: bytes per rank (the ring's "
          f"stats)")
    if runs[2][0][0]["backend"] == "nccl":
        print("(NCCL: a wait returns once the GPU stream waits, so compute here is the step, not the compute)")
    print(_table(ring_rows(runs, ring_cfg)))
    print("\n2. Activation memory per rank (autograd's saved tensors, weights excluded; the busiest rank), lab 11's "
          "TinyGPT (2 layers, width 32, 4 heads, batch 2) with its sequence split, zigzag")
    print(_table(memory_rows(runs)))
    print(f"\n3. Mixture of experts: width {moe_cfg['width']}, ffn {moe_cfg['ffn']}, {moe_cfg['experts']} experts, "
          f"k = {moe_cfg['k']}, capacity factor {moe_cfg['cf']} (per rank), {moe_cfg['tokens']} tokens in all "
          f"(each of ep ranks 1/ep of them); forward + backward")
    print(_table(moe_rows(runs)))
    print("a2a kB: float rows rank 0 sent to other ranks, counted at dist.all_to_all_single (dispatch + combine; the "
          "backward sends the same back); formula: moe.all_to_all_bytes of the rows its routing sends and receives; "
          "index kB: the expert indices and split sizes, int64, not in the formula")
    bsteps = args.balance_steps or (50 if quick else 200)
    brows, logits = balance_rows(steps=bsteps)
    print(f"\nTokens per expert on 1,024 fresh tokens after {bsteps} steps (measure.balance_run: k = 1, no "
          f"capacity limit, 8 experts), without and with Switch's balance loss")
    print(_table(brows))
    print("\nDropped assignments against the capacity factor, those two routers on the same 1,024 tokens (k = 2 "
          "routes their logits top-2)")
    print(_table(drop_rows(logits)))
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
