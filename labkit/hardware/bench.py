"""``python -m labkit bench hardware``: each hardware optimisation of lab 09 against the plain fp32 step.

Prints the processor (or GPU) and its flags, then one table per experiment of
:mod:`labkit.hardware.speed`: medians of interleaved rounds and each variant's ratio against the
baseline measured in the same run, with published figures beside them (for other hardware: a
guide to the direction and size, not a target here):

- bf16 by instruction set: the same CPU with oneDNN held to AVX512 without BF16, and to AVX2
  (``ONEDNN_MAX_CPU_ISA``): bf16 where the hardware has no bf16 arithmetic.
- memory: the calculator against PyTorch's memory tracker (CPU) or the CUDA allocator's peak (GPU).
- mixed precision: NVIDIA DeepLearningExamples, ResNet-50 v1.5 training (PyTorch 21.03): A100-80GB
  TF32 938 img/s vs AMP 2470 (2.63x), V100 FP32 367 vs AMP 1200 (3.26x); on CPUs, bf16 autocast is
  fast only with AVX512-BF16 or AMX (pytorch/pytorch#86270: over 2x slower; #146508: 44-499x slower
  matmuls on AVX2 only).
- channels_last: PyTorch's channels_last tutorial: 8-35% faster on Volta with AMP.
- torch.compile: PyTorch 2.0 release: 43% faster training on average on an A100 (21% fp32, 51% AMP).
- checkpointing: Chen et al. 2016: O(sqrt n) memory for one extra forward (a 1000-layer ResNet from
  48 GB to 7 GB at about 30% more time).

``--quick`` runs the small configurations the notebook uses (seconds each, torch.compile excepted:
its first compile on a CPU takes a minute or more, later runs reuse inductor's cache). ``--model`` and ``--batch``
size every experiment that trains a ResNet (default: the small ResNet on a CPU; ResNet-50 at batch 64 with
``--quick``, 256 without, on a GPU): ``--model resnet18 --batch 64 --trials 3`` on a GPU is a run of about a minute.

Each experiment is guarded: one that raises (a CUDA out-of-memory at a batch too large for the card, a compiler
missing) is reported as FAILED with its error, the GPU's cached memory is released, and the next one runs. The
command exits 1 when any experiment failed.
"""
from __future__ import annotations

import argparse
import gc
import sys

from ..viz import format_table

EXPERIMENTS = ("memory", "precision", "isa", "channels_last", "compile", "batch", "checkpoint", "input")

PUBLISHED = {
    "memory": ["ZeRO (Rajbhandari et al. 2019): 16 bytes per parameter for mixed-precision Adam; the Ultra-Scale "
               "Playbook: 1B parameters -> 16 GB before activations"],
    "precision": ["NVIDIA DeepLearningExamples ResNet-50 v1.5 (PyTorch 21.03): A100 TF32 938 -> AMP 2470 img/s "
                  "(2.63x); V100 FP32 367 -> AMP 1200 (3.26x)",
                  "CPU bf16 without AVX512-BF16/AMX: >2x slower (pytorch/pytorch#86270), matmuls 44-499x slower on "
                  "AVX2 only (pytorch/pytorch#146508)"],
    "isa": ["pytorch/pytorch#86270: BERT inference over 2x slower under CPU bf16 autocast without native bf16; "
            "pytorch/pytorch#146508: bf16 matmuls 44-499x slower on an AVX2-only CPU"],
    "channels_last": ["PyTorch channels_last tutorial: 8-35% faster on Volta with AMP (ResNet-50 ~772 -> ~1011 "
                      "img/s in its example)"],
    "compile": ["PyTorch 2.0 release: torch.compile trained 43% faster on average on an A100 (21% fp32, 51% AMP), "
                "working on 93% of 163 models"],
    "batch": ["activation memory grows linearly with the batch; throughput grows until the device is full"],
    "checkpoint": ["Chen et al. 2016: O(sqrt n) memory for one extra forward; a 1000-layer ResNet 48 GB -> 7 GB "
                   "at about 30% more time"],
    "input": ["workers overlap loading with compute: at best max(load, compute) per batch instead of the sum "
              "(2x when they are equal)"],
}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict]) -> str:
    """Rows as an aligned text table (the union of their keys, in first-seen order, a note last), each cell as
    :func:`_fmt` writes it, laid out by :func:`labkit.viz.format_table`."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and k != "note"]
    if any("note" in r for r in rows):
        cols.append("note")
    return format_table([{c: _fmt(r[c]) if c in r else "" for c in cols} for r in rows])


def memory_check(device="cpu", trials=7, quick=True):
    """The calculator against a measured run (MemTracker on CPU, the CUDA allocator on a GPU) for an MLP, the small
    ResNet and a 2-layer transformer, fp32 Adam: one row per model and component (``trials`` is not used: memory
    does not vary from run to run)."""
    import torch

    from ..sliced.models import build_model
    from .measure import compare, measure
    from .memory import Setup, estimate
    from .step import Result, _resolve_device
    from .transformer import TransformerShape, mlp, tiny_transformer

    device, notes = _resolve_device(device)
    b = 16 if quick else 64
    shape = TransformerShape(layers=2, width=64, heads=4, vocab=100, seq=64, micro_batch=b // 2)
    torch.manual_seed(0)
    models = {"MLP 256-512-512-10": (mlp(dropout=0.1), torch.randn(b, 256)),
              "small ResNet": (build_model("small"), torch.randn(b, 3, 32, 32)),
              "transformer 2 x 64": (tiny_transformer(shape, dropout=0.1), torch.randint(0, 100, (b // 2, 64)))}
    rows, worst = [], {}
    for name, (model, x) in models.items():
        got = measure(model, x, setup=Setup(), steps=2, device=device)
        for r in compare(estimate(model, Setup(), x), got):
            rows.append({"model": name, "batch": x.shape[0], **r, "method": got.method})
            worst[r["component"]] = max(worst.get(r["component"], 0.0), abs(r["ratio"] - 1)
                                        if r["measured"] else 0.0)
    verdict = (f"predicted / measured, worst over the models: params, grads, optimizer within "
               f"{max(worst['params'], worst['grads'], worst['optimizer']):.2%}; activations within "
               f"{worst['activations']:.2%}; peak within {worst['peak']:.2%} ({rows[0]['method']})")
    return Result("memory: calculator against a measured run", rows, verdict, device, notes, {"worst": worst})


def _sized(name: str, model, batch) -> dict:
    """The keyword arguments that size experiment ``name`` (``model``, ``batch``; None keeps its own default)."""
    if name in ("memory", "isa"):  # fixed small models / a CPU-only comparison in fresh processes
        return {}
    kw = {} if model is None else {"model": model}
    if batch is not None:
        if name == "batch":  # a sweep up to the batch asked for
            kw["batches"] = tuple(sorted({max(1, batch // 4), max(1, batch // 2), batch}))
        else:
            kw["batch"] = batch
    return kw


def run(names, device="cpu", trials=7, quick=True, echo=print, model=None, batch=None) -> dict:
    """Run the named experiments, print each table with its verdict and published figures; ``{name: Result}``,
    or ``{name: exception}`` for one that failed (reported as FAILED; the others still run). ``model`` and ``batch``
    size the experiments that train a ResNet (:func:`_sized`)."""
    from .loading import input_pipeline
    from .speed import batch_sweep, bf16_by_isa, channels_last_speed, checkpointing, compile_speed, mixed_precision

    def isa(device="cpu", trials=7, quick=True):
        if device == "cuda":
            from .step import Result
            return Result("bf16 by instruction set", [], "skipped: ONEDNN_MAX_CPU_ISA concerns CPU kernels only",
                          device)
        return bf16_by_isa(batch=8 if quick else 16, trials=trials)

    fns = {"memory": memory_check, "precision": mixed_precision, "isa": isa, "channels_last": channels_last_speed,
           "compile": compile_speed, "batch": batch_sweep, "checkpoint": checkpointing, "input": input_pipeline}
    out = {}
    for name in names:
        try:
            result = fns[name](device=device, trials=trials, quick=quick, **_sized(name, model, batch))
        except Exception as e:  # one experiment's failure (out of memory, no compiler) must not end the others
            out[name] = e
            first = str(e).strip().splitlines()
            echo(f"\n== {name}: FAILED ==\n{type(e).__name__}: {first[0][:300] if first else ''}")
            del e
            _release(device)
            continue
        out[name] = result
        echo(f"\n== {result.name} ==")
        echo(table(result.rows()))
        echo("measured: " + result.verdict)
        for note in result.notes:
            echo("note: " + note)
        for ref in PUBLISHED[name]:
            echo("published: " + ref)
    return out


def _release(device) -> None:
    """Give the failed experiment's memory back (its tensors die with its frames; the CUDA cache keeps them)."""
    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    from ..sliced.models import MODEL_NAMES
    from .cpu import cpu_info, gpu_info, predict_bf16

    p = argparse.ArgumentParser(prog="python -m labkit bench hardware", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the notebook's small configurations")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--trials", type=int, default=7, help="interleaved timed rounds per experiment (default 7)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(EXPERIMENTS)}, run in the "
                   "order given")
    p.add_argument("--model", choices=MODEL_NAMES, default=None,
                   help="the ResNet the speed experiments train (default: small on CPU, resnet50 on GPU)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: the experiment's own; the "
                   "batch sweep goes up to it)")
    args = p.parse_args(argv)
    names = list(EXPERIMENTS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in names if n not in EXPERIMENTS]
        if bad:
            p.error(f"--only: unknown experiment(s) {bad}; choose from {','.join(EXPERIMENTS)}")
    if args.trials < 1:
        p.error(f"--trials must be >= 1, got {args.trials}")
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    info = cpu_info()
    verdict, reason = predict_bf16(info)
    print(f"CPU: {info.summary()}")
    print(f"bf16 on this CPU predicted '{verdict}': {reason}")
    gpu = gpu_info()
    if args.device == "cuda":
        print(f"GPU: {gpu}" if gpu else "GPU: none here; --device cuda runs the CPU case and says so")
    size = ", ".join(x for x in (args.model and f"model {args.model}", args.batch and f"batch {args.batch}") if x)
    print(f"{'quick' if args.quick else 'full'} run, {args.trials} interleaved rounds per experiment, "
          f"one torch thread on CPU" + (f"; {size}" if size else ""))
    out = run(names, device=args.device, trials=args.trials, quick=args.quick, model=args.model, batch=args.batch)
    failed = [n for n, r in out.items() if isinstance(r, BaseException)]
    print(f"\nexperiments: {len(out) - len(failed)} ran, {len(failed)} FAILED" + (f" ({', '.join(failed)})"
                                                                                  if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
