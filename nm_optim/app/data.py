"""Data readers for `nm-optim demo|train`: scikit-learn's digits, CIFAR-10 in its python pickle
format, and any ImageFolder tree (Tiny ImageNet, ...), without torchvision.

Every reader validates the folder it is given and raises :class:`DataError` with one line that
says what is missing or malformed, so the command line can print it instead of a traceback.
A data set is a :class:`Split` pair (train, test) of objects with ``len()`` and
``batch(indices) -> (images float32 [B, C, H, W], labels int64 [B])``: in-memory tensors for
digits and CIFAR-10 (stored as uint8 where the source is, normalised per batch), and lazily
decoded files for ImageFolder trees, which may not fit in memory.

    train, test = nm_optim.app.data.load("cifar10:/data/cifar-10-batches-py")

:func:`batches` reads a sequence of batches in order, with worker processes decoding ahead of the
training step where the data set decodes files (:func:`default_workers`).
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

DATA_KINDS = ("digits", "cifar10:DIR", "imagefolder:DIR")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# The usual ImageNet statistics: an ImageFolder tree is read lazily, so its own mean and std
# would cost a full decoding pass before the first step.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 20210115  # fixed: the split must not move with the training seed


class DataError(ValueError):
    """A data set that is missing or malformed; the message is one line meant for the user."""


class Split(NamedTuple):
    train: Any
    test: Any | None


@dataclass
class TensorData:
    """Images kept in memory (uint8 or float), normalised per batch with a per-channel mean/std.

    `images` [N, C, H, W]; `labels` [N] int64; `scale` divides the raw values first (255 for
    uint8 pixels, 16 for the digits' 0..16 counts)."""

    name: str
    images: Tensor
    labels: Tensor
    classes: list[str]
    mean: Sequence[float]
    std: Sequence[float]
    scale: float = 255.0

    def __post_init__(self) -> None:
        c = self.images.shape[1]
        self._mean = torch.tensor(self.mean, dtype=torch.float32).reshape(1, c, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).reshape(1, c, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        x = self.images[indices].to(torch.float32) / self.scale
        return (x - self._mean) / self._std, self.labels[indices]


# -- digits ---------------------------------------------------------------------------------------


def load_digits(test_fraction: float = DIGITS_TEST_FRACTION) -> Split:
    """scikit-learn's 1797 handwritten digits (8x8, one channel, values 0..16; shipped inside
    scikit-learn, no download), scaled to [0, 1] and normalised with the training mean and std.
    The train/test split is a fixed permutation, the same on every machine and for every seed."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise DataError(
            "the digits data set needs scikit-learn: pip install 'nm_optim[demo]'"
        ) from e
    bunch = sk_load_digits()
    images = torch.as_tensor(np.asarray(bunch.images, dtype=np.float32)).unsqueeze(1)  # [N, 1, 8, 8]
    labels = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_test = round(len(labels) * test_fraction)
    test_idx, train_idx = order[:n_test], order[n_test:]
    train_x = images[train_idx] / 16.0
    mean, std = float(train_x.mean()), float(train_x.std())
    classes = [str(c) for c in range(10)]

    def part(idx: Tensor, name: str) -> TensorData:
        return TensorData(name, images[idx].contiguous(), labels[idx].contiguous(), classes, [mean], [std], scale=16.0)

    return Split(part(train_idx, "digits/train"), part(test_idx, "digits/test") if n_test else None)


# -- CIFAR-10 -------------------------------------------------------------------------------------

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing else: a CIFAR batch is a pickle,
    and unpickling an arbitrary file may run arbitrary code."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles spell the bytes of an array
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = path.read_bytes()
        batch = _ArraysOnly(io.BytesIO(raw), encoding="bytes").load()
    except OSError as e:
        raise DataError(f"cannot read CIFAR-10 file {path}: {e.strerror or e}") from e
    except Exception as e:
        raise DataError(f"{path} is not a CIFAR-10 python batch (unpickling failed: {e})") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR-10 python batch (a {type(batch).__name__}, not a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise DataError(f"{path} is not a CIFAR-10 python batch: no {' or '.join(repr(m) for m in missing)} entry")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be uint8 [N, 3072] (32x32 RGB, channel-major), got {got}")
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: 'labels' must be a list of integers ({e})") from e
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must be in 0..9, found {labels.min()}..{labels.max()}")
    return data, labels


def _cifar_class_names(meta: Path) -> list[str] | None:
    """The label names of batches.meta, or None when unreadable: they are cosmetic, and the
    official names are the default."""
    try:
        m = _ArraysOnly(io.BytesIO(meta.read_bytes()), encoding="bytes").load()
        names = m.get(b"label_names", m.get("label_names")) if isinstance(m, dict) else None
    except Exception:  # noqa: BLE001
        return None
    if names is None or len(names) != 10:
        return None
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load_cifar10(root: str | os.PathLike) -> Split:
    """CIFAR-10 in its python pickle format: a folder with data_batch_1 .. data_batch_5 and
    test_batch (the folder `cifar-10-batches-py` of the official archive, or its parent).
    Images are normalised with the per-channel mean and std of the training batches."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"CIFAR-10 folder {root} does not exist" if not root.exists() else f"CIFAR-10 path {root} is not a folder")
    if not (root / CIFAR10_TRAIN[0]).exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    missing = [n for n in (*CIFAR10_TRAIN, CIFAR10_TEST) if not (root / n).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 folder {root} is missing {', '.join(missing)} "
            f"(expected data_batch_1..5 and test_batch of the python version)"
        )
    parts = [_read_cifar_batch(root / n) for n in CIFAR10_TRAIN]
    train_x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_cifar_batch(root / CIFAR10_TEST)
    classes = list(CIFAR10_CLASSES)
    meta = root / "batches.meta"
    if meta.is_file():
        classes = _cifar_class_names(meta) or classes
    x = torch.from_numpy(train_x)
    mean = (x.double() / 255).mean(dim=(0, 2, 3)).tolist()
    std = (x.double() / 255).std(dim=(0, 2, 3)).tolist()
    train = TensorData("cifar10/train", x, torch.from_numpy(train_y), classes, mean, std)
    test = TensorData("cifar10/test", torch.from_numpy(test_x.reshape(-1, 3, 32, 32)), torch.from_numpy(test_y), classes, mean, std)
    return Split(train, test)


# -- ImageFolder ----------------------------------------------------------------------------------


def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError("reading an ImageFolder needs Pillow: pip install pillow") from e
    return Image


def _class_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_under(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                found.append(Path(dirpath) / f)
    return found


@dataclass
class ImageFolderData:
    """Images in class subfolders (any depth below the class folder, as torchvision's
    ImageFolder), decoded with Pillow when a batch asks for them, converted to RGB and resized to
    `size` x `size`."""

    name: str
    files: list[Path]
    labels: Tensor
    classes: list[str]
    size: int
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __post_init__(self) -> None:
        self._mean = torch.tensor(self.mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).reshape(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def _decode(self, path: Path) -> np.ndarray:
        Image = _pil()
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (self.size, self.size):
                    im = im.resize((self.size, self.size), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise DataError(f"cannot decode image {path}: {e}") from e

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        arr = np.stack([self._decode(self.files[int(i)]) for i in indices])  # [B, H, W, 3]
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return (x - self._mean) / self._std, self.labels[indices]


def _read_image_folder(root: Path, size: int, name: str, classes: list[str] | None = None) -> ImageFolderData:
    folders = _class_folders(root)
    if not folders:
        raise DataError(f"ImageFolder {root} has no class subfolders (expected {root}/<class>/<image files>)")
    if classes is None:
        classes = [f.name for f in folders]
    index = {c: i for i, c in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    empty = []
    for folder in folders:
        if folder.name not in index:
            raise DataError(f"{folder} is a class that the training folder does not have")
        found = _images_under(folder)
        if not found:
            empty.append(folder.name)
        files += found
        labels += [index[folder.name]] * len(found)
    if empty:
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise DataError(f"ImageFolder {root}: class folder(s) {shown} contain no images ({'/'.join(IMAGE_EXTENSIONS)})")
    _pil()
    data = ImageFolderData(name, files, torch.tensor(labels, dtype=torch.int64), classes, size)
    data._decode(files[0])  # fail now, with the file's name, rather than at some later step
    return data


def load_image_folder(root: str | os.PathLike, size: int = 64) -> Split:
    """An ImageFolder tree: `root/<class>/**/<image>`, or `root/train/<class>/...` with an
    optional `root/val/<class>/...` (or `test/`) evaluation split in the same layout. Tiny
    ImageNet's own val/ folder (images/ + val_annotations.txt) is read through its annotations.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ImageFolder {root} does not exist" if not root.exists() else f"ImageFolder path {root} is not a folder")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"image size must be a positive integer, got {size!r}")
    train_root = root / "train" if (root / "train").is_dir() else root
    train = _read_image_folder(train_root, size, f"{root.name}/train")
    test = None
    if train_root is not root:
        for split in ("val", "test"):
            folder = root / split
            if not folder.is_dir():
                continue
            annotations = folder / "val_annotations.txt"
            if annotations.is_file() and (folder / "images").is_dir():
                test = _tiny_imagenet_val(folder, annotations, train, size)
            else:
                test = _read_image_folder(folder, size, f"{root.name}/{split}", classes=train.classes)
            break
    return Split(train, test)


def _tiny_imagenet_val(folder: Path, annotations: Path, train: ImageFolderData, size: int) -> ImageFolderData:
    index = {c: i for i, c in enumerate(train.classes)}
    files, labels = [], []
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"{annotations}:{n}: expected '<file>\\t<class of the training folder>', got {line[:80]!r}")
        path = folder / "images" / fields[0]
        if not path.is_file():
            raise DataError(f"{annotations}:{n}: {path} does not exist")
        files.append(path)
        labels.append(index[fields[1]])
    return ImageFolderData(f"{folder.parent.name}/{folder.name}", files, torch.tensor(labels, dtype=torch.int64), train.classes, size)


# -- one entry point --------------------------------------------------------------------------------


def load(spec: str, *, image_size: int | None = None) -> Split:
    """`digits`, `cifar10:DIR` or `imagefolder:DIR` -> Split(train, test)."""
    kind, sep, where = spec.partition(":")
    if kind == "digits" and not sep:
        if image_size not in (None, 8):
            raise DataError(f"the digits are 8x8 images; --image-size {image_size} is not supported for them")
        return load_digits()
    if kind in ("cifar10", "imagefolder"):
        if not where:
            raise DataError(f"--data {kind} needs a folder: --data {kind}:DIR")
        path = Path(where).expanduser()
        if kind == "cifar10":
            if image_size not in (None, 32):
                raise DataError(f"CIFAR-10 images are 32x32; --image-size {image_size} is not supported for it")
            return load_cifar10(path)
        return load_image_folder(path, 64 if image_size is None else image_size)
    raise DataError(f"unknown data set {spec!r}; expected one of: {', '.join(DATA_KINDS)}")


# -- reading batches -------------------------------------------------------------------------------


def default_workers(data: Any, processes: int = 1) -> int:
    """How many processes decode `data`'s batches by default: for a data set decoded from files
    (ImageFolderData), the cores this process may use, shared with the `processes` training
    processes on this machine (torchrun's LOCAL_WORLD_SIZE), at least one; none for one held in
    memory, whose batch is a tensor index that a worker would only copy through shared memory."""
    if not isinstance(data, ImageFolderData):
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, processes))


class _ByBatch(torch.utils.data.Dataset):
    """`data` as a torch data set whose item `idx` (an index tensor) is the batch data.batch(idx)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __getitem__(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.data.batch(idx)


def batches(data: Any, indices: Iterable[Tensor], *, workers: int = 0,
            pin_memory: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """``data.batch(idx)`` for each `idx` of `indices`, in that order: the same tensors whatever
    `workers` is, so a run's data order (and a resume's) does not depend on it.

    workers > 0: torch.utils.data.DataLoader with that many processes, each decoding whole
    batches (a batch's images in one worker) a few batches ahead; the loader hands them back in
    the order of `indices`. pin_memory: page-locked batches, for asynchronous copies to CUDA."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be a non-negative integer, got {workers!r}")
    if workers == 0 and not pin_memory:
        return (data.batch(idx) for idx in indices)
    # batch_size=None: no automatic batching, the sampler's items (index tensors) are the keys.
    return iter(torch.utils.data.DataLoader(_ByBatch(data), batch_size=None, sampler=indices, num_workers=workers,
                                            pin_memory=pin_memory))
