"""Bigger datasets (MNIST, Fashion-MNIST, CIFAR-10) through torchvision, offline first.

Files already on disk are used first; archives put there by hand are unpacked; a download is tried
only when allowed (``download=None`` allows it unless ``$LABKIT_OFFLINE`` is set); when it fails,
:class:`DatasetUnavailable` says which files to put where. CIFAR-10 files are checked against
torchvision's md5 checksums (``verify=True``); MNIST's unpacked files have no published checksum,
so only their format is checked. Re-exported by :mod:`labkit.data`, so ``labkit.data.load_torchvision``.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ._validate import validate_choice, validate_int


class DatasetError(RuntimeError):
    """A downloadable dataset could not be used; the message says what to do."""


class DatasetUnavailable(DatasetError):
    """The files are not on disk and could not (or may not) be downloaded."""


class DatasetCorrupt(DatasetError):
    """Files are on disk but do not match the published checksums or the expected format."""


TORCHVISION_DATASETS = {
    # key: (torchvision class name, channels, image size, train size, test size)
    "mnist": ("MNIST", 1, 28, 60_000, 10_000),
    "fashion-mnist": ("FashionMNIST", 1, 28, 60_000, 10_000),
    "cifar10": ("CIFAR10", 3, 32, 50_000, 10_000),
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar_10": "cifar10"}


def _dataset_key(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a string such as 'mnist', got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TORCHVISION_DATASETS:
        raise ValueError(f"unknown dataset {name!r}: pass one of {', '.join(map(repr, TORCHVISION_DATASETS))} "
                         f"(or use load_digits() for the offline digits)")
    return key


def _tv_class(key: str):
    import torchvision.datasets as tvd

    return getattr(tvd, TORCHVISION_DATASETS[key][0])


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where datasets live: ``root`` if given, else ``$LABKIT_DATA``, else the repository's ``datasets/``
    (or ``~/.cache/labkit/datasets`` when labkit is installed outside a checkout)."""
    if root is not None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a folder path (str or Path), got {type(root).__name__}")
        return Path(root).expanduser()
    if os.environ.get("LABKIT_DATA"):
        return Path(os.environ["LABKIT_DATA"]).expanduser()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "labkit").is_dir():
        return repo / "datasets"
    return Path.home() / ".cache" / "labkit" / "datasets"


def expected_files(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The unpacked files torchvision reads for ``name`` (train and test together)."""
    key, root = _dataset_key(name), data_root(root)
    cls = _tv_class(key)
    if key == "cifar10":
        folder = root / cls.base_folder
        names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [folder / f for f in names]
    folder = root / cls.__name__ / "raw"
    return [folder / f[: -len(".gz")] for f, _ in cls.resources]


def _archives(key: str, root: Path) -> list[tuple[Path, str | None, str]]:
    """(archive path, md5, url) of what torchvision downloads for ``key``."""
    cls = _tv_class(key)
    if key == "cifar10":
        return [(root / cls.filename, cls.tgz_md5, cls.url)]
    raw = root / cls.__name__ / "raw"
    return [(raw / f, md5, cls.mirrors[0] + f) for f, md5 in cls.resources]


def _md5(path: Path) -> str:
    from torchvision.datasets.utils import calculate_md5

    return calculate_md5(str(path))


def _unpack_local_archives(key: str, root: Path, verify: bool) -> None:
    """Unpack archives someone put on disk by hand (no network involved)."""
    from torchvision.datasets.utils import extract_archive

    files = expected_files(key, root)
    for archive, md5, _ in _archives(key, root):
        if not archive.is_file():
            continue
        targets = files if key == "cifar10" else [archive.with_suffix("")]
        if all(t.is_file() for t in targets):
            continue
        if verify and md5 and _md5(archive) != md5:
            raise DatasetCorrupt(f"{archive} does not match torchvision's md5 checksum ({md5}). Delete it and "
                                 f"download it again; if you made it yourself (e.g. for a test), pass verify=False.")
        extract_archive(str(archive), str(archive.parent))


def _unavailable_message(key: str, root: Path, missing: list[Path], why: str) -> str:
    cls_name = TORCHVISION_DATASETS[key][0]
    lines = [f"{cls_name} is not in {root} ({len(missing)} file(s) missing, e.g. {missing[0]}) and {why}.",
             "To use it without a network, download these files elsewhere and put them here:"]
    for archive, _, url in _archives(key, root):
        lines.append(f"  {archive}   <- {url}")
    lines.append("labkit unpacks them itself on the next call. Or pass root=... / set $LABKIT_DATA to a folder "
                 "that already holds them.")
    lines.append("Meanwhile labkit.data.load_digits() works offline (scikit-learn ships the digits).")
    return "\n".join(lines)


def _make_dataset(key: str, root: Path, train: bool, verify: bool, download: bool):
    cls = _tv_class(key)
    if key == "cifar10" and not verify:
        # torchvision's reader with its checksums switched off: check_integrity(path, None) only
        # checks that a file exists. The archive's checksum still applies to a download.
        cls = type("UncheckedCIFAR10", (cls,), {
            "train_list": [[f, None] for f, _ in cls.train_list],
            "test_list": [[f, None] for f, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
        })
    return cls(root=str(root), train=train, download=download)


def load_torchvision(name: str, root: str | os.PathLike | None = None, train: bool = True,
                     download: bool | None = None, verify: bool = True, as_: str = "tensors",
                     limit: int | None = None):
    """MNIST, Fashion-MNIST or CIFAR-10 through torchvision, from disk first, downloading if allowed.

    name: ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.
    root: the folder holding datasets (default :func:`data_root`: ``$LABKIT_DATA`` or ``<repo>/datasets``).
    download: ``None`` downloads missing files unless ``$LABKIT_OFFLINE`` is set; ``True`` always may;
        ``False`` never touches the network.
    verify: check CIFAR-10's files (and any archive) against torchvision's md5 checksums.
    as_: ``"tensors"`` -> ``X`` (N, C, H, W) float32 in [0, 1] and ``y`` (N,) int64;
         ``"dataset"`` -> the torchvision dataset object (PIL images, for transforms).
    limit: keep only the first ``limit`` samples (tensors only), to save memory and time.

    Raises :class:`DatasetUnavailable` (with the files to put where by hand) when the files are
    missing and cannot be downloaded, :class:`DatasetCorrupt` when files on disk are damaged.
    """
    import torch

    key = _dataset_key(name)
    validate_choice("as_", as_, ("tensors", "dataset"))
    for what, v in (("train", train), ("verify", verify)):
        if not isinstance(v, bool):
            raise TypeError(f"{what} must be True or False, got {v!r}")
    if download is not None and not isinstance(download, bool):
        raise TypeError(f"download must be None (automatic), True or False, got {download!r}")
    if limit is not None:
        limit = validate_int("limit", limit, minimum=1)
        if as_ != "tensors":
            raise ValueError("limit only applies to as_='tensors'; for a dataset use torch.utils.data.Subset")
    root = data_root(root)

    if root.is_dir():
        _unpack_local_archives(key, root, verify)
    missing = [p for p in expected_files(key, root) if not p.is_file()]
    fetched = False
    if missing:
        offline = os.environ.get("LABKIT_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")
        if download is False or (download is None and offline):
            why = ("download=False was passed" if download is False
                   else "$LABKIT_OFFLINE is set, so labkit did not try to download it")
            raise DatasetUnavailable(_unavailable_message(key, root, missing, why))
        from urllib.error import URLError

        try:
            root.mkdir(parents=True, exist_ok=True)
            ds = _make_dataset(key, root, train, verify, download=True)
            fetched = True
        except (URLError, OSError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise DatasetUnavailable(_unavailable_message(
                key, root, [p for p in missing if not p.is_file()],
                f"the download failed ({type(e).__name__}: {first})")) from e
    if not fetched:
        if key == "cifar10" and verify:
            cls = _tv_class(key)
            sums = dict(cls.train_list + cls.test_list)
            sums[cls.meta["filename"]] = cls.meta["md5"]
            bad = [p.name for p in expected_files(key, root) if _md5(p) != sums[p.name]]
            if bad:
                raise DatasetCorrupt(
                    f"CIFAR-10 files in {root / cls.base_folder} do not match torchvision's md5 checksums: "
                    f"{', '.join(bad)}. Delete the folder to download it again; if you made these files "
                    f"yourself (e.g. for a test), pass verify=False.")
        try:
            ds = _make_dataset(key, root, train, verify, download=False)
        except (AssertionError, ValueError, TypeError, KeyError, EOFError, OSError, RuntimeError,
                pickle.UnpicklingError) as e:
            raise DatasetCorrupt(f"{TORCHVISION_DATASETS[key][0]} files in {root} could not be read "
                                 f"({type(e).__name__}: {e}). Delete them and download again.") from e
    if as_ == "dataset":
        return ds
    data = ds.data[:limit] if limit else ds.data
    targets = ds.targets[:limit] if limit else ds.targets
    if key == "cifar10":  # numpy (N, 32, 32, 3) uint8 -> (N, 3, 32, 32)
        X = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).contiguous()
    else:  # torch (N, 28, 28) uint8 -> (N, 1, 28, 28)
        X = torch.as_tensor(data).unsqueeze(1)
    return X.to(torch.float32).div_(255.0), torch.as_tensor(np.asarray(targets), dtype=torch.int64)


def local_datasets(root: str | os.PathLike | None = None) -> list[dict]:
    """Which downloadable datasets are already unpacked under ``root`` (no network, no checksums)."""
    root = data_root(root)
    rows = []
    for key, (_cls, c, hw, n_train, n_test) in TORCHVISION_DATASETS.items():
        files = expected_files(key, root)
        rows.append({"dataset": key, "present": all(p.is_file() for p in files), "folder": str(files[0].parent),
                     "shape": f"{c}x{hw}x{hw}", "train": n_train, "test": n_test})
    return rows
