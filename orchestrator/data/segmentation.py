"""Semantic segmentation data: Pascal VOC 2012 and Cityscapes from their standard layouts, a generated set of
shapes on textured backgrounds (`shapes_seg`, the CPU default), the labeled/unlabeled split of the training
images, and augmentation applied to an image and its mask together.

    voc:        root/JPEGImages/<id>.jpg, root/SegmentationClassAug/<id>.png (if that folder exists, else
                root/SegmentationClass/<id>.png: palette or grayscale PNGs of class indices, 255 = ignore),
                root/ImageSets/Segmentation/{train_aug,train,val}.txt (train_aug.txt with the Aug masks, if there)
    cityscapes: root/leftImg8bit/{train,val}/<city>/<id>_leftImg8bit.png and
                root/gtFine/{train,val}/<city>/<id>_gtFine_labelIds.png, labelIds mapped to the 19 trainIds

The labeled images are the ids of `labeled_list` (a paper's split file) or a seeded random `num_labeled` (or
`labeled_fraction`) of the training images; every other training image is unlabeled, and only labeled masks are
read. Masks are uint8 (H,W) in the stores and int64 in the items; 255 marks pixels without a label (VOC's object
boundaries, Cityscapes' void classes, padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from orchestrator.data.sources import IMAGENET_MEAN, IMAGENET_STD, DataFileError, FileImages, Images, TensorImages
from orchestrator.data.splits import MAX_LISTED_UNLABELED
from orchestrator.data.synthetic import SHAPES
from orchestrator.data.views import IGNORE, MaskPool, Pool, SegmentationTestView, SegmentationView
from orchestrator.spec import DataSpec
from trainers._common.contract import DataInfo

VOC_CLASSES = 21
# Cityscapes labelId -> trainId (cityscapesScripts' labels.py); every other labelId is void (255)
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SHAPES_SEG_SIZE = 64  # shapes_seg's image side when data.image_size is unset
MAX_SHAPES = 3  # most shapes in a generated image by default (data.shapes_per_image)
SHAPES_SEG_SEEDS = {"test": 1, "val": 2}  # generator seed of shapes_seg's evaluated images (training: 0)


class Masks(Protocol):
    """An indexable store of class-index masks; item i is a uint8 tensor (H,W)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> torch.Tensor: ...

    def require(self, indices: np.ndarray) -> None:
        """FileNotFoundError naming the first mask at `indices` that is missing."""


@dataclass(frozen=True)
class SegDefaults:
    """A dataset's augmentation and evaluation sizes where the spec leaves them out."""

    scale_range: tuple[float, float]
    crop_size: int
    eval_size: tuple[int, int]  # (H, W): test images are shrunk to fit, then padded to it


DEFAULTS = {
    "voc": SegDefaults((0.5, 1.5), 321, (512, 512)),  # every VOC image fits in 500 x 500
    "cityscapes": SegDefaults((0.5, 2.0), 769, (1024, 2048)),  # the native resolution
}


@dataclass
class SegSource:
    """A segmentation dataset's train and test images with masks, and how to augment and normalise them."""

    train: Images  # uint8 (3,H,W)
    train_masks: Masks  # uint8 (H,W); read for labeled images only
    train_ids: list[str]
    test: Images
    test_masks: Masks
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    defaults: SegDefaults


def load_segmentation(spec: DataSpec, seed: int) -> tuple[SegmentationView, SegmentationTestView, DataInfo, dict]:
    """The "segmentation" train view, the whole-image test view, the DataInfo and the split artifact of `spec`."""
    source = load_seg_source(spec)
    labeled, unlabeled = labeled_split(spec, source.train_ids, seed)
    if not len(unlabeled):
        raise ValueError("views 'segmentation' needs unlabeled images: set data.labeled_list, data.num_labeled or "
                         "data.labeled_fraction to fewer than all training images")
    source.train_masks.require(labeled)
    source.test_masks.require(np.arange(len(source.test)))
    crop = spec.crop_size or source.defaults.crop_size
    train_transform = PairedTrain(source.mean, source.std, crop, spec.scale_range or source.defaults.scale_range)
    train = SegmentationView(MaskPool(source.train, source.train_masks, labeled),
                             Pool(source.train, unlabeled, np.full(len(unlabeled), -1, dtype=np.int64)),
                             train_transform, spec.unlabeled_ratio, seed)
    eval_transform = PaddedEval(source.mean, source.std, spec.eval_size or source.defaults.eval_size)
    test = SegmentationTestView(MaskPool(source.test, source.test_masks, np.arange(len(source.test))), eval_transform)
    info = DataInfo(source.num_classes, crop, 3, num_train=len(source.train_ids), num_labeled=len(labeled),
                    mean=tuple(source.mean), std=tuple(source.std))
    return train, test, info, _artifact(spec, seed, source, labeled, unlabeled)


def _artifact(spec: DataSpec, seed: int, source: SegSource, labeled: np.ndarray, unlabeled: np.ndarray) -> dict:
    """The JSON-serialisable record of the split, logged as `split.json`."""
    ids = np.asarray(source.train_ids)
    return {
        "dataset": spec.dataset,
        "seed": seed,
        "labeled_list": spec.labeled_list,
        "labeled_ids": ids[labeled].tolist(),
        "unlabeled_ids": len(unlabeled) if len(unlabeled) > MAX_LISTED_UNLABELED else ids[unlabeled].tolist(),
        "num_classes": source.num_classes,
        "num_test": len(source.test),
    }


def load_seg_source(spec: DataSpec) -> SegSource:
    """The `SegSource` named by `spec.dataset`, read from `spec.root` where it needs files."""
    loaders = {"voc": _voc, "cityscapes": _cityscapes, "shapes_seg": _shapes_seg}
    return loaders[spec.dataset](spec)


def check_files(spec: DataSpec) -> None:
    """Before Ray starts: the layout's folders and id lists are there, every mask that training could read and
    every test mask exists (with a random subset any training image may be labeled), and the first image and
    masks decode. Raises FileNotFoundError or DataFileError naming the file."""
    source = load_seg_source(spec)
    if spec.labeled_list:
        labeled = _listed(_labeled_list_path(spec), source.train_ids)
    else:
        labeled = np.arange(len(source.train_ids))
    source.train_masks.require(labeled)
    source.test_masks.require(np.arange(len(source.test)))
    first = int(labeled[0])
    for store, i in ((source.train, first), (source.train_masks, first), (source.test, 0), (source.test_masks, 0)):
        store[i]  # decodes, or raises DataFileError naming the file


# ---------------------------------------------------------------------------------------------- split


def labeled_split(spec: DataSpec, ids: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labeled, unlabeled) sorted indices into `ids`: the ids of data.labeled_list, or data.num_labeled (or
    round(labeled_fraction * n), at least 1) drawn from numpy's Generator(PCG64(seed)); neither: all labeled."""
    n = len(ids)
    if spec.labeled_list:
        labeled = _listed(_labeled_list_path(spec), ids)
    elif spec.num_labeled is not None or spec.labeled_fraction is not None:
        k = spec.num_labeled if spec.num_labeled is not None else max(1, round(spec.labeled_fraction * n))
        if k > n:
            raise ValueError(f"data.num_labeled={k}: the training set has only {n} images")
        labeled = np.sort(np.random.Generator(np.random.PCG64(seed)).choice(n, k, replace=False))
    else:
        labeled = np.arange(n)
    return labeled, np.setdiff1d(np.arange(n), labeled)


def _labeled_list_path(spec: DataSpec) -> Path:
    """data.labeled_list; a relative path is taken from data.root (workers run in other directories)."""
    path = Path(spec.labeled_list).expanduser()
    return path if path.is_absolute() or not spec.root else Path(spec.root).expanduser() / path


def _listed(path: Path, ids: list[str]) -> np.ndarray:
    """Sorted indices into `ids` of the ids in the list file `path`; DataFileError when it names unknown ids."""
    position = {name: i for i, name in enumerate(ids)}
    listed = read_id_list(path)
    unknown = [name for name in listed if name not in position]
    if unknown or not listed:
        problem = f"ids not among the {len(ids)} training images: {unknown[:5]}" if unknown else "no ids in it"
        raise DataFileError(path, problem)
    return np.unique([position[name] for name in listed])


def read_id_list(path: Path) -> list[str]:
    """The image ids of a split file, one a line. A line may be a bare id ("2007_000032"), or paths as the papers'
    lists write them ("JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png",
    "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png ..."): the first one's file name, without
    its extension and Cityscapes' "_leftImg8bit", is the id."""
    lines = _existing(path).read_text().splitlines()
    return [_image_id(line.split()[0]) for line in lines if line.strip()]


def _image_id(token: str) -> str:
    name = Path(token).name
    for suffix in (".jpg", ".jpeg", ".png"):
        name = name.removesuffix(suffix)
    return name.removesuffix("_leftImg8bit")


# ---------------------------------------------------------------------------------------------- mask stores


class MaskFiles:
    """Mask PNGs decoded when an item is read: palette or grayscale PNGs of class ids, mapped through `lut`
    (256,) uint8 when given (Cityscapes labelIds -> trainIds). A mask with a value that is neither a class nor
    255 raises DataFileError naming it."""

    def __init__(self, paths: list[Path], num_classes: int, lut: np.ndarray | None = None):
        self.paths, self.num_classes, self.lut = paths, num_classes, lut

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(read_mask(self.paths[i], self.num_classes, self.lut))

    def require(self, indices: np.ndarray) -> None:
        """FileNotFoundError naming the first of the masks at `indices` that does not exist."""
        missing = next((self.paths[i] for i in indices if not self.paths[i].is_file()), None)
        if missing is not None:
            raise FileNotFoundError(f"{missing} not found: every labeled and test image needs its mask")


class TensorMasks:
    """Masks held in memory as one uint8 tensor (N,H,W)."""

    def __init__(self, masks: torch.Tensor):
        self.masks = masks

    def __len__(self) -> int:
        return self.masks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.masks[i]

    def require(self, indices: np.ndarray) -> None:
        """In memory: nothing can be missing."""


def read_mask(path: Path, num_classes: int, lut: np.ndarray | None = None) -> np.ndarray:
    """A mask PNG as uint8 (H,W) of class ids and 255; DataFileError when it is unreadable, not single-channel
    or holds other values (e.g. a colour-coded mask saved as RGB)."""
    try:
        with Image.open(_existing(path)) as image:
            if image.mode not in ("P", "L"):
                raise DataFileError(path, f"a palette or grayscale PNG of class ids is expected, found mode "
                                    f"{image.mode!r}")
            mask = np.array(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataFileError(path, f"not a readable image ({type(err).__name__}: {err})") from None
    if lut is not None:
        mask = lut[mask]
    bad = np.setdiff1d(np.unique(mask), [*range(num_classes), IGNORE])
    if len(bad):
        raise DataFileError(path, f"values other than the class ids 0..{num_classes - 1} and 255: {bad[:8].tolist()}")
    return mask


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: check data.root (and data.labeled_list)")
    return path


# ---------------------------------------------------------------------------------------------- VOC, Cityscapes


def _voc(spec: DataSpec) -> SegSource:
    """Pascal VOC 2012 (21 classes): train_aug.txt ids with SegmentationClassAug masks when both are there,
    else train.txt; val.txt is the test split. Masks come from SegmentationClassAug when that folder exists."""
    root = Path(spec.root).expanduser()
    lists = root / "ImageSets" / "Segmentation"
    augmented = (root / "SegmentationClassAug").is_dir()
    mask_dir = root / ("SegmentationClassAug" if augmented else "SegmentationClass")
    train_list = lists / "train_aug.txt" if augmented and (lists / "train_aug.txt").is_file() else lists / "train.txt"
    train_ids, test_ids = read_id_list(train_list), read_id_list(lists / "val.txt")

    def images(ids: list[str]) -> FileImages:
        return FileImages([root / "JPEGImages" / f"{name}.jpg" for name in ids])

    def masks(ids: list[str]) -> MaskFiles:
        return MaskFiles([mask_dir / f"{name}.png" for name in ids], VOC_CLASSES)

    return SegSource(images(train_ids), masks(train_ids), train_ids, images(test_ids), masks(test_ids), VOC_CLASSES,
                     IMAGENET_MEAN, IMAGENET_STD, DEFAULTS["voc"])


def _cityscapes(spec: DataSpec) -> SegSource:
    """Cityscapes fine annotations (19 trainIds): leftImg8bit/train for training, leftImg8bit/val for testing."""
    root = Path(spec.root).expanduser()
    lut = np.full(256, IGNORE, dtype=np.uint8)
    lut[list(CITYSCAPES_TRAIN_IDS)] = list(CITYSCAPES_TRAIN_IDS.values())
    train_paths, train_masks = _cityscapes_split(root, "train", lut)
    test_paths, test_masks = _cityscapes_split(root, "val", lut)
    train_ids = [_image_id(path.name) for path in train_paths]
    return SegSource(FileImages(train_paths), train_masks, train_ids, FileImages(test_paths), test_masks,
                     len(CITYSCAPES_TRAIN_IDS), IMAGENET_MEAN, IMAGENET_STD, DEFAULTS["cityscapes"])


def _cityscapes_split(root: Path, split: str, lut: np.ndarray) -> tuple[list[Path], MaskFiles]:
    """The split's images (sorted by city, then name) and their labelIds masks."""
    folder = root / "leftImg8bit" / split
    paths = sorted(folder.glob("*/*_leftImg8bit.png")) if folder.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"{folder} has no <city>/<name>_leftImg8bit.png images: check data.root")
    masks = [root / "gtFine" / split / path.parent.name / f"{_image_id(path.name)}_gtFine_labelIds.png"
             for path in paths]
    return paths, MaskFiles(masks, len(CITYSCAPES_TRAIN_IDS), lut)


# ---------------------------------------------------------------------------------------------- generated


def _shapes_seg(spec: DataSpec) -> SegSource:
    """Generated shapes (`shapes_seg`): synthetic_per_class train images led by each of the shapes_classes shapes
    (generator seed 0), a quarter as many test images (seed 1; eval_on "val": held-out images of seed 2 instead),
    image_size px (default 64); 1 + shapes_classes classes, 0 = background."""
    size = spec.image_size or SHAPES_SEG_SIZE
    shape = {"size": size, "num_shapes": spec.shapes_classes, "radius": spec.shapes_radius,
             "max_shapes": spec.shapes_per_image, "textured": spec.shapes_textured}
    train_images, train_masks = shapes_seg(spec.synthetic_per_class, seed=0, **shape)
    test_seed = SHAPES_SEG_SEEDS[spec.eval_on]
    test_images, test_masks = shapes_seg(max(1, spec.synthetic_per_class // 4), seed=test_seed, **shape)
    values = torch.from_numpy(train_images).float().div(255).transpose(0, 1).flatten(1)  # (3, N*S*S)
    mean, std = tuple(values.mean(1).tolist()), tuple(values.std(1).tolist())
    return SegSource(TensorImages(torch.from_numpy(train_images)), TensorMasks(torch.from_numpy(train_masks)),
                     [f"{i:06d}" for i in range(len(train_images))], TensorImages(torch.from_numpy(test_images)),
                     TensorMasks(torch.from_numpy(test_masks)), 1 + spec.shapes_classes, mean, std,
                     SegDefaults((0.5, 1.5), size, (size, size)))


def shapes_seg(per_class: int, seed: int, size: int = SHAPES_SEG_SIZE, num_shapes: int = len(SHAPES),
               radius: tuple[float, float] = (0.12, 0.25), max_shapes: int = MAX_SHAPES, textured: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N,3,size,size) and masks uint8 (N,size,size), N = num_shapes * per_class, from the seed alone.

    Image i holds 1..max_shapes shapes among the first num_shapes of synthetic.py's (circle, square, triangle,
    cross, ...), each of radius uniform in `radius` (a fraction of the side): the first of class i // per_class,
    the others drawn at random and painted over it; the mask holds 1 + the shape's index in SHAPES, 0 for the
    background. The background is textured (a colour ramp plus stripes and noise; `textured` False: a flat colour
    plus the noise); each shape takes its own flat colour, far from the background's.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    n = per_class * num_shapes
    classes = rng.integers(0, num_shapes, (n, max_shapes))
    classes[:, 0] = np.repeat(np.arange(num_shapes), per_class)
    count = rng.integers(1, max_shapes + 1, n)  # (N,) shapes in each image
    centre = rng.uniform(0.2, 0.8, (n, max_shapes, 2, 1, 1)).astype(np.float32)
    radii = rng.uniform(*radius, (n, max_shapes, 1, 1)).astype(np.float32)
    grid = ((np.arange(size) + 0.5) / size).astype(np.float32)  # pixel centres in (0, 1)
    y, x = grid[None, :, None], grid[None, None, :]  # (1,S,1), (1,1,S)
    images, colours = _texture(rng, n, max_shapes, x, y, textured)  # (N,3,S,S), (N,K,3,1,1)
    mask = np.zeros((n, size, size), dtype=np.uint8)
    for k in range(max_shapes):
        dx, dy = (x - centre[:, k, 0]) / radii[:, k], (y - centre[:, k, 1]) / radii[:, k]  # (N,S,S)
        inside = np.zeros((n, size, size), dtype=bool)
        for c, test in enumerate(list(SHAPES.values())[:num_shapes]):
            rows = np.flatnonzero((count > k) & (classes[:, k] == c))
            inside[rows] = test(dx[rows], dy[rows])
        mask = np.where(inside, classes[:, k, None, None] + 1, mask).astype(np.uint8)
        images = np.where(inside[:, None], colours[:, k], images)
    images = images + rng.normal(0, 0.02, (n, 3, size, size))
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), mask


def _texture(rng: np.random.Generator, n: int, k: int, x: np.ndarray, y: np.ndarray, textured: bool
             ) -> tuple[np.ndarray, np.ndarray]:
    """Backgrounds (N,3,S,S): a base colour ramped along one direction (by up to 0.07 either way), with stripes of
    random frequency and direction (amplitude 0.06) (neither when not `textured`; the same draws either way) and
    pixel noise (0.04); and k shape colours (N,k,3,1,1), each 0.35-0.6 from the base colour in every channel."""
    base = rng.uniform(0.15, 0.85, (n, 3, 1, 1))
    ramp_angle, stripe_angle = rng.uniform(0, 2 * np.pi, (2, n, 1, 1, 1))
    ramp = ((x - 0.5) * np.cos(ramp_angle) + (y - 0.5) * np.sin(ramp_angle)) * rng.uniform(-0.14, 0.14, (n, 3, 1, 1))
    phase = 2 * np.pi * rng.uniform(2, 6, (n, 1, 1, 1)) * (x * np.cos(stripe_angle) + y * np.sin(stripe_angle))
    background = base + textured * (ramp + 0.06 * np.sin(phase)) + rng.normal(0, 0.04, (n, 3, x.shape[-1], x.shape[-1]))
    offset = rng.uniform(0.35, 0.6, (n, k, 3, 1, 1))
    return background, np.where(base[:, None] > 0.5, base[:, None] - offset, base[:, None] + offset)


# ---------------------------------------------------------------------------------------------- augmentation


class PairedTrain:
    """Random rescale (factor uniform in `scale_range`; image bilinear, mask nearest), normalisation, padding to at
    least crop x crop (image 0, i.e. the mean colour after normalising; mask 255), a random crop x crop window and a
    horizontal flip (p 0.5), all applied alike to the image and its mask. Randomness is torch's.

    uint8 image (3,H,W), uint8 mask (H,W) -> float32 (3,crop,crop), int64 (crop,crop)
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], crop: int, scale_range: tuple[float, float]):
        self.mean, self.std, self.crop, self.scale_range = mean, std, crop, scale_range

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2:]
        scale = float(torch.empty(()).uniform_(*self.scale_range))
        x, y = _resize(image, mask, max(1, round(height * scale)), max(1, round(width * scale)))
        x, y = _pad(TF.normalize(x, self.mean, self.std), y, self.crop, self.crop)
        top = int(torch.randint(x.shape[-2] - self.crop + 1, ()))
        left = int(torch.randint(x.shape[-1] - self.crop + 1, ()))
        x, y = x[:, top : top + self.crop, left : left + self.crop], y[top : top + self.crop, left : left + self.crop]
        if bool(torch.rand(()) < 0.5):
            x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y.long()


class PaddedEval:
    """Whole-image evaluation at one batchable size: an image larger than `size` (H, W) shrinks to fit (keeping
    its aspect ratio), then is normalised and padded at the bottom and right to `size` (image 0, mask 255).

    uint8 image (3,H,W), uint8 mask (H,W) -> float32 (3,*size), int64 size
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: tuple[int, int]):
        self.mean, self.std, self.size = mean, std, size

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2:]
        scale = min(1.0, self.size[0] / height, self.size[1] / width)
        fit = (min(self.size[0], math.floor(height * scale + 0.5)), min(self.size[1], math.floor(width * scale + 0.5)))
        x, y = _resize(image, mask, *fit)
        x, y = _pad(TF.normalize(x, self.mean, self.std), y, *self.size)
        return x, y.long()


def _resize(image: torch.Tensor, mask: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 image (3,h,w) on the 0..1 scale (bilinear, antialiased) and uint8 mask (h,w) (nearest pixel
    centre, aligned with the bilinear grid)."""
    x = image.float().div(255)
    if (height, width) == tuple(image.shape[-2:]):
        return x, mask
    x = TF.resize(x, [height, width], InterpolationMode.BILINEAR, antialias=True)
    y = TF.resize(mask[None], [height, width], InterpolationMode.NEAREST_EXACT)[0]
    return x, y


def _pad(x: torch.Tensor, y: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the bottom and right up to at least (height, width): image with 0, mask with 255."""
    bottom, right = max(0, height - x.shape[-2]), max(0, width - x.shape[-1])
    if not bottom and not right:
        return x, y
    return F.pad(x, (0, right, 0, bottom), value=0.0), F.pad(y, (0, right, 0, bottom), value=IGNORE)

