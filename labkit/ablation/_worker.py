"""One worker of :func:`labkit.ablation.runner.run_study`. Started as ``python -m labkit.ablation._worker``.

It reads ``(trial_fn, factors, metric)`` (cloudpickled) from its command pipe, then runs each trial it is sent:
claims it in the results file, runs it, stores the result (or the error and traceback) in one transaction, and
only then tells the runner. It exits when told to stop, when the pipe closes, or when its parent dies.
"""
from __future__ import annotations

import inspect
import math
import os
import pickle
import sys
import traceback
from multiprocessing.connection import Connection


def _jsonable(x):
    """A trial's result as plain JSON types (numpy and torch scalars become floats and ints)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, bool, int, float)) or x is None:
        return x
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"a trial's result must be JSON-like (numbers, strings, lists, dicts), got {type(x).__name__}")


def call_trial(fn, config: dict, seed: int, factors: dict, metric: str) -> tuple[float, dict]:
    """Run ``fn(config, seed[, factors=])``; return (the metric's value, the JSON result). Raises on a bad result."""
    params = inspect.signature(fn).parameters
    takes = "factors" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    kwargs = {"factors": factors} if takes else {}
    result = fn(dict(config), seed, **kwargs)
    if not isinstance(result, dict) or metric not in result:
        raise ValueError(f"the trial function must return a dict holding the study's metric {metric!r}, got "
                         f"{type(result).__name__}"
                         + (f" with keys {sorted(result)}" if isinstance(result, dict) else ""))
    value = float(result[metric])
    if not math.isfinite(value):
        raise ValueError(f"the trial's {metric} is {value}: the training diverged (a lower learning rate, fewer "
                         "steps or a smaller penalty may help)")
    return value, _jsonable(result)


def main() -> None:
    from ..runtime._worker import _die_with_parent
    from .store import Store

    cmd = Connection(int(os.environ["LABKIT_CMD_FD"]), writable=False)
    res = Connection(int(os.environ["LABKIT_RES_FD"]), readable=False)
    _die_with_parent(int(os.environ["LABKIT_PARENT_PID"]))
    try:
        fn, factors, metric = pickle.loads(cmd.recv_bytes())
    except Exception:  # the trial function cannot be loaded here: say why, once, instead of dying silently
        res.send(("fatal", None, traceback.format_exc()))
        sys.exit(1)
    if "torch" in sys.modules:  # the trial function uses torch: one thread per worker
        sys.modules["torch"].set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    store = Store(os.environ["LABKIT_ABLATION_DB"])
    while True:
        try:
            msg = cmd.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        _, key, label, config, seed, code, study = msg
        if not store.claim(key, study=study, label=label, config=config, seed=seed, code=code):
            res.send(("skip", key))
            continue
        res.send(("started", key))
        try:
            value, result = call_trial(fn, config, seed, factors, metric)
        except Exception as e:
            err = f"{type(e).__name__}: {e}"
            store.fail(key, err, traceback.format_exc())
            res.send(("failed", key, err))
            continue
        if store.finish(key, value, result):
            res.send(("done", key, value))
        else:  # pragma: no cover - the trial was claimed again meanwhile (this worker was orphaned)
            res.send(("failed", key, "the trial was claimed by another run while this worker ran it"))


if __name__ == "__main__":
    main()
