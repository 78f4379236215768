"""Generated images joining a real training set (SAU: synthetic images fill the long tail's rare classes).

`data.generated` names a directory of Parquet shards with at least the columns `image` (PNG/JPEG bytes) and
`label`, as the `generate` method writes them (trainers/generate.py, with provenance columns), or as a user
prepares them. A directory holding the generate method's `manifest.json` is read as the manifest lists it; one whose
shards are named like the generate method's (`class*-*.parquet`) but that has no manifest is an unfinished
generation and refused; any other directory is read as all its `*.parquet` files, in name order.

Generated images are decoded with the real images' channel count and, for sources of one fixed size (digits,
CIFAR, STL-10), Lanczos-resized to the size the experiment trains at (the paper downsizes GLIDE's images to CIFAR's
32 px), so every augmentation treats them as it treats real ones. Not to the source's native size when the
experiment upsamples it: 16 px digits from the generator would lose their detail in a round trip through the 8 px
of scikit-learn's digits (measured: a digits classifier's agreement with the requested class fell from 98% to 90%).

With `data.generated_fill: to_head` (the paper's construction) each class c gets the first n_max - n_c of its
generated images (n_max: the largest real class count after the long tail), so every class reaches the head
count when enough were generated; `all` adds every generated image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from orchestrator.data.sources import DataFileError, EncodedImages, Source, read_parquet

MANIFEST = "manifest.json"
COLUMNS = ["image", "label"]


@dataclass(frozen=True)
class Generated:
    images: EncodedImages  # (N_gen) images decoded like the source's
    labels: np.ndarray  # (N_gen,) int64


def shard_files(directory: Path) -> list[Path]:
    """The directory's shards (see the module docstring); raises FileNotFoundError or DataFileError."""
    if not directory.is_dir():
        raise FileNotFoundError(f"data.generated: {directory} is not a directory (the generate run's `generated` "
                                "folder, or a folder of Parquet shards)")
    manifest = directory / MANIFEST
    if manifest.is_file():
        listed = [directory / shard["file"] for shard in json.loads(manifest.read_text())["shards"]]
        missing = [str(f) for f in listed if not f.is_file()]
        if missing:
            raise DataFileError(manifest, f"lists shards that are missing: {', '.join(missing[:3])}")
        return listed
    files = sorted(directory.glob("*.parquet"))
    if any(f.name.startswith("class") for f in files):
        raise DataFileError(directory, "holds shards of a generation run but no manifest.json: the run did not "
                            "finish (run it again; it skips the shards it wrote)")
    if not files:
        raise DataFileError(directory, "holds no *.parquet shards")
    return files


def check(directory: Path) -> None:
    """Before Ray starts: the shards are there and have the image and label columns (footers only)."""
    import pyarrow.parquet as pq

    for file in shard_files(directory):
        try:
            names = pq.read_schema(file).names
        except (pa.ArrowInvalid, OSError) as err:
            raise DataFileError(file, f"not a Parquet file ({err})") from None
        if missing := [c for c in COLUMNS if c not in names]:
            raise DataFileError(file, f"has no column {missing[0]!r} (columns: {names})")


def load(directory: Path, source: Source, size: int) -> Generated:
    """Every generated image of the directory, decoded to the source's channels (and, for fixed-size sources, to
    the training image size `size`)."""
    files = shard_files(directory)
    table = pa.concat_tables(read_parquet(f, COLUMNS) for f in files)
    labels = table.column("label").to_numpy().astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= source.num_classes):
        raise DataFileError(directory, f"labels must be in 0..{source.num_classes - 1} (the dataset's classes), "
                            f"found {labels.min()}..{labels.max()}")
    images = table.column("image").combine_chunks()
    fixed = size if source.crop == "fixed" else None
    return Generated(EncodedImages(images, f"{directory}/*.parquet", source.in_channels, fixed), labels)


def fill_to_head(real_labels: np.ndarray, generated_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Indices into the generated images: the first n_max - n_c of each class c (fewer when fewer exist)."""
    counts = np.bincount(real_labels, minlength=num_classes)
    chosen = [np.flatnonzero(generated_labels == c)[: counts.max() - counts[c]] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))

