"""labkit.data: digits and generated sets, labelled splits, sharding against DistributedSampler,
and the torchvision loaders on tiny files written here in torchvision's on-disk format (the
network is never touched: downloads are made impossible and the message checked)."""
import pickle
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import labkit
from labkit import data
from labkit.data import DatasetCorrupt, DatasetUnavailable

pytestmark = pytest.mark.timeout(600)


# --------------------------------------------------------------------------- digits
def test_load_digits_shapes_dtypes_and_scale():
    X, y = data.load_digits()
    assert X.shape == (1797, 64) and X.dtype == np.float32 and y.dtype == np.int64
    assert X.min() == 0 and X.max() == 1 and sorted(set(y)) == list(range(10))
    raw, _ = data.load_digits(scale=False)
    assert raw.max() == 16 and np.allclose(raw / 16, X)
    Xt, yt = data.load_digits(as_="tensors")
    assert isinstance(Xt, torch.Tensor) and Xt.dtype == torch.float32 and yt.dtype == torch.int64
    Xi, yi = data.load_digits(as_="images")
    assert tuple(Xi.shape) == (1797, 1, 8, 8)
    assert torch.equal(Xi[5, 0], torch.from_numpy(X[5].reshape(8, 8))) and torch.equal(yi, torch.from_numpy(y))
    with pytest.raises(ValueError, match="'arrays', 'tensors', 'images'"):
        data.load_digits(as_="pandas")


def test_train_test_split_digits_is_stratified_and_seeded():
    X, y = data.load_digits()
    Xtr, Xte, ytr, yte = data.train_test_split_digits(test_size=0.5, seed=0)
    assert len(ytr) + len(yte) == len(y) and Xtr.shape[1] == 64
    full, tr, te = (np.bincount(a, minlength=10) for a in (y, ytr, yte))
    assert np.array_equal(tr + te, full) and np.abs(tr - te).max() <= 1  # each class split in half
    # every training row is a digits row (the split only reorders and partitions)
    rows = {r.tobytes() for r in X}
    assert all(r.tobytes() in rows for r in Xtr[:50])
    again = data.train_test_split_digits(test_size=0.5, seed=0)
    assert np.array_equal(again[0], Xtr) and not np.array_equal(data.train_test_split_digits(0.5, seed=1)[2], ytr)
    Itr, Ite, _, _ = data.train_test_split_digits(0.25, seed=0, as_="images")
    assert tuple(Itr.shape[1:]) == (1, 8, 8) and len(Ite) == 450
    for bad in (0, 1, 1.5, "half"):
        with pytest.raises(ValueError, match="between 0 and 1"):
            data.train_test_split_digits(test_size=bad)


# --------------------------------------------------------------------------- semi-supervised splits
def test_labelled_split_k_per_class_partition_and_seed():
    y = np.array([0] * 6 + [1] * 4 + [2] * 9)
    lab, unlab = data.labelled_split(y, k_per_class=3, seed=7)
    assert np.array_equal(np.bincount(y[lab]), [3, 3, 3])
    assert np.array_equal(np.sort(np.concatenate([lab, unlab])), np.arange(len(y)))
    assert list(lab) == sorted(lab) and lab.dtype == np.int64
    assert np.array_equal(data.labelled_split(y, 3, seed=7)[0], lab)
    seeds = {tuple(data.labelled_split(y, 3, seed=s)[0]) for s in range(6)}
    assert len(seeds) > 1
    lab4, unlab4 = data.labelled_split(torch.tensor(y), 4, seed=0)  # tensors work; k == smallest class
    assert set(np.flatnonzero(y == 1)) <= set(lab4)

    y_semi = data.semi_supervised_targets(y, 3, seed=7)
    assert np.array_equal(np.flatnonzero(y_semi == -1), unlab) and np.array_equal(y_semi[lab], y[lab])
    assert y.min() == 0  # the input was not modified

    with pytest.raises(ValueError, match=r"smallest class \(class 1 has 4.*k_per_class <= 4"):
        data.labelled_split(y, 5)
    with pytest.raises(ValueError, match="k_per_class must be an int >= 1"):
        data.labelled_split(y, 0)
    with pytest.raises(TypeError, match="k_per_class must be an int"):
        data.labelled_split(y, 2.5)
    with pytest.raises(ValueError, match="-1 marks unlabelled"):
        data.labelled_split(y_semi, 1)
    with pytest.raises(ValueError, match="1-D"):
        data.labelled_split(y.reshape(-1, 1), 1)
    with pytest.raises(TypeError, match="integer class labels"):
        data.labelled_split(np.array([0.5, 1.0]), 1)


def test_semi_supervised_targets_feed_scikit_learn():
    from sklearn.semi_supervised import LabelSpreading

    _, _, ytr, _ = data.train_test_split_digits(0.5, seed=0)
    Xtr = data.train_test_split_digits(0.5, seed=0)[0]
    y_semi = data.semi_supervised_targets(ytr, 5, seed=0)
    assert (y_semi != -1).sum() == 50
    model = LabelSpreading(kernel="knn", n_neighbors=7).fit(Xtr, y_semi)
    assert (model.transduction_ == ytr).mean() > 0.8  # the -1 convention is what scikit-learn reads


# --------------------------------------------------------------------------- generated sets
def test_two_moons_and_blobs_match_scikit_learn():
    from sklearn.datasets import make_blobs, make_moons

    X, y = data.two_moons(100, noise=0.2, seed=3)
    Xr, yr = make_moons(n_samples=100, noise=0.2, random_state=3)
    assert X.dtype == np.float32 and y.dtype == np.int64 and np.allclose(X, Xr, atol=1e-6) and np.array_equal(y, yr)
    Xb, yb = data.blobs(60, centers=4, seed=1, n_features=3)
    Xbr, ybr = make_blobs(n_samples=60, centers=4, n_features=3, random_state=1)
    assert Xb.shape == (60, 3) and np.allclose(Xb, Xbr, atol=1e-5) and np.array_equal(yb, ybr)
    Xt, yt = data.two_moons(10, as_="tensors")
    assert Xt.dtype == torch.float32 and yt.dtype == torch.int64
    with pytest.raises(ValueError, match="noise"):
        data.two_moons(10, noise=-1)
    with pytest.raises(TypeError, match="n must be an int"):
        data.blobs(True)
    with pytest.raises(ValueError, match="cluster_std"):
        data.blobs(10, cluster_std=0)


def test_random_images_are_deterministic_per_index():
    ds = data.random_images(20, shape=(3, 4, 5), classes=7, seed=2, as_="dataset")
    assert len(ds) == 20 and "RandomImages" in repr(ds)
    x0, l0 = ds[0]
    assert tuple(x0.shape) == (3, 4, 5) and 0 <= l0 < 7
    assert torch.equal(data.RandomImages(20, (3, 4, 5), 7, seed=2)[0][0], x0)  # same in a new instance
    assert not torch.equal(ds[1][0], x0) and not torch.equal(data.RandomImages(20, (3, 4, 5), 7, seed=3)[0][0], x0)
    assert torch.equal(ds[-1][0], ds[19][0])
    with pytest.raises(IndexError):
        ds[20]
    X, y = data.random_images(20, shape=(3, 4, 5), classes=7, seed=2)
    assert torch.equal(X[13], ds[13][0]) and y[13].item() == ds[13][1]
    assert len({int(v) for v in y}) > 1
    xb, yb = next(iter(DataLoader(ds, batch_size=8)))
    assert tuple(xb.shape) == (8, 3, 4, 5) and torch.equal(xb, X[:8]) and torch.equal(yb, y[:8])
    with pytest.raises(ValueError, match=r"shape must be a tuple of positive ints"):
        data.RandomImages(4, shape=(3, 0))
    with pytest.raises(ValueError, match="'tensors', 'dataset'"):
        data.random_images(4, as_="list")


def test_tensor_dataset_dtypes_and_errors():
    X, y = data.two_moons(10)
    ds = data.tensor_dataset(X, y)
    xs, ys = ds[3]
    assert len(ds) == 10 and xs.dtype == torch.float32 and ys.dtype == torch.int64 and ys.item() == y[3]
    assert len(data.tensor_dataset([[1, 2], [3, 4]])[0]) == 1
    with pytest.raises(ValueError, match="same length"):
        data.tensor_dataset(X, y[:5])
    with pytest.raises(TypeError, match="numpy array, a tensor or a list"):
        data.tensor_dataset("not data")


# --------------------------------------------------------------------------- sharding
def test_shard_indices_equal_distributed_sampler():
    cases = 0
    for n in (0, 1, 2, 3, 5, 7, 10, 16, 17):
        for world in (1, 2, 3, 4):
            for shuffle in (True, False):
                for drop_last in (False, True):
                    for seed, epoch in ((0, 0), (0, 1), (5, 2)):
                        for rank in range(world):
                            ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle,
                                                     seed=seed, drop_last=drop_last)
                            ref.set_epoch(epoch)
                            got = data.shard_indices(n, rank, world, shuffle=shuffle, seed=seed, epoch=epoch,
                                                     drop_last=drop_last)
                            assert got == list(ref), (n, world, rank, shuffle, drop_last, seed, epoch)
                            assert len(got) == len(ref)
                            cases += 1
    assert cases > 1000


def test_shard_indices_cover_and_epochs():
    n, w = 11, 4
    shards = [data.shard_indices(n, r, w, epoch=0) for r in range(w)]
    flat = sum(shards, [])
    assert len(flat) == 12 and set(flat) == set(range(n))  # padded by one repeated sample
    dropped = [data.shard_indices(n, r, w, drop_last=True) for r in range(w)]
    assert sum(map(len, dropped)) == 8 and len(set(sum(dropped, []))) == 8
    # the set_epoch pitfall: same epoch, same order; new epoch, new order
    assert data.shard_indices(n, 0, w, epoch=0) == shards[0] != data.shard_indices(n, 0, w, epoch=1)
    X = np.arange(22).reshape(11, 2)
    Xs, ys = data.shard_arrays(X, np.arange(11), 1, w, shuffle=False)
    assert np.array_equal(ys, [1, 5, 9]) and np.array_equal(Xs[:, 0], [2, 10, 18])
    Xt, yt = data.shard_arrays(torch.from_numpy(X), torch.arange(11), 1, w, shuffle=False)
    assert torch.equal(yt, torch.tensor([1, 5, 9]))
    with pytest.raises(ValueError, match=r"rank must be in 0..3 for world_size=4, got 4"):
        data.shard_indices(10, 4, 4)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        data.shard_indices(10, 0, 0)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        data.shard_indices(-1, 0, 2)
    with pytest.raises(TypeError, match="rank must be an int"):
        data.shard_indices(10, 0.0, 2)
    with pytest.raises(ValueError, match="same length"):
        data.shard_arrays(X, np.arange(3), 0, 2)


def _rank_shards(ctx, n, epoch):
    import torch.distributed as dist

    mine = data.shard_indices(n, ctx.rank, ctx.world_size, seed=1, epoch=epoch)
    sampler = DistributedSampler(range(n), seed=1)  # rank and world size come from the process group
    sampler.set_epoch(epoch)
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    return {"mine": mine, "sampler": list(sampler), "everyone": everyone}


def test_shards_on_real_ranks():
    out = labkit.launch(_rank_shards, world_size=2, args=(9,), kwargs={"epoch": 3}, echo=False, timeout=400)
    for r, res in enumerate(out):
        assert res["mine"] == res["sampler"]
        assert res["everyone"][r] == res["mine"]
    gathered = out[0]["everyone"]
    assert sorted(set(gathered[0]) | set(gathered[1])) == list(range(9)) and sum(map(len, gathered)) == 10


# --------------------------------------------------------------------------- torchvision formats
def _write_cifar(root, per_batch=2, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        x = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G plane, B plane
        y = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": x, "labels": y}, f)
        if name == "test_batch":
            test = (x, y)
        else:
            train_x.append(x)
            train_y += y
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_vis": 3072}, f)
    return {"train": (np.concatenate(train_x), train_y), "test": test, "names": names}


@pytest.fixture
def no_network(monkeypatch):
    """Make every download impossible and count the attempts."""
    attempts = []

    def refuse_urlopen(*args, **kwargs):
        attempts.append(args[0] if args else kwargs)
        raise urllib.error.URLError("network disabled by the test")

    def refuse_connect(self, *args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse_urlopen)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.delenv("LABKIT_OFFLINE", raising=False)
    monkeypatch.delenv("LABKIT_DATA", raising=False)
    return attempts


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_format_files_load(tmp_path, no_network, name, folder, write_mnist):
    made = write_mnist(tmp_path, folder=folder)
    for train, split in ((True, "train"), (False, "t10k")):
        X, y = data.load_torchvision(name, root=tmp_path, train=train)
        images, labels = made[split]
        assert tuple(X.shape) == (len(labels), 1, 28, 28) and X.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(X[:, 0], torch.from_numpy(images).float() / 255) and np.array_equal(y.numpy(), labels)
    ds = data.load_torchvision(name, root=tmp_path, as_="dataset")
    assert type(ds).__name__ == folder and len(ds) == 6
    assert np.array_equal(np.asarray(ds[2][0]), made["train"][0][2])  # torchvision's own PIL path agrees
    X2, _ = data.load_torchvision(name, root=tmp_path, limit=2)
    assert len(X2) == 2
    assert no_network == [] and data.local_datasets(tmp_path)[["mnist", "fashion-mnist"].index(name)]["present"]


def test_mnist_archives_put_by_hand_are_unpacked(tmp_path, no_network, write_mnist):
    made = write_mnist(tmp_path, gz=True)
    with pytest.raises(DatasetCorrupt, match="md5.*verify=False"):  # our .gz are not the published ones
        data.load_torchvision("mnist", root=tmp_path)
    X, y = data.load_torchvision("mnist", root=tmp_path, train=False, verify=False)
    assert np.array_equal(y.numpy(), made["t10k"][1]) and (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte").is_file()
    assert no_network == []


def test_damaged_mnist_file_is_reported(tmp_path, no_network, write_mnist):
    write_mnist(tmp_path)
    (tmp_path / "MNIST/raw/train-images-idx3-ubyte").write_bytes(b"\x07" * 64)
    with pytest.raises(DatasetCorrupt, match="could not be read"):
        data.load_torchvision("mnist", root=tmp_path)


def test_cifar10_format_files_load(tmp_path, no_network):
    import torchvision

    made = _write_cifar(tmp_path)
    # Our files cannot carry torchvision's published checksums: verification must say so clearly.
    with pytest.raises(DatasetCorrupt, match=r"md5 checksums: data_batch_1.*verify=False"):
        data.load_torchvision("cifar10", root=tmp_path)
    for train, split in ((True, "train"), (False, "test")):
        X, y = data.load_torchvision("cifar10", root=tmp_path, train=train, verify=False)
        x_raw, y_raw = made[split]
        assert tuple(X.shape) == (len(y_raw), 3, 32, 32) and X.dtype == torch.float32
        expect = torch.from_numpy(x_raw.reshape(-1, 3, 32, 32)).float() / 255
        assert torch.equal(X, expect) and y.tolist() == y_raw
    ds = data.load_torchvision("cifar10", root=tmp_path, verify=False, as_="dataset")
    assert ds.classes == made["names"] and len(ds) == 10

    # Reference: torchvision's own CIFAR10, told the checksums of these files, reads the same data.
    from torchvision.datasets.utils import calculate_md5

    folder = tmp_path / "cifar-10-batches-py"
    ref_cls = type("GeneratedCIFAR10", (torchvision.datasets.CIFAR10,), {
        "train_list": [[f, calculate_md5(str(folder / f))] for f, _ in torchvision.datasets.CIFAR10.train_list],
        "test_list": [[f, calculate_md5(str(folder / f))] for f, _ in torchvision.datasets.CIFAR10.test_list],
        "meta": {**torchvision.datasets.CIFAR10.meta, "md5": calculate_md5(str(folder / "batches.meta"))},
    })
    ref = ref_cls(root=str(tmp_path), train=True)
    assert np.array_equal(ds.data, ref.data) and ds.targets == ref.targets
    assert no_network == []


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_no_network_gives_a_clear_message(tmp_path, no_network, name):
    root = tmp_path / "nothing-here"
    with pytest.raises(DatasetUnavailable) as info:
        data.load_torchvision(name, root=root)  # download=None: tries, and the network refuses
    msg = str(info.value)
    assert no_network, "a download should have been attempted"
    assert "the download failed" in msg and "load_digits() works offline" in msg
    where = root / ("MNIST/raw/train-images-idx3-ubyte.gz" if name == "mnist" else "cifar-10-python.tar.gz")
    assert str(where) in msg and "https://" in msg and "LABKIT_DATA" in msg

    no_network.clear()
    with pytest.raises(DatasetUnavailable, match="download=False was passed"):
        data.load_torchvision(name, root=root, download=False)
    assert no_network == []


def test_offline_environment_variable_stops_downloads(tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("LABKIT_OFFLINE", "1")
    with pytest.raises(DatasetUnavailable, match="LABKIT_OFFLINE is set"):
        data.load_torchvision("fashion-mnist", root=tmp_path)
    assert no_network == []


def test_data_root_and_argument_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("LABKIT_DATA", raising=False)
    assert data.data_root().name == "datasets"
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path))
    assert data.data_root() == tmp_path and data.data_root(tmp_path / "x") == tmp_path / "x"
    assert data.expected_files("CIFAR-10")[-1] == tmp_path / "cifar-10-batches-py" / "batches.meta"
    with pytest.raises(TypeError, match="root must be a folder path"):
        data.data_root(3)
    with pytest.raises(ValueError, match=r"unknown dataset 'svhn'.*'mnist'.*load_digits"):
        data.load_torchvision("svhn")
    with pytest.raises(TypeError, match="name must be a string"):
        data.load_torchvision(10)
    with pytest.raises(TypeError, match="download must be None"):
        data.load_torchvision("mnist", download="yes")
    with pytest.raises(ValueError, match="limit only applies"):
        data.load_torchvision("mnist", as_="dataset", limit=5)
    with pytest.raises(TypeError, match="train must be True or False"):
        data.load_torchvision("mnist", train="test")


def test_tour_passes():
    from labkit.runtime.lab import data_rows  # the data helpers' quick checks, run by lab 00's tour

    rows = data_rows()
    assert len(rows) == 3 and all(r["ok"] for r in rows), rows
    assert all(set(r) == {"lab", "check", "ok", "detail"} for r in rows)
