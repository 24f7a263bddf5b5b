"""Lab 03's exercise checks and tour, and the rank functions and runners the notebook launches (defined in
``stages`` and ``channels``, reached here as ``labkit.sliced.lab.stage_rank`` and so on)."""
from __future__ import annotations

import copy
import random

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..checks import expect_close, run_cases
from ..tour import lab_name, run_check
from .article import article_block_error
from .channels import channel_rank, run_channel_checks
from .models import build_model, flatten_resnet, small_resnet, split_costs, split_stages
from .stages import StagedModel, replica_rank, run_replicas, run_staged, stage_rank

__all__ = ["check_stage_params", "check_row_parallel", "tour",
           "stage_rank", "run_staged", "replica_rank", "run_replicas", "channel_rank", "run_channel_checks"]


def check_stage_params(fn):
    """Exercise check: ``fn(model, cuts)`` must return the parameter count of each stage.

    Cases: fixed splits of the small ResNet and ResNet-18 plus random cuts drawn at check time (so no
    table of answers can pass), and the answer may not run the model (``split_costs`` does; counting
    parameters needs no forward pass)."""
    from ..checks import calls_to, refuse

    rng = random.Random()
    fixed = [("small", [4]), ("small", [2, 5, 8]), ("resnet18", [9])]
    drawn = []
    for name in ("small", "resnet18"):
        n = len(flatten_resnet(build_model(name)))
        while True:  # never one of the fixed cases below
            cuts = sorted(rng.sample(range(1, n), rng.randint(1, 3)))
            if (name, cuts) not in fixed:
                break
        drawn.append((name, cuts))

    models: dict = {}  # one model per name and check: building ResNet-18 is the slow part

    def case(name, bounds):
        def thunk():
            if name not in models:
                models[name] = build_model(name)
            model = models[name]
            want = [sum(p.numel() for p in stage.parameters()) for stage in split_stages(model, bounds)]
            with calls_to(split_costs, (nn.Module.__call__, "a module's forward (model(x))")) as seen:
                got = fn(model, list(bounds))
            refuse(seen, "count the parameters without running the model or calling split_costs "
                         "(p.numel() over each stage's parameters)")
            try:
                got = [int(v) for v in got]
            except (TypeError, ValueError):
                raise AssertionError(f"return a list of integers, one per stage; got {got!r}") from None
            if len(got) != len(want):
                raise AssertionError(f"{len(bounds)} cut(s) make {len(want)} stages; you returned {len(got)} numbers")
            if sum(got) != sum(want):
                raise AssertionError(f"your stages add up to {sum(got)} parameters, the model has {sum(want)}: "
                                     f"every parameter belongs to exactly one stage")
            bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
            if bad:
                raise AssertionError(f"stage(s) {bad} of {name} split at {list(bounds)} have the wrong count "
                                     f"(stage i is layers[cuts[i-1]:cuts[i]] of flatten_resnet)")
        return thunk

    cases = [(f"{n} split at {b}", case(n, b)) for n, b in fixed]
    cases += [(f"{n} split at {b} (drawn now)", case(n, b)) for n, b in drawn]
    return run_cases("parameters per stage", cases,
                     hint="split_stages(model, cuts) gives the stages; count p.numel() over stage.parameters()")


class _ConvCalls(TorchFunctionMode):
    """Record the (input, weight) shapes of every convolution run inside the mode."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[tuple, tuple, object]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("conv2d", "convolution", "_convolution", "conv1d", "conv3d"):
            ins = [a for a in args if isinstance(a, torch.Tensor)]
            if len(ins) >= 2:
                self.calls.append((tuple(ins[0].shape), tuple(ins[1].shape), ins[1]))
        return func(*args, **(kwargs or {}))


def check_row_parallel(fn):
    """Exercise check: ``fn(x, conv, world_size)`` must equal ``conv(x)`` by summing per-slice partials.

    Besides the value, it records every convolution the answer runs: there must be ``world_size`` of them,
    each on ``cin / world_size`` input channels with the matching weight slice, so calling the unsplit layer
    (or ``F.conv2d`` with the whole weight) fails. Layer sizes and seeds are drawn at check time."""
    rng = random.Random()

    def case(cin, cout, world_size, bias, k):
        def thunk():
            torch.manual_seed(rng.randrange(1 << 30))
            conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)
            x = torch.randn(2, cin, 6, 6)
            spy = _ConvCalls()
            with torch.no_grad():
                with spy:
                    got = fn(x, conv, world_size)
                want = conv(x)
            slice_c = cin // world_size
            whole = [c for c in spy.calls if c[0][1] == cin and world_size > 1]
            if whole:
                raise AssertionError(f"a convolution ran on all {cin} input channels (the unsplit layer): each "
                                     f"partial product must see only its slice of {slice_c} channels")
            shapes = [c[1] for c in spy.calls]
            if len(spy.calls) != world_size:
                raise AssertionError(f"expected {world_size} partial convolutions (one per rank), your answer ran "
                                     f"{len(spy.calls)}" + (f" with weight shapes {shapes}" if shapes else ""))
            wrong = [s for s in shapes if s[:2] != (cout, slice_c)]
            if wrong:
                raise AssertionError(f"each partial needs a weight slice of shape ({cout}, {slice_c}, {k}, {k}); "
                                     f"got {wrong}")
            expect_close(got, want, rtol=1e-4, atol=1e-5,
                         what=f"{world_size}-way row split of Conv2d({cin},{cout},{k})")
        return thunk

    specs = [(4, 3, 2, False, 1), (8, 5, 4, True, 3), (4, 2, 1, True, 3)]
    for _ in range(3):  # drawn now: sizes no answer can hard-code
        w = rng.randint(2, 4)
        specs.append((w * rng.randint(1, 3), rng.randint(1, 6), w, rng.random() < 0.5, rng.choice([1, 3])))
    cases = [(f"Conv2d({ci}->{co}, k={k}, bias={b}) over {w} ranks", case(ci, co, w, b, k))
             for ci, co, w, b, k in specs]
    return run_cases("row-parallel convolution", cases,
                     hint="rank r convolves its slice of the input channels with the matching slice of "
                          "conv.weight (F.conv2d, same stride and padding, no bias); sum the partials, "
                          "then add the bias once")


def tour(world_size: int = 2) -> list[dict]:
    """Lab 03's headless quick checks: stages in one process, ``world_size`` stage ranks over send/recv,
    the article's block, and channel-split layers on ``world_size`` ranks."""
    from ..partition import even_cuts

    lab, n = lab_name(__package__), world_size

    def single_process():
        torch.manual_seed(0)
        net = small_resnet().train()
        ref = copy.deepcopy(net)
        x = torch.randn(4, 3, 32, 32)
        staged = StagedModel(split_stages(net, [4, 7]), ["cpu"] * 3)
        a, b = staged(x), ref(x)
        a.square().mean().backward()
        b.square().mean().backward()
        ga = dict(flatten_resnet(net).named_parameters())
        err = max((ga[k].grad - p.grad).abs().max().item() for k, p in flatten_resnet(ref).named_parameters())
        oe = (a - b).abs().max().item()
        return oe < 1e-5 and err < 1e-5, f"output err {oe:.1e}, grad err {err:.1e}"

    def multi_process():
        cuts = even_cuts(len(flatten_resnet(small_resnet())), n)
        r = run_staged("small", cuts, batch=4, pool=True)
        ok = r["max_output_err"] < 1e-5 and r["max_grad_rel"] < 1e-5
        return ok, f"cuts {cuts}: output err {r['max_output_err']:.1e}, grad err {r['max_grad_err']:.1e}"

    def article():
        err = article_block_error()
        return err.startswith("AttributeError"), err

    def channels():
        res = run_channel_checks(n, pool=True, channels=32 if 32 % n == 0 else 16 * n)  # channels split evenly
        worst = max(r["max_err"] for r in res)
        # column layers hold exactly 1/N; row layers and the block also keep a small replicated
        # bias / last BatchNorm, so allow 2% of the whole above 1/N
        ratio = max(r["params/rank"] for r in res)
        return worst < 1e-5 and ratio <= 1 / n + 0.02, f"max err {worst:.1e}; params per rank <= {ratio:.2f} of unsplit"

    return [run_check(lab, "3 stages on 3 'devices' in one process == unsliced small ResNet (output, grads)",
                      single_process),
            run_check(lab, f"{n} ranks, send/recv activations and gradients == unsliced small ResNet", multi_process),
            run_check(lab, "the article's SplitConvBlock fails as published", article),
            run_check(lab, f"column/row conv and linear + TP conv block == unsplit (fwd, bwd), {n} ranks", channels)]
