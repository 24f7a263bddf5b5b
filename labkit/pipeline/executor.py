"""Pipeline parallelism on real ranks: one process per stage, micro-batches, batched isend/irecv, timelines.

Public API (used by the pipeline lab, its benchmark, and the load-balancing lab)::

    run = run_pipeline(make_stage, n_stages, batch, n_micro, schedule="1f1b", loss_fn=None,
                       chunks=2, repeats=1, timeout=120, pool=True)
    run.seconds, run.loss, run.grads, run.events, run.memory, run.bubble, run.gantt()

``make_stage(i)`` builds stage ``i``'s module *on its rank*; it must be picklable (a module-level
function or one of :class:`ModelStages`, :class:`SleepStages`) and give the same weights every time
it is called (seed inside it). ``batch`` is ``(inputs, targets)``; the first stage sees ``inputs``
cut into ``n_micro`` micro-batches (``torch.tensor_split``: a batch that does not divide evenly gives
micro-batches whose sizes differ by one, and each micro-batch loss is weighted by its share of the
rows, so the gradient still equals the full batch's for a mean-reduced loss). The last stage computes
``loss_fn(output, targets)``. ``schedule`` is one of ``naive``, ``gpipe``, ``1f1b``, ``interleaved``,
``zb-h1`` (see :mod:`labkit.pipeline.schedules`); with ``interleaved`` each rank holds ``chunks`` stages, so
``make_stage`` is called for ``n_stages * chunks`` virtual stages.

:class:`SleepStage` is a stage whose forward sleeps ``forward_s`` and whose backward sleeps
``backward_s`` seconds per row of its input (a custom autograd function): sleeping uses no CPU, so
a schedule's effect shows exactly even with 4 ranks on 2 cores.

How a rank runs (:func:`pipeline_rank`): it walks its action list; a forward receives the activation
from the previous rank (``irecv`` then wait: the wait is recorded), runs the stage and posts the
output with ``isend`` (never blocking, so a send does not hold up the next action); a backward
receives the output's gradient, runs autograd and ``isend``\\ s the input's gradient back. Under a zero-bubble
schedule (``zb-h1``) the backward is split: B asks autograd for the gradients of the stage's input and of the output
of every module that owns parameters (``torch.autograd.grad``, graph kept), sends the input's back at once, and the
later W runs autograd from those module outputs to the modules' own parameters alone (adding to ``.grad``) and
frees the micro-batch. Every message goes through ``dist.batch_isend_irecv`` (:func:`labkit.distops.p2p`; a header
and its tensor in one batch), the form NCCL needs. Every forward, backward, send and wait is recorded with
:func:`labkit.devices.now` (``time.perf_counter``, one clock for all processes on a machine, read after the
device has finished its queued kernels), and the bytes autograd saves for each micro-batch are counted with
``torch.autograd.graph.saved_tensors_hooks`` to measure activation memory over time.

This module is long because the rank function's loop is commented step by step, and the driver that launches it
and the :class:`PipelineRun` that reads its results belong with it.
"""
from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch

from .._compat import renamed_kwargs
from .._validate import validate_int
from ..devices import now
from ..distops import p2p, recv
from .reference import _default_loss, _grads, split_batch
from .schedules import (
    SCHEDULES,
    bubble_fraction,
    ideal_speedup,
    make_schedule,
    n_chunks,
    placement_of,
    rank_of_stage,
    simulate,
    splits_backward,
    stage_of,
    zb_h1,
    zb_h1_bubble,
    zb_v,
)

# --------------------------------------------------------------------------------------------
# The rank function
# --------------------------------------------------------------------------------------------
_HEADER = 8  # ndim + up to 7 dimensions
_COMPUTE = ("forward", "backward", "weight")  # the event kinds that are a stage's work


def _owners(module: torch.nn.Module) -> list:
    """The modules in ``module`` that own parameters: a zero-bubble W starts from each one's output."""
    out, seen = [], {}
    for mod in module.modules():
        own = list(mod.parameters(recurse=False))
        for q in own:
            if id(q) in seen:
                raise ValueError(f"a zero-bubble schedule splits the backward at each module's output, but a parameter "
                                 f"of {type(mod).__name__} also belongs to {type(seen[id(q)]).__name__} (tied "
                                 f"weights): use schedule='1f1b'")
            seen[id(q)] = mod
        if own:
            out.append(mod)
    return out


@contextlib.contextmanager
def _outputs_of(modules):
    """Collect ``(module, output)`` for each of ``modules`` a forward calls (nothing if ``modules`` is None)."""
    outs = []

    def hook(mod, args, output):
        if any(mod is m for m, _ in outs):
            raise ValueError(f"{type(mod).__name__} ran twice in one forward: a zero-bubble schedule splits the "
                             f"backward at each module's output once; use schedule='1f1b'")
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"a zero-bubble schedule needs each module with parameters to return a tensor; "
                             f"{type(mod).__name__} returned {type(output).__name__}: use schedule='1f1b'")
        if output.requires_grad:
            outs.append((mod, output))

    handles = [m.register_forward_hook(hook) for m in modules or ()]
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


def _send(t: torch.Tensor, dst: int, tag: int, works: list, group=None):
    """Post ``t`` to ``dst`` (a rank in ``group``) after a header with its shape (on ``t``'s device), both in one
    batch."""
    t = t.detach().contiguous()
    if t.dim() > _HEADER - 1:
        raise ValueError(f"pipeline can send tensors of at most {_HEADER - 1} dimensions, got {t.dim()}")
    head = torch.tensor([t.dim(), *t.shape] + [0] * (_HEADER - 1 - t.dim()), dtype=torch.int64, device=t.device)
    sent, _ = p2p([(head, dst, 2 * tag), (t, dst, 2 * tag + 1)], group=group)
    works += zip(sent, (head, t))  # keep head and t alive until they are sent


def _recv(src: int, tag: int, dtype=torch.float32, group=None, device=None) -> torch.Tensor:
    """Receive a tensor of unknown shape from ``src`` (a rank in ``group``) onto ``device`` (None: the CPU): a
    header with the shape first, then the data."""
    head = torch.empty(_HEADER, dtype=torch.int64, device=device)
    recv(head, src, 2 * tag, group=group)
    h = head.tolist()
    buf = torch.empty(h[1:1 + h[0]], dtype=dtype, device=device)
    recv(buf, src, 2 * tag + 1, group=group)
    return buf


def pipeline_rank(ctx, make_stage: Callable | None, batch, n_micro: int, schedule: str = "1f1b", loss_fn=None,
                  chunks: int = 2, repeats: int = 1, n_stages: int | None = None, warmup: int = 1, *,
                  group=None, stages: dict | None = None) -> dict:
    """One rank of a pipeline (run by :func:`run_pipeline` through ``labkit.launch``).

    Runs ``warmup`` untimed steps then ``repeats`` timed ones. The first step learns the shape of
    every tensor this rank receives (a small header precedes each message); later steps post all
    their ``irecv`` at the start, so a message lands while this rank computes and a
    "wait" event is only time spent really waiting for the neighbour.
    Returns this rank's events (absolute ``perf_counter`` seconds, each read after a synchronise of
    ``ctx.device``), per-repeat (start, end) times, the loss (last rank), gradients of its stage(s), and memory
    samples ``(t, live, saved_bytes)``.

    ``group``: the pipeline's process group (for example the ``pp`` group of a mesh, lab 11); the stage is this
    rank's position in it and messages go to its neighbours in it. ``None``: the whole world, stage = rank.
    ``stages``: ``{chunk: module}`` already built on this rank (kept between calls, as a training loop needs),
    instead of ``make_stage``.
    """
    import torch.distributed as dist

    # This rank's stage is its position in the pipeline's group (the whole world without one).
    if group is None:
        world_size, rank = ctx.world_size, ctx.rank
    else:
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    if n_stages is not None and n_stages != world_size:
        where = "ranks" if group is None else "ranks in its group"
        raise ValueError(f"the pipeline has {n_stages} stages but was launched on {world_size} {where}: "
                         f"launch with world_size={n_stages} (one rank per stage)")
    loss_fn = loss_fn or _default_loss
    sched = make_schedule(schedule, world_size, n_micro, chunks)
    chunks = n_chunks(sched)  # model chunks this rank holds: `chunks` under the interleaved schedule, 2 under ZB-V
    n_virtual = world_size * chunks  # virtual stages in all; rank r holds r, r + world_size, ... (ZB-V: r, 2p-1-r)
    place = placement_of(sched)

    def stage_at(chunk):  # the virtual stage this rank's chunk runs
        return stage_of(rank, chunk, world_size, place)

    def holder(stage):  # the rank that holds a virtual stage
        return rank_of_stage(stage, world_size, place)
    xs, ys, ws = split_batch(batch, n_micro)
    if stages is None:
        stages = {c: make_stage(stage_at(c)).to(ctx.device) for c in range(chunks)}
    elif sorted(stages) != list(range(chunks)):
        raise ValueError(f"stages must map each of this rank's chunks {list(range(chunks))} to its module, "
                         f"got chunks {sorted(stages)}")
    params = {id(q) for module in stages.values() for q in module.parameters()}
    param_ptrs = {q.data_ptr() for module in stages.values() for q in module.parameters()}
    dtype = next((q.dtype for module in stages.values() for q in module.parameters()), torch.float32)
    # Messages always travel through gloo. Under NCCL (one GPU per rank) the stages compute on their GPU
    # and a gloo group carries the messages, on CPU tensors: NCCL's send blocks its stream until the
    # matching receive is posted, which deadlocks 1F1B unless sends and receives are paired. Under gloo
    # the messages are made on ctx.device (the CPU, or the device check's stand-in for a GPU).
    if ctx.backend != "gloo" and group is None:
        group = ctx.cache.get("pipeline_gloo")
        if group is None:
            group = ctx.cache["pipeline_gloo"] = dist.new_group(backend="gloo")
    elif ctx.backend != "gloo" and dist.get_backend(group) != "gloo":
        raise ValueError("under NCCL the pipeline's messages need a gloo group: build the mesh with "
                         "ctx.mesh(..., pp_backend='gloo') (labkit.runtime.mesh) or pass a gloo group")
    dev = ctx.device
    wire = dev if ctx.backend == "gloo" else torch.device("cpu")  # where messages live: see above

    def clock():  # kernels queued on the GPU count where they run, not where they were queued
        return now(dev)

    # A zero-bubble schedule splits each backward in B and W at the outputs of the modules that own parameters.
    split = splits_backward(sched)
    owners = {c: _owners(module) for c, module in stages.items() if stage_at(c) > 0} if split else {}

    def tag(kind, micro, edge):  # edge: the virtual stage that sends the activation forward
        return (edge * n_micro + micro) * 2 + kind

    # Every message this rank receives in one step, as (kind, micro, edge, src): kind 0 is an activation from
    # the previous stage (before a forward), kind 1 the gradient of an output from the next stage (before a backward).
    # Under ZB-V stages p-1 and p sit on the last rank: what passes between them stays on it (no message).
    needs = []
    for a in sched[rank]:
        stage = stage_at(a.chunk)
        if a.kind == "F" and stage > 0 and holder(stage - 1) != rank:
            needs.append((0, a.micro, stage - 1, holder(stage - 1)))
        if a.kind == "B" and stage < n_virtual - 1 and holder(stage + 1) != rank:
            needs.append((1, a.micro, stage, holder(stage + 1)))
    shapes: dict = {}

    out = {"events": [], "times": [], "busy": [], "loss": None, "memory": [], "rank": rank}
    for rep in range(warmup + repeats):
        # A fresh step: no gradients, nothing held, and every rank of the pipeline starts together.
        for module in stages.values():
            module.zero_grad(set_to_none=True)
        events, memory, works = [], [], []
        held = {}  # (micro, chunk) -> (input, output or loss, saved bytes)
        live_bytes, loss_total = 0, 0.0
        dist.barrier(group=group)
        t_begin = clock()
        # Once the first step has learnt every shape, post all of this step's irecv now: each message lands
        # while this rank computes, so the wait before a forward or backward is only a real wait for a neighbour.
        posted = {}
        if len(shapes) == len(needs):
            for kind, micro, edge, src in needs:
                buf = torch.empty(shapes[(kind, micro, edge)], dtype=dtype, device=wire)
                _, (work,) = p2p(recvs=[(buf, src, 2 * tag(kind, micro, edge) + 1)], group=group)
                posted[(kind, micro, edge)] = (work, buf)

        local = {}  # ZB-V's hand-overs between the two stages of the last rank: (kind, micro, edge) -> tensor

        def receive(kind, micro, edge, src, label):
            # Wait for one message (the posted irecv; in the first step a header with its shape, then the tensor)
            # and move it to the stage's device. The time spent is recorded as a "wait".
            key = (kind, micro, edge)
            if src == rank:  # from this rank's other stage: a copy cut from its graph, as a message would be
                return local.pop(key)
            t0 = clock()
            if key in posted:
                work, buf = posted.pop(key)
                work.wait()
            else:
                buf = _recv(src, tag(kind, micro, edge), dtype, group, wire)
            shapes[key] = tuple(buf.shape)
            buf = buf.to(dev)
            events.append({"lane": rank, "kind": "wait", "start": t0, "end": clock(), "label": label})
            return buf

        def send(t, kind, micro, edge, dst):
            # Post the tensor with isend and go on at once: a send never holds up the next action. The work and
            # the tensor are kept in `works` until the end of the step, when every send is waited for.
            if dst == rank:
                local[(kind, micro, edge)] = t.detach().clone()
                return
            t0 = clock()
            t = t.detach().to(wire)
            if shapes_known_by_peer:  # after the first step the receiver knows the shape: no header
                t = t.contiguous()
                (work,), _ = p2p([(t, dst, 2 * tag(kind, micro, edge) + 1)], group=group)
                works.append((work, t))
            else:
                _send(t, dst, tag(kind, micro, edge), works, group)
            events.append({"lane": rank, "kind": "send", "start": t0, "end": clock(), "label": ""})

        shapes_known_by_peer = rep > 0
        # Walk this rank's actions in the schedule's order; a forward or backward waits only for its own message.
        for a in sched[rank]:
            stage = stage_at(a.chunk)  # the virtual stage this action runs
            module = stages[a.chunk]
            if a.kind == "F":
                # Forward, input: the first stage reads its micro-batch; the others receive the previous stage's
                # activation and make it require grad, so that its gradient can be sent back in the backward.
                if stage == 0:
                    x = xs[a.micro].to(dev)
                else:
                    x = receive(0, a.micro, stage - 1, holder(stage - 1), f"r{a}")
                    x.requires_grad_(True)
                saved = [0, set()]

                def pack(t, saved=saved):  # count what autograd keeps for this backward (not the parameters)
                    if t.data_ptr() not in param_ptrs and id(t) not in params and t.data_ptr() not in saved[1]:
                        saved[1].add(t.data_ptr())
                        saved[0] += t.numel() * t.element_size()
                    return t

                # Forward, compute: the last stage also turns its output into this micro-batch's loss, weighted
                # by its share of the rows, so the gradients add up to the whole batch's.
                t0 = clock()
                hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
                with hooks, _outputs_of(owners.get(a.chunk)) as outs:  # outs: what a zero-bubble W starts from
                    y = module(x)
                    if stage == n_virtual - 1:
                        y = loss_fn(y, ys[a.micro].to(dev)) * ws[a.micro]
                events.append({"lane": rank, "kind": "forward", "start": t0, "end": clock(), "label": str(a)})
                # Forward, output: send the activation on to the next stage (isend, no wait), or add up the loss.
                if stage == n_virtual - 1:
                    loss_total += float(y.detach())
                else:
                    send(y, 0, a.micro, stage, holder(stage + 1))
                # Hold the input and output until this micro-batch's backward (its W under a zero-bubble schedule):
                # the activation memory a schedule decides (GPipe holds every micro-batch, 1F1B at most as many as
                # there are stages ahead, ZB-H1 at most p on every stage).
                held[(a.micro, a.chunk)] = (x, y, saved[0], outs)
                live_bytes += saved[0]
                memory.append((clock(), len(held), live_bytes))
            elif split and a.kind == "B":
                # Zero bubble, B: the input's gradient, and the gradients of the module outputs W will start from;
                # autograd computes no parameter gradient here and keeps the graph for W. The first stage has no
                # input gradient to send, so its B is empty and its W runs the whole backward (torch's pipelining
                # does the same).
                x, y, nbytes, outs = held[(a.micro, a.chunk)]
                grad = None if stage == n_virtual - 1 else receive(1, a.micro, stage, holder(stage + 1), f"r{a}")
                t0 = clock()
                if stage == 0:  # no input gradient to send: the whole backward waits for W (as torch's does)
                    gx, parts = None, [(None, y, grad)]
                else:
                    got = torch.autograd.grad(y, [x] + [o for _, o in outs], grad, retain_graph=True,
                                              allow_unused=True)
                    gx, parts = got[0], [(mod, o, g) for (mod, o), g in zip(outs, got[1:]) if g is not None]
                events.append({"lane": rank, "kind": "backward", "start": t0, "end": clock(), "label": str(a)})
                held[(a.micro, a.chunk)] = (x, y, nbytes, parts)
                if stage > 0:
                    send(gx if gx is not None else torch.zeros_like(x), 1, a.micro, stage - 1, holder(stage - 1))
            elif a.kind == "W":
                # Zero bubble, W: from each module's output to its own parameters (no further: the earlier modules'
                # W's are their own), adding this micro-batch's share to .grad; then free the micro-batch.
                x, y, nbytes, parts = held.pop((a.micro, a.chunk))
                t0 = clock()
                for mod, o, g in parts:  # mod None: the first stage's whole backward
                    own = None if mod is None else [q for q in mod.parameters(recurse=False) if q.requires_grad]
                    torch.autograd.backward(o, g, inputs=own, retain_graph=True)
                events.append({"lane": rank, "kind": "weight", "start": t0, "end": clock(), "label": str(a)})
                del x, y, parts
                live_bytes -= nbytes
                memory.append((clock(), len(held), live_bytes))
            else:
                # Backward: take what the forward held; the gradient of its output comes from the next stage
                # (the last stage starts from its loss, so it needs none).
                x, y, nbytes, _ = held.pop((a.micro, a.chunk))
                grad = None if stage == n_virtual - 1 else receive(1, a.micro, stage, holder(stage + 1), f"r{a}")
                # Autograd adds this micro-batch's parameter gradients to .grad (accumulated over micro-batches)
                # and leaves the input's gradient in x.grad.
                t0 = clock()
                torch.autograd.backward(y, grad)
                events.append({"lane": rank, "kind": "backward", "start": t0, "end": clock(), "label": str(a)})
                # The input's gradient goes back to the previous stage as soon as it exists (isend, no wait).
                if stage > 0:
                    send(x.grad if x.grad is not None else torch.zeros_like(x), 1, a.micro, stage - 1,
                         holder(stage - 1))
                # This micro-batch is done on this stage: free its activations.
                del x, y
                live_bytes -= nbytes
                memory.append((clock(), len(held), live_bytes))
        # End of the step: wait for every isend posted (their tensors must live until sent); time spent here is a
        # "flush" wait, usually for the last gradient's receiver.
        t0 = clock()
        for w, _ in works:
            w.wait()
        t_end = clock()
        if t_end - t0 > 1e-4:
            events.append({"lane": rank, "kind": "wait", "start": t0, "end": t_end, "label": "flush"})
        if rep >= warmup:
            out["times"].append((t_begin, t_end))
            out["busy"].append(sum(e["end"] - e["start"] for e in events if e["kind"] in _COMPUTE))
        out["events"], out["memory"] = events, [(t_begin, 0, 0)] + memory
        out["loss"] = loss_total if n_virtual - 1 in [stage_at(c) for c in stages] else None
    out["grads"] = {stage_at(c): _grads(module) for c, module in stages.items()}
    return out


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------
@dataclass
class PipelineRun:
    """What :func:`run_pipeline` measured. Times are seconds; events start at 0 (the earliest start)."""

    schedule: str
    n_stages: int
    n_micro: int
    chunks: int
    seconds: float  # median over repeats of the step's makespan (first rank start to last rank end)
    times: list  # every repeat's makespan
    loss: float
    grads: list  # per virtual stage: {parameter name: gradient}
    events: list  # the last repeat's timeline, for labkit.viz.gantt
    memory: dict  # rank -> [(t, micro-batches held, bytes autograd saved for them)]
    bubbles: list = field(default_factory=list)  # every repeat's measured idle fraction
    per_rank: list = field(default_factory=list, repr=False)

    @property
    def busy(self) -> list[float]:
        """Seconds each rank spent in forward and backward (and W) during the last repeat."""
        out = [0.0] * self.n_stages
        for e in self.events:
            if e["kind"] in _COMPUTE:
                out[e["lane"]] += e["end"] - e["start"]
        return out

    @property
    def makespan(self) -> float:
        return max(e["end"] for e in self.events) if self.events else 0.0

    @property
    def bubble(self) -> float:
        """Measured idle fraction, 1 - busy / (ranks x makespan): the median over the repeats."""
        if self.bubbles:
            return statistics.median(self.bubbles)
        span = self.makespan
        return 1.0 - sum(self.busy) / (self.n_stages * span) if span else 0.0

    @property
    def bubble_theory(self) -> float:
        if self.schedule == "naive":
            return (self.n_stages - 1) / self.n_stages
        if self.schedule == "zb-h1":  # F, B and W equally long (the paper's formula; simulated where m < p)
            if self.n_micro >= self.n_stages:
                return zb_h1_bubble(self.n_stages, self.n_micro)
            return simulate(zb_h1(self.n_stages, self.n_micro), 1.0, 2.0, weight=1.0)["bubble"]
        if self.schedule == "zb-v":  # no closed form for labkit's greedy ZB-V: simulated, F = B = W, half stages
            return simulate(zb_v(self.n_stages, self.n_micro), 0.5, 1.0, weight=0.5)["bubble"]
        return bubble_fraction(self.n_stages, self.n_micro, self.chunks if self.schedule == "interleaved" else 1)

    @property
    def peak_live(self) -> list[int]:
        """Per rank, the most micro-batches whose activations were held at once (measured)."""
        return [max((s[1] for s in self.memory[r]), default=0) for r in range(self.n_stages)]

    @property
    def peak_bytes(self) -> list[int]:
        return [max((s[2] for s in self.memory[r]), default=0) for r in range(self.n_stages)]

    def gantt(self, ax=None, title=None, unit="ms"):
        from ..viz import gantt

        return gantt(self.events, ax=ax, lane_name="rank", unit=unit, title=title or (
            f"{self.schedule}: p={self.n_stages}, m={self.n_micro}, {self.seconds * 1e3:.0f} ms, "
            f"bubble {self.bubble:.0%} (theory {self.bubble_theory:.0%})"))

    def summary(self) -> dict:
        return {"schedule": self.schedule, "p": self.n_stages, "m": self.n_micro, "ms": self.seconds * 1e3,
                "bubble": self.bubble, "bubble theory": self.bubble_theory, "peak held": max(self.peak_live)}


def run_pipeline(make_stage: Callable, n_stages: int, batch, n_micro: int, schedule: str = "1f1b",
                 loss_fn: Callable | None = None, chunks: int = 2, repeats: int = 1, timeout: float = 120,
                 pool: bool = True, threads: int = 1, backend: str = "auto", warmup: int = 1) -> PipelineRun:
    """Run one training step (forward + backward, no optimizer) of a pipeline on ``n_stages`` ranks.

    make_stage: ``make_stage(i) -> nn.Module`` for stage ``i`` (picklable; same weights every call).
    n_stages: ranks, one per stage (``interleaved``: each rank holds ``chunks`` stages).
    batch: ``(inputs, targets)``; n_micro: micro-batches m >= 1 (need not divide the batch).
    schedule: ``"naive"`` (one micro-batch at a time; m=1 is plain model parallelism), ``"gpipe"``,
        ``"1f1b"``, ``"interleaved"`` or ``"zb-h1"`` (zero bubble: each backward split in B and W).
    loss_fn: ``loss_fn(output, targets) -> scalar`` mean over rows; default cross-entropy for
        integer targets, MSE otherwise.
    repeats: steps to time (the timeline shown is the last; ``seconds`` is the median).
    warmup: untimed steps first (the first step also exchanges tensor shapes; see :func:`pipeline_rank`).
    """
    import labkit

    if not isinstance(schedule, str) or schedule.lower() not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    schedule = schedule.lower()
    n_stages = validate_int("n_stages (one rank per stage)", n_stages, minimum=1)
    if not callable(make_stage):
        raise TypeError(f"make_stage must be a function i -> nn.Module, got {type(make_stage).__name__}")
    repeats = validate_int("repeats", repeats, minimum=1)
    warmup = validate_int("warmup", warmup, minimum=0)
    split_batch(batch, n_micro)  # clear errors here rather than on every rank
    sched = make_schedule(schedule, n_stages, n_micro, chunks)
    v = n_chunks(sched)
    pieces = getattr(make_stage, "n_stages", None)
    if pieces is not None and pieces != n_stages * v:
        raise ValueError(f"make_stage builds {pieces} stages but the {schedule} schedule on {n_stages} ranks "
                         f"needs {n_stages * v}" + (f" ({v} chunks per rank)" if v > 1 else "")
                         + f": pass n_stages={pieces // v if pieces % v == 0 else pieces} or split the model "
                         f"into {n_stages * v} stages")
    res = labkit.launch(pipeline_rank, world_size=n_stages,
                        kwargs=dict(make_stage=make_stage, batch=batch, n_micro=n_micro, schedule=schedule,
                                    loss_fn=loss_fn, chunks=chunks, repeats=repeats, n_stages=n_stages, warmup=warmup),
                        timeout=timeout, pool=pool, threads=threads, backend=backend, echo=True)
    origin = min(rr["times"][-1][0] for rr in res)
    events = []
    for rr in res:
        for e in rr["events"]:
            events.append(dict(e, start=e["start"] - origin, end=e["end"] - origin))
    times = [max(rr["times"][k][1] for rr in res) - min(rr["times"][k][0] for rr in res) for k in range(repeats)]
    grads = {}
    for rr in res:
        grads.update(rr["grads"])
    loss = next(rr["loss"] for rr in res if rr["loss"] is not None)
    memory = {rr["rank"]: [(t - origin, n, b) for t, n, b in rr["memory"]] for rr in res}
    bubbles = [1.0 - sum(rr["busy"][k] for rr in res) / (n_stages * times[k]) if times[k] > 0 else 0.0
               for k in range(repeats)]
    return PipelineRun(schedule=schedule, n_stages=n_stages, n_micro=n_micro, chunks=v,
                       seconds=statistics.median(times),
                       times=times, loss=loss, grads=[grads[i] for i in range(n_stages * v)], events=events,
                       memory=memory, bubbles=bubbles, per_rank=list(res))


@renamed_kwargs(p="n_stages", m="n_micro")
def speedup_over_naive(make_stage, n_stages: int, n_micro: int, rows_per_micro: int = 1, schedule: str = "1f1b",
                       repeats: int = 3, width: int = 4, timeout: float = 120) -> dict:
    """Time the naive schedule (whole batch, no micro-batches) and ``schedule`` with ``n_micro`` micro-batches.

    The batch has ``n_micro * rows_per_micro`` rows, so both runs do the same work. Returns the two medians,
    the measured speed-up, the theory ``p m / (m + p - 1)`` (p = ``n_stages``, m = ``n_micro``) and both runs.
    """
    g = torch.Generator().manual_seed(0)
    rows = n_micro * rows_per_micro
    batch = (torch.randn(rows, width, generator=g), torch.randn(rows, width, generator=g))
    naive_run = run_pipeline(make_stage, n_stages, batch, 1, schedule="naive", repeats=repeats, timeout=timeout)
    pipe_run = run_pipeline(make_stage, n_stages, batch, n_micro, schedule=schedule, repeats=repeats, timeout=timeout)
    return {"naive_s": naive_run.seconds, "pipelined_s": pipe_run.seconds,
            "speedup": naive_run.seconds / pipe_run.seconds, "theory": ideal_speedup(n_stages, n_micro),
            "naive": naive_run, "pipelined": pipe_run}
