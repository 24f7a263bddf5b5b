"""Shared test set-up: stop the shared rank pools after each test module, so pools started with
``launch(..., pool=True)`` in one file never pile up (or count as leftovers) in the next."""
import pytest


@pytest.fixture(autouse=True, scope="module")
def _stop_shared_pools_after_module():
    yield
    import labkit

    labkit.shutdown_pools()


@pytest.fixture
def write_mnist():
    """A function ``write(root, train_labels, test_labels, seed=0)`` that writes MNIST in torchvision's raw
    idx format under ``root/MNIST/raw`` (random 28x28 uint8 images with the given labels) and returns the
    (images, labels) per split. The same format as ``tests/test_data.py`` builds by hand."""
    import struct

    import numpy as np

    def idx(array):  # 0, 0, type 0x08 (uint8), ndim; big-endian int32 sizes; then the bytes
        head = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", s) for s in array.shape)
        return head + array.astype(np.uint8).tobytes()

    def write(root, train_labels, test_labels, seed=0):
        rng = np.random.default_rng(seed)
        raw = root / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        made = {}
        for split, labels in (("train", train_labels), ("t10k", test_labels)):
            labels = np.asarray(labels, dtype=np.uint8)
            images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
            (raw / f"{split}-images-idx3-ubyte").write_bytes(idx(images))
            (raw / f"{split}-labels-idx1-ubyte").write_bytes(idx(labels))
            made[split] = (images, labels)
        return made

    return write
