"""The data sets lab 06 clusters: scikit-learn's digits and a generated set of any size (offline, seeded)."""
from __future__ import annotations

import numpy as np

from .._validate import validate_choice, validate_int

__all__ = ["load", "PRESETS"]

# name -> (n, d, k) of the benchmark's generated sets
PRESETS = {"generated": (200_000, 32, 10), "gpu": (1_000_000, 64, 64)}


def load(name: str = "digits", n: int | None = None, d: int | None = None, centers: int = 10, seed: int = 0,
         cluster_std: float = 8.0, dtype=np.float32) -> np.ndarray:
    """``X`` only: ``"digits"`` (1797 x 64, pixels / 16) or ``"generated"`` (Gaussian blobs, n x d).

    The generated set has ``centers`` blobs with centres uniform in [-10, 10]^d and standard deviation
    ``cluster_std`` (8 by default, so that blobs overlap and Lloyd needs tens of iterations, not two).
    """
    validate_choice("name", name, ("digits", "generated"))
    if name == "digits":
        from ..data import load_digits

        return np.asarray(load_digits()[0], dtype=dtype)
    from sklearn.datasets import make_blobs

    n = validate_int("n", PRESETS["generated"][0] if n is None else n, minimum=1)
    d = validate_int("d", PRESETS["generated"][1] if d is None else d, minimum=1)
    X, _ = make_blobs(n_samples=n, n_features=d, centers=validate_int("centers", centers, minimum=1),
                      cluster_std=cluster_std, random_state=validate_int("seed", seed, minimum=0))
    return X.astype(dtype)
