"""The device discipline, checked on a CPU: a GPU's placement rules emulated, so that the suite catches what NCCL would.

On a GPU server a rank computes on ``cuda:r`` and its process group is NCCL, which has no backend for CPU tensors;
a tensor created without ``device=`` lands on the CPU, and a CUDA model refuses it. On a laptop every tensor is on
the CPU, so a rank function that forgets ``ctx.device`` passes every test here and fails on the first GPU server.

:class:`DeviceDiscipline` makes the difference visible without a GPU. Inside it, ``ctx.device`` is a **stand-in
device**, ``cpu:0`` (the same memory, another name), and every tensor is one of two kinds, as on a GPU machine:

- **host**: created without a device (``torch.zeros(3)``, ``torch.tensor([...])``, ``torch.from_numpy``), with
  ``device="cpu"``, by ``.cpu()``, or handed to the rank function as an argument: where a GPU run would hold it
  in host memory;
- **device**: created with ``device=ctx.device``, moved there (``.to(ctx.device)``, ``model.to(ctx.device)``),
  or computed from a device tensor.

Then the rules a GPU enforces are enforced here, with an error that says where the host tensor was made:

1. a host tensor (not a 0-dim scalar, which CUDA accepts) and a device tensor meet in one operation
   (CUDA: "Expected all tensors to be on the same device");
2. a host tensor reaches a collective or a point-to-point call (NCCL: "No backend type associated with device
   type cpu");
3. ``.numpy()`` of a device tensor (CUDA: "can't convert cuda:0 device type tensor to numpy").

A move between the two kinds copies, as it does on a GPU, so a host tensor and its device copy stay apart.
``tensor.device`` answers ``cpu:0`` for a device tensor, so ``torch.zeros(n, device=x.device)`` follows ``x``.
Tensors that ``torch.distributed`` creates on its mesh's device type (DTensor's and FSDP's buffers, made on "cpu"
by name here and on "cuda" on a GPU) and tensors PyTorch makes in C++ (autograd's gradients) count as device
tensors: the rules check labkit's code and the learner's, not PyTorch's.

The launcher turns it on for every rank when ``LABKIT_DEVICE_CHECK=1`` (the test suite sets it; gloo only) and the
rank function is labkit's or a notebook's (a test module's own harness functions opt in, :func:`applies_to`), and
``with DeviceDiscipline() as dev:`` checks code that runs in this process. What it cannot see: work in threads the
rank starts (modes are per thread), unbatched ``isend``/``irecv`` (their identity is checked by ``P2POp``; the
batched form is checked), and a CPU ``torch.Generator`` used for a device tensor.
"""
from __future__ import annotations

import os
import sys
import weakref
from typing import Any

__all__ = ["DeviceDiscipline", "DevicePlacementError", "STAND_IN", "enabled", "active", "applies_to", "mark_host",
           "is_host", "install_collective_checks"]

ENV = "LABKIT_DEVICE_CHECK"


class DevicePlacementError(RuntimeError):
    """A tensor is where a GPU run would refuse it: the message names the operation, the tensor and the fix."""


def enabled() -> bool:
    """Whether ``LABKIT_DEVICE_CHECK`` asks for the discipline (``1``, ``true`` or ``yes``)."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes")


def active() -> bool:
    """Whether a :class:`DeviceDiscipline` block is open in this process."""
    return _active > 0


def applies_to(fn) -> bool:
    """Whether a rank function is held to the check: labkit's and a notebook's always; a test module's own rank
    functions (harnesses that hand labkit CPU data on purpose) only when the module says ``LABKIT_DEVICE_CHECK =
    True``."""
    module = getattr(fn, "__module__", None) or ""
    leaf = module.rsplit(".", 1)[-1]
    if not (leaf.startswith("test_") or leaf == "conftest"):
        return True
    return bool(getattr(sys.modules.get(module), "LABKIT_DEVICE_CHECK", False))


STAND_IN = "cpu:0"  # the stand-in device's name (torch.device("cpu", 0))


def _stand_in():
    import torch

    return torch.device(STAND_IN)

_host: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()  # storage -> where it was made
_active = 0  # how many DeviceDiscipline blocks are open (the collective checks run only inside one)
_TORCH_DIR = None
_THIS = os.path.abspath(__file__)


def _storage(t):
    try:
        return t.untyped_storage()
    except Exception:  # sparse, nested, or a tensor subclass without storage: not tracked
        return None


def is_host(t) -> bool:
    """Whether ``t`` is a host tensor (see the module's docstring)."""
    s = _storage(t)
    return s is not None and s in _host


def mark_host(t, where: str = "") -> None:
    """Count ``t`` (and everything sharing its storage) as a host tensor."""
    s = _storage(t)
    if s is not None:
        _host[s] = where or _host.get(s, "")


def _caller() -> tuple[str, bool]:
    """``("file:line in function", inside_torch_distributed)`` of the code that called into torch."""
    global _TORCH_DIR
    if _TORCH_DIR is None:
        import torch

        _TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    f = sys._getframe(2)
    in_dist = None
    while f is not None:
        name = os.path.abspath(f.f_code.co_filename)
        if name != _THIS and not name.startswith(_TORCH_DIR + "overrides") and "/torch/utils/_" not in name:
            if in_dist is None:  # the first frame that made the call decides
                in_dist = name.startswith(_TORCH_DIR + "distributed" + os.sep)
            if not name.startswith(_TORCH_DIR):  # the place to report: the first frame outside torch
                return f"{name}:{f.f_lineno} in {f.f_code.co_name}", in_dist
        f = f.f_back
    return "?", bool(in_dist)


def _kind(device) -> str | None:
    """'host', 'device' or None (no device given) for a ``device=`` argument."""
    if device is None:
        return None
    import torch

    try:
        d = torch.device(device)
    except (TypeError, RuntimeError):
        return None
    if d.type == "cpu":
        return "device" if d.index == 0 else "host"
    return "device" if d.type != "meta" else None


def _describe(t) -> str:
    return f"a host tensor of shape {tuple(t.shape)} ({str(t.dtype).replace('torch.', '')})"


_FIX = ("create it with device=ctx.device (torch.zeros(..., device=ctx.device)) or move it with .to(ctx.device); "
        "build models with model.to(ctx.device)")


def _mixed(name: str, host_t, where: str) -> DevicePlacementError:
    return DevicePlacementError(
        f"{name}: {_describe(host_t)} meets a tensor on ctx.device. On a GPU this fails ('Expected all tensors to be "
        f"on the same device'). The host tensor was made at {where or 'an unknown place'}; {_FIX}. "
        f"(labkit's device check, {ENV}=1, emulates a GPU's placement rules on the CPU.)")


# functions that move data between the two kinds, or accept both by design (CUDA allows them across devices)
_CROSS = {"copy_", "__setitem__", "_has_compatible_shallow_copy_type", "set_", "is_same_size", "record_stream"}


def _mode_class():
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_flatten

    class _Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            import torch

            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name in ("__get__", "__set__"):
                prop = getattr(getattr(func, "__self__", None), "__name__", "")
                out = func(*args, **kwargs)
                if name == "__get__" and prop == "device" and out.type == "cpu" and not is_host(args[0]) \
                        and not _caller()[1]:  # torch.distributed compares with its mesh's device: the real one
                    return _stand_in()
                if name == "__get__" and prop == "grad" and out is not None and is_host(args[0]):
                    mark_host(out)
                return out
            if name in ("numpy", "__array__"):
                t = args[0]
                if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not is_host(t):
                    raise DevicePlacementError(
                        f"{name}() of a tensor on ctx.device (shape {tuple(t.shape)}): on a GPU this fails ('can't "
                        f"convert cuda:0 device type tensor to numpy'). Call .cpu() first (x.detach().cpu().numpy()), "
                        f"or .item()/.tolist() for numbers.")
                return func(*args, **kwargs)
            if name in ("to", "cpu"):
                return self._move(func, name, args, kwargs)
            flat, _ = tree_flatten((args, kwargs))
            tensors = [a for a in flat if isinstance(a, torch.Tensor)]
            host = [t for t in tensors if is_host(t)]
            dev = [t for t in tensors if not is_host(t)]
            if name not in _CROSS and name != "__getitem__":
                big = [t for t in host if t.dim() > 0]
                if big and dev:
                    raise _mixed(name, big[0], _host.get(_storage(big[0]), ""))
            out = func(*args, **kwargs)
            where = ""
            if name in _CROSS or name == "__getitem__":
                kind = "host" if tensors and is_host(tensors[0]) else None
            else:
                kind = _kind(kwargs.get("device"))
                if kind is None and tensors:
                    kind = "device" if dev else "host"
                    where = _host.get(_storage(host[0]), "") if host else ""  # where the host input was made
                elif kind != "device":  # made here without a device, or on "cpu" by name: host, as on a GPU machine,
                    where, in_dist = _caller()  # unless torch.distributed made it on its mesh's device type
                    kind = "device" if in_dist else "host"
            if kind == "host":
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        if not where:
                            where = _caller()[0]
                        mark_host(t, where)
            return out

        def _move(self, func, name, args, kwargs):
            import torch

            t = args[0]
            if name == "cpu":
                target = "host"
            else:
                dev = None
                rest = list(args[1:])
                if rest and isinstance(rest[0], torch.Tensor):
                    target = "host" if is_host(rest[0]) else "device"
                else:
                    try:
                        dev = torch._C._nn._parse_to(*rest, **kwargs)[0]
                    except Exception:
                        dev = kwargs.get("device")
                    target = _kind(dev)
                    if target == "host" and _caller()[1]:  # torch.distributed moving to its group's device type
                        target = "device"
            out = func(*args, **kwargs)
            if not isinstance(out, torch.Tensor) or out.device.type != "cpu":
                return out
            was = "host" if is_host(t) else "device"
            target = target or was
            if target != was and _storage(out) is not None and _storage(out) is _storage(t):
                out = out.clone()  # a move between host and device copies, as on a GPU
            if target == "host":
                mark_host(out, _host.get(_storage(t), "") or _caller()[0])
            else:
                s = _storage(out)
                if s is not None and s is not _storage(t):
                    _host.pop(s, None)
            return out

    return _Mode


class DeviceDiscipline:
    """``with DeviceDiscipline() as device:`` GPU placement rules on the CPU for the block; ``device`` is the
    stand-in (``cpu:0``) to pass where a lab expects ``ctx.device``. See the module's docstring."""

    def __init__(self):
        self._mode = None

    def __enter__(self):
        global _active
        install_collective_checks()
        _install_from_numpy()
        self._mode = _mode_class()()
        self._mode.__enter__()
        _active += 1
        return _stand_in()

    def __exit__(self, *exc):
        global _active
        _active -= 1
        self._mode.__exit__(*exc)
        self._mode = None


# ---------------------------------------------------------------------------------------------- collectives
_COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
                "batch_isend_irecv", "all_gather_single", "reduce_scatter_single")
_installed = False
_cpu_groups: "weakref.WeakSet" = weakref.WeakSet()  # groups made with backend="gloo" by name: CPU tensors are right


def _check_collective(name, args, kwargs):
    import torch
    from torch.utils._pytree import tree_flatten

    leaves = tree_flatten((args, kwargs))[0]
    if any(_is_cpu_group(a) for a in leaves):
        return  # a gloo group asked for by name takes CPU tensors on a GPU server too
    flat = []
    for a in leaves:
        if isinstance(a, torch.Tensor):
            flat.append(a)
        elif hasattr(a, "tensor") and hasattr(a, "peer"):  # a P2POp in batch_isend_irecv's list
            flat.append(a.tensor)
    for t in flat:
        if t.device.type == "cpu" and is_host(t):
            raise DevicePlacementError(
                f"dist.{name}: {_describe(t)} reaches a collective. An NCCL process group has no backend for CPU "
                f"tensors ('No backend type associated with device type cpu'), so this fails on every GPU server. "
                f"The tensor was made at {_host.get(_storage(t), '') or 'an unknown place'}; {_FIX}. "
                f"(labkit's device check, {ENV}=1, emulates a GPU's placement rules on the CPU.)")


def _is_cpu_group(obj) -> bool:
    try:
        return obj in _cpu_groups
    except TypeError:  # unhashable or not weak-referenceable: not a group
        return False


def install_collective_checks() -> None:
    """Wrap ``torch.distributed``'s collectives so that, inside a :class:`DeviceDiscipline` block, a host tensor
    reaching one raises :class:`DevicePlacementError` (unless the call names a group made with ``backend="gloo"``,
    which takes CPU tensors on a GPU server too). Outside a block the wrappers only forward. Idempotent."""
    global _installed
    if _installed:
        return
    import functools

    import torch.distributed as dist

    for name in _COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrap(fn=fn, name=name):
            @functools.wraps(fn)
            def checked(*args, **kwargs):
                if _active:
                    _check_collective(name, args, kwargs)
                return fn(*args, **kwargs)
            return checked

        setattr(dist, name, wrap())

    original_new_group = dist.new_group

    @functools.wraps(original_new_group)
    def new_group(*args, **kwargs):
        group = original_new_group(*args, **kwargs)
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        if group is not None and str(backend).lower() == "gloo":
            try:
                _cpu_groups.add(group)
            except TypeError:
                pass
        return group

    dist.new_group = new_group
    _installed = True


def _install_from_numpy() -> None:
    """``torch.from_numpy`` makes host tensors (PyTorch does not route it through function modes)."""
    import functools

    import torch

    if getattr(torch.from_numpy, "_labkit_checked", False):
        return
    original = torch.from_numpy

    @functools.wraps(original)
    def from_numpy(array):
        t = original(array)
        if _active:
            mark_host(t, _caller()[0])
        return t

    from_numpy._labkit_checked = True
    torch.from_numpy = from_numpy
