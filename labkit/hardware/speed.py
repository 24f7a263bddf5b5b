"""Each hardware optimisation of lab 09 timed against the plain fp32 training step.

The experiments time :class:`labkit.hardware.step.Step` variants with :func:`labkit.hardware.timing.time_interleaved`
(rounds A, B, A, B, ...; ratios per round, then the median) and each return a
:class:`~labkit.hardware.step.Result` with ``.rows()``, ``.as_dict()`` and a one-line ``.verdict``:

- :func:`mixed_precision`: fp32 vs autocast-bf16 (vs autocast-fp16 + GradScaler on a GPU), beside
  :func:`labkit.hardware.cpu.predict_bf16`'s prediction, and the bf16 loss against fp32's.
- :func:`bf16_by_isa`: the same comparison on the same CPU with oneDNN held to older instruction sets
  (``ONEDNN_MAX_CPU_ISA``), each in a fresh process: what bf16 costs where the hardware has no bf16 arithmetic.
- :func:`channels_last_speed`: NCHW vs NHWC, in fp32 and in bf16.
- :func:`compile_speed`: eager vs ``torch.compile``: compile time of the first call apart from the
  steady-state ratio; the compiled losses against eager's.
- :func:`batch_sweep`: images per second and activation bytes (the saved-tensor ledger,
  :func:`labkit.sliced.models.saved_bytes`) against batch size.
- :func:`checkpointing`: activation bytes kept across the forward and step time per number of
  segments. Chen et al. 2016 ("Training Deep Nets with Sublinear Memory Cost", sec. 3.3): with
  ``n`` layers cut into ``k`` segments, memory ~ ``k`` kept segment inputs + ``n/k`` layers
  recomputed at a time, minimal at ``k ~ sqrt(n)``, for about one extra forward pass (their
  1000-layer ResNet: 48 GB to 7 GB at about 30% more time).

The input pipeline (DataLoader workers, pinned memory, ``cudnn.benchmark``) is in :mod:`labkit.hardware.loading`.
Options that need a GPU give a skipped row with the reason on a machine without one; nothing here fails for
lack of a GPU.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys

import torch
from torch import nn

from .._validate import ArgumentError, validate_int
from ..devices import now
from ..runtime.launcher import child_env
from ..sliced.models import saved_bytes, small_resnet
from .cpu import ONEDNN_ISAS, cpu_info, gpu_info, predict_bf16
from .step import (
    LOSS_RTOL,
    NOT_ON_CPU,
    Result,
    _agreement,
    _close,
    _model_name,
    _setup,
    _skipped,
    _threads,
    _timed_row,
    _where,
    make_step,
)
from .timing import time_interleaved

__all__ = ["mixed_precision", "bf16_by_isa", "channels_last_speed", "compile_speed", "batch_sweep", "checkpointing"]


def _predict(device):
    if device == "cuda":
        info = gpu_info() or {}
        major = int(str(info.get("capability", "0.0")).split(".")[0])
        if info.get("bf16") and major >= 8:
            return "fast", f"compute capability {info.get('capability')}: tensor cores take bf16 and fp16"
        if major >= 7:
            return "unknown", f"compute capability {info.get('capability')}: fp16 tensor cores, bf16 emulated or absent"
        return "slow", f"compute capability {info.get('capability')}: no tensor cores"
    return predict_bf16(cpu_info())


def mixed_precision(model=None, batch=None, device="cpu", trials=7, quick=True, optimizer="sgd", threads=1,
                    progress=None) -> Result:
    """fp32 vs autocast-bf16 (and autocast-fp16 + GradScaler on a GPU): step time, the prediction beside it,
    and each loss at the initial weights against fp32's."""
    model, batch, device, trials, notes = _setup(model, batch, device, trials, quick)
    precisions = ["fp32", "autocast-bf16"] + (["autocast-fp16"] if device == "cuda" else [])
    with _threads(threads if device == "cpu" else None):
        steps = {p: make_step(model, batch, device, precision=p, optimizer=optimizer) for p in precisions}
        runs = dict(steps)
        if device == "cuda":  # the fp32 baseline without TF32 (PyTorch's default lets convolutions use it), and with
            steps["fp32 + TF32"] = make_step(model, batch, device, optimizer=optimizer)
            runs = {"fp32": _tf32(steps["fp32"], False), "fp32 + TF32": _tf32(steps["fp32 + TF32"], True),
                    **{p: _tf32(steps[p], False) for p in precisions[1:]}}
            precisions.insert(1, "fp32 + TF32")
            notes.append("fp32 runs with TF32 off in matmuls and convolutions; 'fp32 + TF32' with it on "
                         "(torch.backends.cudnn.allow_tf32 is on by default)")
        timing = time_interleaved(runs, trials=trials, warmup=1, device=device, progress=progress)
    pred, reason = _predict(device)
    ref = steps["fp32"].losses[0]
    rows = []
    for p in precisions:
        loss0 = steps[p].losses[0]
        rows.append(_timed_row(timing, p, batch, **{"loss at init": loss0, "|loss - fp32|": abs(loss0 - ref),
                                                    "loss close": _close(loss0, ref, LOSS_RTOL)}))
    if device != "cuda":
        rows.append(_skipped("autocast-fp16", "GPU only (fp16 needs GradScaler's loss scaling; a CPU's fast "
                                              "half type is bf16)", NOT_ON_CPU))
    bf = timing.speedup("autocast-bf16")
    agree = _agreement(pred, bf)
    bf_row = next(r for r in rows if r["variant"] == "autocast-bf16")
    close = bf_row["loss close"]
    fp16 = f", autocast-fp16 {timing.speedup('autocast-fp16'):.2f}x" if "autocast-fp16" in timing.names else ""
    verdict = (f"autocast-bf16 step {bf:.2f}x the speed of fp32{fp16} ({_model_name(model)}, batch {batch}, "
               f"{_where(device)}, median of {trials} interleaved rounds); predicted '{pred}': {agree}; "
               f"bf16 loss at init {bf_row['loss at init']:.4f} vs fp32 {ref:.4f} "
               f"({'within' if close else 'NOT within'} {LOSS_RTOL:.0%})")
    return Result("mixed precision", rows, verdict, device, notes,
                  {"prediction": pred, "reason": reason, "agreement": agree, "bf16_speedup": bf}, timing)


def _tf32(step, on: bool):
    """``step`` with TF32 on or off in CUDA matmuls and convolutions while it runs (restored after)."""
    def run():
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
        try:
            return step()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    return run


_ISA_SCRIPT = """
import json, torch
torch.set_num_threads({threads})
from labkit.hardware import cpu_info, mixed_precision, predict_bf16
r = mixed_precision(model={model!r}, batch={batch}, trials={trials})
t = r.timing
print("LABKIT-JSON " + json.dumps({{"fp32 ms": t.median("fp32") * 1e3, "bf16 ms": t.median("autocast-bf16") * 1e3,
      "bf16 speed-up": t.speedup("autocast-bf16"), "predicted": predict_bf16(cpu_info())[0],
      "torch kernels": torch.backends.cpu.get_cpu_capability()}}))
"""


def _isa_row(isa: str, model: str, batch: int, trials: int, threads: int, timeout: float) -> dict:
    keep = ONEDNN_ISAS[isa]
    env = {"ONEDNN_MAX_CPU_ISA": isa}
    if "avx512f" not in keep:  # torch's own (non-oneDNN) kernels too: AVX2, or none
        env["ATEN_CPU_CAPABILITY"] = "avx2" if "avx2" in keep else "default"
    code = _ISA_SCRIPT.format(threads=threads, model=model, batch=batch, trials=trials)
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                           env=child_env(**env))
    except subprocess.TimeoutExpired:
        return _skipped(f"oneDNN held to {isa}", f"did not finish in {timeout:g} s (a busy machine?)")
    line = next((x for x in p.stdout.splitlines() if x.startswith("LABKIT-JSON ")), None)
    if p.returncode or line is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        return _skipped(f"oneDNN held to {isa}", f"the run failed (exit {p.returncode}): {tail[0]}")
    return {"variant": f"oneDNN held to {isa}", **json.loads(line[len("LABKIT-JSON "):])}


def bf16_by_isa(isas=("AVX512_CORE", "AVX2"), model="small", batch=8, trials=3, threads=1,
                timeout: float = 300) -> Result:
    """fp32 against autocast-bf16 on this CPU as it is, then with oneDNN held to each of ``isas``
    (``ONEDNN_MAX_CPU_ISA``; below AVX512 torch's own kernels are held to AVX2 too, ``ATEN_CPU_CAPABILITY``), each
    in a fresh process (the variables are read once, when the library loads). Rows: the prediction from the
    usable flags, fp32 and bf16 step times (medians of interleaved rounds) and bf16's speed-up.

    On an AVX512-BF16 or AMX machine this shows both sides of "mixed precision is faster" on one chip: without
    native bf16 instructions every bf16 value is converted around fp32 kernels."""
    if not isinstance(isas, (list, tuple)) or not isas:
        raise ArgumentError(f"isas must be a non-empty list of oneDNN ISA names, got {isas!r}; pick from "
                            f"{list(ONEDNN_ISAS)}")
    bad = [i for i in isas if str(i).upper() not in ONEDNN_ISAS]
    if bad:
        raise ArgumentError(f"isas has unknown oneDNN ISA names {bad}; pick from {list(ONEDNN_ISAS)}")
    if not isinstance(model, str):
        raise ArgumentError(f"model must be a model name (each run is a fresh process), got {type(model).__name__}")
    trials = validate_int("trials", trials, minimum=1)
    info = cpu_info()
    notes = []
    with _threads(threads):
        here = mixed_precision(model=model, batch=batch, trials=trials, threads=threads)
    t = here.timing
    rows = [{"variant": "every ISA this CPU has", "fp32 ms": t.median("fp32") * 1e3,
             "bf16 ms": t.median("autocast-bf16") * 1e3, "bf16 speed-up": t.speedup("autocast-bf16"),
             "predicted": predict_bf16(info)[0], "torch kernels": info.capability}]
    if not any(info.flags.get(f) for f in ("avx2", "avx512f")):
        notes.append("no x86 vector flags could be read here: ONEDNN_MAX_CPU_ISA applies to x86 CPUs only")
    else:
        rows += [_isa_row(str(i).upper(), model, batch, trials, threads, timeout) for i in isas]
    ran = [r for r in rows if r.get("bf16 speed-up") is not None]
    verdict = "bf16 speed-up over fp32: " + "; ".join(f"{r['bf16 speed-up']:.2f}x with {r['variant']}" for r in ran)
    verdict += f" ({model}, batch {batch}, {info.model}, medians of {trials} interleaved rounds per process)"
    return Result("bf16 by instruction set", rows, verdict, "cpu", notes, {"speedups": {
        r["variant"]: r["bf16 speed-up"] for r in ran}}, here.timing)


def channels_last_speed(model=None, batch=None, device="cpu", trials=7, quick=True, optimizer="sgd", threads=1,
                        progress=None) -> Result:
    """NCHW vs channels_last (NHWC), in fp32 and in autocast-bf16; each against its own precision's NCHW run."""
    model, batch, device, trials, notes = _setup(model, batch, device, trials, quick)
    cases = {"fp32": ("fp32", False), "fp32 + channels_last": ("fp32", True),
             "bf16": ("autocast-bf16", False), "bf16 + channels_last": ("autocast-bf16", True)}
    with _threads(threads if device == "cpu" else None):
        steps = {n: make_step(model, batch, device, precision=p, channels_last=c, optimizer=optimizer)
                 for n, (p, c) in cases.items()}
        timing = time_interleaved(steps, trials=trials, warmup=1, device=device, progress=progress)
    rows = [_timed_row(timing, n, batch, against="bf16" if n.startswith("bf16") else "fp32",
                       **{"baseline": "bf16" if n.startswith("bf16") else "fp32",
                          "vs fp32 NCHW": timing.speedup(n)}) for n in cases]
    f, b = timing.speedup("fp32 + channels_last"), timing.speedup("bf16 + channels_last", "bf16")
    verdict = (f"channels_last: {f:.2f}x the speed of NCHW in fp32, {b:.2f}x in bf16 ({_model_name(model)}, batch "
               f"{batch}, {_where(device)}, median of {trials} interleaved rounds)")
    return Result("channels_last", rows, verdict, device, notes, {"fp32_speedup": f, "bf16_speedup": b}, timing)


_CUDA_HOME_NOTE = ("torch logs 'No CUDA runtime is found, using CUDA_HOME=...' when inductor first loads its C++ "
                   "builder on a machine with a CUDA toolkit but no GPU; the CPU compile uses no CUDA, so that line is "
                   "silenced during the compile (other warnings still show)")


@contextlib.contextmanager
def _quiet_cuda_home(device):
    """Silence ``torch.utils.cpp_extension``'s one warning, "No CUDA runtime is found, using CUDA_HOME=...", while
    compiling for the CPU with a CUDA build of torch and no GPU: the module logs it when it is first imported (it
    looks for a CUDA toolkit at import), inductor imports it to build C++ for the CPU, and CUDA plays no part.
    Errors from that logger still show. Yields whether it silenced anything."""
    quiet = str(device).split(":")[0] == "cpu" and torch.cuda._is_compiled() and not torch.cuda.is_available()
    log = logging.getLogger("torch.utils.cpp_extension")
    old = log.level
    if quiet:
        log.setLevel(logging.ERROR)
    try:
        yield quiet
    finally:
        log.setLevel(old)


def _cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def compile_speed(model=None, batch=None, device="cpu", trials=7, quick=True, optimizer="sgd", threads=1,
                  progress=None) -> Result:
    """Eager vs ``torch.compile``: the first compiled call (compile time) apart from the steady-state ratio; the
    compiled losses against eager's. On the CPU the quick path compiles a smaller ResNet (widths 8, 16, 32) at
    batch 8 to keep the compile short."""
    if model is None and quick and str(device).split(":")[0] == "cpu":
        torch.manual_seed(0)
        model = small_resnet(widths=(8, 16, 32), blocks=(1, 1, 1))
    model, batch, device, trials, notes = _setup(model, batch, device, trials, quick, cpu_batch=(8, 32))
    name = _model_name(model)
    with _threads(threads if device == "cpu" else None):
        eager = make_step(model, batch, device, optimizer=optimizer)
        t0 = now(device)
        eager()
        eager_first = now(device) - t0
        if device == "cpu" and _cxx() is None:
            reason = "no C++ compiler found (set CXX or install g++/clang++): inductor generates C++ on the CPU"
            return Result("torch.compile", [_skipped("compiled", reason)], f"torch.compile not measured: {reason}",
                          device, notes + [reason])
        try:
            with _quiet_cuda_home(device) as quiet:
                compiled = make_step(model, batch, device, optimizer=optimizer, compiled=True)
                t0 = now(device)
                compiled()
                first = now(device) - t0
            if quiet:
                notes.append(_CUDA_HOME_NOTE)
        except Exception as e:  # inductor or dynamo failing is a result to report, not a crash
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            reason = f"torch.compile failed ({type(e).__name__}: {msg}); a working C++ compiler is needed on CPU"
            return Result("torch.compile", [_skipped("compiled", reason)], f"torch.compile not measured: {reason}",
                          device, notes + [reason])
        timing = time_interleaved({"eager": eager, "compiled": compiled}, trials=trials, warmup=1, device=device,
                                  progress=progress)
    le, lc = eager.losses, compiled.losses
    rel = max(abs(a - b) / max(abs(a), 1e-8) for a, b in zip(le, lc))
    match0 = _close(lc[0], le[0], 1e-3)
    rows = [_timed_row(timing, "eager", batch, **{"first call s": eager_first, "loss at init": le[0]}),
            _timed_row(timing, "compiled", batch, **{"first call s": first, "loss at init": lc[0],
                                                      "loss matches eager": match0})]
    sp = timing.speedup("compiled")
    verdict = (f"torch.compile: first call {first:.1f} s (compiling; eager's first {eager_first * 1e3:.0f} ms), then "
               f"{sp:.2f}x the speed of eager ({name}, batch {batch}, {_where(device)}, median of {trials} rounds); "
               f"loss at init {'matches' if match0 else 'DIFFERS from'} eager (max relative difference over "
               f"{len(lc)} steps {rel:.1e})")
    return Result("torch.compile", rows, verdict, device, notes,
                  {"compile_s": first - statistics.median(timing.seconds["compiled"]), "speedup": sp,
                   "max_rel_loss_diff": rel}, timing)


def batch_sweep(batches=None, model=None, device="cpu", trials=7, quick=True, optimizer="sgd", threads=1,
                progress=None) -> Result:
    """Images per second and activation bytes (saved-tensor ledger) against batch size, interleaved."""
    model, _, device, trials, notes = _setup(model, 1, device, trials, quick)
    if batches is None:
        batches = ((4, 16, 32) if quick else (8, 16, 32, 64, 128)) if device == "cpu" else \
            ((16, 64, 128) if quick else (16, 32, 64, 128, 256))
    if not isinstance(batches, (list, tuple)) or not batches:
        raise ArgumentError(f"batches must be a non-empty list of batch sizes, got {batches!r}")
    batches = [validate_int("batches[]", b, minimum=1) for b in batches]
    with _threads(threads if device == "cpu" else None):
        steps = {f"batch {b}": make_step(model, b, device, optimizer=optimizer) for b in batches}
        act = {n: s.activation_bytes() for n, s in steps.items()}
        timing = time_interleaved(steps, trials=trials, warmup=1, device=device, progress=progress)
    rows = []
    base_ips = batches[0] / timing.median(f"batch {batches[0]}")
    for b in batches:
        n = f"batch {b}"
        ips = b / timing.median(n)
        rows.append({"batch": b, "median ms": timing.median(n) * 1e3, "images/s": ips,
                     "images/s vs first": ips / base_ips, "activation MB": act[n] / 1e6,
                     "MB per image": act[n] / b / 1e6})
    per = [r["MB per image"] for r in rows]
    best = max(rows, key=lambda r: r["images/s"])
    verdict = (f"batch {batches[0]} -> {batches[-1]}: {rows[0]['images/s']:.0f} -> {rows[-1]['images/s']:.0f} "
               f"images/s (best {best['images/s']:.0f} at batch {best['batch']}); activations "
               f"{rows[0]['activation MB']:.1f} -> {rows[-1]['activation MB']:.1f} MB, "
               f"{min(per):.3f}-{max(per):.3f} MB per image ({_model_name(model)}, {_where(device)})")
    return Result("batch size", rows, verdict, device, notes, {"mb_per_image": per}, timing)


def _segment_bytes(layers: nn.Sequential, x, k: int) -> list[tuple[int, int]]:
    """``(input bytes, saved bytes other than the input)`` of each segment that
    ``checkpoint_sequential(layers, k, x)`` recomputes (all but the last, which runs without checkpointing)."""
    if k < 2:
        return []
    size = len(layers) // k
    out, h = [], x
    for i in range(k - 1):
        seg = layers[i * size:(i + 1) * size]
        h_in = h.detach().requires_grad_(i > 0)
        skip = nn.Module()  # the segment's weights and its input (counted as kept) are not counted again
        skip.seg = seg
        skip.register_buffer("inp", h_in, persistent=False)
        h, got = saved_bytes(lambda: seg(h_in), exclude=skip)
        out.append((h_in.untyped_storage().nbytes(), got))
    return out


def _backward_peak(kept: int, segments: list[tuple[int, int]]) -> int:
    """Activation bytes at the worst moment of the backward: all that the forward kept, or, while segment ``i`` is
    recomputed (last to first; the later segments' tensors are freed by then), the inputs of segments
    ``0..i`` plus segment ``i``'s saved tensors. Gradient buffers in flight are not counted."""
    peak = kept
    for i, (_, saved) in enumerate(segments):
        peak = max(peak, sum(b for b, _ in segments[:i + 1]) + saved)
    return peak


def checkpointing(segments=None, model=None, batch=None, device="cpu", trials=7, quick=True, optimizer="sgd",
                  threads=1, progress=None) -> Result:
    """Activation bytes and step time per number of checkpoint segments (0: none), against Chen et al.'s
    sqrt(n) rule; each checkpointed run's gradients against the plain run's."""
    model, batch, device, trials, notes = _setup(model, batch, device, trials, quick)
    with _threads(threads if device == "cpu" else None):
        plain = make_step(model, batch, device, optimizer=optimizer)
        n = len(plain.layers)
        if segments is None:
            top = min(n, 2 * math.ceil(math.sqrt(n)))
            segments = (0, 2, 3, 4) if quick else (0, *range(2, top + 1))
        if not isinstance(segments, (list, tuple)) or not segments:
            raise ArgumentError(f"segments must be a non-empty list of segment counts (0: none), got {segments!r}")
        segments = [validate_int("segments[]", k, minimum=0, maximum=n) for k in segments]
        if 0 not in segments:
            segments = [0, *segments]
        segments = sorted(set(segments))
        steps = {0: plain, **{k: make_step(model, batch, device, optimizer=optimizer, checkpoint=k)
                              for k in segments if k}}
        ref = plain.gradients()
        grads_equal = {}
        for k, s in steps.items():
            g = s.gradients()
            grads_equal[k] = g.keys() == ref.keys() and all(torch.allclose(g[p], ref[p], rtol=1e-4, atol=1e-6)
                                                            for p in ref)
        kept = {k: s.activation_bytes() for k, s in steps.items()}
        seg = {k: _segment_bytes(s.layers, s.x, k) for k, s in steps.items()}
        timing = time_interleaved({f"segments {k}": s for k, s in steps.items()}, trials=trials, warmup=1,
                                  device=device, progress=progress)
    rows = []
    for k in segments:
        peak = _backward_peak(kept[k], seg[k])
        rows.append({"segments": k, "median ms": timing.median(f"segments {k}") * 1e3,
                     "time vs none": timing.ratio(f"segments {k}"), "kept MB": kept[k] / 1e6,
                     "backward peak MB": peak / 1e6, "memory vs none": peak / kept[0],
                     "grads equal": grads_equal[k]})
    best = min(rows, key=lambda r: r["backward peak MB"])
    rule = math.sqrt(n)
    ck = [r for r in rows if r["segments"] >= 2]
    extra_time = statistics.median(r["time vs none"] for r in ck) if ck else float("nan")
    verdict = (f"{n} layers: least activation memory at {best['segments']} segments "
               f"({best['memory vs none']:.0%} of none; Chen et al.'s sqrt(n) = {rule:.1f}, for layers of equal "
               f"size), step time "
               f"{extra_time:.2f}x of none (median over checkpointed runs; one extra forward predicts ~1.33x); "
               f"gradients {'equal' if all(grads_equal.values()) else 'DIFFER'} ({_model_name(model)}, batch "
               f"{batch}, {_where(device)})")
    return Result("checkpointing", rows, verdict, device, notes,
                  {"n_layers": n, "sqrt_n": rule, "best_segments": best["segments"], "grads_equal": grads_equal},
                  timing)
