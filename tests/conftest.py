"""Shared test fixtures: the shared rank pools stop after each test module, so pools started with
``launch(..., pool=True)`` in one file never pile up (or count as leftovers) in the next; ``write_mnist`` writes
MNIST files for the data tests; ``trial_module`` writes an importable module (lab 08's trial functions).
(``--busy N`` lives in the repository's root ``conftest.py``, so it also works when only ``notebooks/`` is
collected.)"""
import pytest


@pytest.fixture(autouse=True, scope="module")
def _stop_shared_pools_after_module():
    yield
    import labkit

    labkit.shutdown_pools()


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, as the labs' notebooks and rank functions run it; restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def trial_module(tmp_path, monkeypatch):
    """A function ``make(name, source)`` that writes ``tmp_path/name.py``, makes it importable here and in child
    processes (``sys.path`` and ``PYTHONPATH``, both restored after the test) and returns the freshly imported
    module: a trial function that ablation workers load by reference."""
    import importlib
    import os
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")

    def make(name, source):
        (tmp_path / f"{name}.py").write_text(source)
        sys.modules.pop(name, None)
        importlib.invalidate_caches()
        return importlib.import_module(name)

    return make


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
