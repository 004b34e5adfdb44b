"""--dataset=fashion_mnist: the official IDX files (gzip or raw), SHA256SUMS, bad files."""

import gzip
import hashlib
import shutil

import numpy as np
import pytest

from ftsam_jax.data import DataError, load_dataset
from ftsam_jax.data.datasets import FASHION_MNIST_CLASSES, normalization_for
from tests.conftest import ROOT

FASHION = ROOT.parent / "shared" / "data" / "fashion-mnist"


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of uint8 data: magic 0x0000 08 ndim, big-endian sizes, the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_set(folder, n_train=40, n_test=20, compress=True, labels_train=None, sums=True):
    """A small Fashion-MNIST-shaped folder with the official file names."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10 if labels_train is None
                                    else labels_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    lines = []
    for stem, array in arrays.items():
        data = idx_bytes(np.asarray(array))
        name = f"{stem}.gz" if compress else stem
        raw = gzip.compress(data, mtime=0) if compress else data
        (folder / name).write_bytes(raw)
        lines.append(f"{hashlib.sha256(raw).hexdigest()}  {name}")
    if sums:
        (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return arrays


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_reads_the_official_layout(tmp_path, compress):
    arrays = write_set(tmp_path / "fm", compress=compress)
    ds = load_dataset("fashion_mnist", str(tmp_path / "fm"))
    assert ds.name == "fashion_mnist" and ds.class_names == FASHION_MNIST_CLASSES
    assert ds.x_train.shape == (40, 28, 28, 1) and ds.x_test.shape == (20, 28, 28, 1)
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    # the published grey-level constants, not the toy set's own statistics
    assert normalization_for(ds) == ((0.2860,), (0.3530,))


def test_the_complete_official_set():
    if not FASHION.is_dir():
        pytest.skip("../shared/data/fashion-mnist is not present")
    ds = load_dataset("fashion_mnist", str(FASHION), target=0)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    x = ds.x_train.astype(np.float64) / 255.0
    assert x.mean() == pytest.approx(0.2860, abs=1e-4) and x.std() == pytest.approx(0.3530,
                                                                                      abs=1e-4)


def test_truncated_file_is_refused(tmp_path):
    write_set(tmp_path / "fm", sums=False)
    path = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100], mtime=0))
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion_mnist", str(tmp_path / "fm"))


def test_a_file_that_differs_from_sha256sums_is_refused(tmp_path):
    write_set(tmp_path / "fm")
    path = tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[-1] = (data[-1] + 1) % 10  # one label changed: still a valid IDX file
    path.write_bytes(gzip.compress(bytes(data), mtime=0))
    with pytest.raises(DataError, match="differs from SHA256SUMS"):
        load_dataset("fashion_mnist", str(tmp_path / "fm"))


def test_mislabelled_and_swapped_files_are_refused(tmp_path):
    write_set(tmp_path / "a", labels_train=np.full(40, 10), sums=False)
    with pytest.raises(DataError, match="label 10 is outside 0..9"):
        load_dataset("fashion_mnist", str(tmp_path / "a"))
    write_set(tmp_path / "b", sums=False)
    images, labels = (tmp_path / "b" / f for f in ("train-images-idx3-ubyte.gz",
                                                  "train-labels-idx1-ubyte.gz"))
    shutil.move(images, tmp_path / "tmp.gz")
    shutil.move(labels, images)
    shutil.move(tmp_path / "tmp.gz", labels)
    with pytest.raises(DataError, match="files swapped"):
        load_dataset("fashion_mnist", str(tmp_path / "b"))
    write_set(tmp_path / "c", n_train=40, sums=False)
    (tmp_path / "c" / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.arange(30) % 10), mtime=0))
    with pytest.raises(DataError, match="40 train images but 30 labels"):
        load_dataset("fashion_mnist", str(tmp_path / "c"))


def test_a_missing_file_names_what_to_give(tmp_path):
    write_set(tmp_path / "fm", sums=False)
    (tmp_path / "fm" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks the Fashion-MNIST file t10k-images-idx3-ubyte"):
        load_dataset("fashion_mnist", str(tmp_path / "fm"))
