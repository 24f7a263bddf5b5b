"""Inputs and k-means++ seeding, shared by the estimator (:mod:`.estimator`) and the distributed version
(:mod:`.distributed`): device and dtype resolution, checked tensors, scikit-learn's tolerance, and greedy
k-means++ drawing from the same random stream as scikit-learn."""
from __future__ import annotations

import numpy as np
import torch

from .._validate import ArgumentError, validate_finite, validate_int
from .loop import _guard


# ----------------------------------------------------------------------------- inputs
def resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"device must be a device this machine has, got {str(device)!r}: CUDA is not "
                            "available here (no GPU, or a CPU-only torch); pass device='cpu'")
    return dev


def resolve_dtype(dtype) -> torch.dtype:
    table = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
             torch.float64: torch.float64, np.float32: torch.float32, np.float64: torch.float64}
    try:
        return table[dtype]
    except (KeyError, TypeError):
        raise ArgumentError("dtype must be 'float32' or 'float64' (or the torch/numpy dtype), "
                            f"got {dtype!r}") from None


def as_tensor(X, name: str = "X", dtype=torch.float32, device="cpu") -> torch.Tensor:
    """``X`` as a 2-D finite tensor of ``dtype`` on ``device`` (numpy, lists or tensors accepted)."""
    t = X.detach() if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
    if t.ndim != 2:
        raise ArgumentError(f"{name} must be a 2-D array (n_samples, n_features), got shape {tuple(t.shape)}"
                            "; reshape a single sample with x.reshape(1, -1)")
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ArgumentError(f"{name} must hold at least one sample and one feature, got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.uint8, torch.int16, torch.int8)):
        raise ArgumentError(f"{name} must hold numbers, got dtype {t.dtype}")
    if t.is_floating_point():
        validate_finite(name, t)
    return t.to(device=device, dtype=dtype).contiguous()


def tolerance(X: torch.Tensor, tol: float) -> float:
    """scikit-learn's absolute tolerance: ``tol * mean(var(X, axis=0))`` (population variance)."""
    if tol == 0:
        return 0.0
    return float(X.var(dim=0, unbiased=False).mean()) * tol


# ----------------------------------------------------------------------------- k-means++
def kmeans_plusplus(X, n_clusters: int, random_state=None, sample_weight=None, n_local_trials: int | None = None,
                    chunk_size: int | None = None):
    """Greedy k-means++ as scikit-learn does it: ``(centers (k, d) tensor, indices (k,) numpy)``.

    First centre: a point drawn with probability proportional to its weight. Each next centre: draw
    ``n_local_trials`` (default ``2 + int(ln k)``) candidates with probability proportional to
    ``weight * D(x)^2`` (D = distance to the nearest centre chosen so far) and keep the one that
    lowers the potential ``sum weight * D^2`` the most. Uses ``np.random.RandomState(random_state)``
    exactly as scikit-learn does, so the indices match ``sklearn.cluster.kmeans_plusplus`` in float64.
    """
    _guard("assign", "the assignment step")
    X = X if isinstance(X, torch.Tensor) else as_tensor(X, dtype=torch.float64)
    n = X.shape[0]
    k = validate_int("n_clusters", n_clusters, minimum=1, maximum=n,
                  hint=f"k-means needs 1 <= n_clusters <= n_samples ({n})")
    rs = random_state if isinstance(random_state, np.random.RandomState) else np.random.RandomState(random_state)
    w = np.ones(n) if sample_weight is None else np.asarray(
        sample_weight.cpu() if isinstance(sample_weight, torch.Tensor) else sample_weight, dtype=np.float64)
    trials = n_local_trials or 2 + int(np.log(k))
    x_sq = (X * X).sum(1)
    w_t = torch.as_tensor(w, dtype=X.dtype, device=X.device)

    def d2_to(rows):  # (len(rows), n) squared distances, clamped
        C = X[rows]
        return (x_sq.unsqueeze(0) - 2.0 * C @ X.T + (C * C).sum(1, keepdim=True)).clamp_(min=0)

    indices = np.full(k, -1, dtype=np.int64)
    indices[0] = rs.choice(n, p=w / w.sum())
    closest = d2_to([int(indices[0])])[0]
    pot = float(closest @ w_t)
    for c in range(1, k):
        rand = rs.uniform(size=trials) * pot
        cum = np.cumsum(w * closest.cpu().numpy().astype(np.float64))
        cand = np.clip(np.searchsorted(cum, rand), None, n - 1)
        dist = torch.minimum(closest.unsqueeze(0), d2_to(torch.as_tensor(cand, device=X.device)))
        pots = dist @ w_t
        best = int(torch.argmin(pots))
        pot, closest, indices[c] = float(pots[best]), dist[best], cand[best]
    return X[torch.as_tensor(indices, device=X.device)].clone(), indices


# ----------------------------------------------------------------------------- the estimator
