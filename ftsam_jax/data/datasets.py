"""Data sets as in-memory uint8 NHWC arrays, from TFDS, the official CIFAR or Fashion-MNIST
files, or an npz.

Every source gives the same `Dataset` through one validation (`_validate`: shapes, dtypes,
finite values, labels). Nothing here needs TensorFlow: TFDS is read through
`tfds.data_source` (array_record), the official CIFAR python batches through a restricted
unpickler that only accepts the expected keys and dtypes, Fashion-MNIST's official IDX files
(gzip or not, checked against a `SHA256SUMS` beside them) and `npz:PATH` with numpy.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import math
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FASHION_MNIST_CLASSES", "DataError", "Dataset", "NORMALIZATION",
           "check_backdoor_target", "fashion_mnist_split", "load_dataset", "load_fashion_mnist",
           "normalization_for", "read_idx"]


class DataError(ValueError):
    """A data set cannot be found, fetched or read; the message says how to supply it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An image classification data set held in host memory.

    Attributes:
      name: canonical name ("cifar10", "npz:/path/x.npz", ...).
      x_train, x_test: uint8 arrays of shape (N, H, W, C), C in {1, 3}.
      y_train, y_test: int32 labels in [0, num_classes).
      class_names: one name per class.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


# Per-channel mean/std on [0, 1] images. CIFAR-10 as in BackdoorBench (the FT-SAM reference).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}


def normalization_for(ds: Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The data set's mean/std: the published constants, else computed on its training images."""
    key = ds.name if ds.name in NORMALIZATION else None
    if key is not None and len(NORMALIZATION[key][0]) == ds.image_shape[-1]:
        return NORMALIZATION[key]
    x = ds.x_train.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 1, 2))
    std = np.maximum(x.std(axis=(0, 1, 2)), 1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# ----------------------------------------------------------------------------------------------
# Validation shared by all sources.


def _validate(name: str, x_train: Any, y_train: Any, x_test: Any, y_test: Any,
              class_names: tuple[str, ...] | None) -> Dataset:
    arrays = {}
    for key, x in (("x_train", x_train), ("x_test", x_test)):
        x = np.asarray(x)
        if x.ndim == 3:  # (N, H, W): grey images
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise DataError(f"{name}: {key} must have shape (N, H, W[, C]) with C in 1 or 3, "
                            f"got {x.shape}")
        if x.dtype != np.uint8:
            if np.issubdtype(x.dtype, np.floating):
                bad = int(x.size - np.count_nonzero(np.isfinite(x)))
                if bad:
                    raise DataError(f"{name}: {key} holds {bad} non-finite value"
                                    f"{'s' if bad > 1 else ''} (NaN/inf)")
            if np.issubdtype(x.dtype, np.floating) and x.size and x.max() <= 1.0 + 1e-6:
                x = np.round(np.clip(x, 0.0, 1.0) * 255.0)
            if x.size and (x.min() < 0 or x.max() > 255):
                raise DataError(f"{name}: {key} values must lie in [0, 255] (or [0, 1] floats)")
            x = x.astype(np.uint8)
        arrays[key] = np.ascontiguousarray(x)
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        y = np.asarray(y).reshape(-1)
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{name}: {key} must hold integer labels, got dtype {y.dtype}")
        arrays[key] = y.astype(np.int32)
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(f"{name}: train and test images differ in shape "
                        f"({arrays['x_train'].shape[1:]} vs {arrays['x_test'].shape[1:]})")
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise DataError(f"{name}: x_{split} and y_{split} differ in length")
        if len(arrays[f"x_{split}"]) == 0:
            raise DataError(f"{name}: the {split} split is empty")
    labels = np.concatenate([arrays["y_train"], arrays["y_test"]])
    if labels.min() < 0:
        raise DataError(f"{name}: labels must be >= 0")
    num_classes = int(labels.max()) + 1
    if class_names is None:
        # Without class names the classes are 0..max: a label far above the others (255 in a
        # ten-class set) would silently make hundreds of empty classes.
        absent = np.setdiff1d(np.arange(num_classes), arrays["y_train"])
        if len(absent):
            raise DataError(
                f"{name}: labels must be 0..C-1 with every class in the training split; "
                f"{len(absent)} of 0..{num_classes - 1} have no training image (first: "
                f"{absent[:5].tolist()}); labels out of range?")
    elif num_classes > len(class_names):
        raise DataError(f"{name}: label {num_classes - 1} is outside the {len(class_names)} "
                        "classes of class_names")
    if class_names is None:
        class_names = tuple(str(i) for i in range(num_classes))
    if len(class_names) < 2 or len(np.unique(arrays["y_train"])) < 2:
        raise DataError(f"{name}: need at least 2 classes in the training split, got "
                        f"{len(np.unique(arrays['y_train']))}")
    return Dataset(name, arrays["x_train"], arrays["y_train"], arrays["x_test"],
                   arrays["y_test"], tuple(class_names))


# ----------------------------------------------------------------------------------------------
# npz


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """Reads an npz with x_train, y_train, x_test, y_test (optional class_names); no pickle."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise DataError(f"{path} lacks the arrays {sorted(missing)} "
                                "(needs x_train, y_train, x_test, y_test)")
            names = tuple(str(s) for s in z["class_names"]) if "class_names" in z.files else None
            return _validate(f"npz:{path}", z["x_train"], z["y_train"], z["x_test"],
                             z["y_test"], names)
    except DataError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError (object arrays), OSError
        raise DataError(f"cannot read {path} as an npz file: {e}") from None


# ----------------------------------------------------------------------------------------------
# Official CIFAR python batches.

_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], meta="batches.meta", label_key=b"labels",
                    names_key=b"label_names",
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
                     label_key=b"fine_labels", names_key=b"fine_label_names",
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85"),
}

# numpy's array reconstruction helpers (and `_codecs.encode`, which protocol-2 pickles written by
# Python 3 use for bytes) are the only globals a CIFAR batch file may reference.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _unpickle(path: Path) -> dict[bytes, Any]:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except Exception as e:
        raise DataError(f"{path} is not a CIFAR python batch file: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR python batch file (not a dict)")
    return obj


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if b"data" not in d or label_key not in d:
        raise DataError(f"{path} lacks the keys b'data' and {label_key!r}")
    data, labels = d[b"data"], d[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        raise DataError(f"{path}: b'data' must be a uint8 array of shape (N, 3072)")
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
        raise DataError(f"{path}: {label_key!r} must list one label per image")
    if not all(isinstance(v, int | np.integer) for v in labels):
        raise DataError(f"{path}: {label_key!r} must hold integers")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(labels, np.int64)


def find_cifar_folder(name: str, data_dir: str | os.PathLike[str]) -> Path | None:
    """`data_dir` itself or `data_dir/<official folder>`, if it holds the official files."""
    spec = _CIFAR[name]
    for cand in (Path(data_dir), Path(data_dir) / spec["folder"]):
        if (cand / spec["meta"]).is_file() or (cand / spec["test"][0]).is_file():
            return cand
    return None


def load_cifar_python(name: str, folder: str | os.PathLike[str]) -> Dataset:
    """Reads the official `cifar-10-batches-py` / `cifar-100-python` folder with numpy."""
    spec = _CIFAR[name]
    folder = Path(folder)
    missing = [f for f in spec["train"] + spec["test"] if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder} is missing the {name} files {missing}")
    parts = {split: [_read_cifar_batch(folder / f, spec["label_key"]) for f in spec[split]]
             for split in ("train", "test")}
    names: tuple[str, ...] | None = None
    if (folder / spec["meta"]).is_file():
        meta = _unpickle(folder / spec["meta"])
        raw = meta.get(spec["names_key"])
        if isinstance(raw, list) and all(isinstance(s, bytes | str) for s in raw):
            names = tuple(s.decode() if isinstance(s, bytes) else s for s in raw)
    return _validate(name,
                     np.concatenate([p[0] for p in parts["train"]]),
                     np.concatenate([p[1] for p in parts["train"]]),
                     np.concatenate([p[0] for p in parts["test"]]),
                     np.concatenate([p[1] for p in parts["test"]]), names)


def download_cifar(name: str, data_dir: str | os.PathLike[str], timeout: float = 20.0) -> Path:
    """Fetches and checks the official tarball into `data_dir` (machines with internet)."""
    spec = _CIFAR[name]
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / Path(spec["url"]).name
    if not archive.is_file():
        tmp = archive.with_suffix(".part")
        with urllib.request.urlopen(spec["url"], timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        tmp.rename(archive)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    if md5 != spec["md5"]:
        archive.unlink()
        raise DataError(f"downloaded {archive.name} has md5 {md5}, expected {spec['md5']}")
    with tarfile.open(archive) as tar:
        tar.extractall(data_dir, filter="data")
    return data_dir / spec["folder"]


# ----------------------------------------------------------------------------------------------
# Official Fashion-MNIST IDX files.

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of uint8 data (gzip or raw) as a numpy array; DataError if it is missing,
    truncated or not IDX."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of uint8 data")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != math.prod(shape):
        raise DataError(f"{path}: {len(raw) - header} data bytes, the header says "
                        f"{math.prod(shape)} (truncated?)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path:
    """`stem.gz` or `stem` in `folder` (the official names, compressed or not)."""
    for cand in (folder / f"{stem}.gz", folder / stem):
        if cand.is_file():
            return cand
    raise DataError(f"{folder} lacks the Fashion-MNIST file {stem}.gz (or {stem}); give the "
                    "folder of the four official files")


def _check_sha256(path: Path) -> None:
    """DataError when a `SHA256SUMS` beside `path` lists it with another digest."""
    sums = path.parent / "SHA256SUMS"
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name.lstrip("*") == path.name:
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
            if actual != digest.lower():
                raise DataError(f"{path}: sha256 {actual[:16]}... differs from SHA256SUMS "
                                f"({digest[:16]}...): a damaged or different file")
            return


def fashion_mnist_split(folder: str | os.PathLike[str], split: str
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int32 (N,)) of the official `train` or `test` files in
    `folder` (each checked against `SHA256SUMS` when the folder has one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"Fashion-MNIST folder not found: {folder}")
    paths = [_idx_file(folder, stem) for stem in FASHION_MNIST_FILES[split]]
    for path in paths:
        _check_sha256(path)
    images, labels = (read_idx(path) for path in paths)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{folder}: {split} images must be (N, H, W) and labels (N,), got "
                        f"{images.shape} and {labels.shape} (files swapped?)")
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{folder}: {split} label {int(labels.max())} is outside 0..9")
    return images, labels.astype(np.int32)


def load_fashion_mnist(folder: str | os.PathLike[str]) -> Dataset:
    """The complete Fashion-MNIST (60,000 / 10,000 grey 28x28 images) from its official files."""
    (xtr, ytr), (xte, yte) = (fashion_mnist_split(folder, s) for s in ("train", "test"))
    return _validate("fashion_mnist", xtr, ytr, xte, yte, FASHION_MNIST_CLASSES)


# ----------------------------------------------------------------------------------------------
# TFDS (no TensorFlow: random-access array_record data sources).


def load_tfds(name: str, data_dir: str | None = None, download: bool = True) -> Dataset:
    """Reads a prepared TFDS image classification data set through `tfds.data_source`."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            f"--dataset={name} needs tensorflow-datasets (pip install 'ftsam_jax[tfds]'), or "
            "give the data as --dataset=npz:PATH"
        ) from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:
        raise DataError(f"unknown dataset {name!r} (not a TFDS name, 'cifar10', 'cifar100' or "
                        f"'npz:PATH'): {str(e).splitlines()[0]}") from None
    try:
        sources = tfds.data_source(name, split=["train", "test"], data_dir=data_dir,
                                   download=download)
        splits = [_read_source(s) for s in sources]
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"TFDS could not provide {name!r} ({first}). Prepare it where there is internet "
            f"(`tfds build {name} --file_format=array_record`) and pass --data_dir, or pass "
            "--dataset=npz:PATH"
        ) from None
    names = None
    features = builder.info.features
    if "label" in features and hasattr(features["label"], "names"):
        names = tuple(features["label"].names)
    (xtr, ytr), (xte, yte) = splits
    return _validate(name, xtr, ytr, xte, yte, names)


def _read_source(source: Any, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    n = len(source)
    for start in range(0, n, chunk):
        idx = list(range(start, min(n, start + chunk)))
        try:
            records = source.__getitems__(idx)  # batched read of array_record sources
        except (AttributeError, TypeError):
            records = [source[i] for i in idx]
        for r in records:
            images.append(np.asarray(r["image"]))
            labels.append(int(r["label"]))
    return np.stack(images), np.asarray(labels)


# ----------------------------------------------------------------------------------------------
# Entry point.


def default_cache_dir() -> Path:
    return Path(os.environ.get("FTSAM_JAX_DATA", Path.home() / ".cache" / "ftsam_jax"))


def check_backdoor_target(ds: Dataset, target: int) -> None:
    """DataError unless an all-to-one attack on `target` can be measured on `ds`: the target is
    one of its classes and the test split holds images of other classes (the poisoned test
    set of ASR / R-Acc), with the counts in the message."""
    if not 0 <= target < ds.num_classes:
        raise DataError(f"{ds.name}: target {target} is outside the {ds.num_classes} classes "
                        f"[0, {ds.num_classes})")
    others = int(np.sum(ds.y_test != target))
    if others == 0:
        raise DataError(f"{ds.name}: all {len(ds.y_test)} test images are of the target class "
                        f"{target}; ASR needs test images of other classes (0 found)")


def load_dataset(spec: str, data_dir: str | None = None, *, download: bool = True,
                 target: int | None = None) -> Dataset:
    """Loads a data set by spec and checks it (shapes, dtypes, non-empty splits, labels in
    0..C-1, two classes at least; with `target`, `check_backdoor_target`).

    Args:
      spec: "cifar10" / "cifar100" (official python folder in `data_dir`, else a prepared TFDS
        copy, else the official download), "fashion_mnist" (the official IDX files in
        `data_dir`; without it TFDS's copy), another TFDS name, or "npz:PATH".
      data_dir: the official CIFAR folder (or its parent) for CIFAR, a TFDS data dir otherwise.
      download: allow fetching from the internet when nothing local is found.
      target: the target class of an all-to-one backdoor attack to be run on the data.

    Raises:
      DataError: with a one-line message saying what is missing and how to supply it.
    """
    ds = _load(spec, data_dir, download=download)
    if target is not None:
        check_backdoor_target(ds, target)
    return ds


def _load(spec: str, data_dir: str | None, *, download: bool) -> Dataset:
    if spec.startswith("npz:"):
        return load_npz(spec[4:])
    if data_dir is not None and not Path(data_dir).exists():
        raise DataError(f"--data_dir {data_dir} does not exist")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"--data_dir {data_dir} is a file; give the folder that holds the data")
    if spec == "fashion_mnist" and data_dir is not None:
        return load_fashion_mnist(data_dir)
    if spec in _CIFAR:
        for base in ([data_dir] if data_dir else []) + [str(default_cache_dir())]:
            folder = find_cifar_folder(spec, base)
            if folder is not None:
                return load_cifar_python(spec, folder)
        if data_dir is not None:
            raise DataError(
                f"{data_dir} holds no official {spec} python files "
                f"({_CIFAR[spec]['folder']}/{_CIFAR[spec]['test'][0]} etc.)")
        try:
            return load_tfds(spec, None, download=False)
        except DataError:
            pass
        if download:
            try:
                return load_cifar_python(spec, download_cifar(spec, default_cache_dir()))
            except DataError:
                raise
            except Exception as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(
                    f"cannot download {spec} ({reason}); on an offline machine pass "
                    f"--data_dir=DIR with the official '{_CIFAR[spec]['folder']}' folder "
                    f"(from {_CIFAR[spec]['url']}) or --dataset=npz:PATH") from None
        raise DataError(f"{spec} not found locally; pass --data_dir with the official "
                        f"'{_CIFAR[spec]['folder']}' folder or --dataset=npz:PATH")
    return load_tfds(spec, data_dir, download=download)
