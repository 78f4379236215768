"""GreenMIM and its SimMIM baseline: the green encoder against a dense masked Swin, masking, merging, the timm
hand-off and the losses (pure PyTorch, no Ray)."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformer, window_partition, window_reverse
from torch import nn

from trainers import greenmim, simmim, supervised
from trainers._common.contract import DataInfo

# 32-px RGB, patch 2, three stages (grids 16, 8, 4; windows 4, 4, 4 with shifts 2, 2, 0), 8-px units (4 x 4).
SMALL = greenmim.Config(patch_size=2, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4,
                        decoder_dim=32, decoder_heads=2)
INFO = DataInfo(num_classes=10, image_size=32, in_channels=3, num_train=1, num_labeled=1)


def timm_swin(cfg, image_size: int, in_channels: int, eps: float) -> SwinTransformer:
    return SwinTransformer(img_size=image_size, patch_size=cfg.patch_size, in_chans=in_channels, num_classes=0,
                           embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=cfg.num_heads,
                           window_size=cfg.window_size, drop_path_rate=0.0,
                           norm_layer=partial(nn.LayerNorm, eps=eps)).eval()


def perturbed_green(cfg: greenmim.Config = SMALL, seed: int = 0) -> greenmim.GreenMIM:
    """A GreenMIM whose every parameter is random (unit norms and zero biases would hide a swapped key)."""
    torch.manual_seed(seed)
    model = greenmim.build(cfg, INFO).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def timm_copy(model: greenmim.GreenMIM, cfg: greenmim.Config = SMALL) -> SwinTransformer:
    swin = timm_swin(cfg, INFO.image_size, INFO.in_channels, cfg.norm_eps)
    swin.load_state_dict(greenmim.timm_swin_state_dict(model.state_dict(), cfg), strict=True)
    return swin


def dense_masked_block(block: nn.Module, z: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """timm's SwinTransformerBlock on the whole (B, H, W, C) grid, with masked keys removed from every window."""
    b, h, w, c = z.shape
    (wh, ww), (sh, sw) = block.window_size, block.shift_size
    shifted = torch.roll(block.norm1(z), (-sh, -sw), (1, 2))
    vis = torch.roll(visible, (-sh, -sw), (0, 1)).float()[None, :, :, None]  # (1, H, W, 1)
    windows = window_partition(shifted, (wh, ww)).view(-1, wh * ww, c)  # (B * nW, M^2, C)
    key_vis = window_partition(vis, (wh, ww)).view(-1, wh * ww)  # (nW, M^2)
    mask = (1 - key_vis)[:, None, :] * -1e4  # (nW, M^2, M^2): a query never sees a masked key
    if block.attn_mask is not None:
        mask = mask + block.attn_mask
    out = window_reverse(block.attn(windows, mask=mask).view(-1, wh, ww, c), (wh, ww), h, w)
    z = z + torch.roll(out, (sh, sw), (1, 2))
    return z + block.mlp(block.norm2(z))


def dense_masked_features(swin: SwinTransformer, x: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
    """The dense reference: every token computed, attention restricted to visible keys; visible final tokens out."""
    z, visible = swin.patch_embed(x), ~patch_mask  # (B, H, W, C), (H, W)
    for i, stage in enumerate(swin.layers):
        if i > 0:
            z, visible = stage.downsample(z), visible[::2, ::2]
        for block in stage.blocks:
            z = dense_masked_block(block, z, visible)
    return swin.norm(z)[:, visible]  # (B, N_vis, D), row-major


@pytest.mark.parametrize("group_size", ["optimal", "fixed", "masking", 16])
def test_green_encoder_equals_dense_masked_swin(group_size) -> None:
    model = perturbed_green()
    model.encoder.group_size = group_size
    x = torch.randn(2, 3, 32, 32)
    unit_mask = greenmim.random_unit_mask(model.units, 0.75, torch.Generator().manual_seed(1))
    patch_mask = greenmim.upsample_mask(unit_mask, model.unit // SMALL.patch_size)  # (16, 16)
    with torch.no_grad():
        green = model.encoder(x, patch_mask)  # (2, 4, 64)
        dense = dense_masked_features(timm_copy(model), x, patch_mask)
    assert green.shape == (2, 4, 64)
    torch.testing.assert_close(green, dense, atol=2e-5, rtol=1e-4)


def test_fully_visible_encoder_equals_timm_swin() -> None:
    """Mask ratio 0: the green path is the ordinary Swin. Equal up to float rounding, not bitwise: the visible
    patch embedding is a matmul where timm runs a conv, and attention runs in packed groups."""
    model = perturbed_green()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        green = model.encoder(x, torch.zeros(16, 16, dtype=torch.bool))  # (2, 16, 64)
        reference = timm_copy(model).forward_features(x).flatten(1, 2)  # (2, 4, 4, 64) -> (2, 16, 64)
    torch.testing.assert_close(green, reference, atol=2e-5, rtol=1e-4)


def test_timm_state_dict_has_timm_keys_and_shapes() -> None:
    for method, cfg in ((greenmim, SMALL), (simmim, simmim.TINY)):
        state = greenmim.timm_swin_state_dict(method.build(cfg, INFO).state_dict(), cfg)
        swin = timm_swin(cfg, INFO.image_size, INFO.in_channels, 1e-5).state_dict()
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in swin.items()}
    other_depths = dataclasses.replace(SMALL, depths=(2, 4))
    with pytest.raises(ValueError, match="depths"):
        greenmim.timm_swin_state_dict(greenmim.build(SMALL, INFO).state_dict(), other_depths)


def test_masking_is_batch_wise_at_the_ratio_with_complete_units() -> None:
    torch.manual_seed(0)
    for ratio, units in ((0.75, 7), (0.6, 7), (0.75, 4)):
        mask = greenmim.random_unit_mask(units, ratio)
        assert mask.shape == (units, units) and int((~mask).sum()) == int(units * units * (1 - ratio))
    patch_mask = greenmim.upsample_mask(mask, 4)  # (16, 16): every unit a constant 4 x 4 block
    assert torch.equal(patch_mask.view(4, 4, 4, 4).permute(0, 2, 1, 3).flatten(2).float().std(2), torch.zeros(4, 4))
    # one mask for the batch: the loss of a batch is the mean of its samples' losses under the same draw
    model, x = perturbed_green(), torch.randn(2, 3, 32, 32)
    losses = []
    for batch in (x, x[:1], x[1:]):
        torch.manual_seed(5)
        losses.append(greenmim.train_step(model, {"x": batch}, SMALL, 0)[0])
    torch.testing.assert_close(losses[0], (losses[1] + losses[2]) / 2)


def test_patch_merging_drops_exactly_the_masked_groups() -> None:
    unit_mask = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    patch_mask = greenmim.upsample_mask(unit_mask, 2)  # (4, 4): 2x2 groups, two of them visible
    coords = (~patch_mask).nonzero()  # (8, 2)
    order, merged = greenmim.merge_order(coords, (4, 4))
    assert torch.equal(merged, (~unit_mask).nonzero())  # the visible groups, row-major
    groups = coords[order].view(-1, 4, 2)
    swin_order = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]])  # x0..x3 of Swin's PatchMerging
    assert torch.equal(groups, 2 * merged[:, None] + swin_order)
    with pytest.raises(ValueError, match="complete 2x2 groups"):
        greenmim.merge_order(coords[1:], (4, 4))
    # and the merged features are timm's PatchMerging on the dense grid at those groups
    timm_merging = PatchMerging(8)
    with torch.no_grad():
        for p in timm_merging.parameters():
            p.add_(0.1 * torch.randn_like(p))
    merging = greenmim.VisiblePatchMerging(8, 1e-5)
    merging.load_state_dict(timm_merging.state_dict())
    dense = torch.randn(1, 4, 4, 8)  # (B, H, W, C)
    with torch.no_grad():
        out, new_coords, grid = merging(dense[:, coords[:, 0], coords[:, 1]], coords, (4, 4))
        torch.testing.assert_close(out, timm_merging(dense)[:, ~unit_mask])
    assert torch.equal(new_coords, merged) and grid == (2, 2)


def test_norm_pix_loss_counts_masked_units_only() -> None:
    pred = torch.zeros(1, 2, 4)
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [100.0, 0.0, 0.0, 0.0]]])  # unit 0 masked, unit 1 visible
    masked = torch.tensor([True, False])
    var = 5.0 / 3.0  # unbiased variance of 1, 2, 3, 4
    expected = 5.0 / (4 * (var + 1e-6))  # mean of ((t - 2.5) / sqrt(var + 1e-6))^2
    torch.testing.assert_close(greenmim.reconstruction_loss(pred, target, masked, True), torch.tensor(expected))
    torch.testing.assert_close(greenmim.reconstruction_loss(pred, target, masked, False), torch.tensor(7.5))


def test_patchify_orders_units_rows_cols_channels() -> None:
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)  # (B, C, H, W)
    units = greenmim.patchify(x, 2)  # (1, 4, 8)
    assert units[0, 1].tolist() == [x[0, c, i, 2 + j].item() for i in range(2) for j in range(2) for c in range(2)]


def test_simmim_l1_counts_masked_pixels_only() -> None:
    x, rec = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 100.0)
    pixel_mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    pixel_mask[:, :2] = True
    rec[:, :, :2] = 1.0  # error 1 on the masked pixels, 100 on the visible ones
    expected = (2 * 8 * 3) / (2 * 8 + 1e-5) / 3  # sum of errors / (masked pixels of the batch + 1e-5) / C
    torch.testing.assert_close(simmim.masked_l1(x, rec, pixel_mask), torch.tensor(expected))


def test_simmim_masks_batch_wise_or_per_sample() -> None:
    model = simmim.build(simmim.TINY, dataclasses.replace(INFO, image_size=16, in_channels=1))
    torch.manual_seed(0)
    shared = simmim.unit_masks(model, simmim.TINY, batch_size=8)
    per_sample = simmim.unit_masks(model, dataclasses.replace(simmim.TINY, batch_wise_mask=False), batch_size=8)
    assert shared.shape == (1, 4, 4) and per_sample.shape == (8, 4, 4)
    assert (per_sample.flatten(1).sum(1) == 16 - int(16 * 0.4)).all() and not (per_sample == per_sample[:1]).all()
    loss, _ = simmim.train_step(model, {"x": torch.randn(8, 1, 16, 16)},
                                dataclasses.replace(simmim.TINY, batch_wise_mask=False), 0)
    assert torch.isfinite(loss)


def test_supervised_init_from_loads_a_greenmim_encoder_into_timm_swin(tmp_path) -> None:
    cfg = greenmim.Config(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))  # Swin-T sizes
    info = DataInfo(num_classes=10, image_size=224, in_channels=3, num_train=1, num_labeled=1)
    pretrained = greenmim.build(cfg, info)
    (tmp_path / "checkpoint").mkdir()
    torch.save(pretrained.state_dict(), tmp_path / "checkpoint" / "model.pt")
    finetune = supervised.Config(arch="swin_tiny_patch4_window7_224", init_from=str(tmp_path / "checkpoint"))
    supervised.check(finetune)
    model = supervised.build(finetune, info)
    loaded = model.encoder.model.state_dict()
    for key, value in greenmim.timm_swin_state_dict(pretrained.state_dict(), cfg).items():
        assert torch.equal(loaded[key], value), key
    with pytest.raises(ValueError, match="must be a timm Swin"):
        supervised.build(dataclasses.replace(finetune, arch="small_cnn"), info)
