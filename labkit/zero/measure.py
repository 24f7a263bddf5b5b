"""Memory per rank, measured: the bytes each sharding method really holds after a step, and its peak during one.

:func:`memory_rank` builds one model with each method of :data:`MEASURED_METHODS`, trains it a few steps and, on every
rank, counts the tensors the method holds after a step, each storage once (:meth:`Method.held`):

- ``params``: the model's parameters (DDP, ZeRO-1/2 and torch's ZeRO: full copies; ZeRO-3: this rank's shards;
  FSDP2: the local piece of each ``DTensor``). labkit's ZeRO-1/2 also keep their shard as a flat copy (the inner
  optimiser's parameter), counted here: 4P/N bytes more than the paper's fp32 figure;
- ``grads``: the ``.grad`` of those tensors (and of ZeRO-1/2's shard);
- ``optimizer``: the optimiser's per-element state (Adam: two buffers; ``step`` counters left out);
- ``buffers``: what a method keeps besides (lab 02's ``BucketedDDP``: its flat buckets, 4P bytes; ZeRO-2:
  buckets still in flight; ZeRO-3: units still gathered). torch's DDP reducer buckets (under ``zero-torch``) live
  in C++ and are not counted.

beside :func:`labkit.memory_model.zero_bytes_each_rank` (Rajbhandari et al. 2019, arXiv 1910.02054, section 5:
stage 0 = plain data parallelism), with precision ``"fp32"`` (4 + 4 + 8 bytes per parameter with Adam; float64
doubles every figure).

The **peak** during one step (zero_grad, forward, backward, communication, optimiser step) starts from the tensors
the method holds when the step begins (parameters, optimiser state, the batch; gradients already set to None). On
the CPU it is read by PyTorch's memory tracker, ``torch.distributed._tools.mem_tracker.MemTracker`` (a
``TorchDispatchMode``: it sees every storage an operator allocates, and frees through weak references). It does not
see gloo's own transport buffers, nor allocations in C++ outside the dispatcher (torch's DDP reducer). A private
API: if it fails, ``peak`` is None and ``peak_note`` says why. On a GPU the CUDA caching allocator's own figures are
used instead (``torch.cuda.max_memory_allocated`` above ``memory_allocated`` at the step's start, plus what the method
held then; as lab 09's :mod:`labkit.hardware.measure` does): they are what the card really had to hold, they see
every allocation on the device (the DDP reducer's buckets too; NCCL's own buffers live outside the allocator), they
are not a private API, and they cost nothing, where MemTracker's dispatch mode would slow every GPU kernel launch.
The allocator rounds each block up to 512 bytes, so on a GPU small tensors weigh a little more than their bytes.

The module is long because it reads the peak two ways (MemTracker on a CPU, the allocator on a GPU) and sorts what
is alive at the peak by kind, for the notebook's "held is not peak" section.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .._compat import moved_names, renamed_kwargs
from .._validate import ArgumentError, validate_choice, validate_int, validate_number
from ..ddp import make_ddp
from ..memory_model import zero_bytes_each_rank
from ..models import mlp as _models_mlp
from .optim import NaiveZero1, Zero1, Zero2
from .stage3 import Zero3
from .torch_impl import torch_fsdp2, torch_zero1

__all__ = ["MEASURED_METHODS", "ALL_METHODS", "BF16_METHODS", "STAGE", "BENCH_OPTIMIZERS", "DTYPES", "BENCH_WIDTHS",
           "Method", "mlp", "memory_rank", "memory_row", "peak_bytes", "peak_detail", "PEAK_KINDS", "storage_bytes",
           "validate_args", "validate_widths", "validate_global_batch", "batches", "rank_slice"]

# ----------------------------------------------------------------------------- what the measurements compare
#: The methods the memory measurement and the bench (``python -m labkit bench zero``) compare by default.
MEASURED_METHODS = ("ddp", "zero1", "zero2", "zero3", "zero-torch", "fsdp2")
#: FSDP2 with bf16 compute (MixedPrecisionPolicy): not bit-comparable to the others, so in no default list.
BF16_METHODS = ("fsdp2-bf16",)
#: Every method :class:`Method` runs: also one process and the naive ZeRO-1 (the lab compares them all).
ALL_METHODS = ("single", "zero1-naive") + MEASURED_METHODS + BF16_METHODS
#: What each method shards, as ZeRO's stages say (0: nothing, 1: optimiser state, 2: + gradients, 3: + weights).
STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "zero-torch": 1, "fsdp2": 3, "fsdp2-bf16": 3}
#: The optimisers a method is built with by name, and their settings for the bench's model (the lab trains its own
#: small model with larger steps: ``labkit.zero.lab.OPTIMIZERS``). Memory and time do not depend on the settings.
BENCH_OPTIMIZERS = {"sgd": (torch.optim.SGD, dict(lr=0.1)),
                    "momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                    "adam": (torch.optim.Adam, dict(lr=1e-3)),
                    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1))}
#: The dtypes the measurements train in, by name.
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: The bench's MLP (and the measurements' default): 1.3 M parameters, 5.3 MB per fp32 copy.
BENCH_WIDTHS = (256, 1024, 1024, 10)


def validate_widths(widths) -> tuple:
    """``widths`` as a tuple of ints if it lists at least two positive layer widths (input, ..., classes)."""
    try:
        out = tuple(int(w) for w in widths)
    except (TypeError, ValueError):
        raise ArgumentError(f"widths must be layer widths such as (256, 1024, 1024, 10), got {widths!r}") from None
    if len(out) < 2 or min(out) < 1:
        raise ArgumentError(f"widths must be at least two positive widths (input, ..., classes), got {widths!r}; "
                            f"pass e.g. (256, 1024, 1024, 10)")
    return out


@renamed_kwargs(sizes="widths")
def mlp(widths=BENCH_WIDTHS, dtype: str = "float32", seed: int = 0, device="cpu", activation=nn.ReLU) -> nn.Module:
    """Linear layers of ``widths`` with ``activation`` between them, the same on every rank (built from ``seed``):
    :func:`labkit.models.mlp` in one of :data:`DTYPES`."""
    validate_choice("dtype", dtype, tuple(DTYPES))
    return _models_mlp(validate_widths(widths), activation=activation, seed=seed, dtype=DTYPES[dtype], device=device)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors, seen: set | None = None) -> int:
    """Bytes of the distinct storages under ``tensors`` (a storage shared by several views counted once;
    storages already in ``seen`` skipped, and the new ones added to it)."""
    seen = set() if seen is None else seen
    n = 0
    for t in tensors:
        if t is None:
            continue
        st = _local(t).detach().untyped_storage()
        key = (st.data_ptr(), str(st.device))
        if key not in seen and st.nbytes():
            seen.add(key)
            n += st.nbytes()
    return n


class Method:
    """One sharding method on one rank: ``step(x, y)``, the tensors it holds, the bytes it sends.

    ``method`` is one of :data:`ALL_METHODS`: ``"ddp"`` (lab 02's ``BucketedDDP``), ``"zero1"``, ``"zero2"``,
    ``"zero3"`` (this lab, from scratch), ``"zero-torch"`` (torch's ``ZeroRedundancyOptimizer`` under
    ``DistributedDataParallel``), ``"fsdp2"`` (``fully_shard``), and for the lab's rank functions ``"single"``
    (one process) and ``"zero1-naive"``. ``optimizer`` is a name of :data:`BENCH_OPTIMIZERS` or ``(class,
    kwargs)``."""

    def __init__(self, method: str, model: nn.Module, optimizer="adam", bucket_mb: float = 25.0):
        validate_choice("method", method, ALL_METHODS)
        if isinstance(optimizer, tuple):  # (optimizer class, keyword arguments), as the lab's rank functions pass
            opt_cls, kw = optimizer
        else:
            opt_cls, kw = BENCH_OPTIMIZERS[validate_choice("optimizer", optimizer, tuple(BENCH_OPTIMIZERS))]
        validate_number("bucket_mb", bucket_mb, minimum=0, open_low=True, hint="the bucket size in MiB, e.g. 25")
        self.method, self.model, self.sync, self.traffic, self.ddp, self.z3 = method, model, None, None, None, None
        self.P = sum(p.numel() for p in model.parameters())
        self.esize = next(model.parameters()).element_size()
        if method in ("zero1", "zero2", "zero1-naive"):
            extra = dict(bucket_mb=bucket_mb) if method == "zero2" else {}
            cls = {"zero1": Zero1, "zero2": Zero2, "zero1-naive": NaiveZero1}[method]
            self.opt = cls(list(model.parameters()), opt_cls, **extra, **kw)
            self.forward, self.traffic = model, self.opt.traffic
            self.psi = self.opt.layout.padded
        elif method == "zero-torch":
            self.forward, self.opt = torch_zero1(model, opt_cls, **kw)
            self.psi = self.P
        else:
            if method == "ddp":
                self.ddp = make_ddp("bucketed", model, bucket_mb)
                self.forward, self.sync = self.ddp, self.ddp.sync_grads
            elif method == "zero3":
                self.forward = self.z3 = Zero3(model)
                self.traffic = self.z3.traffic
            elif method in ("fsdp2", "fsdp2-bf16"):
                self.forward = torch_fsdp2(model, mixed_precision=method == "fsdp2-bf16")
            else:  # "single": one process, no sharding
                self.forward = model
            self.opt = opt_cls(self.forward.parameters(), **kw)
            self.psi = sum(lay.padded for lay in self.z3.layouts) if self.z3 is not None else self.P
        self._ddp_sent = 0

    def step(self, x, y) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.forward(x), y)
        loss.backward()
        if self.sync is not None:
            self.sync()
        self.opt.step()
        return loss.detach()

    # ------------------------------------------------------------------ what it sends
    def reset_volume(self) -> None:
        if self.traffic is not None:
            self.traffic.reset()
        if self.ddp is not None:
            self._ddp_sent = self.ddp.stats["allreduce_bytes"]

    def volume(self) -> int | None:
        """Bytes sent since :meth:`reset_volume`, in the ZeRO paper's units (an all-reduce counts 2Ψ); None for
        torch's methods, whose collectives are not counted here."""
        if self.traffic is not None:
            return self.traffic.volume
        if self.ddp is not None:  # lab 02 counts the all-reduced buffer once; an all-reduce moves it twice
            return 2 * (self.ddp.stats["allreduce_bytes"] - self._ddp_sent)
        return None

    # ------------------------------------------------------------------ what it holds
    def _inner(self):
        if self.method == "zero-torch":
            return self.opt.optim
        return getattr(self.opt, "inner", self.opt)

    def _param_tensors(self) -> list:
        ps = list(self.z3.shards) if self.z3 is not None else list(self.model.parameters())
        return ps + ([self.opt.shard] if self.method in ("zero1", "zero2", "zero1-naive") else [])

    def _state_tensors(self) -> list:
        return [v for st in self._inner().state.values() for k, v in st.items()
                if isinstance(v, torch.Tensor) and k != "step" and v.dim() > 0]

    def _buffer_tensors(self) -> list:
        if self.ddp is not None:
            return list(getattr(self.ddp, "_flat", []))
        if self.method == "zero2":
            return list(self.opt._buffers.values())
        if self.z3 is not None:
            return list(self.z3._gathered.values()) + list(self.z3._regathered.values())
        return []

    def held(self) -> dict:
        """Bytes this rank holds now, by kind, each storage counted once (see the module's docstring)."""
        seen: set = set()
        params = self._param_tensors()
        out = {"params": storage_bytes(params, seen),
               "grads": storage_bytes([p.grad for p in params], seen),
               "optimizer": storage_bytes(self._state_tensors(), seen),
               "buffers": storage_bytes(self._buffer_tensors(), seen)}
        out["total"] = sum(out.values())
        return out

    def state_numel(self) -> int:
        return sum(_local(v).numel() for v in self._state_tensors())

    def tracked(self) -> list:
        """What a memory tracker must be told about: modules, optimisers and the tensors outside them."""
        mods = [self.model] + ([self.forward] if self.forward is not self.model else [])
        return mods + [self._inner()] + [t for t in self._param_tensors() + self._buffer_tensors()
                                         if not isinstance(t, nn.Parameter) or self.method in ("zero1", "zero2",
                                                                                                "zero1-naive")]


#: MemTracker's kinds of storage, as the lab names them (its own names: Parameter, Gradient, Optstate, ...).
PEAK_KINDS = {"Parameter": "parameters", "Buffer": "module buffers", "Gradient": "gradients",
              "Optstate": "optimiser state", "Activation": "activations",
              "Temp": "backward temporaries", "Other": "other tracked tensors"}


def _peak_tracker_class():
    """MemTracker, noting at each new peak the phase of the step and the size and kind of every live storage
    (what :func:`peak_detail` reports). Built on first use: the tracker is a private torch API."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakTracker(MemTracker):
        def __init__(self) -> None:
            super().__init__()
            self.phase, self.live, self.noted = None, [], None

        def _update_peak_stats(self, peak_state) -> None:
            before = sum(self._peak_mem.values())
            super()._update_peak_stats(peak_state)
            if sum(self._peak_mem.values()) <= before:
                return
            try:   # a note only: if the tracker's internals change, the peak itself still comes back
                self.phase = ("optimiser step" if self._in_opt else "backward" if self._mod_tracker.is_bw
                              else "forward")
                self.live = sorted(((PEAK_KINDS.get(str(getattr(w.reftype, "value", w.reftype)), "other"),
                                     w.mem_consumed) for w, ref in list(self._WINFO.values())
                                    if ref() is not None and w.mem_consumed), key=lambda kb: -kb[1])
            except Exception as e:  # noqa: BLE001
                self.noted = f"{type(e).__name__}: {e}"

    return PeakTracker


def peak_detail(run: Method, x, y) -> dict:
    """One step of ``run`` under the tracker: ``peak`` (bytes live at once at its highest, None if not measured),
    ``note`` (how it was read, or why not), and on the CPU what the peak is made of: ``phase`` (``"forward"``,
    ``"backward"`` or ``"optimiser step"``), ``kinds`` (bytes by kind of :data:`PEAK_KINDS`) and ``live``
    (``(kind, bytes)`` of every storage live at the peak, largest first). On a GPU those three are None."""
    detail = {"peak": None, "note": "", "phase": None, "kinds": None, "live": None}
    if x.device.type == "cuda":
        return {**detail, "peak": _cuda_peak(run, x, y), "note": "CUDA allocator"}
    try:
        tracker = _peak_tracker_class()()
    except ImportError as e:  # pragma: no cover - torch without the tracker
        return {**detail, "note": f"MemTracker unavailable ({e})"}
    run.opt.zero_grad(set_to_none=True)  # the step starts without gradients (it would free them first anyway)
    try:
        tracker.track_external(*run.tracked(), x, y)
        with tracker:
            run.step(x, y)
        snap = tracker.get_tracker_snapshot("peak")
    except Exception as e:  # noqa: BLE001 - a private API: report, do not crash the bench
        return {**detail, "note": f"MemTracker failed ({type(e).__name__}: {e})"}
    kinds: dict = {}
    for dev in snap.values():
        for k, v in dev.items():
            name = PEAK_KINDS.get(str(getattr(k, "value", k)))
            if name is not None and v:
                kinds[name] = kinds.get(name, 0) + v
    return {"peak": sum(dev.get("Total", 0) for dev in snap.values()),
            "note": "MemTracker" + (f" (no breakdown: {tracker.noted})" if tracker.noted else ""),
            "phase": tracker.phase, "kinds": kinds, "live": tracker.live or None}


def peak_bytes(run: Method, x, y) -> tuple[int | None, str]:
    """``(peak, note)``: the most bytes live at once during one step of ``run`` (MemTracker on the CPU, the CUDA
    allocator on a GPU), or None and why. :func:`peak_detail` also says what the peak is made of."""
    d = peak_detail(run, x, y)
    return d["peak"], d["note"]


def _cuda_peak(run: Method, x, y) -> int:
    """The step's peak on the GPU: the allocator's high-water mark above what was allocated when the step began,
    plus what the method held then (so other methods' tensors alive on the same device are not counted)."""
    from ..devices import cuda_peak

    run.opt.zero_grad(set_to_none=True)
    start = run.held()["total"] + storage_bytes([x, y])
    return cuda_peak(x.device, lambda: run.step(x, y))[1] + start


@renamed_kwargs(world="world_size")
def memory_row(run: Method, data, world_size: int, optimizer: str = "adam", peak: bool = True) -> dict:
    """Steps of ``run`` on each ``(x, y)`` of ``data`` (under the tracker when ``peak``); then the bytes held, the
    formula's figures (``formula_*``), ``state_numel``, ``peak`` (the highest over those steps), ``peak_low`` (the
    lowest: they differ when a buffer's release waits on gloo's thread, as ZeRO-2's asynchronous reduces do),
    ``peak_note`` (see :func:`memory_rank`), and what the highest peak is made of (:func:`peak_detail`):
    ``peak_phase``, ``peak_kinds`` and ``peak_live`` (None on a GPU or when not measured)."""
    peaks, note, top = [], "not measured", None
    for x, y in data:
        if peak:
            d = peak_detail(run, x, y)
            note = d["note"]
            if d["peak"] is not None:
                peaks.append(d["peak"])
                top = d if top is None or d["peak"] >= top["peak"] else top
        else:
            run.step(x, y)
    scale = run.esize / 4  # the formula's fp32 bytes, scaled to the dtype trained
    f = zero_bytes_each_rank(run.P, world_size, STAGE[run.method], "fp32", optimizer)
    return {**run.held(), "formula_params": f["weights"] * scale, "formula_grads": f["grads"] * scale,
            "formula_optimizer": f["optimizer"] * scale, "formula_total": f["total"] * scale,
            "state_numel": run.state_numel(), "peak": max(peaks) if peaks else None,
            "peak_low": min(peaks) if peaks else None, "peak_note": note,
            "peak_phase": top and top["phase"], "peak_kinds": top and top["kinds"], "peak_live": top and top["live"]}


@renamed_kwargs(sizes="widths")
def batches(steps: int, global_batch: int, widths, dtype: str, seed: int, device="cpu") -> list:
    """``steps`` global batches ``(x, y)`` of a fixed random classification task: inputs drawn in float64 from
    ``seed`` (the same values whatever ``dtype`` they are cast to), ``widths[-1]`` classes."""
    g = torch.Generator().manual_seed(1000 + seed)
    return [(torch.randn(global_batch, widths[0], generator=g, dtype=torch.float64).to(device=device,
                                                                                      dtype=DTYPES[dtype]),
             torch.randint(0, widths[-1], (global_batch,), generator=g).to(device)) for _ in range(steps)]


@renamed_kwargs(world="world_size")
def rank_slice(data, rank: int, world_size: int) -> list:
    """Rank ``rank``'s equal slice of each global batch, as its own tensors (not views of the whole batch)."""
    n = data[0][0].shape[0] // world_size
    return [(x[rank * n:(rank + 1) * n].clone(), y[rank * n:(rank + 1) * n].clone()) for x, y in data]


@renamed_kwargs(sizes="widths", world="world_size")
def validate_args(methods, widths, dtype, optimizer, steps, global_batch, world_size):
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    if not methods:
        raise ArgumentError(f"methods must name at least one of {MEASURED_METHODS}, got an empty list")
    for m in methods:
        validate_choice("method", m, MEASURED_METHODS)
    validate_choice("dtype", dtype, tuple(DTYPES))
    validate_choice("optimizer", optimizer, tuple(BENCH_OPTIMIZERS))
    steps = validate_int("steps", steps, minimum=1)
    return methods, validate_widths(widths), steps, validate_global_batch(global_batch, world_size)


@renamed_kwargs(world="world_size")
def validate_global_batch(global_batch, world_size: int) -> int:
    """``global_batch`` if it splits into ``world_size`` equal slices (then the mean of the ranks' mean losses is the
    global batch's mean loss, and averaging the gradients gives its gradient)."""
    global_batch = validate_int("global_batch", global_batch, minimum=world_size)
    if global_batch % world_size:
        raise ArgumentError(f"global_batch={global_batch} does not split evenly over {world_size} ranks; pass a "
                            f"multiple of {world_size}, e.g. {world_size * max(1, global_batch // world_size)}")
    return global_batch


@renamed_kwargs(sizes="widths")
def memory_rank(ctx, methods=MEASURED_METHODS, widths=BENCH_WIDTHS, dtype: str = "float32", optimizer: str = "adam",
                steps: int = 3, global_batch: int = 32, seed: int = 0, bucket_mb: float = 25.0,
                peak: bool = True, peak_steps: int = 2) -> dict:
    """Train ``steps`` steps with each method (the last ``peak_steps`` of them under the memory tracker); the
    bytes this rank holds after the last one, beside the formula.

    Returns ``{"P": parameters, "world": N, "rows": {method: {...}}}``; each row has ``params``, ``grads``,
    ``optimizer``, ``buffers`` and ``total`` (bytes held after the last step, :meth:`Method.held`), the formula's
    ``formula_params``, ``formula_grads``, ``formula_optimizer``, ``formula_total``
    (``zero_bytes_each_rank(P, N, stage, "fp32", optimizer)``, times 2 in float64), ``state_numel``, ``peak``
    (bytes, the highest over the tracked steps; None if not measured), ``peak_low``, ``peak_note``, and what that
    peak is made of: ``peak_phase``, ``peak_kinds``, ``peak_live`` (:func:`peak_detail`)."""
    world, rank = ctx.world_size, ctx.rank
    methods, widths, steps, global_batch = validate_args(methods, widths, dtype, optimizer, steps, global_batch,
                                                         world)
    peak_steps = validate_int("peak_steps", peak_steps, minimum=1, maximum=steps,
                           hint=f"at most steps={steps} (the tracked steps are the last ones)")
    device = getattr(ctx, "device", "cpu")
    data = rank_slice(batches(steps, global_batch, widths, dtype, seed, device), rank, world)
    out = {"P": None, "world": world, "rows": {}}
    for method in methods:
        run = Method(method, mlp(widths, dtype, seed, device), optimizer, bucket_mb)
        out["P"] = run.P
        for x, y in data[:-peak_steps]:
            run.step(x, y)
        dist.barrier()
        out["rows"][method] = memory_row(run, data[-peak_steps:], world, optimizer, peak)
        del run
        dist.barrier()
    return out


# old names (issue 30): one meaning per name across lab 10's modules, widths for an MLP's layer widths
__getattr__ = moved_names(__name__, {"METHODS": "labkit.zero.measure:MEASURED_METHODS",
                                     "OPTIMIZERS": "labkit.zero.measure:BENCH_OPTIMIZERS",
                                     "SIZES": "labkit.zero.measure:BENCH_WIDTHS",
                                     "validate_sizes": "labkit.zero.measure:validate_widths"})
