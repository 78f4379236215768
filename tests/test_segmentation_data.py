"""orchestrator.data.segmentation: VOC and Cityscapes layouts written here as tiny trees, the labeled split, the
labelId -> trainId mapping, paired augmentation, the generated shapes_seg set and the "segmentation" view."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from orchestrator.data import build_data
from orchestrator.data.segmentation import CITYSCAPES_TRAIN_IDS, PairedTrain, check_files, read_mask, shapes_seg
from orchestrator.data.sources import DataFileError
from orchestrator.spec import DataSpec

VOC_TRAIN = [f"2007_{i:06d}" for i in range(8)]
VOC_VAL = ["2008_000001", "2008_000002"]
CITIES = {"train": ["aachen", "bochum"], "val": ["frankfurt"]}


def _rgb(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _palette_mask(values: np.ndarray) -> Image.Image:
    """A VOC-style palette PNG: the pixel values are class indices (255 = boundary)."""
    image = Image.fromarray(values.astype(np.uint8), mode="P")
    image.putpalette(np.random.default_rng(0).integers(0, 256, 768).tolist())
    return image


def _write_voc(root: Path, augmented: bool = False) -> dict[str, np.ndarray]:
    """JPEGImages, SegmentationClass (or SegmentationClassAug + train_aug.txt) and the id lists; every image is
    24 x (30 + 2i) with a mask of class i % 21 on the left half, 0 on the right and a 255 column between.
    Returns the masks by id."""
    rng = np.random.default_rng(0)
    mask_dir = root / ("SegmentationClassAug" if augmented else "SegmentationClass")
    lists = root / "ImageSets" / "Segmentation"
    for folder in (root / "JPEGImages", mask_dir, lists):
        folder.mkdir(parents=True)
    masks = {}
    for i, name in enumerate(VOC_TRAIN + VOC_VAL):
        width = 30 + 2 * i
        _rgb(rng, 24, width).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        masks[name] = np.zeros((24, width), dtype=np.uint8)
        masks[name][:, : width // 2] = i % 21
        masks[name][:, width // 2] = 255
        _palette_mask(masks[name]).save(mask_dir / f"{name}.png")
    (lists / ("train_aug.txt" if augmented else "train.txt")).write_text("\n".join(VOC_TRAIN) + "\n")
    (lists / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    return masks


def _write_cityscapes(root: Path) -> dict[str, np.ndarray]:
    """leftImg8bit and gtFine labelIds for two train cities (2 images each) and one val city (1 image), 16 x 32;
    each mask holds every labelId 0..33 and a few others. Returns the labelId masks by image id."""
    rng = np.random.default_rng(0)
    masks = {}
    for split, cities in CITIES.items():
        for city in cities:
            for folder in ("leftImg8bit", "gtFine"):
                (root / folder / split / city).mkdir(parents=True)
            for j in range(1 if split == "val" else 2):
                name = f"{city}_{j:06d}_000019"
                _rgb(rng, 16, 32).save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
                masks[name] = np.resize(np.concatenate([np.arange(34), [-1 % 256, 40, 0]]), (16, 32)).astype(np.uint8)
                Image.fromarray(masks[name], mode="L").save(root / "gtFine" / split / city /
                                                            f"{name}_gtFine_labelIds.png")
    return masks


def _unnormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Back to the 0..255 scale: (C,H,W)."""
    return (x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]) * 255


# ---------------------------------------------------------------------------------------------- split


def test_voc_labeled_list_and_items(tmp_path):
    masks = _write_voc(tmp_path)
    # the papers' list formats: DeepLab-style image + mask paths, and bare ids; blank lines are skipped
    (tmp_path / "labeled.txt").write_text(f"/JPEGImages/{VOC_TRAIN[5]}.jpg /SegmentationClass/{VOC_TRAIN[5]}.png\n"
                                          f"\n{VOC_TRAIN[1]}\n")
    spec = DataSpec(dataset="voc", root=str(tmp_path), labeled_list="labeled.txt", crop_size=20, unlabeled_ratio=2,
                    eval_size=(48, 46))
    bundle = build_data(spec, seed=0, views="segmentation")
    split = json.loads(json.dumps(bundle.artifacts))["split.json"]
    assert split["labeled_ids"] == [VOC_TRAIN[1], VOC_TRAIN[5]]
    assert split["unlabeled_ids"] == [name for name in VOC_TRAIN if name not in split["labeled_ids"]]
    info = bundle.info
    assert (info.num_classes, info.image_size, info.in_channels, info.num_train, info.num_labeled) == (21, 20, 3, 8, 2)
    assert len(bundle.train) == math.ceil(6 / 2) and len(bundle.test) == 2
    item = bundle.train[0]
    shapes = {key: tuple(value.shape) for key, value in item.items()}
    assert shapes == {"x": (3, 20, 20), "y": (20, 20), "idx": (), "u": (2, 3, 20, 20), "u_valid": (2, 20, 20),
                      "idx_u": (2,)}
    assert item["y"].dtype == item["idx"].dtype == item["idx_u"].dtype == torch.int64
    assert item["u_valid"].dtype == torch.bool
    assert set(item["y"].unique().tolist()) <= {0, 1, 5, 255}
    # test: whole images padded to eval_size; the second val image (24 x 48) shrinks to 23 x 46 first
    for j, height in enumerate((24, 23)):
        test_item = bundle.test[j]
        assert test_item["x"].shape == (3, 48, 46) and int(test_item["idx"]) == j
        assert (test_item["y"][height:] == 255).all() and (test_item["x"][:, height:] == 0).all()
        assert (test_item["y"][:height] != 255).any()
    torch.testing.assert_close(bundle.test[0]["y"][:24, :46], torch.from_numpy(masks[VOC_VAL[0]]).long())


def test_voc_augmented_masks_and_train_aug_list(tmp_path):
    _write_voc(tmp_path, augmented=True)
    bundle = build_data(DataSpec(dataset="voc", root=str(tmp_path), num_labeled=3), seed=0, views="segmentation")
    assert bundle.info.num_train == 8 and bundle.info.num_labeled == 3
    assert bundle.train[0]["x"].shape == (3, 321, 321) and bundle.test[0]["y"].shape == (512, 512)


def test_random_subset_is_seeded(tmp_path):
    _write_voc(tmp_path)

    def labeled(seed: int, **keys) -> list[str]:
        spec = DataSpec(dataset="voc", root=str(tmp_path), crop_size=16, **keys)
        return build_data(spec, seed, "segmentation").artifacts["split.json"]["labeled_ids"]

    a, b, c = labeled(0, num_labeled=3), labeled(0, num_labeled=3), labeled(1, num_labeled=3)
    assert a == b and a != c and len(a) == 3 and set(a) <= set(VOC_TRAIN)
    assert len(labeled(0, labeled_fraction=0.25)) == 2
    with pytest.raises(ValueError, match="data.num_labeled"):
        labeled(0, num_labeled=9)
    with pytest.raises(ValueError, match="unlabeled images"):
        labeled(0)  # every image labeled: nothing to pair with


def test_labeled_list_with_unknown_ids_names_the_file(tmp_path):
    _write_voc(tmp_path)
    (tmp_path / "labeled.txt").write_text("2007_000001\n2099_123456\n")
    spec = DataSpec(dataset="voc", root=str(tmp_path), labeled_list=str(tmp_path / "labeled.txt"))
    with pytest.raises(DataFileError, match=r"labeled\.txt.*2099_123456"):
        build_data(spec, seed=0, views="segmentation")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        check_files(spec.model_copy(update={"labeled_list": "missing.txt"}))


# ---------------------------------------------------------------------------------------------- Cityscapes


def test_cityscapes_label_ids_map_to_train_ids(tmp_path):
    masks = _write_cityscapes(tmp_path)
    spec = DataSpec(dataset="cityscapes", root=str(tmp_path), num_labeled=2, crop_size=16, eval_size=(16, 32))
    bundle = build_data(spec, seed=0, views="segmentation")
    assert (bundle.info.num_classes, bundle.info.num_train, len(bundle.test)) == (19, 4, 1)
    expected = np.full(256, 255, dtype=np.int64)
    for label_id, train_id in {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                               25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}.items():
        expected[label_id] = train_id
    assert CITYSCAPES_TRAIN_IDS == {k: int(v) for k, v in enumerate(expected) if v != 255}
    torch.testing.assert_close(bundle.test[0]["y"], torch.from_numpy(expected[masks["frankfurt_000000_000019"]]))
    assert bundle.artifacts["split.json"]["unlabeled_ids"][0].startswith(("aachen", "bochum"))
    # a CPS/U2PL-style list of image paths selects the same images as their ids
    (tmp_path / "split.txt").write_text("leftImg8bit/train/bochum/bochum_000001_000019_leftImg8bit.png "
                                        "gtFine/train/bochum/bochum_000001_000019_gtFine_labelIds.png\n")
    listed = build_data(spec.model_copy(update={"num_labeled": None, "labeled_list": "split.txt"}), 0, "segmentation")
    assert listed.artifacts["split.json"]["labeled_ids"] == ["bochum_000001_000019"]


# ---------------------------------------------------------------------------------------------- augmentation


def test_paired_augmentation_keeps_image_and_mask_aligned():
    """An image of 6 x 6 px blocks whose colour encodes the block's class: after rescale, crop and flip, every
    labeled pixel away from a block edge has its class's colour, and nearly every labeled pixel is closest to it."""
    palette = torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]])
    classes = torch.randint(0, len(palette), (7, 9), generator=torch.Generator().manual_seed(0))
    mask = classes.repeat_interleave(6, 0).repeat_interleave(6, 1).to(torch.uint8)  # (42, 54)
    image = palette[mask.long()].permute(2, 0, 1).to(torch.uint8)  # (3, 42, 54)
    mask[:, 20] = 255  # an unlabeled column inside class blocks (shrinking may drop it from the mask)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    transform = PairedTrain(mean, std, crop=40, scale_range=(0.5, 2.0))
    torch.manual_seed(0)
    checked = 0
    for _ in range(20):
        x, y = transform(image, mask)
        assert x.shape == (3, 40, 40) and y.shape == (40, 40) and y.dtype == torch.int64
        pixels = _unnormalize(x, mean, std).permute(1, 2, 0)  # (40, 40, 3)
        labeled = y != 255
        nearest = (pixels[:, :, None] - palette.float()).abs().sum(-1).argmin(-1)  # (40, 40)
        assert (nearest[labeled] == y[labeled]).float().mean() > 0.95
        padded_y = torch.nn.functional.pad(y[None, None].float(), (2, 2, 2, 2), value=255)[0, 0]
        interior = labeled & (padded_y.unfold(0, 5, 1).unfold(1, 5, 1).amax((-1, -2)) ==
                              padded_y.unfold(0, 5, 1).unfold(1, 5, 1).amin((-1, -2)))  # 5 x 5 uniform around
        torch.testing.assert_close(pixels[interior], palette[y[interior]].float(), atol=2.0, rtol=0)
        checked += int(interior.sum())
    assert checked > 5000


def test_padding_gets_the_ignore_index_and_the_mean_colour():
    image = torch.full((3, 20, 24), 200, dtype=torch.uint8)
    mask = torch.full((20, 24), 3, dtype=torch.uint8)
    transform = PairedTrain((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop=16, scale_range=(0.5, 0.5))
    x, y = transform(image, mask)  # 10 x 12 of image, padded at the bottom and right to 16 x 16
    image_part = y != 255
    assert int(image_part.sum()) == 10 * 12 and set(y[image_part].tolist()) == {3}
    assert (x[:, ~image_part] == 0).all()
    torch.testing.assert_close(x[:, image_part], torch.full((3, 120), (200 / 255 - 0.5) / 0.25))


# ---------------------------------------------------------------------------------------------- generated


def test_shapes_seg_is_deterministic_and_its_masks_match_its_shapes():
    images, masks = shapes_seg(3, seed=0, size=32)
    assert images.shape == (30, 3, 32, 32) and masks.shape == (30, 32, 32) and masks.dtype == np.uint8
    again, again_masks = shapes_seg(3, seed=0, size=32)
    assert np.array_equal(images, again) and np.array_equal(masks, again_masks)
    assert not np.array_equal(masks, shapes_seg(3, seed=1, size=32)[1])
    assert set(np.unique(masks).tolist()) == set(range(11))
    for image, mask in zip(images.astype(float), masks):
        for c in np.unique(mask[mask > 0]):
            shape = image[:, mask == c]  # (3, n): one flat colour (pixel noise 0.02) per shape of that class
            background = image[:, mask == 0]
            centre = np.median(shape, axis=1, keepdims=True)
            if np.abs(shape - centre).max() < 0.12 * 255:  # one shape of class c (two may differ in colour)
                assert np.abs(background - centre).max(0).min() > 0.1 * 255  # no background pixel has its colour



def test_shapes_seg_difficulty_knobs_draw_the_documented_shapes():
    images, masks = shapes_seg(4, seed=0, size=32, num_shapes=3, radius=(0.3, 0.3), max_shapes=1, textured=False)
    assert images.shape == (12, 3, 32, 32) and np.array_equal(images, shapes_seg(
        4, seed=0, size=32, num_shapes=3, radius=(0.3, 0.3), max_shapes=1, textured=False)[0])
    assert [set(np.unique(m).tolist()) for m in masks] == [{0, 1 + i // 4} for i in range(12)]  # one shape each
    circles = (masks[:4] == 1).sum((1, 2))  # a circle of radius 0.3 * 32 px, whole (centres 0.2-0.8: may be cut)
    assert (circles <= np.pi * 9.6**2 * 1.05).all() and circles.max() > np.pi * 9.6**2 * 0.9
    flat = [image[:, mask == 0].astype(float).std(1).max() for image, mask in zip(images, masks)]
    textured_images, textured_masks = shapes_seg(4, seed=0, size=32, num_shapes=3, radius=(0.3, 0.3), max_shapes=1)
    textured = [image[:, mask == 0].astype(float).std(1).max() for image, mask in zip(textured_images, textured_masks)]
    assert max(flat) < 0.06 * 255 < np.median(textured)  # flat: only the 0.04 + 0.02 pixel noise


def test_shapes_seg_spec_knobs_and_the_validation_split():
    spec = DataSpec(dataset="shapes_seg", synthetic_per_class=4, image_size=24, num_labeled=4, shapes_classes=2,
                    shapes_radius=(0.2, 0.3), shapes_per_image=2, shapes_textured=False)
    test = build_data(spec, seed=0, views="segmentation")
    val = build_data(DataSpec(**{**spec.model_dump(), "eval_on": "val"}), seed=0, views="segmentation")
    assert test.info.num_classes == val.info.num_classes == 3 and test.info.num_train == 8 and len(val.test) == 2
    assert int(max(val.test[i]["y"].max() for i in range(2))) == 2
    assert not torch.equal(test.test[0]["x"], val.test[0]["x"])
    with pytest.raises(ValidationError, match="shapes_classes with dataset shapes_seg only"):
        DataSpec(dataset="digits", shapes_classes=4)
    with pytest.raises(ValidationError, match="eval_on: val needs a validation split"):
        DataSpec(dataset="voc", root="/x", eval_on="val")
    with pytest.raises(ValidationError, match="shapes_radius"):
        DataSpec(dataset="shapes_seg", shapes_radius=(0.3, 0.2))

def test_shapes_seg_build_data_items_and_epochs():
    spec = DataSpec(dataset="shapes_seg", synthetic_per_class=4, image_size=24, num_labeled=8, unlabeled_ratio=3)
    bundle = build_data(spec, seed=0, views="segmentation")
    assert (bundle.info.num_classes, bundle.info.image_size, bundle.info.num_train, bundle.info.num_labeled) == (
        11, 24, 40, 8)
    assert len(bundle.train) == math.ceil(32 / 3) and len(bundle.test) == 10
    item = bundle.train[len(bundle.train) - 1]
    assert item["u"].shape == (3, 3, 24, 24) and item["y"].shape == (24, 24) and item["u_valid"].shape == (3, 24, 24)
    covered = torch.cat([bundle.train[i]["idx_u"] for i in range(len(bundle.train))])
    assert set(covered.tolist()) == set(range(32))
    first = [bundle.train[i]["idx_u"].tolist() for i in range(2)]
    bundle.train.set_epoch(1)
    assert [bundle.train[i]["idx_u"].tolist() for i in range(2)] != first
    test_item = bundle.test[3]
    assert test_item["x"].shape == (3, 24, 24) and test_item["y"].shape == (24, 24) and int(test_item["idx"]) == 3
    assert int(test_item["y"].max()) <= 10 and test_item["y"].dtype == torch.int64
    crop = DataSpec(**{**spec.model_dump(), "crop_size": 16})
    assert build_data(crop, seed=0, views="segmentation").train[0]["x"].shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------------- errors


def test_a_missing_mask_is_named(tmp_path):
    _write_voc(tmp_path)
    (tmp_path / "labeled.txt").write_text(f"{VOC_TRAIN[2]}\n{VOC_TRAIN[4]}\n")
    spec = DataSpec(dataset="voc", root=str(tmp_path), labeled_list="labeled.txt")
    check_files(spec)
    missing = tmp_path / "SegmentationClass" / f"{VOC_TRAIN[4]}.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        check_files(spec)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_data(spec, seed=0, views="segmentation")
    with pytest.raises(FileNotFoundError, match="val.txt"):
        (tmp_path / "ImageSets" / "Segmentation" / "val.txt").unlink()
        check_files(spec)


def test_an_unreadable_mask_is_named(tmp_path):
    _write_voc(tmp_path)
    bad = tmp_path / "SegmentationClass" / f"{VOC_VAL[0]}.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(bad)  # a colour-coded RGB mask
    spec = DataSpec(dataset="voc", root=str(tmp_path), num_labeled=2)
    with pytest.raises(DataFileError, match=f"{bad}.*mode 'RGB'"):
        check_files(spec)
    bad.write_bytes(b"not a png")
    with pytest.raises(DataFileError, match=str(bad)):
        check_files(spec)
    out_of_range = tmp_path / "mask.png"
    _palette_mask(np.full((4, 4), 21)).save(out_of_range)
    with pytest.raises(DataFileError, match="21"):
        read_mask(out_of_range, num_classes=21)


def test_cityscapes_without_images_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="leftImg8bit/train"):
        check_files(DataSpec(dataset="cityscapes", root=str(tmp_path), num_labeled=1))


def test_spec_keys_and_views_go_with_segmentation_datasets(tmp_path):
    with pytest.raises(ValidationError, match="labeled_per_class"):
        DataSpec(dataset="voc", root=str(tmp_path), labeled_per_class=2)
    with pytest.raises(ValidationError, match="num_labeled with a segmentation dataset"):
        DataSpec(dataset="cifar10", root=str(tmp_path), num_labeled=2)
    with pytest.raises(ValidationError, match="at most one"):
        DataSpec(dataset="shapes_seg", num_labeled=2, labeled_list="a.txt")
    with pytest.raises(ValidationError, match="scale_range"):
        DataSpec(dataset="shapes_seg", scale_range=(1.5, 0.5))
    with pytest.raises(ValidationError, match="root"):
        DataSpec(dataset="cityscapes")
    with pytest.raises(ValueError, match="go together"):
        build_data(DataSpec(dataset="shapes_seg", num_labeled=2), seed=0, views="plain")
    with pytest.raises(ValueError, match="go together"):
        build_data(DataSpec(dataset="digits"), seed=0, views="segmentation")
