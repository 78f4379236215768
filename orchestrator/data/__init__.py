"""Data for an experiment: a source, a seeded split and the train view its method needs (DESIGN.md, "Data").

    bundle = build_data(spec.data, seed=spec.seed, views=spec.views)
    bundle.train, bundle.test   # torch Datasets of dict items (views.py); test is the validation split with eval_on: val
    bundle.info                 # DataInfo for the trainer's build()
    bundle.artifacts            # {"split.json": {...}}: logged by the launcher

Modules: sources.py (on-disk formats), synthetic.py (generated shapes), splits.py (long tail, labeled subset),
transforms.py (augmentations), views.py (item formats), segmentation.py (VOC, Cityscapes and generated shapes with
masks: the "segmentation" view), text.py (corpora, tokenizer, token shards: the "text"
dataset with the "tokens" view), reasoning.py (problems with verifiable answers: the "arithmetic" and "jsonl"
datasets with the "problems" view).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from orchestrator.data import generated, text, transforms
from orchestrator.data.sources import ConcatImages, Source, load_source
from orchestrator.data.splits import Split, make_split, split_artifact
from orchestrator.data.views import MultiCropView, PlainView, Pool, SauView, TwoCropView, WeakStrongView
from orchestrator.spec import SEGMENTATION_DATASETS, DataSpec
from trainers._common.contract import DataInfo

VIEWS = ("plain", "weak_strong", "weak_strong_multicrop", "two_crop", "weak_contrastive", "byol_two_crop", "multi_crop",
         "sau", "tokens", "problems", "segmentation")
PROBLEM_DATASETS = ("arithmetic", "jsonl")
TEXT_CACHE = Path("~/.cache/lab-orchestrator/text")


@dataclass
class DataBundle:
    """What `build_data` gives the launcher."""

    train: Dataset  # dict items per the views; has set_epoch(epoch)
    test: Dataset  # {"x": float32 (C,H,W), "y": int64 (), "idx": int64 ()}
    info: DataInfo
    artifacts: dict[str, Any]  # file name -> JSON-serialisable object


def build_data(spec: DataSpec, seed: int, views: str) -> DataBundle:
    """The train/test datasets of `spec` for `views`, split deterministically from `seed`.

    Without a labeled subset every train image is labeled. With one (labeled_per_class / labeled_fraction),
    "plain" trains on the labeled images only, "weak_strong" pairs them with the unlabeled pool (the whole
    train set, plus STL-10's unlabeled_X), "weak_strong_multicrop" adds smaller strong crops of each unlabeled
    image (SimMatchV2), and "two_crop" / "multi_crop" train on the unlabeled pool. With `data.generated`, generated
    images join the (fully labeled) training set; "sau" marks them with `is_syn`.
    """
    if views not in VIEWS:
        raise ValueError(f"views: expected one of {', '.join(VIEWS)}, found {views!r}")
    if (spec.dataset == "text") != (views == "tokens"):
        raise ValueError(f"views 'tokens' and dataset 'text' go together, found dataset {spec.dataset!r} with "
                         f"views {views!r}")
    if spec.dataset == "text":
        return build_text_data(spec)
    if (spec.dataset in PROBLEM_DATASETS) != (views == "problems"):
        raise ValueError(f"views 'problems' and the datasets {' / '.join(PROBLEM_DATASETS)} go together, found dataset "
                         f"{spec.dataset!r} with views {views!r}")
    if views == "problems":
        return build_problem_data(spec, seed)
    if (spec.dataset in SEGMENTATION_DATASETS) != (views == "segmentation"):
        raise ValueError(f"views 'segmentation' and the datasets {' / '.join(SEGMENTATION_DATASETS)} go together, "
                         f"found dataset {spec.dataset!r} with views {views!r}")
    if views == "segmentation":
        return build_segmentation_data(spec, seed)
    semi = views in ("weak_strong", "weak_strong_multicrop")
    if semi and spec.labeled_per_class is None and spec.labeled_fraction is None:
        raise ValueError(f"views {views!r} needs a labeled subset: set data.labeled_per_class (or labeled_fraction)")
    source = load_source(spec)
    size = spec.image_size or source.default_size
    split = make_split(
        source.train_labels,
        source.num_classes,
        seed,
        imbalance_factor=spec.imbalance_factor,
        labeled_per_class=spec.labeled_per_class,
        labeled_fraction=spec.labeled_fraction,
        num_extra=len(source.extra_unlabeled) if source.extra_unlabeled is not None else 0,
        val_per_class=spec.val_per_class,
    )
    labeled, unlabeled = _pools(source, split)
    artifact = split_artifact(split, source.train_labels, source.num_classes, spec.dataset, seed, len(source.test))
    artifact["eval_on"] = spec.eval_on
    is_syn = np.zeros(len(labeled), dtype=bool)
    if spec.generated:
        labeled, is_syn, artifact["generated"] = _with_generated(spec, source, size, labeled)
    train = _train_view(views, spec, source, size, seed, labeled, unlabeled, is_syn)
    test = PlainView(_eval_pool(spec, source, split), transforms.evaluation(source, size))
    num_train = len(labeled) if views in ("plain", "sau") or unlabeled is None else len(unlabeled)
    class_counts = np.bincount(source.train_labels[split.train], minlength=source.num_classes)
    info = DataInfo(source.num_classes, size, source.in_channels, num_train=num_train, num_labeled=len(labeled),
                    mean=tuple(source.mean), std=tuple(source.std), class_counts=tuple(int(n) for n in class_counts))
    return DataBundle(train, test, info, {"split.json": artifact})


def prepare_text(spec: DataSpec) -> tuple[text.CorpusInfo, int]:
    """Tokenise the corpus into the cache directory, or reuse it there: (corpus, number of documents). The
    launcher calls this on the driver first, so that workers find the shards instead of all building them."""
    root = Path(spec.root).expanduser() if spec.root else None
    files = text.local_corpus(root, spec.text_pattern) if root else text.stdlib_corpus()
    files = files[: spec.max_documents] if spec.max_documents else files
    source_key = hashlib.sha1(str(root.resolve() if root else "stdlib").encode()).hexdigest()[:10]
    name = f"{root.name if root else 'stdlib'}-{source_key}-v{spec.vocab_size}-n{len(files)}"
    out_dir = Path(spec.cache_dir or TEXT_CACHE).expanduser() / name
    return text.prepare_corpus(files, out_dir, spec.vocab_size, spec.val_fraction, root=root), len(files)


def build_text_data(spec: DataSpec) -> DataBundle:
    """Token windows of a corpus: the train and validation documents tokenised into Parquet shards (once, then
    reused from the cache directory), read back as (input_ids, labels) windows of `seq_len` tokens."""
    corpus, documents = prepare_text(spec)
    out_dir = corpus.out_dir
    train = text.TokenWindows(out_dir, "train", spec.seq_len)
    test = text.TokenWindows(out_dir, "val", spec.seq_len)
    info = DataInfo(num_classes=0, image_size=0, in_channels=0, num_train=len(train), num_labeled=len(train),
                    vocab_size=corpus.vocab_size, seq_len=spec.seq_len)
    artifact = {"corpus": str(out_dir), "documents": documents, "vocab_size": corpus.vocab_size,
                "eot_id": corpus.eot_id, "train_tokens": corpus.train_tokens, "val_tokens": corpus.val_tokens}
    return DataBundle(train, test, info, {"corpus.json": artifact})


def build_problem_data(spec: DataSpec, seed: int) -> DataBundle:
    from orchestrator.data.reasoning import load_problems

    train, test, artifact = load_problems(spec, seed)
    info = DataInfo(num_classes=0, image_size=0, in_channels=0, num_train=len(train), num_labeled=len(train))
    return DataBundle(train, test, info, {"problems.json": artifact})


def build_segmentation_data(spec: DataSpec, seed: int) -> DataBundle:
    """Labeled crops with masks paired with unlabeled crops, and whole test images with masks (segmentation.py)."""
    from orchestrator.data.segmentation import load_segmentation

    train, test, info, artifact = load_segmentation(spec, seed)
    return DataBundle(train, test, info, {"split.json": artifact})


def _eval_pool(spec: DataSpec, source: Source, split: Split) -> Pool:
    """The images `eval` scores: the test set, or (eval_on: val) the validation images held out of the train set."""
    if spec.eval_on == "val":
        return Pool(source.train, split.val, source.train_labels[split.val])
    return Pool(source.test, np.arange(len(source.test)), source.test_labels)


def _pools(source: Source, split: Split) -> tuple[Pool, Pool | None]:
    """The labeled set and the unlabeled pool (train images followed by the source's extra unlabeled images)."""
    labeled = Pool(source.train, split.labeled, source.train_labels[split.labeled])
    if split.unlabeled is None:
        return labeled, None
    images, labels = source.train, source.train_labels
    if source.extra_unlabeled is not None:
        images = ConcatImages(source.train, source.extra_unlabeled)
        labels = np.concatenate([labels, np.full(len(source.extra_unlabeled), -1, dtype=np.int64)])
    return labeled, Pool(images, split.unlabeled, labels[split.unlabeled])


def _with_generated(spec: DataSpec, source: Source, size: int, real: Pool) -> tuple[Pool, np.ndarray, dict[str, Any]]:
    """The real training pool followed by the generated images it takes (generated.py), which are marked in the
    returned `is_syn` (n,) and counted per class in the artifact."""
    directory = Path(spec.generated)
    made = generated.load(directory, source, size)
    chosen = (generated.fill_to_head(real.labels, made.labels, source.num_classes) if spec.generated_fill == "to_head"
              else np.arange(len(made.labels)))
    images = ConcatImages(source.train, made.images)
    pool = Pool(images, np.concatenate([real.indices, len(source.train) + chosen]),
                np.concatenate([real.labels, made.labels[chosen]]))
    is_syn = np.arange(len(pool)) >= len(real)
    counts = np.bincount(made.labels[chosen], minlength=source.num_classes)
    record = {"directory": str(directory), "fill": spec.generated_fill, "available": len(made.labels),
              "class_counts": {str(c): int(n) for c, n in enumerate(counts)}}
    return pool, is_syn, record


def _train_view(
    views: str, spec: DataSpec, source: Source, size: int, seed: int, labeled: Pool, unlabeled: Pool | None,
    is_syn: np.ndarray,
) -> Dataset:
    if views == "plain":
        return PlainView(labeled, transforms.weak(source, size))
    if views == "sau":
        sau_views = (transforms.weak(source, size), transforms.autoaugment(source, size),
                     transforms.contrastive(source, size, scale=(0.2, 1.0)))
        return SauView(labeled, sau_views, is_syn)
    if views == "weak_strong":
        weak, strong = transforms.weak(source, size), transforms.strong(source, size)
        return WeakStrongView(labeled, unlabeled, weak, strong, spec.unlabeled_ratio, seed)
    local_size = max(8, round(size * 96 / 224))
    if views == "weak_strong_multicrop":
        return _weak_strong_multicrop(spec, source, size, local_size, seed, labeled, unlabeled)
    pool = labeled if unlabeled is None else unlabeled  # self-supervised views ignore labels: the whole pool
    if views == "two_crop":
        return TwoCropView(pool, transforms.contrastive(source, size, scale=(0.2, 1.0)))
    if views == "byol_two_crop":
        return TwoCropView(pool, transforms.contrastive(source, size, scale=(0.2, 1.0), blur=1.0),
                           transforms.contrastive(source, size, scale=(0.2, 1.0), blur=0.1, solarize=0.2))
    if views == "weak_contrastive":
        return _weak_contrastive(spec, source, size, local_size, pool)
    global_view = transforms.contrastive(source, size, scale=(0.14, 1.0))
    local_view = transforms.contrastive(source, local_size, scale=(0.05, 0.14))
    local_shape = (source.in_channels, local_size, local_size)
    return MultiCropView(pool, global_view, local_view, spec.num_local_crops, local_shape)


def _weak_contrastive(spec: DataSpec, source: Source, size: int, local_size: int, pool: Pool) -> TwoCropView:
    """ReSSL: x1 the teacher's weak view (resized crop 0.2-1 + flip), x2 the student's MoCo-v2 view (crop 0.2-1,
    jitter 0.4/0.4/0.4/0.1 p 0.8, grayscale 0.2, blur 0.5), and `num_local_crops` smaller student crops
    "x_local" (the official multi-crop uses sizes 192/160/128/96 of 224; here all take 96/224 of full size, scale
    0.086-0.429, as the smallest does)."""
    weak = transforms.resized_crop(source, size, scale=(0.2, 1.0))
    strong = transforms.contrastive(source, size, scale=(0.2, 1.0))
    local = transforms.contrastive(source, local_size, scale=(0.086, 0.429))
    return TwoCropView(pool, weak, strong, local if spec.num_local_crops else None, spec.num_local_crops,
                       (source.in_channels, local_size, local_size))


def _weak_strong_multicrop(
    spec: DataSpec, source: Source, size: int, local_size: int, seed: int, labeled: Pool, unlabeled: Pool
) -> WeakStrongView:
    """SimMatchV2's `--multicrop`, simplified to one full-size strong crop plus k crops of one smaller size.

    The official code draws 5 strong crops of sizes 224/192/160/120/96 with scales (0.14, 1) / (0.117, 0.86) /
    (0.095, 0.715) / (0.073, 0.571) / (0.05, 0.429). Here x_ulb_s is the 224 crop (scale 0.14-1) at full size and
    the k = num_local_crops local crops all take the smallest one's size (96/224 of full) and scale (0.05, 0.429).
    Every strong crop uses the DINO-style pipeline: jitter 0.4/0.4/0.2/0.1 (p 0.8), grayscale 0.2, blur 0.5,
    solarize 0.1 (on 1-channel images: brightness/contrast jitter only).
    """
    weak = transforms.weak(source, size)
    strong = transforms.contrastive(source, size, scale=(0.14, 1.0), saturation=0.2, solarize=0.1)
    local = transforms.contrastive(source, local_size, scale=(0.05, 0.429), saturation=0.2, solarize=0.1)
    local_shape = (source.in_channels, local_size, local_size)
    return WeakStrongView(labeled, unlabeled, weak, strong, spec.unlabeled_ratio, seed,
                          local=local, num_local=spec.num_local_crops, local_shape=local_shape)
