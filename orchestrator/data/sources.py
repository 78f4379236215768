"""Dataset sources: uint8 images and integer labels read from each dataset's standard on-disk format.

Nothing here fakes a dataset (DESIGN.md, "Data"): the defaults that need no files are `digits`, which ships with
scikit-learn, and `synthetic`, shapes this project generates procedurally (orchestrator/data/synthetic.py).
Every image store returns one uint8 tensor (C,H,W) per index; augmentation happens in views.py.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from orchestrator.data.synthetic import SHAPES, shapes
from orchestrator.spec import DataSpec

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
STL10_MEAN, STL10_STD = (0.4408, 0.4279, 0.3867), (0.2682, 0.2610, 0.2686)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIGITS_CACHE = Path("~/.cache/lab-orchestrator/digits")
DIGITS_ARRAYS = ("images", "labels", "train", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
STL10_IMAGE_BYTES = 3 * 96 * 96


class DataFileError(RuntimeError):
    """A dataset file that exists but cannot be read as its format says: `path` and what is wrong with it.
    Deterministic, so a run that meets one is not retried (orchestrator/divergence.py `no_retry_callback`)."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"unreadable dataset file {self.path}: {problem}")

    def __reduce__(self) -> tuple:  # Ray pickles worker errors: rebuild from the fields
        return type(self), (self.path, self.problem)


class Images(Protocol):
    """An indexable store of images; item i is a uint8 tensor (C,H,W)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> torch.Tensor: ...


@dataclass
class Source:
    """A dataset's train and test images with labels, and how its images may be cropped and normalised.

    crop: "fixed" - every image is default_size x default_size (in-memory arrays, STL-10 binaries);
          "imagenet" - photos of any size: RandomResizedCrop for training, resize 256/224 + center crop for eval;
          "center" - images of any size, resized (shorter side) and center-cropped, then treated as "fixed".
    extra_unlabeled: images without labels that join the unlabeled pool (STL-10's unlabeled_X.bin).
    """

    train: Images
    train_labels: np.ndarray  # (N_train,) int64
    test: Images
    test_labels: np.ndarray  # (N_test,) int64
    num_classes: int
    in_channels: int
    default_size: int  # image_size when the spec leaves it out
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: Literal["fixed", "imagenet", "center"] = "fixed"
    hflip: bool = True  # whether horizontal flips preserve the labels
    extra_unlabeled: Images | None = None


def load_source(spec: DataSpec) -> Source:
    """The `Source` named by `spec.dataset`, read from `spec.root` where it needs files."""
    loaders = {
        "digits": _digits,
        "cifar10": _cifar,
        "cifar100": _cifar,
        "stl10": _stl10,
        "imagefolder": _imagefolder,
        "parquet": _parquet,
        "synthetic": _synthetic,
    }
    return loaders[spec.dataset](spec)


def check_files(spec: DataSpec) -> None:
    """Before Ray starts: the dataset's files are there and readable as their format says, at a cost far below
    loading them (CIFAR's batches are unpickled; STL-10 sizes, Parquet footers, and the first image of each
    image-folder split are checked; for VOC/Cityscapes the id lists, that the masks exist, and the first image and
    masks). A file that breaks later, e.g. a corrupt JPEG deep in ImageNet, raises DataFileError naming it when a
    worker reads it. Raises FileNotFoundError, DataFileError or KeyError."""
    if spec.download or spec.dataset in ("digits", "synthetic", "text", "arithmetic", "shapes_seg"):
        return
    if spec.dataset == "jsonl":
        from trainers.rl.tasks import read_jsonl

        for split in ("train", "test"):
            path = _existing(Path(spec.root) / f"{split}.jsonl")
            try:
                read_jsonl(path)
            except ValueError as err:
                raise DataFileError(path, str(err).replace(f"{path}:", "line ", 1)) from None
    elif spec.dataset in CIFAR_LAYOUTS:
        layout = CIFAR_LAYOUTS[spec.dataset]
        for name in layout.train_files + layout.test_files:
            _cifar_batch(_existing(Path(spec.root) / layout.folder / name), layout.label_key)
    elif spec.dataset == "stl10":
        load_source(spec)
    elif spec.dataset == "imagefolder":
        _check_image_folders(Path(spec.root))
    elif spec.dataset == "parquet":
        _parquet_files(spec, "train")
        _parquet_files(spec, "test")
    elif spec.dataset in ("voc", "cityscapes"):
        from orchestrator.data import segmentation

        segmentation.check_files(spec)


# ---------------------------------------------------------------------------------------------- image stores


class TensorImages:
    """Images held in memory as one uint8 tensor (N,C,H,W)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class Stl10Binary:
    """An STL-10 `*_X.bin` file, memory-mapped; each image is 3x96x96 uint8 stored column-major (W before H)."""

    def __init__(self, path: Path):
        self.path = path
        self.length = path.stat().st_size // STL10_IMAGE_BYTES
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.length, 3, 96, 96))
        return torch.from_numpy(np.ascontiguousarray(self._array[i].transpose(0, 2, 1)))  # (3,W,H) -> (3,H,W)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}  # loader workers map the file again rather than copy it


class FileImages:
    """Image files decoded with PIL when an item is read."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _decode(self.paths[i], self.paths[i])


class EncodedImages:
    """Encoded PNG/JPEG bytes (a pyarrow binary array) decoded with PIL when an item is read; `files` names
    where they came from, for errors. `channels` 1 decodes to grayscale; `size` Lanczos-resizes every image to
    size x size (generated images joining a dataset of another resolution)."""

    def __init__(self, values: pa.Array, files: str = "<memory>", channels: int = 3, size: int | None = None):
        self.values, self.files, self.channels, self.size = values, files, channels, size

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _decode(io.BytesIO(self.values[i].as_py()), f"{self.files} (row {i})", self.channels, self.size)


def _decode(file: Path | io.BytesIO, name: str | Path, channels: int = 3, size: int | None = None) -> torch.Tensor:
    """One image file or buffer as uint8 (channels,H,W); a corrupt or truncated one raises DataFileError naming
    it."""
    try:
        with Image.open(file) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.LANCZOS)
            return pil_to_tensor(image)
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for unknown formats and truncated data
        raise DataFileError(name, f"not a readable image ({type(err).__name__}: {err})") from None


class ConcatImages:
    """`first` followed by `second`."""

    def __init__(self, first: Images, second: Images):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.first[i] if i < len(self.first) else self.second[i - len(self.first)]


# ---------------------------------------------------------------------------------------------- in memory


def _digits(spec: DataSpec) -> Source:
    """scikit-learn's bundled 8x8 digits; a fixed stratified 75/25 split (random_state=0): 1347 / 450 images."""
    images, labels, train, test = _digits_split()
    images = torch.from_numpy(images)[:, None]  # (1797,1,8,8) uint8
    mean, std = _channel_stats(images[train])
    return Source(
        TensorImages(images[train]), labels[train], TensorImages(images[test]), labels[test],
        num_classes=10, in_channels=1, default_size=8, mean=mean, std=std, hflip=False,
    )


def _digits_split() -> tuple[np.ndarray, ...]:
    """(images uint8 (1797,8,8), labels, train indices, test indices), computed once per scikit-learn version into
    DIGITS_CACHE: importing scikit-learn cost every worker of the quickstart 1.3 s. A cache that cannot be read or
    written only costs that import again."""
    from importlib.metadata import version

    path = DIGITS_CACHE.expanduser() / f"digits-scikit-learn-{version('scikit-learn')}.npz"
    try:
        with np.load(path) as cached:
            return tuple(cached[key] for key in DIGITS_ARRAYS)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        pass
    arrays = _split_digits()
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "wb") as file:
            np.savez(file, **dict(zip(DIGITS_ARRAYS, arrays)))
        os.replace(part, path)  # whole or absent: a reader never sees half a file
    except OSError:
        part.unlink(missing_ok=True)
    return arrays


def _split_digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0)
    return images, labels, np.sort(train), np.sort(test)


def _synthetic(spec: DataSpec) -> Source:
    """Procedurally generated shapes (synthetic.py): fixed generator seeds, 32 px, per_class // 4 test images."""
    train_images, train_labels = shapes(spec.synthetic_per_class, seed=0)
    test_images, test_labels = shapes(max(1, spec.synthetic_per_class // 4), seed=1)
    train = torch.from_numpy(train_images)
    mean, std = _channel_stats(train)
    return Source(
        TensorImages(train), train_labels, TensorImages(torch.from_numpy(test_images)), test_labels,
        num_classes=len(SHAPES), in_channels=3, default_size=32, mean=mean, std=std,
    )


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N,C,H,W), on the 0..1 scale."""
    values = images.float().div(255).transpose(0, 1).flatten(1)  # (C, N*H*W)
    return tuple(values.mean(1).tolist()), tuple(values.std(1).tolist())


# ---------------------------------------------------------------------------------------------- CIFAR, STL-10


class _CifarLayout(NamedTuple):
    folder: str
    train_files: list[str]
    test_files: list[str]
    label_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
                            10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": _CifarLayout("cifar-100-python", ["train"], ["test"], "fine_labels", 100, CIFAR100_MEAN, CIFAR100_STD),
}


def _cifar(spec: DataSpec) -> Source:
    """The CIFAR python pickle batches (`cifar-10-batches-py/`, `cifar-100-python/`), read without md5 checks."""
    if spec.download:
        import torchvision

        dataset_cls = torchvision.datasets.CIFAR10 if spec.dataset == "cifar10" else torchvision.datasets.CIFAR100
        dataset_cls(spec.root, train=True, download=True)
    layout = CIFAR_LAYOUTS[spec.dataset]
    root = Path(spec.root) / layout.folder
    train, train_labels = _cifar_batches([root / name for name in layout.train_files], layout.label_key)
    test, test_labels = _cifar_batches([root / name for name in layout.test_files], layout.label_key)
    return Source(
        TensorImages(train), train_labels, TensorImages(test), test_labels,
        num_classes=layout.num_classes, in_channels=3, default_size=32, mean=layout.mean, std=layout.std,
    )


def _cifar_batches(paths: list[Path], label_key: str) -> tuple[torch.Tensor, np.ndarray]:
    """Images uint8 (N,3,32,32) and labels (N,) from CIFAR pickle batches (dicts with `data` (N,3072) and labels)."""
    images, labels = [], []
    for path in paths:
        data, batch_labels = _cifar_batch(_existing(path), label_key)
        images.append(data)
        labels.append(batch_labels)
    return torch.from_numpy(np.concatenate(images)), np.concatenate(labels)


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: images uint8 (N,3,32,32), labels (N,); DataFileError when it is not such a pickle."""
    try:
        with open(path, "rb") as f:
            batch = {_text(key): value for key, value in pickle.load(f, encoding="bytes").items()}
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, ImportError) as err:
        raise DataFileError(path, f"not a CIFAR python batch ({type(err).__name__}: {err})") from None
    if "data" not in batch or label_key not in batch:
        raise DataFileError(path, f"a CIFAR batch needs the keys 'data' and {label_key!r}, found {sorted(batch)}")
    data, labels = np.asarray(batch["data"], dtype=np.uint8), np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataFileError(path, f"'data' must be (N, 3072) with N labels, found {data.shape} and {len(labels)} "
                            "labels")
    return data.reshape(-1, 3, 32, 32), labels


def _text(key: str | bytes) -> str:
    return key.decode() if isinstance(key, bytes) else key


def _stl10(spec: DataSpec) -> Source:
    """The STL-10 binaries in `stl10_binary/` (labels 1..10 in the files), memory-mapped; 100k unlabeled extras."""
    if spec.download:
        import torchvision

        torchvision.datasets.STL10(spec.root, split="train+unlabeled", download=True)
    root = Path(spec.root) / "stl10_binary"
    train, train_labels = _stl10_split(root, "train")
    test, test_labels = _stl10_split(root, "test")
    return Source(
        train, train_labels, test, test_labels, num_classes=10, in_channels=3, default_size=96, mean=STL10_MEAN,
        std=STL10_STD, extra_unlabeled=_stl10_images(root / "unlabeled_X.bin"),
    )


def _stl10_split(root: Path, split: str) -> tuple[Stl10Binary, np.ndarray]:
    images = _stl10_images(root / f"{split}_X.bin")
    labels_path = _existing(root / f"{split}_y.bin")
    labels = np.fromfile(labels_path, dtype=np.uint8).astype(np.int64) - 1
    if len(labels) != len(images) or not ((labels >= 0) & (labels < 10)).all():
        values = sorted(set((labels + 1).tolist()))[:12]
        raise DataFileError(labels_path, f"expected {len(images)} labels in 1..10 (one per image of {split}_X.bin), "
                            f"found {len(labels)} with values {values}")
    return images, labels


def _stl10_images(path: Path) -> Stl10Binary:
    size = _existing(path).stat().st_size
    if size % STL10_IMAGE_BYTES:
        raise DataFileError(path, f"{size} bytes is not a whole number of 3x96x96 images (truncated?)")
    return Stl10Binary(path)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: check data.root, or set data.download: true (needs internet)")
    return path


# ---------------------------------------------------------------------------------------------- image files


def _imagefolder(spec: DataSpec) -> Source:
    """ImageNet layout: `root/train/<class>/*.jpg` and `root/val/<class>/...` (or `root/test/`); classes sorted."""
    root = Path(spec.root)
    train_dir = root / "train"
    test_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), root / "val")
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: data.root must hold train/ and val/ (or test/) folders")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    unknown = sorted({d.name for d in test_dir.iterdir() if d.is_dir()} - set(classes))
    if unknown:
        raise ValueError(f"{test_dir} has class folders that train/ lacks: {unknown}")
    train_paths, train_labels = _scan(train_dir, classes)
    test_paths, test_labels = _scan(test_dir, classes)
    return Source(
        FileImages(train_paths), train_labels, FileImages(test_paths), test_labels, num_classes=len(classes),
        in_channels=3, default_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop="imagenet",
    )


def _check_image_folders(root: Path) -> None:
    """train/ and val/ (or test/) exist, train/ has class folders, and the first image of each split decodes."""
    test_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), root / "val")
    for folder in (root / "train", test_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: data.root must hold train/ and val/ (or test/) folders")
        first = next((p for d in sorted(folder.iterdir()) if d.is_dir() for p in sorted(d.rglob("*"))
                      if p.suffix.lower() in IMAGE_SUFFIXES), None)
        if first is None:
            raise FileNotFoundError(f"{folder} has no class folder with images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        _decode(first, first)


def _scan(folder: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _parquet(spec: DataSpec) -> Source:
    """Parquet shards `root/train/*.parquet` (or `root/train.parquet`) and the same for test; bytes in memory.

    The image column holds encoded PNG/JPEG bytes, or a struct with a `bytes` field (as HF datasets writes it).
    The default image size is the shorter side of the first training image.
    """
    train, train_labels = _parquet_split(spec, "train")
    test, test_labels = _parquet_split(spec, "test")
    return Source(
        train, train_labels, test, test_labels, num_classes=int(train_labels.max()) + 1, in_channels=3,
        default_size=min(train[0].shape[1:]), mean=IMAGENET_MEAN, std=IMAGENET_STD, crop="center",
    )


def _parquet_split(spec: DataSpec, split: str) -> tuple[EncodedImages, np.ndarray]:
    files = _parquet_files(spec, split)
    table = pa.concat_tables(read_parquet(f, [spec.image_column, spec.label_column]) for f in files)
    images = table.column(spec.image_column).combine_chunks()
    if pa.types.is_struct(images.type):
        images = images.field("bytes")
    where = str(files[0]) if len(files) == 1 else f"{files[0].parent}/*.parquet"
    return EncodedImages(images, where), table.column(spec.label_column).to_numpy().astype(np.int64)


def _parquet_files(spec: DataSpec, split: str) -> list[Path]:
    """The split's shards, each with a readable footer and both columns (reads metadata only)."""
    root = Path(spec.root)
    files = sorted((root / split).glob("*.parquet")) or [_existing(root / f"{split}.parquet")]
    for file in files:
        try:
            names = pq.read_schema(file).names
        except (pa.ArrowInvalid, OSError) as err:
            raise DataFileError(file, f"not a Parquet file ({err})") from None
        for key, column in (("image_column", spec.image_column), ("label_column", spec.label_column)):
            if column not in names:
                raise KeyError(f"data.{key}: column {column!r} not in {file} (columns: {names})")
    return files


def read_parquet(file: Path, columns: list[str]) -> pa.Table:
    try:
        return pq.read_table(file, columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataFileError(file, f"its data cannot be read ({err})") from None
