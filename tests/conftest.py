"""Shared test set-up.

- ``--busy N`` (or ``LABKIT_BUSY=N``; ``N:matmul`` for torch matmul loops instead of pure-Python spinning) keeps N
  busy processes running for the whole session, so the suite (notebooks included) runs as on a busy classroom server.
- The shared rank pools stop after each test module, so pools started with ``launch(..., pool=True)`` in one file
  never pile up (or count as leftovers) in the next.
"""
import os

import pytest

_busy = None


def pytest_addoption(parser):
    parser.addoption("--busy", action="store", default=os.environ.get("LABKIT_BUSY", ""), metavar="N[:KIND]",
                     help="run N busy processes (KIND spin or matmul) for the whole session; default $LABKIT_BUSY")


def pytest_configure(config):
    global _busy
    from labkit.runtime.busy import BusyLoad, parse_spec

    n, kind = parse_spec(config.getoption("--busy"))
    if n and _busy is None:
        _busy = BusyLoad(n, kind).start()


def pytest_report_header(config):
    return f"labkit: {_busy.n} busy {_busy.kind} processes for the whole run" if _busy else None


def pytest_unconfigure(config):
    global _busy
    if _busy is not None:
        _busy.stop()
        _busy = None


@pytest.fixture(autouse=True, scope="module")
def _stop_shared_pools_after_module():
    yield
    import labkit

    labkit.shutdown_pools()


@pytest.fixture
def write_mnist():
    """A function ``write(root, train_labels=None, test_labels=None, seed=0, folder="MNIST", gz=False, n_train=6,
    n_test=3)`` that writes MNIST in torchvision's raw idx format under ``root/folder/raw`` (random 28x28 uint8
    images; the given labels, or random ones) and returns ``{split: (images, labels)}`` for "train" and "t10k"."""
    import gzip
    import struct

    import numpy as np

    def idx(array):  # 0, 0, type 0x08 (uint8), ndim; big-endian int32 sizes; then the bytes
        head = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", s) for s in array.shape)
        return head + array.astype(np.uint8).tobytes()

    def write(root, train_labels=None, test_labels=None, seed=0, folder="MNIST", gz=False, n_train=6, n_test=3):
        rng = np.random.default_rng(seed)
        raw = root / folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        made = {}
        for split, labels, n in (("train", train_labels, n_train), ("t10k", test_labels, n_test)):
            images = rng.integers(0, 256, size=(n if labels is None else len(labels), 28, 28), dtype=np.uint8)
            labels = rng.integers(0, 10, size=n, dtype=np.uint8) if labels is None else np.asarray(labels, np.uint8)
            for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
                name, payload = f"{split}-{kind}-ubyte", idx(arr)
                if gz:
                    (raw / (name + ".gz")).write_bytes(gzip.compress(payload))
                else:
                    (raw / name).write_bytes(payload)
            made[split] = (images, labels)
        return made

    return write
