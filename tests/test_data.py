"""The data readers: digits, CIFAR-10's python pickle batches and ImageFolder trees, read from
tiny generated data sets; every malformed folder is named in a one-line DataError. Batches read
by worker processes are the in-process ones, in the same order, and training with them (and
resuming) is bit-identical."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import dump, write_cifar10, write_image_folder

from nm_optim.app import data
from nm_optim.app.data import DataError

# -- digits ------------------------------------------------------------------------------------------------


def test_digits_are_normalised_8x8_with_a_fixed_disjoint_split():
    pytest.importorskip("sklearn")
    train, test = data.load_digits()
    assert len(train) + len(test) == 1797 and len(test) == round(1797 * data.DIGITS_TEST_FRACTION)
    assert train.shape == (1, 8, 8) and train.num_classes == 10
    x, y = train.batch(torch.arange(len(train)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3, "normalised with the training statistics"
    # the split is a function of nothing but the data: the same on a second call, and disjoint
    train2, test2 = data.load_digits()
    assert torch.equal(train.images, train2.images) and torch.equal(test.labels, test2.labels)
    seen = {tuple(im.flatten().tolist()) for im in train.images}
    overlap = sum(tuple(im.flatten().tolist()) in seen for im in test.images)
    assert overlap < 5, f"{overlap} test images also in the training set (digits has a few exact duplicates)"
    assert set(y.tolist()) == set(range(10))


# -- CIFAR-10 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True], ids=["batches-folder", "archive-parent"])
def test_cifar10_reads_every_batch_in_order_channel_major(tmp_path, nested):
    inner = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    batches = write_cifar10(inner, n_per_batch=5)
    train, test = data.load("cifar10:" + str(tmp_path))
    assert (len(train), len(test)) == (25, 5) and train.shape == (3, 32, 32)
    expected = np.concatenate([batches[n][0] for n in data.CIFAR10_TRAIN]).reshape(-1, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), expected)
    assert train.labels.tolist() == [y for n in data.CIFAR10_TRAIN for y in batches[n][1]]
    assert test.labels.tolist() == batches["test_batch"][1]
    assert train.classes[0] == "airplane"
    # image 7, pixel (row 3, col 4) of the green plane is byte 1024 + 3*32 + 4 of its row
    x, y = train.batch(torch.tensor([7]))
    raw = float(expected[7, 1, 3, 4]) / 255
    assert x[0, 1, 3, 4].item() == pytest.approx((raw - train.mean[1]) / train.std[1], rel=1e-5)
    assert y.tolist() == [batches["data_batch_2"][1][2]]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda root: (root / "data_batch_3").unlink(), "missing data_batch_3"),
        (lambda root: (root / "test_batch").write_bytes(b"not a pickle"), "test_batch is not a CIFAR-10 python batch"),
        (lambda root: dump({b"labels": [1]}, root / "data_batch_1"), "no 'data' entry"),
        (lambda root: dump({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, root / "data_batch_1"),
         "'data' must be uint8 [N, 3072]"),
        (lambda root: dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, root / "data_batch_1"),
         "2 images but 1 labels"),
        (lambda root: dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, root / "data_batch_1"),
         "labels must be in 0..9"),
        (lambda root: dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [1], b"x": print}, root / "data_batch_1"),
         "refusing to load"),
    ],
    ids=["missing-batch", "not-a-pickle", "no-data", "float-data", "label-count", "label-range", "code-in-pickle"],
)
def test_cifar10_says_what_is_wrong_in_one_line(tmp_path, corrupt, message):
    write_cifar10(tmp_path)
    corrupt(tmp_path)
    with pytest.raises(DataError, match="^[^\n]*$") as info:
        data.load(f"cifar10:{tmp_path}")
    assert message in str(info.value)


def test_cifar10_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"CIFAR-10 folder .*nowhere does not exist"):
        data.load(f"cifar10:{tmp_path / 'nowhere'}")


# -- ImageFolder -----------------------------------------------------------------------------------------------


def test_image_folder_labels_by_sorted_class_and_resizes(tmp_path):
    pixels = write_image_folder(tmp_path / "train", classes=("zebra", "ant", "bee"), per_class=2, nested=True)
    write_image_folder(tmp_path / "val", classes=("ant", "zebra"), per_class=1, seed=1)
    train, test = data.load(f"imagefolder:{tmp_path}", image_size=6)
    assert train.classes == ["ant", "bee", "zebra"]
    assert len(train) == 6 and len(test) == 2 and train.shape == (3, 6, 6)
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.labels.tolist() == [0, 2], "the val classes index into the training classes"
    x, y = train.batch(torch.tensor([5, 0]))
    assert x.shape == (2, 3, 6, 6) and x.dtype == torch.float32 and y.tolist() == [2, 0]
    # 10x7 images resized to a square of any size
    assert data.load_image_folder(tmp_path, size=10).train.batch(torch.tensor([0]))[0].shape == (1, 3, 10, 10)
    # the same size: no resampling, so the pixels come back exactly (normalised with ImageNet's statistics)
    square = tmp_path / "square"
    sq = write_image_folder(square, classes=("a",), per_class=1, size=(5, 5))
    one, _ = data.load_image_folder(square, size=5)
    got = one.batch(torch.tensor([0]))[0][0]
    mean = torch.tensor(data.IMAGENET_MEAN).reshape(3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).reshape(3, 1, 1)
    want = torch.from_numpy(sq[("a", 0)]).permute(2, 0, 1).float() / 255
    assert torch.allclose(got * std + mean, want, atol=1e-6)
    assert len(pixels) == 6


def test_tiny_imagenet_val_folder_is_read_through_its_annotations(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    write_image_folder(tmp_path / "train", classes=("n01", "n02"), per_class=2, nested=True)
    (tmp_path / "val" / "images").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "val" / "images" / f"val_{i}.JPEG")
    (tmp_path / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02\t0\t0\t8\t8\nval_1.JPEG\tn01\t0\t0\t8\t8\nval_2.JPEG\tn02\t0\t0\t8\t8\n")
    train, test = data.load(f"imagefolder:{tmp_path}", image_size=8)
    assert test.labels.tolist() == [1, 0, 1] and len(train) == 4
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\n")
    with pytest.raises(DataError, match=r"val_annotations.txt:1: expected"):
        data.load(f"imagefolder:{tmp_path}")


def test_image_folder_errors_name_the_problem(tmp_path):
    pytest.importorskip("PIL")
    with pytest.raises(DataError, match="does not exist"):
        data.load(f"imagefolder:{tmp_path / 'absent'}")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="has no class subfolders"):
        data.load(f"imagefolder:{tmp_path / 'flat'}")
    write_image_folder(tmp_path / "some", classes=("a",), per_class=1)
    (tmp_path / "some" / "b").mkdir()
    (tmp_path / "some" / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder\(s\) b contain no images"):
        data.load(f"imagefolder:{tmp_path / 'some'}")
    (tmp_path / "some" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="cannot decode image .*broken.png"):
        data.load(f"imagefolder:{tmp_path / 'some'}").train.batch(torch.arange(2))


@pytest.mark.parametrize(
    "spec, message",
    [("mnist", "unknown data set 'mnist'"), ("cifar10", "needs a folder"), ("digits:/x", "unknown data set")],
)
def test_data_spec_errors(spec, message):
    with pytest.raises(DataError, match=message):
        data.load(spec)


# -- reading batches with worker processes --------------------------------------------------------------


def _index_batches():
    return [torch.tensor([0, 3, 5]), torch.tensor([8, 1]), torch.tensor([2, 7, 6, 4])]


def test_batches_from_workers_are_the_in_process_batches_in_order(tmp_path):
    write_image_folder(tmp_path, per_class=3)
    train, _ = data.load(f"imagefolder:{tmp_path}", image_size=6)
    want = [train.batch(i) for i in _index_batches()]
    for workers in (0, 2):
        got = list(data.batches(train, iter(_index_batches()), workers=workers))
        assert len(got) == len(want)
        for (x, y), (wx, wy) in zip(got, want):
            assert torch.equal(x, wx) and torch.equal(y, wy), f"workers={workers}"
    with pytest.raises(ValueError, match="non-negative integer"):
        data.batches(train, _index_batches(), workers=-1)


def test_files_are_decoded_by_every_core_and_memory_in_process(tmp_path):
    write_image_folder(tmp_path, per_class=1)
    files, _ = data.load(f"imagefolder:{tmp_path}", image_size=6)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert data.default_workers(files) == cores
    assert data.default_workers(files, processes=2) == max(1, cores // 2), "torchrun's processes share the cores"
    memory = data.TensorData("t", torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64), ["a"], [0.0], [1.0])
    assert data.default_workers(memory) == 0


class _Stop(Exception):
    pass


def _train_on_images(root, out, *, workers, resume=False, stop_at=None):
    from nm_optim.app.config import TrainConfig
    from nm_optim.app.loop import train

    def on_step(done):
        if done == stop_at:
            raise _Stop(done)

    config = TrainConfig(model="mlp", data=f"imagefolder:{root}", image_size=6, lr=0.05, momentum=0.9,
                         batch_size=4, steps=9, checkpoint_every=3, seed=5)
    return train(config, out, resume=resume, progress=False, write_outputs=False, workers=workers, on_step=on_step,
                 track="layers")


def test_training_reads_the_same_batches_with_workers_and_resumes_exactly(tmp_path):
    """9 steps over an ImageFolder of 9 images in batches of 4 (two per epoch, so five epochs'
    orders): decoding by 2 worker processes gives the in-process run's parameters and record to the
    bit, and so does a run stopped after step 4 and resumed from its checkpoint at step 3."""
    from helpers import assert_same_record

    write_image_folder(tmp_path / "images", per_class=3)
    root = tmp_path / "images"
    alone = _train_on_images(root, tmp_path / "alone", workers=0)
    with_workers = _train_on_images(root, tmp_path / "workers", workers=2)
    with pytest.raises(_Stop):
        _train_on_images(root, tmp_path / "parts", workers=2, stop_at=4)
    resumed = _train_on_images(root, tmp_path / "parts", workers=2, resume=True)
    assert resumed.resumed_from == 3
    for run in (with_workers, resumed):
        assert run.steps == alone.steps == 9
        for (name, a), b in zip(alone.model.named_parameters(), run.model.parameters()):
            assert torch.equal(a, b), name
        assert_same_record(alone.record, run.record)
        assert run.test_accuracy == alone.test_accuracy


def test_negative_workers_is_a_user_error(tmp_path):
    from nm_optim.app.config import UserError

    write_image_folder(tmp_path / "images", per_class=1)
    with pytest.raises(UserError, match="--workers must be a non-negative integer"):
        _train_on_images(tmp_path / "images", tmp_path / "out", workers=-2)
