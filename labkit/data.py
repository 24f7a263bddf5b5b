"""Datasets for the labs: small ones that work offline, bigger ones when there is a network.

Offline, always available (shipped with installed packages or generated):

    X, y = load_digits()                          # scikit-learn's 8x8 digits, pixels/16, float32
    X, y = load_digits(as_="images")              # (1797, 1, 8, 8) tensors
    Xtr, Xte, ytr, yte = train_test_split_digits(test_size=0.5, seed=0)   # stratified
    lab, unlab = labelled_split(ytr, k_per_class=5, seed=0)              # K labels per class
    y_semi = semi_supervised_targets(ytr, k_per_class=5, seed=0)         # -1 = unlabelled
    X, y = two_moons(200, noise=0.1); X, y = blobs(300, centers=3)
    ds = random_images(10_000, shape=(3, 32, 32), as_="dataset")        # for throughput work

Downloaded through torchvision into ``datasets/`` (or ``$LABKIT_DATA``) when there is a network:

    X, y = load_torchvision("mnist")              # (60000, 1, 28, 28) float32 in [0, 1], int64
    X, y = load_torchvision("cifar10", train=False, limit=1000)

Files already on disk are used first; archives put there by hand are unpacked; a download is tried
only when allowed (``download=None`` allows it unless ``$LABKIT_OFFLINE`` is set); when it fails,
:class:`DatasetUnavailable` says which files to put where. CIFAR-10 files are checked against
torchvision's md5 checksums (``verify=True``); MNIST's unpacked files have no published checksum,
so only their format is checked.

Sharding: :func:`shard_indices` gives the indices rank ``r`` of ``w`` reads in an epoch, exactly as
``torch.utils.data.DistributedSampler`` does (same shuffle, same padding or dropping), but as a
pure function of its arguments, so it can be printed, plotted and tested without processes.
"""
from __future__ import annotations

import math
import operator
import os
from typing import Any, Sequence

import numpy as np

from ._validate import validate_choice, validate_int

__all__ = [
    "load_digits", "train_test_split_digits", "labelled_split", "semi_supervised_targets",
    "two_moons", "blobs", "RandomImages", "random_images", "tensor_dataset",
    "shard_indices", "shard_arrays",
    "data_root", "expected_files", "local_datasets", "load_torchvision",
    "DatasetError", "DatasetUnavailable", "DatasetCorrupt", "TORCHVISION_DATASETS",
]


# --------------------------------------------------------------------------- input checks
def _as_label_array(y: Any) -> np.ndarray:
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D array of class labels, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError("y must hold the true labels (>= 0); it already contains negative values "
                         "(-1 marks unlabelled samples): pass the fully labelled targets")
    return y.astype(np.int64, copy=False)


def _to_torch(X: np.ndarray, y: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)), torch.from_numpy(
        np.ascontiguousarray(y, dtype=np.int64))


# --------------------------------------------------------------------------- digits
def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits file read with numpy (importing sklearn costs seconds on every fresh rank);
    scikit-learn's own loader when the file is not where it usually is."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec else ""
    if os.path.exists(path):
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as _sk_load_digits

    d = _sk_load_digits()
    return d.data, d.target


def load_digits(as_: str = "arrays", scale: bool = True):
    """scikit-learn's handwritten digits (1797 images of 8x8 pixels, 10 classes), offline.

    as_: ``"arrays"`` -> numpy ``X`` (1797, 64) float32 and ``y`` (1797,) int64;
         ``"tensors"`` -> the same as torch tensors; ``"images"`` -> ``X`` as a (1797, 1, 8, 8)
         float32 tensor (for convolutions) and ``y`` an int64 tensor.
    scale: divide the pixel values (0..16) by 16, so they lie in [0, 1].
    """
    validate_choice("as_", as_, ("arrays", "tensors", "images"))
    data, target = _read_digits()
    X = data.astype(np.float32)
    if scale:
        X /= 16.0
    y = target.astype(np.int64)
    if as_ == "arrays":
        return X, y
    Xt, yt = _to_torch(X, y)
    if as_ == "images":
        Xt = Xt.reshape(-1, 1, 8, 8)
    return Xt, yt


def train_test_split_digits(test_size: float = 0.5, seed: int = 0, as_: str = "arrays", scale: bool = True):
    """Stratified train/test split of the digits: ``X_train, X_test, y_train, y_test``.

    Each class keeps (almost exactly) its share in both halves. ``as_`` as in :func:`load_digits`.
    """
    from sklearn.model_selection import train_test_split

    if not isinstance(test_size, (float, int)) or isinstance(test_size, bool) or not 0 < test_size < 1:
        raise ValueError(f"test_size must be a fraction strictly between 0 and 1 (e.g. 0.5), got {test_size!r}")
    seed = validate_int("seed", seed, minimum=0)
    validate_choice("as_", as_, ("arrays", "tensors", "images"))
    X, y = load_digits("arrays", scale=scale)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y)
    out = []
    for idx in (idx_train, idx_test):
        Xi, yi = X[idx], y[idx]
        if as_ != "arrays":
            Xi, yi = _to_torch(Xi, yi)
            if as_ == "images":
                Xi = Xi.reshape(-1, 1, 8, 8)
        out.append((Xi, yi))
    (Xtr, ytr), (Xte, yte) = out
    return Xtr, Xte, ytr, yte


# --------------------------------------------------------------------------- semi-supervised splits
def labelled_split(y, k_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``k_per_class`` labelled samples at random in every class; the rest are unlabelled.

    Returns ``(labelled_idx, unlabelled_idx)``, both sorted int64 index arrays that together cover
    ``range(len(y))`` once. The same ``seed`` gives the same split.
    """
    y = _as_label_array(y)
    k = validate_int("k_per_class", k_per_class, minimum=1)
    seed = validate_int("seed", seed, minimum=0)
    if y.size == 0:
        raise ValueError("y is empty: pass the labels of the samples to split")
    classes, counts = np.unique(y, return_counts=True)
    if k > counts.min():
        c = classes[counts.argmin()]
        raise ValueError(f"k_per_class={k} is larger than the smallest class (class {c} has {counts.min()} "
                         f"samples): pass k_per_class <= {counts.min()}")
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(y == c), size=k, replace=False) for c in classes]
    labelled = np.sort(np.concatenate(chosen)).astype(np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[labelled] = False
    return labelled, np.flatnonzero(mask).astype(np.int64)


def semi_supervised_targets(y, k_per_class: int, seed: int = 0) -> np.ndarray:
    """A copy of ``y`` where every sample outside :func:`labelled_split` is ``-1`` (unlabelled).

    This is scikit-learn's convention for ``SelfTrainingClassifier`` and ``LabelSpreading``.
    """
    y = _as_label_array(y)
    labelled, unlabelled = labelled_split(y, k_per_class, seed)
    y_semi = y.copy()
    y_semi[unlabelled] = -1
    return y_semi


# --------------------------------------------------------------------------- generated sets
def _finish(X: np.ndarray, y: np.ndarray, as_: str):
    X, y = X.astype(np.float32), y.astype(np.int64)
    return _to_torch(X, y) if as_ == "tensors" else (X, y)


def two_moons(n: int = 200, noise: float = 0.1, seed: int = 0, as_: str = "arrays"):
    """Two interleaving half circles (scikit-learn's ``make_moons``): ``X`` (n, 2) float32, ``y`` in {0, 1}."""
    from sklearn.datasets import make_moons

    n = validate_int("n", n, minimum=2)
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or noise < 0:
        raise ValueError(f"noise must be a standard deviation >= 0 (e.g. 0.1), got {noise!r}")
    validate_choice("as_", as_, ("arrays", "tensors"))
    X, y = make_moons(n_samples=n, noise=float(noise), random_state=validate_int("seed", seed, minimum=0))
    return _finish(X, y, as_)


def blobs(n: int = 300, centers: int = 3, seed: int = 0, cluster_std: float = 1.0, n_features: int = 2,
          as_: str = "arrays"):
    """Gaussian blobs (scikit-learn's ``make_blobs``): ``X`` (n, n_features) float32, ``y`` the blob index."""
    from sklearn.datasets import make_blobs

    n = validate_int("n", n, minimum=1)
    centers = validate_int("centers", centers, minimum=1)
    n_features = validate_int("n_features", n_features, minimum=1)
    if not isinstance(cluster_std, (int, float)) or isinstance(cluster_std, bool) or cluster_std <= 0:
        raise ValueError(f"cluster_std must be a positive number (e.g. 1.0), got {cluster_std!r}")
    validate_choice("as_", as_, ("arrays", "tensors"))
    X, y = make_blobs(n_samples=n, centers=centers, n_features=n_features, cluster_std=float(cluster_std),
                      random_state=validate_int("seed", seed, minimum=0))
    return _finish(X, y, as_)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of the SplitMix64 generator: a cheap, well-mixed 64-bit hash of an integer."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _item_seed(seed: int, index: int) -> int:
    # Hash (seed, index) so that neighbouring items get unrelated random streams.
    return _splitmix64(_splitmix64(seed) ^ index) >> 1


try:
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover - torch is a dependency; keep the arrays usable without it
    _TorchDataset = object


class RandomImages(_TorchDataset):
    """A dataset of ``n`` random images (standard normal pixels) with random labels, for throughput work.

    Item ``i`` is generated on demand from ``(seed, i)`` alone, so it is the same in every process,
    every worker and every epoch, and the dataset holds no memory however large ``n`` is.
    """

    def __init__(self, n: int, shape: Sequence[int] = (3, 32, 32), classes: int = 10, seed: int = 0):
        self.n = validate_int("n", n, minimum=0)
        if isinstance(shape, (int, np.integer)) or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
            raise ValueError(f"shape must be a tuple of positive ints such as (3, 32, 32), got {shape!r}")
        self.shape = tuple(int(s) for s in shape)
        self.classes = validate_int("classes", classes, minimum=1)
        self.seed = validate_int("seed", seed, minimum=0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        import torch

        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(f"index must be an int, got {type(index).__name__}") from None
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for RandomImages of length {self.n}")
        g = torch.Generator().manual_seed(_item_seed(self.seed, index))
        label = int(torch.randint(self.classes, (1,), generator=g).item())
        return torch.randn(self.shape, generator=g), label

    def __repr__(self) -> str:
        return f"RandomImages(n={self.n}, shape={self.shape}, classes={self.classes}, seed={self.seed})"


def random_images(n: int, shape: Sequence[int] = (3, 32, 32), classes: int = 10, seed: int = 0,
                  as_: str = "tensors"):
    """Random images for throughput work: ``as_="dataset"`` gives a lazy :class:`RandomImages`;
    ``as_="tensors"`` materialises the same items as ``X`` (n, *shape) float32 and ``y`` (n,) int64."""
    import torch

    validate_choice("as_", as_, ("tensors", "dataset"))
    ds = RandomImages(n, shape, classes, seed)
    if as_ == "dataset":
        return ds
    X = torch.empty((ds.n, *ds.shape))
    y = torch.empty(ds.n, dtype=torch.int64)
    for i in range(ds.n):
        X[i], y[i] = ds[i]
    return X, y


def tensor_dataset(X, y=None):
    """A ``torch.utils.data.TensorDataset`` from arrays or tensors (features float32, labels int64)."""
    import torch
    from torch.utils.data import TensorDataset

    def as_tensor(a, dtype, what):
        if not isinstance(a, (np.ndarray, torch.Tensor, list, tuple)):
            raise TypeError(f"{what} must be a numpy array, a tensor or a list, got {type(a).__name__}")
        return torch.as_tensor(np.asarray(a) if isinstance(a, (list, tuple)) else a).to(dtype)

    Xt = as_tensor(X, torch.float32, "X")
    if y is None:
        return TensorDataset(Xt)
    yt = as_tensor(y, torch.int64, "y")
    if len(Xt) != len(yt):
        raise ValueError(f"X and y must have the same length, got {len(Xt)} and {len(yt)}")
    return TensorDataset(Xt, yt)


# --------------------------------------------------------------------------- sharding
def shard_indices(n: int, rank: int, world_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                  drop_last: bool = False) -> list[int]:
    """The sample indices that ``rank`` of ``world_size`` reads in ``epoch``, as DistributedSampler does.

    1. Order: ``torch.randperm(n)`` seeded with ``seed + epoch`` when ``shuffle``, else ``0..n-1``.
    2. Equal shares: with ``drop_last`` the tail is cut to a multiple of ``world_size``; without it
       the order is padded by repeating its start, so some samples are read twice.
    3. Rank ``r`` takes every ``world_size``-th index starting at position ``r``.

    Forgetting to change ``epoch`` (``sampler.set_epoch``) gives every epoch the same order.
    """
    import torch

    n = validate_int("n", n, minimum=0)
    world_size = validate_int("world_size", world_size, minimum=1)
    rank = validate_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1} for world_size={world_size}, got {rank}")
    seed, epoch = validate_int("seed", seed), validate_int("epoch", epoch, minimum=0)
    # drop_last: floor(n / w) each (torch writes it ceil((n - w) / w)); else ceil(n / w) each
    per_rank = n // world_size if drop_last else math.ceil(n / world_size)
    total = per_rank * world_size
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    if drop_last:
        order = order[:total]
    elif total > n:
        order = (order * math.ceil(total / n))[:total] if n else order
    return order[rank:total:world_size]


def shard_arrays(X, y, rank: int, world_size: int, **kwargs):
    """``X[idx], y[idx]`` with ``idx = shard_indices(len(X), rank, world_size, **kwargs)``."""
    if len(X) != len(y):
        raise ValueError(f"X and y must have the same length, got {len(X)} and {len(y)}")
    idx = shard_indices(len(X), rank, world_size, **kwargs)
    if hasattr(X, "index_select"):  # torch tensors
        import torch

        t = torch.as_tensor(idx, dtype=torch.long)
        return X[t], y[t]
    idx = np.asarray(idx, dtype=np.int64)
    return np.asarray(X)[idx], np.asarray(y)[idx]


# the downloadable datasets live in their own module; they are part of this one's API
from .torchvision_data import (  # noqa: E402
    TORCHVISION_DATASETS,
    DatasetCorrupt,
    DatasetError,
    DatasetUnavailable,
    data_root,
    expected_files,
    load_torchvision,
    local_datasets,
)
