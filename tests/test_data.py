"""orchestrator.data: sources (bundled, generated, and standard on-disk formats written here as tiny fixtures),
seeded splits, and the item format of every view."""

from __future__ import annotations

import io
import json
import math
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from orchestrator.data import build_data
from orchestrator.data.synthetic import shapes
from orchestrator.spec import DataSpec

SMALL_SYNTHETIC = {"dataset": "synthetic", "synthetic_per_class": 8}


def _split(bundle) -> dict:
    return bundle.artifacts["split.json"]


def _unnormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Back to the 0..255 scale: (C,H,W)."""
    return (x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]) * 255


# ---------------------------------------------------------------------------------------------- bundled / generated


def test_digits_native_and_resized():
    native = build_data(DataSpec(dataset="digits"), seed=0, views="plain")
    assert (len(native.train), len(native.test)) == (1347, 450)
    assert (native.info.num_classes, native.info.in_channels, native.info.image_size) == (10, 1, 8)
    assert (native.info.num_train, native.info.num_labeled) == (1347, 1347)
    assert native.train[0]["x"].shape == native.test[0]["x"].shape == (1, 8, 8)
    resized = build_data(DataSpec(dataset="digits", image_size=32), seed=0, views="plain")
    assert resized.train[0]["x"].shape == resized.test[0]["x"].shape == (1, 32, 32)
    assert resized.info.image_size == 32


def test_synthetic_is_deterministic():
    images, labels = shapes(200, seed=0)
    assert images.shape == (2000, 3, 32, 32) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [200] * 10
    first, second = (build_data(DataSpec(dataset="synthetic", synthetic_per_class=20), 0, "plain") for _ in range(2))
    assert first.info.num_classes == 10 and (len(first.train), len(first.test)) == (200, 50)
    assert all(torch.equal(first.test[i]["x"], second.test[i]["x"]) for i in range(len(first.test)))


# ---------------------------------------------------------------------------------------------- splits


def test_split_is_deterministic_in_the_seed():
    spec = DataSpec(dataset="digits", labeled_per_class=4)
    a, b, c = (_split(build_data(spec, seed, "plain"))["labeled_indices"] for seed in (0, 0, 1))
    assert a == b and a != c


def test_labeled_per_class_gives_exactly_k_per_class():
    bundle = build_data(DataSpec(dataset="digits", labeled_per_class=4), seed=3, views="plain")
    assert len(bundle.train) == bundle.info.num_labeled == 40
    assert Counter(int(bundle.train[i]["y"]) for i in range(40)) == {c: 4 for c in range(10)}
    assert _split(bundle)["class_counts_labeled"] == {str(c): 4 for c in range(10)}
    assert len(_split(bundle)["unlabeled_indices"]) == 1347


def test_labeled_per_class_beyond_a_class_names_the_key():
    with pytest.raises(ValueError, match="data.labeled_per_class"):
        build_data(DataSpec(dataset="digits", labeled_per_class=1000), seed=0, views="plain")


def test_labeled_fraction_rounds_per_class():
    split = _split(build_data(DataSpec(dataset="digits", labeled_fraction=0.1), seed=0, views="plain"))
    expected = {c: max(1, round(0.1 * n)) for c, n in split["class_counts_train"].items()}
    assert split["class_counts_labeled"] == expected


def test_long_tail_follows_the_formula():
    spec = DataSpec(dataset="synthetic", synthetic_per_class=50, imbalance_factor=10, labeled_per_class=2)
    split = _split(build_data(spec, seed=0, views="plain"))
    counts = [split["class_counts_train"][str(c)] for c in range(10)]
    assert counts[0] == 50 and counts[-1] == 5
    assert counts == [math.floor(50 * 10 ** (-c / 9) + 1e-9) for c in range(10)]
    assert set(split["labeled_indices"]) <= set(split["unlabeled_indices"])
    assert len(split["unlabeled_indices"]) == sum(counts)


def test_validation_images_are_held_out_of_every_training_pool_and_evaluated_with_eval_on_val():
    spec = DataSpec(dataset="digits", val_per_class=12, labeled_per_class=2, eval_on="val")
    bundle = build_data(spec, seed=4, views="weak_strong")
    split = _split(bundle)
    val = set(split["val_indices"])
    assert len(val) == 120 and not val & set(split["unlabeled_indices"]) and not val & set(split["labeled_indices"])
    assert len(split["unlabeled_indices"]) == 1347 - 120
    assert Counter(int(bundle.test[i]["y"]) for i in range(len(bundle.test))) == {c: 12 for c in range(10)}
    on_test = build_data(spec.model_copy(update={"eval_on": "test"}), seed=4, views="weak_strong")
    assert _split(on_test) | {"eval_on": "val"} == split and len(on_test.test) == 450


def test_the_validation_split_depends_on_the_seed_only_and_precedes_the_long_tail():
    def val(seed, **keys):
        return _split(build_data(DataSpec(dataset="digits", val_per_class=5, **keys), seed, "plain"))["val_indices"]
    assert val(0) == val(0, imbalance_factor=100) == val(0, labeled_per_class=3) != val(1)
    split = _split(build_data(DataSpec(dataset="digits", val_per_class=5, imbalance_factor=100), 0, "plain"))
    head = split["class_counts_train"]["0"]
    assert head == 133 - 5 and split["class_counts_train"]["9"] == 1  # digit 0: 133 train images, all kept


def test_the_other_draws_do_not_change_without_a_validation_split():
    from orchestrator.data.sources import load_source
    from orchestrator.data.splits import make_split
    labels = load_source(DataSpec(dataset="digits")).train_labels
    with_val = make_split(labels, 10, 0, labeled_per_class=2, val_per_class=1)
    without = make_split(labels, 10, 0, labeled_per_class=2)
    assert len(without.val) == 0 and len(with_val.val) == 10
    rng = np.random.Generator(np.random.PCG64(0))  # the labeled draw is the seed's first draw
    expected = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:2] for c in range(10)]))
    assert np.array_equal(without.labeled, expected)


def test_a_validation_split_that_takes_a_whole_class_names_the_key():
    with pytest.raises(ValueError, match="data.val_per_class=133: class 0 has only 133"):
        build_data(DataSpec(dataset="digits", val_per_class=133), seed=0, views="plain")


@pytest.mark.parametrize("keys, message", [
    ({"dataset": "digits", "eval_on": "val"}, "eval_on: val needs a validation split"),
    ({"dataset": "shapes_seg", "val_per_class": 2}, "has no classes to hold out"),
])
def test_validation_keys_are_checked(keys, message):
    with pytest.raises(ValueError, match=message):
        DataSpec(**keys)


def test_split_artifact_is_json():
    bundle = build_data(DataSpec(dataset="digits", labeled_per_class=2, imbalance_factor=5), seed=0, views="plain")
    record = json.loads(json.dumps(bundle.artifacts))["split.json"]
    assert record["dataset"] == "digits" and record["seed"] == 0 and record["num_test"] == 450


# ---------------------------------------------------------------------------------------------- views

EXPECTED_ITEMS = {
    "plain": {"x": (3, 32, 32), "y": (), "idx": ()},
    "weak_strong": {
        "x_lb": (3, 32, 32),
        "y_lb": (),
        "idx_lb": (),
        "x_ulb_w": (3, 3, 32, 32),
        "x_ulb_s": (3, 3, 32, 32),
        "idx_ulb": (3,),
    },
    "weak_strong_multicrop": {
        "x_lb": (3, 32, 32),
        "y_lb": (),
        "idx_lb": (),
        "x_ulb_w": (3, 3, 32, 32),
        "x_ulb_s": (3, 3, 32, 32),
        "x_ulb_local": (3, 4, 3, 14, 14),  # (mu, k, C, s, s), s = round(32 * 96 / 224)
        "idx_ulb": (3,),
    },
    "two_crop": {"x1": (3, 32, 32), "x2": (3, 32, 32), "y": (), "idx": ()},
    "byol_two_crop": {"x1": (3, 32, 32), "x2": (3, 32, 32), "y": (), "idx": ()},
    "weak_contrastive": {"x1": (3, 32, 32), "x2": (3, 32, 32), "y": (), "idx": (), "x_local": (4, 3, 14, 14)},
    "multi_crop": {"x_global": (2, 3, 32, 32), "x_local": (4, 3, 14, 14), "y": (), "idx": ()},
}


@pytest.mark.parametrize("views", list(EXPECTED_ITEMS))
def test_view_items(views):
    spec = DataSpec(**SMALL_SYNTHETIC, labeled_per_class=2, unlabeled_ratio=3, num_local_crops=4)
    bundle = build_data(spec, seed=0, views=views)
    item = bundle.train[len(bundle.train) - 1]
    assert {key: tuple(value.shape) for key, value in item.items()} == EXPECTED_ITEMS[views]
    for key, value in item.items():
        assert value.dtype == (torch.int64 if key.startswith(("y", "idx")) else torch.float32), key
    assert bundle.info.num_labeled == 20 and bundle.info.num_train == (20 if views == "plain" else 80)
    bundle.train.set_epoch(1)
    test_item = bundle.test[0]
    assert test_item["x"].shape == (3, 32, 32) and test_item["y"].dtype == test_item["idx"].dtype == torch.int64


@pytest.mark.parametrize("views", ["weak_strong", "weak_strong_multicrop", "two_crop", "byol_two_crop",
                                   "weak_contrastive", "multi_crop"])
def test_views_on_one_channel_images(views):
    spec = DataSpec(dataset="digits", image_size=16, labeled_per_class=2, unlabeled_ratio=2, num_local_crops=2)
    item = build_data(spec, seed=0, views=views).train[0]
    assert all(value.shape[-3:] in ((1, 16, 16), (1, 8, 8)) for value in item.values() if value.is_floating_point())


def test_weak_contrastive_pairs_a_weak_crop_with_a_contrastive_view():
    """ReSSL's teacher view is crop + flip only (no jitter, no grayscale); the student's view has the jitter."""
    bundle = build_data(DataSpec(**SMALL_SYNTHETIC, num_local_crops=0), seed=0, views="weak_contrastive")
    item = bundle.train[0]
    assert set(item) == {"x1", "x2", "y", "idx"}  # no local crops asked for
    weak, strong = bundle.train.view1, bundle.train.view2
    assert not any("ColorJitter" in repr(t) or "Grayscale" in repr(t) for t in weak.transforms)
    assert any("ColorJitter" in repr(t) for t in strong.transforms)


def test_multi_crop_without_local_crops():
    spec = DataSpec(**SMALL_SYNTHETIC, num_local_crops=0)
    assert build_data(spec, seed=0, views="multi_crop").train[0]["x_local"].shape == (0, 3, 14, 14)


def test_weak_strong_multicrop_without_local_crops():
    spec = DataSpec(**SMALL_SYNTHETIC, labeled_per_class=2, unlabeled_ratio=3, num_local_crops=0)
    assert build_data(spec, seed=0, views="weak_strong_multicrop").train[0]["x_ulb_local"].shape == (3, 0, 3, 14, 14)


def test_weak_strong_multicrop_crops_the_same_unlabeled_images():
    spec = DataSpec(**SMALL_SYNTHETIC, labeled_per_class=2, unlabeled_ratio=3, num_local_crops=2)
    plain = build_data(spec, seed=0, views="weak_strong").train[5]
    multi = build_data(spec, seed=0, views="weak_strong_multicrop").train[5]
    assert torch.equal(plain["idx_ulb"], multi["idx_ulb"]) and torch.equal(plain["idx_lb"], multi["idx_lb"])


def test_weak_strong_needs_a_labeled_subset():
    with pytest.raises(ValueError, match="data.labeled_per_class"):
        build_data(DataSpec(dataset="digits"), seed=0, views="weak_strong")


def test_unknown_views_are_rejected():
    with pytest.raises(ValueError, match="weak_strong"):
        build_data(DataSpec(dataset="digits"), seed=0, views="mixup")


def test_weak_strong_epochs_cover_the_pool_and_re_pair():
    spec = DataSpec(**SMALL_SYNTHETIC, labeled_per_class=2, unlabeled_ratio=7)
    train = build_data(spec, seed=0, views="weak_strong").train
    assert len(train) == math.ceil(80 / 7)
    covered = torch.cat([train[i]["idx_ulb"] for i in range(len(train))])
    assert set(covered.tolist()) == set(range(80))
    pairing = [(int(train[i]["idx_lb"]), train[i]["idx_ulb"].tolist()) for i in range(2)]
    train.set_epoch(1)
    assert [(int(train[i]["idx_lb"]), train[i]["idx_ulb"].tolist()) for i in range(2)] != pairing
    train.set_epoch(0)
    assert [(int(train[i]["idx_lb"]), train[i]["idx_ulb"].tolist()) for i in range(2)] == pairing


# ---------------------------------------------------------------------------------------------- on-disk formats


def _write_cifar(root: Path, folder: str, files: list[str], label_key: bytes, meta: str, per_file: int = 20):
    """CIFAR python batches: pickled dicts with b"data" uint8 (N,3072) (R, G, B planes, row-major) and labels."""
    rng = np.random.default_rng(0)
    (root / folder).mkdir(parents=True)
    for name in files:
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            label_key: [i % 10 for i in range(per_file)],
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_file)],
        }
        with open(root / folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(root / folder / meta, "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)


def _read_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def test_cifar10_batches(tmp_path):
    _write_cifar(tmp_path, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                 b"labels", "batches.meta")
    spec = DataSpec(dataset="cifar10", root=str(tmp_path), labeled_per_class=2)
    bundle = build_data(spec, seed=0, views="weak_strong")
    assert (bundle.info.num_classes, bundle.info.num_train, bundle.info.num_labeled) == (10, 100, 20)
    assert bundle.train[0]["x_ulb_s"].shape == (7, 3, 32, 32)
    expected = _read_pickle(tmp_path / "cifar-10-batches-py" / "test_batch")[b"data"][0].reshape(3, 32, 32)
    pixels = _unnormalize(bundle.test[0]["x"], (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    torch.testing.assert_close(pixels, torch.from_numpy(expected).float(), atol=1e-3, rtol=0)


def test_cifar100_batches(tmp_path):
    _write_cifar(tmp_path, "cifar-100-python", ["train", "test"], b"fine_labels", "meta")
    bundle = build_data(DataSpec(dataset="cifar100", root=str(tmp_path), image_size=16), seed=0, views="plain")
    assert bundle.info.num_classes == 100 and (len(bundle.train), len(bundle.test)) == (20, 20)
    assert bundle.train[3]["x"].shape == (3, 16, 16) and int(bundle.train[3]["y"]) == 3


def test_cifar_missing_files_say_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        build_data(DataSpec(dataset="cifar10", root=str(tmp_path)), seed=0, views="plain")


def _write_stl10(root: Path) -> np.ndarray:
    """STL-10 binaries: images (3,96,96) column-major, labels 1..10; returns the test images (N,3,96,96)."""
    rng = np.random.default_rng(0)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    images = {}
    for name, n in (("train", 20), ("test", 10), ("unlabeled", 30)):
        images[name] = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        (folder / f"{name}_X.bin").write_bytes(images[name].transpose(0, 1, 3, 2).tobytes())
    for name, n in (("train", 20), ("test", 10)):
        (folder / f"{name}_y.bin").write_bytes((np.arange(n) % 10 + 1).astype(np.uint8).tobytes())
    return images["test"]


def test_stl10_binaries(tmp_path):
    test_images = _write_stl10(tmp_path)
    spec = DataSpec(dataset="stl10", root=str(tmp_path), labeled_per_class=1, unlabeled_ratio=2)
    bundle = build_data(spec, seed=0, views="weak_strong")
    assert (bundle.info.num_train, bundle.info.num_labeled, bundle.info.image_size) == (50, 10, 96)
    assert _split(bundle)["unlabeled_indices"] == list(range(50))
    assert sorted(int(bundle.test[i]["y"]) for i in range(10)) == list(range(10))
    pixels = _unnormalize(bundle.test[4]["x"], (0.4408, 0.4279, 0.3867), (0.2682, 0.2610, 0.2686))
    torch.testing.assert_close(pixels, torch.from_numpy(test_images[4]).float(), atol=1e-3, rtol=0)
    item = bundle.train[len(bundle.train) - 1]
    assert item["x_ulb_w"].shape == (2, 3, 96, 96) and item["idx_ulb"].max() < 50
    copied = pickle.loads(pickle.dumps(bundle.test))  # as spawned loader workers receive it: the file is mapped again
    assert torch.equal(copied[4]["x"], bundle.test[4]["x"])
    supervised = build_data(DataSpec(dataset="stl10", root=str(tmp_path)), seed=0, views="two_crop")
    assert supervised.info.num_train == 20 and supervised.train[0]["x1"].shape == (3, 96, 96)


def _png(rng: np.random.Generator, height: int, width: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split, folder, n in (("train", "train", 3), ("val", "val", 2)):
        for name in ("cat", "dog"):
            (tmp_path / folder / name).mkdir(parents=True)
            for i in range(n):
                (tmp_path / folder / name / f"{i}.png").write_bytes(_png(rng, 30 + i, 40))
    bundle = build_data(DataSpec(dataset="imagefolder", root=str(tmp_path), image_size=16), seed=0, views="plain")
    assert bundle.info.num_classes == 2 and (len(bundle.train), len(bundle.test)) == (6, 4)
    assert bundle.train[5]["x"].shape == bundle.test[3]["x"].shape == (3, 16, 16)
    assert [int(bundle.test[i]["y"]) for i in range(4)] == [0, 0, 1, 1]
    two_crop = build_data(DataSpec(dataset="imagefolder", root=str(tmp_path), image_size=16), 0, "two_crop")
    assert two_crop.train[0]["x2"].shape == (3, 16, 16)


def test_parquet(tmp_path):
    rng = np.random.default_rng(0)
    train_png = [_png(rng, 12, 12) for _ in range(9)]
    struct = pa.array([{"bytes": png, "path": f"{i}.png"} for i, png in enumerate(train_png)])
    pq.write_table(pa.table({"img": struct, "target": [i % 3 for i in range(9)]}), tmp_path / "train.parquet")
    (tmp_path / "test").mkdir()
    test_png = [_png(rng, 12, 12) for _ in range(3)]
    test_table = pa.table({"img": pa.array(test_png, pa.binary()), "target": [0, 1, 2]})
    pq.write_table(test_table, tmp_path / "test" / "part-0.parquet")
    spec = DataSpec(dataset="parquet", root=str(tmp_path), image_column="img", label_column="target")
    bundle = build_data(spec, seed=0, views="plain")
    assert (bundle.info.num_classes, bundle.info.image_size, len(bundle.train), len(bundle.test)) == (3, 12, 9, 3)
    assert bundle.train[0]["x"].shape == (3, 12, 12)
    pixels = _unnormalize(bundle.test[1]["x"], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(test_png[1])))).permute(2, 0, 1).float()
    torch.testing.assert_close(pixels, expected, atol=1e-3, rtol=0)
    with pytest.raises(KeyError, match="data.label_column"):
        build_data(DataSpec(dataset="parquet", root=str(tmp_path), image_column="img"), seed=0, views="plain")


def test_the_digits_split_is_cached_and_a_damaged_cache_is_rebuilt(tmp_path: Path, monkeypatch) -> None:
    """Workers read scikit-learn's digits split from the cache instead of importing scikit-learn; a cache file
    that does not read is computed and written again."""
    from orchestrator.data import sources

    monkeypatch.setattr(sources, "DIGITS_CACHE", tmp_path)
    first = build_data(DataSpec(dataset="digits"), seed=0, views="plain")
    (cached,) = tmp_path.glob("digits-scikit-learn-*.npz")
    cached.write_bytes(cached.read_bytes()[:100])  # half a file
    again = build_data(DataSpec(dataset="digits"), seed=0, views="plain")
    assert len(first.train) == len(again.train) == 1347 and len(first.test) == len(again.test) == 450
    assert torch.equal(first.test[5]["x"], again.test[5]["x"]) and first.test[5]["y"] == again.test[5]["y"]
    assert np.load(cached)["train"].shape == (1347,) and not list(tmp_path.glob("*.part"))
