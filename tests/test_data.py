"""Data sources (official CIFAR folder, npz, TFDS data_source) and on-device augmentation."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftsam_jax.data import DataError, load_dataset, normalization_for, random_crop, random_flip


def test_cifar_subset_loads_like_the_official_files(cifar_subset):
    ds = cifar_subset
    assert ds.x_train.shape == (5170, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (1017, 32, 32, 3)
    assert ds.y_train.dtype == np.int32 and set(np.unique(ds.y_train)) == set(range(10))
    assert ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
    assert normalization_for(ds) == ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))


def test_cifar_folder_can_be_given_directly(cifar_dir):
    ds = load_dataset("cifar10", str(cifar_dir / "cifar-10-batches-py"))
    assert len(ds.y_test) == 1017


def _write_fake_cifar(folder, payload=None, data=None):
    folder.mkdir(parents=True, exist_ok=True)
    batch = {b"data": np.zeros((4, 3072), np.uint8) if data is None else data,
             b"labels": [0, 1, 2, 3]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            if payload is not None and name == "data_batch_1":
                f.write(payload)
            else:
                pickle.dump(batch, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a", b"b", b"c", b"d"]}, f, protocol=2)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_reader_refuses_arbitrary_pickles(tmp_path):
    _write_fake_cifar(tmp_path / "c", payload=pickle.dumps({b"data": _Evil()}))
    with pytest.raises(DataError, match="refusing to load global builtins.print"):
        load_dataset("cifar10", str(tmp_path / "c"))


def test_cifar_reader_checks_shapes(tmp_path):
    _write_fake_cifar(tmp_path / "c", data=np.zeros((4, 100), np.uint8))
    with pytest.raises(DataError, match=r"shape \(N, 3072\)"):
        load_dataset("cifar10", str(tmp_path / "c"))
    _write_fake_cifar(tmp_path / "ok")
    assert load_dataset("cifar10", str(tmp_path / "ok")).class_names == ("a", "b", "c", "d")


def test_missing_data_dir_and_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="holds no official cifar10"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(DataError, match="not found"):
        load_dataset("npz:" + str(tmp_path / "x.npz"))


def test_npz_grey_images_any_size(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
             y_train=rng.integers(0, 3, 20), x_test=rng.random((6, 28, 28, 1)),
             y_test=np.arange(6) % 3)
    ds = load_dataset(f"npz:{path}")
    assert ds.x_train.shape == (20, 28, 28, 1) and ds.x_test.dtype == np.uint8
    assert ds.num_classes == 3
    mean, std = normalization_for(ds)
    assert len(mean) == 1 and len(std) == 1


def test_malformed_npz(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((2, 8, 8, 3), np.uint8), y_train=[0, 1])
    with pytest.raises(DataError, match="lacks the arrays"):
        load_dataset(f"npz:{path}")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")


def test_tfds_data_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        ds = load_dataset("mnist", None, download=False)
    assert ds.x_train.shape[1:] == (28, 28, 1) and len(ds.y_train) == 12
    assert ds.num_classes == 10


def test_unknown_tfds_name_is_a_clear_error():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("no_such_dataset_xyz")


def test_random_crop_moves_content_within_padding():
    img = jnp.zeros((64, 8, 8, 1)).at[:, 3, 3, 0].set(1.0)
    out = np.asarray(random_crop(jax.random.key(0), img, padding=2))
    pos = np.argwhere(out[..., 0] == 1.0)
    assert len(pos) == 64  # the pixel stays inside for shifts up to 2
    shifts = pos[:, 1:] - 3
    assert np.abs(shifts).max() <= 2 and len({tuple(s) for s in shifts}) > 10


def test_random_flip_flips_about_half():
    img = jnp.zeros((400, 4, 4, 1)).at[:, :, 0, 0].set(1.0)
    out = np.asarray(random_flip(jax.random.key(1), img))
    flipped = out[:, 0, 3, 0] == 1.0
    assert 150 < flipped.sum() < 250
    np.testing.assert_array_equal(out[flipped][:, :, ::-1], np.asarray(img[:flipped.sum()]))
