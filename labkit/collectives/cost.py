"""The cost of a collective: nccl-tests bandwidths and the latency-bandwidth (alpha-beta) model (pure).

Bandwidth as nccl-tests defines it (NVIDIA/nccl-tests, doc/PERFORMANCE.md)::

    algbw = S / t                      S: bytes of the tensor, t: time of one collective
    busbw = algbw * 2(n-1)/n           all-reduce
    busbw = algbw * (n-1)/n            reduce-scatter, all-gather (S: the full, gathered size)

busbw is the rate at which the busiest link carries data, so it can be compared across world sizes
and with the hardware's peak.

The alpha-beta model: a message of m bytes costs ``alpha + m * beta`` (alpha: latency, seconds;
beta: seconds per byte). :func:`cost_terms` counts, for each algorithm, the messages and bytes on its
critical path, so ``predict_time = a * alpha + b * beta``. :func:`fit_alpha_beta` fits alpha and beta
to measured times (point-to-point ping-pong, or the algorithms themselves) by least squares on
relative error. The model leaves out the reduction arithmetic and, on a small CPU, the ranks
competing for cores; the notebook shows where that matters.

A fit to noisy timings can come out degenerate (alpha or beta pinned at 0, or constants so far off that
the ring never beats the tree in the range studied). :func:`usable_alpha_beta` says so and falls back to
:data:`DEFAULT_ALPHA_BETA`; :func:`crossover_bytes` gives the size where one algorithm starts to beat
another, exactly, instead of searching a list of sizes.

"""
from __future__ import annotations

from .schedules import ALGORITHMS, _check_world_size, _hd_layout

LIBRARY = "library"  # torch.distributed's own all_reduce (gloo's or NCCL's algorithm)
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
              "all_gather": lambda n: (n - 1) / n, "broadcast": lambda n: 1.0, "reduce": lambda n: 1.0}
MODELLED = ALGORITHMS + ("ring_pipelined", "p2p", "reduce_scatter", "all_gather")
DEFAULT_ALPHA_BETA = (100e-6, 1 / 2e9)
"""The stated fallback (alpha = 100 us, 1/beta = 2 GB/s) for a degenerate fit: gloo over the loopback device
on a small shared CPU machine. Measured with lab 01's ping-pong on the course's 2-core machine under load
(torch 2.14.1, December 2026): alpha 100-150 us, 1/beta 2.5-3.7 GB/s; an idle laptop has a smaller alpha."""

PUBLISHED_LINKS = {
    "NVLink (A100, 8 GPUs)": {
        "alpha": 3.4e-6, "beta": 1 / 300e9, "world_size": 8,
        "source": "alpha: NCCL's own cost model, per ring step over NVLink, Simple protocol, 3.4 us (NVIDIA/nccl "
                  "src/graph/tuning.cc, hwLat); 1/beta: 300 GB/s each way, half of the A100's 600 GB/s NVLink "
                  "bandwidth (NVIDIA A100 Tensor Core GPU datasheet)"},
    "InfiniBand HDR (64 GPUs)": {
        "alpha": 14e-6, "beta": 1 / 25e9, "world_size": 64,
        "source": "alpha: NCCL's cost model, per ring step over the network, Simple protocol, 14 us in recent "
                  "releases (9.6 us in older ones; NVIDIA/nccl src/graph/tuning.cc, hwLat); 1/beta: 25 GB/s, one "
                  "HDR InfiniBand port's 200 Gb/s (NVIDIA ConnectX-6 / Quantum HDR specifications)"},
}
"""Published link figures for the alpha-beta model of a GPU cluster, with their sources: lab 01 predicts from them
where its ring overtakes its tree on hardware whose links are separate wires, which its own CPU cannot show."""


def bus_factor(collective: str, world_size: int) -> float:
    """nccl-tests' busbw / algbw ratio for ``collective`` on ``world_size`` ranks."""
    if collective not in BUS_FACTOR:
        raise ValueError(f"unknown collective {collective!r}; pass one of {sorted(BUS_FACTOR)}")
    return BUS_FACTOR[collective](_check_world_size(world_size))


def bandwidths(nbytes: float, seconds: float, collective: str = "all_reduce", world_size: int = 2) -> dict:
    """``{"algbw": bytes/s, "busbw": bytes/s}`` as nccl-tests computes them."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    algbw = nbytes / seconds
    return {"algbw": algbw, "busbw": algbw * bus_factor(collective, world_size)}


def cost_terms(algorithm: str, nbytes: float, world_size: int) -> tuple[float, float]:
    """``(a, b)`` such that the alpha-beta model predicts ``a * alpha + b * beta`` seconds."""
    n = _check_world_size(world_size)
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
    S = float(nbytes)
    if algorithm == "p2p":
        return 1.0, S
    if n == 1:
        return 0.0, 0.0
    if algorithm == "naive":  # rank 0 receives n-1 tensors one after another, then sends n-1
        return 2.0 * (n - 1), 2.0 * (n - 1) * S
    if algorithm == "tree":  # ceil(log2 n) rounds up, as many down, whole tensor each
        L = (n - 1).bit_length()
        return 2.0 * L, 2.0 * L * S
    if algorithm in ("ring", "ring_pipelined"):  # pipelining overlaps the additions, not the transfers
        return 2.0 * (n - 1), 2.0 * (n - 1) / n * S
    if algorithm == "ring_unchunked":
        return float(n - 1), (n - 1) * S
    if algorithm in ("reduce_scatter", "all_gather"):
        return float(n - 1), (n - 1) / n * S
    if algorithm == "halving_doubling":
        p, r, _, _ = _hd_layout(n)
        L = p.bit_length() - 1
        extra = 2.0 if r else 0.0  # fold and unfold move the whole tensor once each
        return 2.0 * L + extra, 2.0 * (p - 1) / p * S + extra * S
    raise ValueError(f"no cost model for {algorithm!r}; pass one of {', '.join(MODELLED)} "
                     f"(the library's own algorithm is not modelled)")


def total_traffic(algorithm: str, nbytes: float, world_size: int) -> tuple[int, float]:
    """``(messages, bytes)`` that *all* ranks together send in one all-reduce of ``nbytes``, from the pure schedule.

    The alpha-beta model counts the critical path, as if every rank had its own links and cores. When the ranks
    share a few cores and their "links" are memory copies (gloo over loopback on a small CPU), every message costs
    the same cores, so the total is what the clock sees: the ring and the binomial tree both move ``2(n-1)S``
    bytes in all, but the ring sends ``n`` times as many messages."""
    from .schedules import schedule

    n = _check_world_size(world_size)
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
    sched = schedule(algorithm, n)
    return len(sched.messages), sum(sched.bytes_each_rank(nbytes))


def predict_time(algorithm: str, nbytes: float, world_size: int, alpha: float, beta: float) -> float:
    a, b = cost_terms(algorithm, nbytes, world_size)
    return a * alpha + b * beta


def fit_alpha_beta(rows) -> tuple[float, float]:
    """Least-squares ``(alpha, beta)`` from rows ``{"algorithm", "bytes", "world_size", "seconds"}``,
    weighting each row by 1/seconds (relative error, so small messages count as much as big ones).
    Both are kept >= 0."""
    import numpy as np

    rows = [r for r in rows if r["algorithm"] in MODELLED and r["seconds"] > 0]
    if len(rows) < 2:
        raise ValueError("fit_alpha_beta needs at least two timed rows of modelled algorithms "
                         f"({', '.join(MODELLED)}), e.g. ping-pong at two message sizes")
    A = np.array([cost_terms(r["algorithm"], r["bytes"], r["world_size"]) for r in rows])
    t = np.array([r["seconds"] for r in rows])
    w = 1.0 / t
    sol, *_ = np.linalg.lstsq(A * w[:, None], t * w, rcond=None)
    alpha, beta = float(sol[0]), float(sol[1])
    if alpha < 0 or beta < 0:  # refit with the offending parameter pinned at zero
        col = 1 if alpha < 0 else 0
        x = float(np.dot(A[:, col] * w, t * w) / max(np.dot(A[:, col] * w, A[:, col] * w), 1e-300))
        alpha, beta = (0.0, x) if alpha < 0 else (x, 0.0)
    return alpha, beta


def crossover_bytes(algorithm: str, other: str, world_size: int, alpha: float, beta: float) -> float:
    """The message size (bytes) above which ``algorithm`` is predicted faster than ``other``, from the model's
    terms (time = a * alpha + b * S * beta, so the two lines cross at one size). ``0.0`` when ``algorithm`` is
    never slower; ``inf`` when it never wins (it pays at least as much per byte, or beta is 0)."""
    a1, b1 = cost_terms(algorithm, 1.0, world_size)
    a2, b2 = cost_terms(other, 1.0, world_size)
    lat, per_byte = (a1 - a2) * alpha, (b2 - b1) * beta  # extra latency paid, bandwidth saved per byte
    if lat <= 0 and per_byte >= 0:
        return 0.0
    if per_byte <= 0:
        return float("inf")
    return lat / per_byte


def _size(nbytes: float) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= k and nbytes != float("inf"):
            return f"{nbytes / k:.3g} {unit}"
    return f"{nbytes:.3g} B"


def describe_alpha_beta(alpha: float, beta: float) -> str:
    """``"alpha = 95 us, 1/beta = 3.1 GB/s"``, also for a zero or negative constant (no division by zero)."""
    bw = f"1/beta = {1 / beta / 1e9:.3g} GB/s" if beta > 0 else f"beta = {beta:.3g} s/byte (no bandwidth term)"
    return f"alpha = {alpha * 1e6:.3g} us, {bw}"


def usable_alpha_beta(alpha: float, beta: float, source: str = "fit", default=DEFAULT_ALPHA_BETA,
                      crossover=None) -> tuple[float, float, str]:
    """``(alpha, beta, note)``: the fitted constants when they make sense, else ``default`` with a note saying
    why. Degenerate: alpha or beta not > 0 (or not finite), or, with ``crossover=(algorithm, other,
    world_size, lo, hi)``, the size where ``algorithm`` starts to beat ``other`` outside ``[lo, hi]`` bytes.
    Never raises for a bad fit: a notebook on a busy machine prints the note and carries on."""
    import math

    problems = []
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            problems.append(f"{name} = {v!r} is not > 0")
    if not problems and crossover is not None:
        alg, other, n, lo, hi = crossover
        s = crossover_bytes(alg, other, n, alpha, beta)
        if not lo <= s <= hi:
            problems.append(f"with it the model's {alg} would beat the {other} on {n} ranks from {_size(s)}, "
                            f"outside {_size(lo)} to {_size(hi)}")
    if not problems:
        return float(alpha), float(beta), f"{source}: {describe_alpha_beta(alpha, beta)}"
    a, b = default
    return float(a), float(b), (f"{source} came out degenerate ({'; '.join(problems)}; timings on a busy machine are "
                                f"noisy): using the stated default {describe_alpha_beta(a, b)} instead")
