"""Dataset loaders read tiny files written here in each dataset's real format.

IDX files (big-endian headers, gzipped and plain), CIFAR python batches pickled as Python 2
wrote them, a Tiny ImageNet folder as distributed (sorted by the real setup script, run as a
subprocess) and an ImageNet class-folder tree of JPEGs.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from Utils.data import DATASETS, dataset_info, get_data, sample_batch
from Utils.errors import CorruptFileError, DataMissingError, UnknownNameError, UsageError

ROOT = Path(__file__).resolve().parent.parent
SETUP_SCRIPT = ROOT / "scripts" / "tiny_imagenet_setup.py"
MNIST_STATS = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
WNIDS = ("n01443537", "n01629819", "n01641577")


# --------------------------------------------------------------------------- writers


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """Writes a uint8 array as an IDX file: magic 0x0000 0x08 <ndim>, big-endian int32 dims."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(f"{path}.gz", "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def make_idx(root: Path, folder: str, n_train: int = 23, n_test: int = 11, seed: int = 0):
    """MNIST-style files: train gzipped, test plain. Returns the four arrays."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(raw / name, array, gz=name.startswith("train"))
    return arrays


class Py2Str(bytes):
    """A Python 2 `str`: read back as bytes with encoding="bytes", as str with "latin1"."""


class Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler writing `Py2Str` as BINSTRING, as Python 2 did for CIFAR."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: Py2Str) -> None:
        data = bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[Py2Str] = save_py2_str


def write_py2_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        Py2Pickler(handle, protocol=2).dump(obj)


def cifar_entry(rng: np.random.Generator, n: int, classes: int, label_key: str, title: str):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, classes, n).tolist()
    entry = {
        Py2Str(b"batch_label"): Py2Str(title.encode()),
        Py2Str(label_key.encode()): labels,
        Py2Str(b"data"): data,
        Py2Str(b"filenames"): [Py2Str(f"img_{i}.png".encode()) for i in range(n)],
    }
    if label_key == "fine_labels":
        entry[Py2Str(b"coarse_labels")] = [label // 5 for label in labels]
    return entry, data, labels


def make_cifar(root: Path, name: str, per_file: int = 6, n_test: int = 11):
    """CIFAR-10 (5 data batches) or CIFAR-100 (train/test) pickles. Returns test data, labels."""
    rng = np.random.default_rng(1)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        for i in range(1, 6):
            entry, _, _ = cifar_entry(rng, per_file, 10, "labels", f"training batch {i} of 5")
            write_py2_pickle(folder / f"data_batch_{i}", entry)
        test, data, labels = cifar_entry(rng, n_test, 10, "labels", "testing batch 1 of 1")
        write_py2_pickle(folder / "test_batch", test)
        names = [Py2Str(f"class{i}".encode()) for i in range(10)]
        write_py2_pickle(folder / "batches.meta", {Py2Str(b"label_names"): names})
    else:
        folder = root / "cifar-100-python"
        entry, _, _ = cifar_entry(rng, 5 * per_file, 100, "fine_labels", "training")
        write_py2_pickle(folder / "train", entry)
        test, data, labels = cifar_entry(rng, n_test, 100, "fine_labels", "testing")
        write_py2_pickle(folder / "test", test)
        meta = {
            Py2Str(b"fine_label_names"): [Py2Str(f"c{i}".encode()) for i in range(100)],
            Py2Str(b"coarse_label_names"): [Py2Str(f"s{i}".encode()) for i in range(20)],
        }
        write_py2_pickle(folder / "meta", meta)
    return data, labels


def save_jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int], gray: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, quality=90)


def make_tiny(root: Path, per_class: int = 4, val_per_class: int = 2) -> Path:
    """A Tiny ImageNet folder as distributed: flat val/images plus val_annotations.txt."""
    rng = np.random.default_rng(2)
    base = root / "tiny-imagenet-200"
    (base / "wnids.txt").parent.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(reversed(WNIDS)) + "\n")
    lines = []
    for c, wnid in enumerate(WNIDS):
        folder = base / "train" / wnid
        for i in range(per_class):
            save_jpeg(folder / "images" / f"{wnid}_{i}.JPEG", rng, (64, 64), gray=(c, i) == (1, 0))
        boxes = [f"{wnid}_{i}.JPEG\t0\t0\t63\t63" for i in range(per_class)]
        (folder / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
        for i in range(val_per_class):
            name = f"val_{c * val_per_class + i}.JPEG"
            save_jpeg(base / "val" / "images" / name, rng, (64, 64))
            lines.append(f"{name}\t{wnid}\t1\t2\t60\t61")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def make_imagenet(root: Path) -> None:
    """ILSVRC-style class folders with JPEGs of varied sizes."""
    rng = np.random.default_rng(3)
    for split, count in (("train", 3), ("val", 2)):
        for wnid in WNIDS[:2]:
            for i in range(count):
                size = (40 + 9 * i, 52 - 5 * i)
                save_jpeg(root / "imagenet_raw" / split / wnid / f"{wnid}_{i}.JPEG", rng, size)


def run_setup(data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SETUP_SCRIPT), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )


# --------------------------------------------------------------------------- helpers


def collect(stream, epoch: int = 0, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(stream.epoch(epoch, start))


def assert_same(a: list, b: list, atol: float = 0.0) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == xb.shape and xa.dtype == xb.dtype
        torch.testing.assert_close(xa, xb, rtol=0, atol=atol)
        assert torch.equal(ya, yb)


def check_batches(stream, info, batch_size: int) -> None:
    """Shapes, dtypes and label ranges of one epoch."""
    batches = collect(stream)
    assert len(batches) == len(stream) == -(-stream.num_samples // batch_size)
    assert sum(len(x) for x, _ in batches) == stream.num_samples
    for x, y in batches:
        assert x.shape[1:] == info.input_shape and x.dtype == torch.float32
        assert torch.isfinite(x).all()
        if info.task == "regression":
            assert y.shape == (len(x), info.num_classes) and y.dtype == torch.float32
        else:
            assert y.shape == (len(x),) and y.dtype == torch.int64
            assert 0 <= int(y.min()) and int(y.max()) < info.num_classes


# --------------------------------------------------------------------------- tests


def test_registry_and_unknown_names(tmp_path):
    expected = {
        "mnist": ((1, 28, 28), 10),
        "fashion-mnist": ((1, 28, 28), 10),
        "cifar10": ((3, 32, 32), 10),
        "cifar100": ((3, 32, 32), 100),
        "tiny-imagenet": ((3, 64, 64), 200),
        "imagenet": ((3, 224, 224), 1000),
        "mnist1d": ((1, 40), 10),
        "synthetic": ((1, 28, 28), 10),
        "synthetic-regression": ((1, 28, 28), 10),
    }
    assert set(DATASETS.names()) == set(expected)
    for name, (shape, classes) in expected.items():
        info = dataset_info(name)
        assert (info.name, info.input_shape, info.num_classes) == (name, shape, classes)
    assert dataset_info("synthetic-regression").task == "regression"
    assert not dataset_info("imagenet").in_memory and dataset_info("cifar10").in_memory
    for call in (dataset_info, lambda n: get_data(n, tmp_path), lambda n: sample_batch(n)):
        with pytest.raises(UnknownNameError, match="cifar10"):
            call("cifar-11")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_files_fast_and_torchvision_paths(tmp_path, name):
    arrays = make_idx(tmp_path, IDX_FOLDERS[name])
    fast = get_data(name, tmp_path, train_batch_size=8, test_batch_size=4, download=False)
    slow = get_data(name, tmp_path, 8, 4, in_memory=False, download=False)
    assert fast.info.in_memory and not slow.info.in_memory
    assert (fast.train.num_samples, fast.test.num_samples, len(fast.train)) == (23, 11, 3)
    # The gzipped train files were extracted next to the archives.
    assert (tmp_path / IDX_FOLDERS[name] / "raw" / "train-images-idx3-ubyte").is_file()
    for data in (fast, slow):
        check_batches(data.train, data.info, 8)
        check_batches(data.test, data.info, 4)
    # The test split is in file order and normalised with the dataset's constants.
    mean, std = MNIST_STATS[name]
    x_test = torch.cat([x for x, _ in collect(fast.test)])
    expected = (torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float() / 255 - mean) / std
    torch.testing.assert_close(x_test[:, 0], expected, rtol=0, atol=1e-6)
    y_test = torch.cat([y for _, y in collect(fast.test)])
    assert y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # Fast path and torchvision's per-sample path: same samples, same permutation.
    for epoch in (0, 1):
        assert_same(collect(fast.train, epoch), collect(slow.train, epoch), atol=1e-6)
    assert_same(collect(fast.test), collect(slow.test), atol=1e-6)
    train_y = torch.cat([y for _, y in collect(fast.train, 0)])
    assert sorted(train_y.tolist()) == sorted(arrays["train-labels-idx1-ubyte"].tolist())


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_fast_and_torchvision_paths(tmp_path, name):
    data, labels = make_cifar(tmp_path, name)
    folder = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    test_file = folder / ("test_batch" if name == "cifar10" else "test")
    with open(test_file, "rb") as handle:  # the format documented on the CIFAR page
        assert b"data" in pickle.load(handle, encoding="bytes")
    kwargs = dict(train_batch_size=8, test_batch_size=4, augment=False, download=False)
    fast = get_data(name, tmp_path, **kwargs)
    slow = get_data(name, tmp_path, in_memory=False, **kwargs)
    assert (fast.train.num_samples, fast.test.num_samples) == (30, 11)
    for stream in (fast.train, fast.test, slow.train, slow.test):
        check_batches(stream, fast.info, stream.batch_size)
    x_test = torch.cat([x for x, _ in collect(fast.test)])
    mean = torch.tensor(dataset_info_stats(name)[0]).view(3, 1, 1)
    std = torch.tensor(dataset_info_stats(name)[1]).view(3, 1, 1)
    expected = (torch.from_numpy(data).float().view(-1, 3, 32, 32) / 255 - mean) / std
    torch.testing.assert_close(x_test, expected, rtol=0, atol=1e-5)
    assert torch.cat([y for _, y in collect(fast.test)]).tolist() == labels
    for epoch in (0, 3):
        assert_same(collect(fast.train, epoch), collect(slow.train, epoch), atol=1e-6)
    assert_same(collect(fast.test), collect(slow.test), atol=1e-6)


def dataset_info_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    spec = DATASETS.get(name)
    return spec.mean, spec.std


def test_fast_path_augmentation_is_deterministic_resumable_crop_flip(tmp_path):
    make_cifar(tmp_path, "cifar10")
    kwargs = dict(train_batch_size=8, seed=5, download=False)
    first = get_data("cifar10", tmp_path, **kwargs)
    again = get_data("cifar10", tmp_path, **kwargs)
    plain = get_data("cifar10", tmp_path, augment=False, **kwargs)
    full = collect(first.train, 2)
    assert_same(full, collect(again.train, 2))
    assert_same(full[2:], collect(again.train, 2, start=2))
    assert collect(first.train, 2, start=len(first.train)) == []
    other = torch.cat([y for _, y in collect(first.train, 3)])
    assert not torch.equal(torch.cat([y for _, y in full]), other)
    assert not torch.equal(
        collect(get_data("cifar10", tmp_path, 8, seed=6).train, 2)[0][0], full[0][0]
    )
    # Every augmented image is a crop of the zero-padded original, maybe flipped.
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in dataset_info_stats("cifar10"))
    black = (0 - mean) / std  # [3, 1, 1]
    changed = 0
    for (xa, ya), (xp, yp) in zip(full, collect(plain.train, 2)):
        assert torch.equal(ya, yp)
        for aug, orig in zip(xa, xp):
            padded = black.expand(3, 40, 40).clone()
            padded[:, 4:36, 4:36] = orig
            candidates = [
                view
                for dy in range(9)
                for dx in range(9)
                for view in (padded[:, dy : dy + 32, dx : dx + 32],)
                for view in (view, view.flip(-1))
            ]
            assert any(torch.allclose(aug, c, atol=1e-6) for c in candidates)
            changed += not torch.allclose(aug, orig)
    assert changed > 0
    with pytest.raises(UsageError):
        first.train.epoch(0, start_batch=len(first.train) + 1)
    with pytest.raises(UsageError):
        first.train.epoch(-1)


def test_rank_slices_concatenate_to_the_global_batch(tmp_path):
    make_cifar(tmp_path, "cifar10")
    make_idx(tmp_path, "MNIST")
    cases = [("cifar10", None), ("mnist", False)]
    for name, in_memory in cases:
        for world_size in (2, 4):
            single = get_data(name, tmp_path, 8, 4, seed=3, in_memory=in_memory, download=False)
            ranks = [
                get_data(
                    name,
                    tmp_path,
                    8,
                    4,
                    seed=3,
                    in_memory=in_memory,
                    download=False,
                    rank=r,
                    world_size=world_size,
                )
                for r in range(world_size)
            ]
            for split in ("train", "test"):
                whole = collect(getattr(single, split), 1)
                parts = [collect(getattr(data, split), 1) for data in ranks]
                assert all(len(p) == len(whole) for p in parts)
                for b, (x, y) in enumerate(whole):
                    assert all(p[b][0].shape[1:] == x.shape[1:] for p in parts)
                    assert torch.equal(torch.cat([p[b][0] for p in parts]), x)
                    assert torch.equal(torch.cat([p[b][1] for p in parts]), y)
    # mnist test split: 11 samples, batch 4 -> last batch of 3 leaves rank 0 of 4 empty.
    last = collect(
        get_data(
            "mnist", tmp_path, 8, 4, in_memory=False, download=False, rank=0, world_size=4
        ).test
    )[-1]
    assert last[0].shape == (0, 1, 28, 28) and last[1].shape == (0,)
    with pytest.raises(UsageError, match="divisible"):
        get_data("cifar10", tmp_path, train_batch_size=10, world_size=4)
    with pytest.raises(UsageError, match="rank"):
        get_data("cifar10", tmp_path, 8, 4, rank=2, world_size=2)


def test_tiny_imagenet_setup_script_and_loader(tmp_path):
    base = make_tiny(tmp_path)
    with pytest.raises(DataMissingError, match="tiny_imagenet_setup.py"):
        get_data("tiny-imagenet", tmp_path)
    first = run_setup(tmp_path)
    assert first.returncode == 0 and "moved 6" in first.stdout, first.stderr
    listing = sorted(str(p.relative_to(base)) for p in base.rglob("*"))
    second = run_setup(tmp_path)
    assert second.returncode == 0 and "already sorted" in second.stdout
    assert sorted(str(p.relative_to(base)) for p in base.rglob("*")) == listing
    assert not (base / "val" / "images").exists()
    assert len(list((base / "val" / WNIDS[2]).glob("*.JPEG"))) == 2

    data = get_data("tiny-imagenet", tmp_path, train_batch_size=4, test_batch_size=4)
    assert not data.info.in_memory and data.info.num_classes == 200
    assert (data.train.num_samples, data.test.num_samples) == (12, 6)
    check_batches(data.train, data.info, 4)
    check_batches(data.test, data.info, 4)
    # Classes are the sorted wnids; val image c*2+i belongs to class c.
    assert torch.cat([y for _, y in collect(data.test)]).tolist() == [0, 0, 1, 1, 2, 2]
    # Decoded in memory (grayscale JPEG included) = the per-sample PIL path.
    plain = dict(train_batch_size=4, test_batch_size=4, augment=False)
    fast = get_data("tiny-imagenet", tmp_path, in_memory=True, **plain)
    slow = get_data("tiny-imagenet", tmp_path, **plain)
    assert_same(collect(fast.train, 1), collect(slow.train, 1), atol=1e-6)
    assert_same(collect(fast.test), collect(slow.test), atol=1e-6)
    # Augmented file path: deterministic, resumable, the same with a worker process.
    full = collect(data.train, 4)
    assert_same(full, collect(get_data("tiny-imagenet", tmp_path, 4, 4).train, 4))
    assert_same(full[1:], collect(data.train, 4, start=1))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, collect(slow.train, 4)))
    worker = get_data("tiny-imagenet", tmp_path, 4, 4, workers=1)
    next(iter(worker.train.epoch(4)))  # an abandoned epoch must not disturb the next one
    assert_same(full, collect(worker.train, 4))


def test_imagenet_folders(tmp_path):
    make_imagenet(tmp_path)
    data = get_data("imagenet", tmp_path, train_batch_size=4, test_batch_size=2)
    assert (data.train.num_samples, data.test.num_samples) == (6, 4)
    check_batches(data.train, data.info, 4)
    check_batches(data.test, data.info, 2)
    assert torch.cat([y for _, y in collect(data.test)]).tolist() == [0, 0, 1, 1]
    full = collect(data.train, 1)
    assert_same(full[1:], collect(data.train, 1, start=1))
    assert_same(collect(data.test), collect(data.test))
    with pytest.raises(UsageError, match="in memory"):
        get_data("imagenet", tmp_path, in_memory=True)
    flat = tmp_path / "flat"
    make_imagenet(flat)
    for image in (flat / "imagenet_raw" / "val").rglob("*.JPEG"):
        image.rename(flat / "imagenet_raw" / "val" / image.name)
    for folder in (flat / "imagenet_raw" / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()
    with pytest.raises(DataMissingError, match="class folders"):
        get_data("imagenet", flat)


@pytest.mark.parametrize(
    "name, folder",
    [
        ("mnist", "MNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("tiny-imagenet", "tiny-imagenet-200"),
        ("imagenet", "imagenet_raw"),
    ],
)
def test_missing_files_name_the_folder(tmp_path, name, folder):
    with pytest.raises(DataMissingError) as caught:
        get_data(name, tmp_path / "empty", download=False)
    message = str(caught.value)
    assert str(Path(tmp_path / "empty" / folder)) in message and "\n" not in message


def test_missing_message_lists_only_missing_idx_files(tmp_path):
    make_idx(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataMissingError) as caught:
        get_data("mnist", tmp_path, download=False)
    message = str(caught.value)
    assert "t10k-labels-idx1-ubyte(.gz)" in message and "train-images" not in message


def test_corrupt_files_raise_corrupt_file_error(tmp_path):
    make_idx(tmp_path, "MNIST")
    image_file = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    image_file.write_bytes(image_file.read_bytes()[:-100])
    with pytest.raises(CorruptFileError):
        get_data("mnist", tmp_path, download=False)
    other = tmp_path / "labels"
    arrays = make_idx(other, "MNIST")
    labels = arrays["t10k-labels-idx1-ubyte"].copy()
    labels[0] = 10
    write_idx(other / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", labels, gz=False)
    with pytest.raises(CorruptFileError, match="labels"):
        get_data("mnist", other, download=False)


def debian_fashion_listing() -> list[str]:
    if shutil.which("dpkg") is None:
        return []
    listing = subprocess.run(
        ["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, check=False
    ).stdout.split()
    return [line for line in listing if line.endswith("-ubyte.gz")]


def test_fashion_mnist_from_the_debian_package(tmp_path):
    if len(debian_fashion_listing()) == 4:
        data = get_data("fashion-mnist", tmp_path, test_batch_size=1000, download=False)
        assert (data.train.num_samples, data.test.num_samples) == (60000, 10000)
        raw = tmp_path / "FashionMNIST" / "raw"
        assert sorted(p.name for p in raw.iterdir()) == sorted(
            Path(line).name[:-3] for line in debian_fashion_listing()
        )
        counts = torch.bincount(torch.cat([y for _, y in collect(data.test)]), minlength=10)
        assert counts.tolist() == [1000] * 10  # Fashion-MNIST's balanced test split
        x, _ = next(iter(data.train.epoch(0)))
        assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2
    else:
        with pytest.raises(DataMissingError, match="FashionMNIST"):
            get_data("fashion-mnist", tmp_path, download=False)


def test_mnist1d_generated_and_cached(tmp_path):
    state = np.random.get_state()[1].copy()  # noqa: NPY002
    data = get_data("mnist1d", tmp_path, train_batch_size=500)
    assert np.array_equal(np.random.get_state()[1], state)  # noqa: NPY002
    cache = tmp_path / "mnist1d" / "mnist1d.npz"
    assert cache.is_file()
    assert (data.train.num_samples, data.test.num_samples) == (4000, 1000)
    check_batches(data.train, data.info, 500)
    stamp = cache.stat().st_mtime_ns
    again = get_data("mnist1d", tmp_path, train_batch_size=500, in_memory=False)
    assert cache.stat().st_mtime_ns == stamp
    assert_same(collect(data.test), collect(again.test))
    assert_same(collect(data.train, 2)[:2], list(again.train.epoch(2))[:2])


def test_synthetic_teacher_student(tmp_path):
    cls = get_data("synthetic", tmp_path, seed=0)
    reg = get_data("synthetic-regression", tmp_path, seed=7)
    assert (cls.train.num_samples, cls.test.num_samples) == (4096, 1024)
    assert reg.info.task == "regression"
    check_batches(cls.test, cls.info, 256)
    check_batches(reg.test, reg.info, 256)
    for (xc, yc), (xr, yr) in zip(collect(cls.test), collect(reg.test)):
        assert torch.equal(xc, xr)  # the run seed does not change the data
        assert torch.equal(yr.argmax(1), yc)  # labels are the teacher's argmax
    labels = torch.cat([y for _, y in collect(cls.train)])
    assert torch.bincount(labels, minlength=10).min() > 200
    assert_same(collect(cls.train, 1), collect(get_data("synthetic", tmp_path).train, 1))


def test_sample_batch_real_or_random(tmp_path):
    make_idx(tmp_path, "MNIST")
    x, y, real = sample_batch("mnist", tmp_path, batch_size=8, seed=2)
    assert real
    first = collect(get_data("mnist", tmp_path, 8, augment=False, seed=2).train)[0]
    assert torch.equal(x, first[0]) and torch.equal(y, first[1])
    x, y, real = sample_batch("cifar100", tmp_path / "none", batch_size=5)
    assert not real and x.shape == (5, 3, 32, 32) and y.dtype == torch.int64
    assert int(y.max()) < 100 and not (tmp_path / "none" / "cifar-100-python").exists()
    x, y, real = sample_batch("imagenet", tmp_path / "none", batch_size=2)
    assert not real and x.shape == (2, 3, 224, 224)
    x, y, real = sample_batch("synthetic-regression", tmp_path, batch_size=3)
    assert real and y.shape == (3, 10) and y.dtype == torch.float32
