"""Lab 03's exercise checks and tour."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..checks import expect_close, expect_equal, run_cases
from ..tour import check_row
from .article import article_block_error
from .channels import run_channel_checks
from .models import build_model, flatten_resnet, input_shape_for, small_resnet, split_costs, split_stages
from .stages import StagedModel, run_staged


def check_stage_params(fn):
    """Exercise check: ``fn(model, cuts)`` must return the parameter count of each stage."""
    def case(name, bounds):
        def thunk():
            model = build_model(name)
            want = [r["params"] for r in split_costs(model, bounds, input_shape_for(name, 1))]
            got = fn(model, list(bounds))
            expect_equal([int(v) for v in got], want, what=f"parameters per stage of {name} split at {list(bounds)}")
        return thunk

    cases = [(f"{n} split at {b}", case(n, b)) for n, b in [("small", [4]), ("small", [2, 5, 8]), ("small", [9])]]
    return run_cases("parameters per stage", cases,
                     hint="split_stages(model, cuts) gives the stages; count p.numel() over stage.parameters()")


def check_row_parallel(fn):
    """Exercise check: ``fn(x, conv, world)`` must equal ``conv(x)`` by summing per-slice partials."""
    def case(cin, cout, world, bias, k):
        def thunk():
            torch.manual_seed(cin * 7 + world)
            conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)
            x = torch.randn(2, cin, 6, 6)
            with torch.no_grad():
                got = fn(x, conv, world)
                expect_close(got, conv(x), rtol=1e-4, atol=1e-5, what=f"{world}-way row split of Conv2d({cin},{cout},{k})")
        return thunk

    cases = [(f"Conv2d({ci}->{co}, k={k}, bias={b}) over {w} ranks", case(ci, co, w, b, k))
             for ci, co, w, b, k in [(4, 3, 2, False, 1), (8, 5, 4, True, 3), (6, 6, 3, True, 3), (4, 2, 1, True, 3)]]
    return run_cases("row-parallel convolution", cases,
                     hint="slice x[:, r*k:(r+1)*k] and conv.weight[:, r*k:(r+1)*k]; add the bias once, after the sum")


def tour(world_size: int = 2) -> list[dict]:
    """Lab 03's headless quick checks: stages in one process, ``world_size`` stage ranks over send/recv,
    the article's block, and channel-split layers on ``world_size`` ranks."""
    from ..partition import even_cuts

    lab, n = "03 model parallel", world_size

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

    return [check_row(lab, "3 stages on 3 'devices' in one process == unsliced small ResNet (output, grads)",
                      single_process),
            check_row(lab, f"{n} ranks, send/recv activations and gradients == unsliced small ResNet", multi_process),
            check_row(lab, "the article's SplitConvBlock fails as published", article),
            check_row(lab, f"column/row conv and linear + TP conv block == unsplit (fwd, bwd), {n} ranks", channels)]
