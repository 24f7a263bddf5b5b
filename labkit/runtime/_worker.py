"""One rank of a :mod:`labkit.runtime.launcher` job. Started as ``python -m labkit.runtime._worker``;
not for direct use.

It joins the process group through the FileStore named in ``LABKIT_STORE``, says it is ready,
then runs every job that arrives on its command pipe and sends back ``("ok", value)`` or
``("error", traceback)``. It exits when the pipe closes, when told to stop, or when its parent
dies (so no rank outlives the notebook that started it).
"""
from __future__ import annotations

import faulthandler
import io
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection


def _die_with_parent(parent_pid: int) -> None:
    """Exit as soon as the parent (the notebook kernel, the test) is gone.

    A polling thread rather than prctl(PR_SET_PDEATHSIG): the latter fires when the *thread* that
    started the rank exits, which would kill a pool created from a short-lived thread.
    """
    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="labkit-parent-watch").start()


def _dumps(obj) -> bytes:
    """``pickle.dumps(obj)``, with every tensor on a GPU copied to the CPU first: a result then loads in a parent
    that has no GPU (or does not want to start CUDA in the notebook's kernel)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return pickle.dumps(obj)

    class HostPickler(pickle.Pickler):
        def reducer_override(self, o):
            if isinstance(o, torch.Tensor) and o.device.type not in ("cpu", "meta"):
                return o.detach().cpu().__reduce_ex__(pickle.HIGHEST_PROTOCOL)
            return NotImplemented

    buf = io.BytesIO()
    HostPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _mark_tensors_host(tree) -> None:
    import torch
    from torch.utils._pytree import tree_flatten

    from labkit.runtime.placement import mark_host

    for t in tree_flatten(tree)[0]:
        if isinstance(t, torch.Tensor):
            mark_host(t, "the launch's arguments (the parent's memory)")


def main() -> None:
    # `kill -USR1 PID` prints every thread's stack to the rank's stderr (echoed as "[rank r]"): how a hang is
    # located (python -m labkit stress uses it).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    rank = int(os.environ["LABKIT_RANK"])
    world_size = int(os.environ["LABKIT_WORLD_SIZE"])
    backend = os.environ["LABKIT_BACKEND"]
    store = os.environ["LABKIT_STORE"]
    threads = int(os.environ.get("LABKIT_THREADS", "1"))
    cmd = Connection(int(os.environ["LABKIT_CMD_FD"]), writable=False)
    res = Connection(int(os.environ["LABKIT_RES_FD"]), readable=False)
    _die_with_parent(int(os.environ.get("LABKIT_PARENT_PID", os.getppid())))

    def send(kind, body):
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            data = _dumps((kind, body))
        except Exception as e:
            data = pickle.dumps(("error", (
                f"rank {rank} returned a value that cannot be pickled ({type(e).__name__}: {e}). "
                f"Return plain data instead: numbers, strings, lists, dicts, numpy arrays or CPU tensors "
                f"(call .detach().cpu() on a tensor; return a model's state_dict(), not the model)."
            )))
        res.send_bytes(data)

    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        # Full float32 on every rank: lab functions check their results against one process (often on the CPU) at
        # 1e-5, which TF32 convolutions and matmuls on Ampere or later GPUs (10 mantissa bits) would miss. A function
        # that measures TF32's speed turns it on itself (labkit.hardware does, in one process).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        from labkit.runtime import placement

        check = backend == "gloo" and placement.enabled()  # GPU placement rules emulated (the test suite's mode)
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu", 0) if check else torch.device("cpu")
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=30), **kw)
        from labkit.runtime.launcher import Context

        ctx = Context(rank=rank, world_size=world_size, backend=backend, device=device,
                      local_rank=rank, group=dist.group.WORLD)
    except BaseException:
        send("error", traceback.format_exc())
        return
    send("ready", None)

    import cloudpickle

    while True:
        try:
            msg = cmd.recv_bytes()
        except (EOFError, OSError):
            break
        try:
            job = cloudpickle.loads(msg)
        except BaseException as e:
            send("error", f"rank {rank} could not load the job ({type(e).__name__}: {e}). A function defined in a "
                          f"module must be importable on the ranks: keep it in a file on the Python path "
                          f"or define it in the notebook.\n" + traceback.format_exc())
            continue
        if job[0] == "stop":
            break
        _, fn, args, kwargs = job
        try:
            held = check and placement.applies_to(fn)
            ctx.device = device if held or not check else torch.device("cpu")  # the stand-in only when held
            if held:  # arguments arrive in host memory, as on a GPU server
                _mark_tensors_host((args, kwargs))
                with placement.DeviceDiscipline():
                    value = fn(ctx, *args, **kwargs)
            else:
                value = fn(ctx, *args, **kwargs)
        except BaseException:
            send("error", traceback.format_exc())
            continue
        send("ok", value)
    try:
        dist.destroy_process_group()
    except Exception:
        pass


if __name__ == "__main__":
    main()
