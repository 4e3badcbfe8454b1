"""Datasets: a registry of real loaders and a deterministic, resumable batch stream.

Every dataset is registered in `DATASETS` as a `DatasetSpec` that knows its shape, its
normalisation, its augmentation and how to open its files (torchvision classes where they
exist). `get_data` returns a `Data` with one `BatchStream` per split.

Two ways to serve batches, giving the same samples in the same order:

* the fast path (``in_memory=True``): the whole split is loaded once into one tensor on the
  target device (uint8 images stay uint8) and each batch is gathered with a per-epoch
  permutation, augmented with batched torch ops (random crop from a zero-padded copy by
  index arithmetic, flip by ``torch.where``) and normalised exactly as torchvision's
  ``ToTensor`` + ``Normalize`` do;
* the file path (``in_memory=False``, always for ImageNet): a torch ``DataLoader`` with
  ``num_workers=workers`` over the torchvision dataset with PIL transforms, fed by a batch
  sampler that yields the same per-epoch permutation.

Randomness is a pure function of the run seed: the permutation of epoch ``e`` comes from a
generator seeded with ``(seed, e)``, the augmentation of batch ``b`` from one seeded with
``(seed, e, b)``. Resuming at ``(epoch, start_batch)`` therefore gives exactly the batches an
uninterrupted run would have seen. Batch sizes are global: with ``world_size > 1`` each global
batch is cut into ``world_size`` contiguous slices and rank ``r`` gets slice ``r`` (random draws
are made for the whole global batch, so the union of the slices equals the single-process
batch, augmentation included).

CIFAR files are checked for existence, not against torchvision's MD5 sums (see `_CIFAR10Files`),
so that re-packed or generated files in the same pickle format load; an unreadable file raises
`CorruptFileError`. Downloads, when torchvision offers them, are still MD5-checked.
"""

from __future__ import annotations

import abc
import gzip
import os
import pickle
import random
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from Utils.errors import CorruptFileError, DataMissingError, UsageError
from Utils.registry import Registry

__all__ = [
    "DATASETS",
    "BatchStream",
    "Data",
    "DatasetInfo",
    "DatasetSpec",
    "dataset_info",
    "get_data",
    "sample_batch",
]

# Exceptions a damaged dataset file can raise while torchvision or numpy parse it.
_READ_ERRORS = (
    OSError,
    ValueError,
    RuntimeError,
    EOFError,
    pickle.UnpicklingError,
    KeyError,
    AssertionError,
)

# Tags that keep the random streams of one (seed, epoch, batch) apart.
_PERMUTATION_TAG = 0
_AUGMENT_TAG = 1
_SAMPLE_TAG = 2


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Attributes:
        name: registry name.
        input_shape: one sample's shape without the batch dimension: (C, H, W) for images,
            (C, L) for 1-D signals.
        num_classes: number of model outputs.
        task: "classification" (int64 labels) or "regression" (float targets [num_classes]).
        in_memory: whether the split is served by the in-memory fast path.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    task: str = "classification"
    in_memory: bool = True


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its description and how to read it.

    Attributes:
        info: shape, classes, task and default serving path.
        open_split: ``(data_dir, train, download) -> Dataset`` giving per-sample
            ``(PIL image or tensor, target)`` without any transform; raises
            `DataMissingError` naming the files to provide.
        to_tensors: turns an opened split into ``(x, y)`` tensors for the fast path (x uint8
            [N, C, H, W] for images, float32 otherwise), or None when the split cannot be held
            in memory.
        mean: per-channel mean for normalisation (None: the inputs are used as stored).
        std: per-channel standard deviation.
        augmentation: "none", "crop-flip" (padded random crop + horizontal flip) or
            "resized-crop-flip" (ImageNet's RandomResizedCrop + flip).
        crop_padding: zero padding of the random crop, in pixels.
        eval_resize: (resize, center crop) applied to every split on the file path, or None.
    """

    info: DatasetInfo
    open_split: Callable[[Path, bool, bool], Dataset]
    to_tensors: Callable[[Dataset], tuple[Tensor, Tensor]] | None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augmentation: str = "none"
    crop_padding: int = 0
    eval_resize: tuple[int, int] | None = None


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def dataset_info(name: str) -> DatasetInfo:
    """Returns the description of a registered dataset without touching any file.

    Args:
        name: registry name, e.g. "fashion-mnist".

    Raises:
        UnknownNameError: for a name that is not registered, listing the valid ones.
    """
    return resolve_dataset(name).info


def resolve_dataset(name: str) -> DatasetSpec:
    """The spec of a registered dataset, or of a user's ``package.module:builder``.

    A builder named with a colon is imported, called and registered under that name on
    first use (see Utils/plugins.py).

    Raises:
        UnknownNameError: an unknown registry name.
        UsageError: a builder that cannot be imported or called, or returns bad tensors.
    """
    from Utils import plugins

    if plugins.is_import_spec(name) and name not in DATASETS:
        x_train, y_train, x_test, y_test, task, classes = plugins.dataset_tensors(name)
        info = DatasetInfo(name, tuple(int(d) for d in x_train.shape[1:]), classes, task=task)
        splits = {True: _ArrayDataset(x_train, y_train), False: _ArrayDataset(x_test, y_test)}
        opener = lambda root, train, download: splits[train]  # noqa: E731
        DATASETS.add(name, DatasetSpec(info, opener, _arrays_to_tensors))
    return DATASETS.get(name)


# --------------------------------------------------------------------------- file helpers


def _atomic_gunzip(source: Path, target: Path) -> None:
    """Decompresses `source` into `target` through a temporary file and `os.replace`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out, gzip.open(source, "rb") as inp:
            shutil.copyfileobj(inp, out, length=1 << 20)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except OSError as err:
        Path(tmp_name).unlink(missing_ok=True)
        raise CorruptFileError(f"cannot decompress {source} into {target}: {err}") from err
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _try_download(fetch: Callable[[], object], folder: Path) -> None:
    """Runs a torchvision download; when it fails, removes the folders it created.

    Offline (or blocked), the download fails after creating its folders: they are removed so
    that a failed attempt leaves the data folder as it was.
    """
    first_new = None
    for p in (folder, *folder.parents):
        if p.exists():
            break
        first_new = p
    try:
        fetch()
    except Exception:  # offline or blocked: the caller's clear error follows
        if first_new is not None:
            shutil.rmtree(first_new, ignore_errors=True)


def _folder_hint(path: Path) -> str:
    """A folder path as the user should see it in a message (with a trailing slash)."""
    return f"{path}{os.sep}"


# --------------------------------------------------------------------------- MNIST family

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_DEBIAN_FASHION_PACKAGE = "dataset-fashion-mnist"
_DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@lru_cache(maxsize=1)
def _debian_fashion_files() -> dict[str, Path]:
    """The gzipped IDX files of Debian's `dataset-fashion-mnist` package, by plain file name.

    Looks in the package's usual folder first and then asks ``dpkg -L``; returns an empty
    dict when the package is not installed.
    """
    candidates = [_DEBIAN_FASHION_DIR / f"{name}.gz" for name in _IDX_FILES]
    if not all(path.is_file() for path in candidates) and shutil.which("dpkg"):
        try:
            listing = subprocess.run(
                ["dpkg", "-L", _DEBIAN_FASHION_PACKAGE],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            listing = []
        by_name = {Path(line).name: Path(line) for line in listing}
        candidates = [by_name.get(f"{name}.gz", Path("/nonexistent")) for name in _IDX_FILES]
    if all(path.is_file() for path in candidates):
        return dict(zip(_IDX_FILES, candidates))
    return {}


def _missing_idx(raw: Path) -> list[str]:
    """Gunzips ``<name>.gz`` files present in `raw` and lists the IDX files still missing."""
    missing = []
    for name in _IDX_FILES:
        plain, packed = raw / name, raw / f"{name}.gz"
        if not plain.is_file() and packed.is_file():
            _atomic_gunzip(packed, plain)
        if not plain.is_file():
            missing.append(name)
    return missing


def _open_idx_split(
    cls: type[tv_datasets.MNIST], label: str, root: Path, train: bool, download: bool
) -> Dataset:
    """Opens MNIST or Fashion-MNIST IDX files with torchvision, fetching them if possible.

    Order: IDX files (plain or .gz) in ``<root>/<Class>/raw``; for Fashion-MNIST the Debian
    package's files, gunzipped there; a torchvision download when `download` is True and no
    Debian files exist (their MD5 sums differ from torchvision's).
    """
    raw = root / cls.__name__ / "raw"
    missing = _missing_idx(raw)
    debian = _debian_fashion_files() if cls is tv_datasets.FashionMNIST else {}
    if missing and debian:
        for name in missing:
            _atomic_gunzip(debian[name], raw / name)
        missing = _missing_idx(raw)
    if missing and download and not debian:
        _try_download(lambda: cls(str(root), train=train, download=True), raw)
        missing = _missing_idx(raw)
    if missing:
        files = ", ".join(f"{name}(.gz)" for name in missing)
        extra = ""
        if cls is tv_datasets.FashionMNIST:
            extra = f" (or apt-get install {_DEBIAN_FASHION_PACKAGE})"
        raise DataMissingError(
            f"{label} files missing: put {files} in {_folder_hint(raw)}{extra}; see Data/README.md"
        )
    try:
        return cls(str(root), train=train)
    except _READ_ERRORS as err:
        raise CorruptFileError(f"cannot read {label} IDX files in {raw}: {err}") from err


def _idx_to_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """(x uint8 [N, 1, 28, 28], y int64 [N]) from a torchvision MNIST-like dataset."""
    return dataset.data.unsqueeze(1).contiguous(), dataset.targets.long()


# --------------------------------------------------------------------------- CIFAR


class _CIFAR10Files(tv_datasets.CIFAR10):
    """torchvision's CIFAR-10 reader with an existence check instead of fixed MD5 sums.

    torchvision compares every batch file with the MD5 of the official release, so files in
    the same format written by anything else (re-packed data, the tests' generated batches)
    would be refused. Here the MD5 entries are None, which `check_integrity` treats as
    "file exists"; the downloaded archive itself is still MD5-checked by `download`.
    """

    train_list = [[name, None] for name, _ in tv_datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in tv_datasets.CIFAR10.test_list]
    meta = {**tv_datasets.CIFAR10.meta, "md5": None}


class _CIFAR100Files(tv_datasets.CIFAR100):
    """torchvision's CIFAR-100 reader with an existence check (see `_CIFAR10Files`)."""

    train_list = [[name, None] for name, _ in tv_datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in tv_datasets.CIFAR100.test_list]
    meta = {**tv_datasets.CIFAR100.meta, "md5": None}


def _cifar_missing(cls: type[tv_datasets.CIFAR10], root: Path) -> list[str]:
    """Batch and meta files of a CIFAR release that are not in its folder."""
    names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [name for name in names if not (root / cls.base_folder / name).is_file()]


def _open_cifar_split(
    cls: type[tv_datasets.CIFAR10], label: str, root: Path, train: bool, download: bool
) -> Dataset:
    """Opens CIFAR python batches, downloading them with torchvision when allowed."""
    if _cifar_missing(cls, root) and download:
        _try_download(lambda: cls(str(root), train=train, download=True), root)
    missing = _cifar_missing(cls, root)
    if missing:
        raise DataMissingError(
            f"{label} files missing: put {', '.join(missing)} in "
            f"{_folder_hint(root / cls.base_folder)} (extract {cls.filename} into "
            f"{_folder_hint(root)}); see Data/README.md"
        )
    try:
        return cls(str(root), train=train)
    except _READ_ERRORS as err:
        raise CorruptFileError(
            f"cannot read {label} batches in {root / cls.base_folder}: {err}"
        ) from err


def _cifar_to_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """(x uint8 [N, 3, 32, 32], y int64 [N]) from a torchvision CIFAR dataset."""
    x = torch.from_numpy(np.ascontiguousarray(dataset.data))  # [N, H, W, C]
    return x.permute(0, 3, 1, 2).contiguous(), torch.as_tensor(dataset.targets, dtype=torch.int64)


# --------------------------------------------------------------------------- image folders


class _ClassListImageFolder(tv_datasets.ImageFolder):
    """ImageFolder whose class list is given (so train and val share label indices)."""

    def __init__(self, root: Path, classes: Sequence[str]) -> None:
        self._given_classes = list(classes)
        super().__init__(str(root), allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """Returns the given classes in their given order."""
        return self._given_classes, {name: i for i, name in enumerate(self._given_classes)}


def _subfolders(path: Path) -> list[str]:
    """Sorted names of the sub-folders of `path` (empty when it does not exist)."""
    if not path.is_dir():
        return []
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())


def _check_val_classes(val: Path, classes: Sequence[str], label: str) -> None:
    """Raises when the val split has class folders the train split does not have."""
    unknown = sorted(set(_subfolders(val)) - set(classes))
    if unknown:
        raise CorruptFileError(
            f"{label}: class folders {', '.join(unknown[:5])} in {val} are not in the train "
            f"classes; both splits must use the same class folder names"
        )


def _has_files(path: Path) -> bool:
    """Whether `path` is a folder holding at least one regular file."""
    return path.is_dir() and any(entry.is_file() for entry in os.scandir(path))


def _open_tiny_split(root: Path, train: bool, download: bool) -> Dataset:
    """Opens Tiny ImageNet as distributed, once val/ is sorted into class folders."""
    base = root / "tiny-imagenet-200"
    setup = f"python scripts/tiny_imagenet_setup.py --data-dir {root}"
    train_dir, val_dir = base / "train", base / "val"
    classes = _subfolders(train_dir)
    if not classes or not val_dir.is_dir():
        raise DataMissingError(
            f"tiny-imagenet files missing: unzip tiny-imagenet-200.zip into {_folder_hint(root)} "
            f"so that {_folder_hint(train_dir)} and {_folder_hint(val_dir)} exist, then run "
            f"'{setup}'; see Data/README.md"
        )
    if _has_files(val_dir / "images") or not _subfolders(val_dir):
        raise DataMissingError(
            f"tiny-imagenet val/ is not sorted into class folders: run '{setup}'"
        )
    wnids_file = base / "wnids.txt"
    if wnids_file.is_file():
        listed = sorted(line.strip() for line in wnids_file.read_text().split() if line.strip())
        if set(classes) - set(listed):
            raise CorruptFileError(f"tiny-imagenet: train folders not listed in {wnids_file}")
        classes = listed
    if len(classes) > dataset_info("tiny-imagenet").num_classes:
        raise CorruptFileError(f"tiny-imagenet: {len(classes)} classes found in {train_dir}")
    _check_val_classes(val_dir, classes, "tiny-imagenet")
    return _ClassListImageFolder(train_dir if train else val_dir, classes)


def _open_imagenet_split(root: Path, train: bool, download: bool) -> Dataset:
    """Opens ImageNet stored as class folders under ``<root>/imagenet_raw/{train,val}``."""
    base = root / "imagenet_raw"
    train_dir, val_dir = base / "train", base / "val"
    classes = _subfolders(train_dir)
    if not classes or not val_dir.is_dir():
        raise DataMissingError(
            f"imagenet files missing: put the ILSVRC2012 train and val images in class folders "
            f"{_folder_hint(train_dir / '<wnid>')} and {_folder_hint(val_dir / '<wnid>')}; "
            f"see Data/README.md"
        )
    if _has_files(val_dir) and not _subfolders(val_dir):
        raise DataMissingError(
            f"imagenet val images in {val_dir} are not sorted into class folders "
            f"(val/<wnid>/*.JPEG); see Data/README.md"
        )
    limit = dataset_info("imagenet").num_classes
    if len(classes) > limit:
        raise CorruptFileError(
            f"imagenet: {len(classes)} class folders in {train_dir}, expected at most {limit}"
        )
    _check_val_classes(val_dir, classes, "imagenet")
    return _ClassListImageFolder(train_dir if train else val_dir, classes)


def _tiny_to_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """Decodes every Tiny ImageNet image of a split into (x uint8 [N, C, H, W], y [N])."""
    shape = dataset_info("tiny-imagenet").input_shape
    images = torch.empty((len(dataset), *shape), dtype=torch.uint8)  # [N, C, H, W]
    for i in range(len(dataset)):
        image, _ = dataset[i]
        array = np.array(image, dtype=np.uint8)  # [H, W, C], a writable copy
        if array.shape != (shape[1], shape[2], shape[0]):
            raise CorruptFileError(
                f"{dataset.samples[i][0]}: image of shape {array.shape}, expected "
                f"{shape[1]}x{shape[2]} RGB"
            )
        images[i] = torch.from_numpy(array).permute(2, 0, 1)
    return images, torch.as_tensor(dataset.targets, dtype=torch.int64)


# --------------------------------------------------------------------------- generated data


class _ArrayDataset(Dataset):
    """Per-sample view of in-memory arrays (the file path for generated datasets)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]


def _arrays_to_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """The arrays behind an `_ArrayDataset`."""
    return dataset.x, dataset.y


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """Generates MNIST-1D with the package's default arguments (4000 train, 1000 test).

    The generator reseeds Python's and numpy's global random state; both are restored.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    # mnist1d draws from the legacy global RNGs, so their states are saved and restored.
    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        generated = make_dataset(get_dataset_args())
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
    return {key: np.asarray(generated[key]) for key in ("x", "y", "x_test", "y_test")}


def _load_mnist1d(root: Path) -> dict[str, np.ndarray]:
    """MNIST-1D arrays from ``<root>/mnist1d/mnist1d.npz``, generating and caching them."""
    path = root / "mnist1d" / "mnist1d.npz"
    if path.is_file():
        try:
            with np.load(path) as stored:
                arrays = {key: stored[key] for key in ("x", "y", "x_test", "y_test")}
        except (*_READ_ERRORS, zipfile.BadZipFile) as err:
            raise CorruptFileError(f"cannot read {path} ({err}); delete it to regenerate") from err
        length = dataset_info("mnist1d").input_shape[-1]
        if arrays["x"].ndim != 2 or arrays["x"].shape[1] != length:
            raise CorruptFileError(f"{path} holds inputs of shape {arrays['x'].shape}; delete it")
        return arrays
    arrays = _generate_mnist1d()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".mnist1d.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez(out, **arrays)
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, path)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    except OSError:
        pass  # a read-only data folder: the arrays are simply regenerated next time
    return arrays


def _open_mnist1d_split(root: Path, train: bool, download: bool) -> Dataset:
    """MNIST-1D split as float32 [N, 1, 40] inputs and int64 labels."""
    arrays = _load_mnist1d(root)
    x, y = (arrays["x"], arrays["y"]) if train else (arrays["x_test"], arrays["y_test"])
    inputs = torch.from_numpy(x.astype(np.float32)).unsqueeze(1)  # [N, 1, L]
    return _ArrayDataset(inputs, torch.from_numpy(y.astype(np.int64)))


_TEACHER_SEED = 20210101
_TEACHER_HIDDEN = 128
_SYNTHETIC_SIZES = (4096, 1024)


@lru_cache(maxsize=1)
def _teacher_student() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gaussian inputs and the outputs of a fixed random 2-layer ReLU teacher.

    Returns:
        x_train [4096, 1, 28, 28], out_train [4096, 10], x_test [1024, 1, 28, 28],
        out_test [1024, 10], all float32. Outputs are standardised per unit with the train
        statistics (a fixed affine last layer), so the argmax classes are roughly balanced.
    """
    shape = dataset_info("synthetic").input_shape
    classes = dataset_info("synthetic").num_classes
    dim = int(np.prod(shape))
    gen = torch.Generator().manual_seed(_TEACHER_SEED)
    n_train, n_test = _SYNTHETIC_SIZES
    x = torch.randn((n_train + n_test, dim), generator=gen, dtype=torch.float64)  # [N, D]
    w1 = torch.randn((dim, _TEACHER_HIDDEN), generator=gen, dtype=torch.float64) / dim**0.5
    w2 = torch.randn((_TEACHER_HIDDEN, classes), generator=gen, dtype=torch.float64)
    out = torch.relu(x @ w1) @ (w2 / _TEACHER_HIDDEN**0.5)  # [N, K]
    out = (out - out[:n_train].mean(0)) / out[:n_train].std(0)
    x = x.float().reshape(-1, *shape)  # [N, 1, 28, 28]
    out = out.float()
    return x[:n_train], out[:n_train], x[n_train:], out[n_train:]


def _open_synthetic_split(root: Path, train: bool, download: bool) -> Dataset:
    """Teacher-student classification: labels are the argmax of the teacher's outputs."""
    x_train, out_train, x_test, out_test = _teacher_student()
    x, out = (x_train, out_train) if train else (x_test, out_test)
    return _ArrayDataset(x, out.argmax(1))


def _open_synthetic_regression_split(root: Path, train: bool, download: bool) -> Dataset:
    """Teacher-student regression: targets are the teacher's outputs [N, 10]."""
    x_train, out_train, x_test, out_test = _teacher_student()
    return _ArrayDataset(*((x_train, out_train) if train else (x_test, out_test)))


# --------------------------------------------------------------------------- registry

_MNIST_STATS = ((0.1307,), (0.3081,))
_FASHION_STATS = ((0.2860,), (0.3530,))
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _idx_opener(cls: type[tv_datasets.MNIST], label: str) -> Callable[[Path, bool, bool], Dataset]:
    return lambda root, train, download: _open_idx_split(cls, label, root, train, download)


def _cifar_opener(
    cls: type[tv_datasets.CIFAR10], label: str
) -> Callable[[Path, bool, bool], Dataset]:
    return lambda root, train, download: _open_cifar_split(cls, label, root, train, download)


DATASETS.add(
    "mnist",
    DatasetSpec(
        DatasetInfo("mnist", (1, 28, 28), 10),
        _idx_opener(tv_datasets.MNIST, "mnist"),
        _idx_to_tensors,
        *_MNIST_STATS,
    ),
)
DATASETS.add(
    "fashion-mnist",
    DatasetSpec(
        DatasetInfo("fashion-mnist", (1, 28, 28), 10),
        _idx_opener(tv_datasets.FashionMNIST, "fashion-mnist"),
        _idx_to_tensors,
        *_FASHION_STATS,
    ),
)
DATASETS.add(
    "cifar10",
    DatasetSpec(
        DatasetInfo("cifar10", (3, 32, 32), 10),
        _cifar_opener(_CIFAR10Files, "cifar10"),
        _cifar_to_tensors,
        *_CIFAR10_STATS,
        augmentation="crop-flip",
        crop_padding=4,
    ),
)
DATASETS.add(
    "cifar100",
    DatasetSpec(
        DatasetInfo("cifar100", (3, 32, 32), 100),
        _cifar_opener(_CIFAR100Files, "cifar100"),
        _cifar_to_tensors,
        *_CIFAR100_STATS,
        augmentation="crop-flip",
        crop_padding=4,
    ),
)
DATASETS.add(
    "tiny-imagenet",
    DatasetSpec(
        DatasetInfo("tiny-imagenet", (3, 64, 64), 200, in_memory=False),
        _open_tiny_split,
        _tiny_to_tensors,
        *_IMAGENET_STATS,
        augmentation="crop-flip",
        crop_padding=8,
    ),
)
DATASETS.add(
    "imagenet",
    DatasetSpec(
        DatasetInfo("imagenet", (3, 224, 224), 1000, in_memory=False),
        _open_imagenet_split,
        None,
        *_IMAGENET_STATS,
        augmentation="resized-crop-flip",
        eval_resize=(256, 224),
    ),
)
DATASETS.add(
    "mnist1d",
    DatasetSpec(DatasetInfo("mnist1d", (1, 40), 10), _open_mnist1d_split, _arrays_to_tensors),
)
DATASETS.add(
    "synthetic",
    DatasetSpec(
        DatasetInfo("synthetic", (1, 28, 28), 10), _open_synthetic_split, _arrays_to_tensors
    ),
)
DATASETS.add(
    "synthetic-regression",
    DatasetSpec(
        DatasetInfo("synthetic-regression", (1, 28, 28), 10, task="regression"),
        _open_synthetic_regression_split,
        _arrays_to_tensors,
    ),
)


# --------------------------------------------------------------------------- randomness


def _stream_seed(*parts: int) -> int:
    """A 63-bit generator seed that mixes non-negative integers (seed, epoch, batch, tag)."""
    state = np.random.SeedSequence([int(part) for part in parts]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from `parts` (CPU draws make every device see the same values)."""
    return torch.Generator().manual_seed(_stream_seed(*parts))


# --------------------------------------------------------------------------- batch streams


class BatchStream(abc.ABC):
    """One split served batch by batch; deterministic and resumable.

    Batch ``b`` of epoch ``e`` holds the samples at positions ``[b*B, (b+1)*B)`` of the epoch's
    order (a permutation seeded by ``(seed, e)`` when shuffled, the identity otherwise); the
    last, partial batch is kept. With ``world_size > 1`` rank ``r`` gets the ``r``-th of
    ``world_size`` contiguous slices of every global batch (equal for full batches; the last
    batch is cut as evenly as possible, so a rank may get fewer samples, even none).

    Attributes:
        num_samples: samples in the split (global, before sharding).
        batch_size: global batch size.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def order(self, epoch: int) -> Tensor:
        """The sample order of an epoch: int64 [num_samples] on the CPU."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        gen = _generator(self.seed, epoch, _PERMUTATION_TAG)
        return torch.randperm(self.num_samples, generator=gen)

    def _global_bounds(self, batch: int) -> tuple[int, int]:
        """Positions [start, stop) of a global batch in the epoch's order."""
        start = batch * self.batch_size
        return start, min(start + self.batch_size, self.num_samples)

    def _rank_bounds(self, start: int, stop: int) -> tuple[int, int]:
        """Positions [lo, hi) of this rank's contiguous slice of the global batch [start, stop)."""
        size = stop - start
        return (
            start + size * self.rank // self.world_size,
            start + size * (self.rank + 1) // self.world_size,
        )

    def _random_draws(self, epoch: int, batch: int, tag: int) -> torch.Generator:
        """The generator of one batch's random draws (augmentation or per-sample seeds)."""
        return _generator(self.seed, epoch, batch, tag)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterates over the batches of one epoch, starting at `start_batch`.

        Args:
            epoch: epoch index (>= 0); it selects the order and the augmentation.
            start_batch: index of the first batch to yield (0 <= start_batch <= len(self)).

        Returns:
            An iterator of (x [b, *input_shape] float32, y [b] int64 or [b, num_classes]
            float32) on the stream's device, b being this rank's share of the batch.

        Raises:
            UsageError: for a negative epoch or a start batch out of range.
        """
        if epoch < 0:
            raise UsageError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise UsageError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        return self._iterate(epoch, start_batch)

    @abc.abstractmethod
    def _iterate(self, epoch: int, start_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Yields the batches of `epoch` from `start_batch` on (arguments already checked)."""


class _Normalise:
    """uint8 [B, C, H, W] -> float32 exactly as torchvision's ToTensor followed by Normalize."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)

    def __call__(self, images: Tensor) -> Tensor:
        return images.to(torch.float32).div(255).sub_(self.mean).div_(self.std)  # [B, C, H, W]


def _crop_flip(
    images: Tensor, padding: int, gen: torch.Generator, offset: int, total: int
) -> Tensor:
    """Batched random crop from a zero-padded copy, then random horizontal flip.

    Random draws are made for the whole global batch with `gen`; rows [offset, offset + b) of
    those draws belong to `images`, so the rank slices of a global batch get exactly the draws
    of a single process.

    Args:
        images: [b, C, H, W] this rank's slice of the batch (uint8 or float).
        padding: zero padding on each side, in pixels.
        gen: the batch's generator.
        offset: position of this slice within the global batch.
        total: size of the global batch.

    Returns:
        [b, C, H, W] augmented images, same dtype and device.
    """
    b, c, h, w = images.shape
    shifts = torch.randint(0, 2 * padding + 1, (total, 2), generator=gen)  # [total, 2]
    flips = torch.rand(total, generator=gen) < 0.5  # [total]
    shifts = shifts[offset : offset + b].to(images.device)  # [b, 2]
    flips = flips[offset : offset + b].to(images.device)  # [b]
    padded = images.new_zeros((b, c, h + 2 * padding, w + 2 * padding))  # [b, C, H+2p, W+2p]
    padded[:, :, padding : padding + h, padding : padding + w] = images
    rows = shifts[:, :1] + torch.arange(h, device=images.device)  # [b, H]
    cols = shifts[:, 1:] + torch.arange(w, device=images.device)  # [b, W]
    batch_index = torch.arange(b, device=images.device).view(b, 1, 1, 1)
    channel_index = torch.arange(c, device=images.device).view(1, c, 1, 1)
    cropped = padded[batch_index, channel_index, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
    return torch.where(flips.view(b, 1, 1, 1), cropped.flip(-1), cropped)  # [b, C, H, W]


class _TensorStream(BatchStream):
    """The fast path: batches gathered from tensors held on the device."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
        normalise: _Normalise | None,
        crop_padding: int,
    ) -> None:
        super().__init__(len(x), batch_size, shuffle, seed, rank, world_size)
        self.x = x  # [N, *input_shape] uint8 or float32
        self.y = y  # [N] int64 or [N, K] float32
        self.normalise = normalise
        self.crop_padding = crop_padding

    def _iterate(self, epoch: int, start_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.order(epoch).to(self.x.device)  # [N]
        for batch in range(start_batch, len(self)):
            start, stop = self._global_bounds(batch)
            lo, hi = self._rank_bounds(start, stop)
            index = order[lo:hi]  # [b]
            x = self.x[index]  # [b, *input_shape]
            if self.crop_padding:
                gen = self._random_draws(epoch, batch, _AUGMENT_TAG)
                x = _crop_flip(x, self.crop_padding, gen, lo - start, stop - start)
            if self.normalise is not None:
                x = self.normalise(x)
            yield x, self.y[index]


class _KeyedDataset(Dataset):
    """Wraps a per-sample dataset; keys are (index, sample seed) pairs.

    A random transform runs under a forked torch RNG seeded with the sample seed, so the
    augmentation of a sample depends only on its key (in any worker, on any rank) and the
    caller's global random state is left untouched.
    """

    def __init__(self, base: Dataset, transform: Callable | None, random_transform: bool):
        self.base = base
        self.transform = transform
        self.random_transform = random_transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, object]:
        index, sample_seed = key
        x, y = self.base[index]
        if self.transform is None:
            return x, y
        if not self.random_transform:
            return self.transform(x), y
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.transform(x), y


class _KeyBatches:
    """Batch sampler whose batches are set before each epoch's iteration starts."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _LoaderStream(BatchStream):
    """The file path: a torch DataLoader over a per-sample dataset with PIL transforms."""

    def __init__(
        self,
        dataset: _KeyedDataset,
        batch_size: int,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        device: torch.device,
        empty_batch: tuple[Tensor, Tensor],
    ) -> None:
        super().__init__(len(dataset), batch_size, shuffle, seed, rank, world_size)
        self.dataset = dataset
        self.workers = workers
        self.device = device
        self.empty_batch = empty_batch
        self._sampler = _KeyBatches()
        self._loader: DataLoader | None = None

    def _get_loader(self) -> DataLoader:
        if self._loader is None:
            self._loader = DataLoader(
                self.dataset,
                batch_sampler=self._sampler,
                num_workers=self.workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.workers > 0,
            )
        return self._loader

    def _keys(self, epoch: int, batch: int, order: list[int]) -> list[tuple[int, int]]:
        """(index, sample seed) keys of this rank's slice of one batch."""
        start, stop = self._global_bounds(batch)
        lo, hi = self._rank_bounds(start, stop)
        if self.dataset.random_transform:
            gen = self._random_draws(epoch, batch, _SAMPLE_TAG)
            seeds = torch.randint(0, 1 << 62, (stop - start,), generator=gen)
            seeds = seeds[lo - start : hi - start].tolist()
        else:
            seeds = [0] * (hi - lo)
        return list(zip(order[lo:hi], seeds))

    def _iterate(self, epoch: int, start_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.order(epoch).tolist()
        keys = [self._keys(epoch, batch, order) for batch in range(start_batch, len(self))]
        # Only the last batch can leave a rank empty; a DataLoader cannot collate it.
        trailing_empty = bool(keys) and not keys[-1]
        if trailing_empty:
            keys.pop()
        if keys:
            loader = self._get_loader()
            self._sampler.batches = keys
            non_blocking = self.device.type == "cuda"
            for x, y in loader:
                yield x.to(self.device, non_blocking=non_blocking), y.to(
                    self.device, non_blocking=non_blocking
                )
        if trailing_empty:
            yield self.empty_batch[0].to(self.device), self.empty_batch[1].to(self.device)


# --------------------------------------------------------------------------- get_data


@dataclass
class Data:
    """A dataset ready for training.

    Attributes:
        info: the dataset's description (``in_memory`` tells the path actually used).
        train: shuffled each epoch, augmented when requested.
        test: fixed order, never augmented.
    """

    info: DatasetInfo
    train: BatchStream
    test: BatchStream


def _pil_transform(spec: DatasetSpec, train: bool, augment: bool) -> tuple[Callable | None, bool]:
    """The torchvision transform of the file path and whether it is random."""
    if spec.mean is None:
        return None, False
    steps: list[Callable] = []
    random_steps = train and augment and spec.augmentation != "none"
    size = spec.info.input_shape[-1]
    if random_steps and spec.augmentation == "crop-flip":
        steps += [T.RandomCrop(size, padding=spec.crop_padding), T.RandomHorizontalFlip()]
    elif random_steps and spec.augmentation == "resized-crop-flip":
        steps += [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    elif spec.eval_resize is not None:
        steps += [T.Resize(spec.eval_resize[0]), T.CenterCrop(spec.eval_resize[1])]
    steps += [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    return T.Compose(steps), random_steps


def _check_labels(y: Tensor, info: DatasetInfo, source: str) -> None:
    """Raises `CorruptFileError` when class labels fall outside [0, num_classes)."""
    if info.task != "classification" or y.numel() == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= info.num_classes:
        raise CorruptFileError(
            f"{info.name}: labels in [{low}, {high}] read from {source}, expected "
            f"[0, {info.num_classes - 1}]"
        )


def _check_int(value: int, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")


def get_data(
    name: str,
    data_dir: str | os.PathLike = "Data",
    train_batch_size: int = 128,
    test_batch_size: int = 256,
    seed: int = 0,
    workers: int = 0,
    augment: bool = True,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    in_memory: bool | None = None,
    download: bool = True,
) -> Data:
    """Opens a dataset and returns its train and test batch streams.

    Args:
        name: registry name (see `DATASETS.names()`).
        data_dir: folder holding the datasets (layout in Data/README.md).
        train_batch_size: global training batch size.
        test_batch_size: global evaluation batch size.
        seed: run seed (>= 0) for the order and augmentation.
        workers: DataLoader worker processes of the file path.
        augment: augment the training split (CIFAR, Tiny ImageNet, ImageNet).
        device: where batches are delivered (and the fast path's tensors live).
        rank: this process's rank in distributed training.
        world_size: number of processes; both batch sizes must be divisible by it.
        in_memory: force the fast path (True) or the file path (False); None picks the
            dataset's default (`DatasetInfo.in_memory`).
        download: let torchvision try to download missing MNIST/CIFAR files first.

    Returns:
        A `Data` with the dataset's info and its train and test streams.

    Raises:
        UnknownNameError: unknown dataset name.
        UsageError: invalid batch size, rank, world size, seed or workers, or in_memory=True
            for ImageNet.
        DataMissingError: files missing, naming what to put where.
        CorruptFileError: files present but unreadable.
    """
    spec = resolve_dataset(name)
    _check_int(train_batch_size, "train batch size", 1)
    _check_int(test_batch_size, "test batch size", 1)
    _check_int(seed, "seed", 0)
    _check_int(workers, "workers", 0)
    _check_int(world_size, "world size", 1)
    _check_int(rank, "rank", 0)
    if rank >= world_size:
        raise UsageError(f"rank must be in [0, {world_size - 1}], got {rank}")
    for label, size in (("train", train_batch_size), ("test", test_batch_size)):
        if size % world_size:
            raise UsageError(
                f"{label} batch size {size} is not divisible by world size {world_size}; "
                f"the global batch is split evenly across processes"
            )
    use_memory = spec.info.in_memory if in_memory is None else bool(in_memory)
    if use_memory and spec.to_tensors is None:
        raise UsageError(f"dataset '{name}' cannot be held in memory: use in_memory=False")
    device = torch.device(device)
    root = Path(data_dir)
    info = replace(spec.info, in_memory=use_memory)
    streams = []
    for train in (True, False):
        split = spec.open_split(root, train, download)
        batch_size = train_batch_size if train else test_batch_size
        common = dict(
            batch_size=batch_size, shuffle=train, seed=seed, rank=rank, world_size=world_size
        )
        if use_memory:
            x, y = spec.to_tensors(split)
            _check_labels(y, info, str(root))
            normalise = None if spec.mean is None else _Normalise(spec.mean, spec.std, device)
            padding = spec.crop_padding if train and augment else 0
            stream = _TensorStream(
                x.to(device), y.to(device), normalise=normalise, crop_padding=padding, **common
            )
            streams.append(stream)
        else:
            targets = getattr(split, "targets", None)
            if targets is not None:
                _check_labels(torch.as_tensor(targets), info, str(root))
            transform, random_transform = _pil_transform(spec, train, augment)
            keyed = _KeyedDataset(split, transform, random_transform)
            label_shape = (0, info.num_classes) if info.task == "regression" else (0,)
            label_dtype = torch.float32 if info.task == "regression" else torch.int64
            empty = (
                torch.empty((0, *info.input_shape)),
                torch.empty(label_shape, dtype=label_dtype),
            )
            streams.append(
                _LoaderStream(keyed, workers=workers, device=device, empty_batch=empty, **common)
            )
    return Data(info, streams[0], streams[1])


def sample_batch(
    name: str, data_dir: str | os.PathLike = "Data", batch_size: int = 64, seed: int = 0
) -> tuple[Tensor, Tensor, bool]:
    """A training batch for numerical checks, real when the files are present.

    Args:
        name: registry name.
        data_dir: folder holding the datasets.
        batch_size: number of samples (fewer when the split is smaller).
        seed: seed of the order (real data) or of the random inputs.

    Returns:
        (x [B, *input_shape] float32, y [B] int64 or [B, num_classes] float32, is_real):
        the first unaugmented training batch of epoch 0 when the files are present (never
        downloaded), else standard normal inputs with uniform random labels.

    Raises:
        UnknownNameError: unknown dataset name.
        CorruptFileError: files present but unreadable.
    """
    info = dataset_info(name)
    try:
        data = get_data(
            name,
            data_dir,
            train_batch_size=batch_size,
            test_batch_size=batch_size,
            seed=seed,
            augment=False,
            download=False,
        )
    except DataMissingError:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((batch_size, *info.input_shape), generator=gen)
        if info.task == "regression":
            y = torch.randn((batch_size, info.num_classes), generator=gen)
        else:
            y = torch.randint(0, info.num_classes, (batch_size,), generator=gen)
        return x, y, False
    x, y = next(iter(data.train.epoch(0)))
    return x, y, True
