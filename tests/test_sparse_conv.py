"""GreenMIM sparse conv: spconv and the densified paths against nn.Conv2d on zero-filled maps, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lab_kernels.sparse_conv import SparseConv2d, dense_reference, output_sites, spconv_usable

B = 2
GRID = (9, 7)  # odd and non-square, so row/col mix-ups show


@pytest.fixture
def one_thread():
    """spconv's CPU path is only used (and only correct) with one torch intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_sites(n_visible: int, grid: tuple[int, int] = GRID, seed: int = 0) -> torch.Tensor:
    """A batch-wise mask as coords (N, 2) of (row, col), in random (not row-major) order."""
    flat = torch.randperm(grid[0] * grid[1], generator=torch.Generator().manual_seed(seed))[:n_visible]
    return torch.stack([flat // grid[1], flat % grid[1]], dim=1)


def random_tokens(n_visible: int, channels: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(B, n_visible, channels, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def zero_filled(x: torch.Tensor, coords: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The test's own scatter: (B, N, C) -> (B, C, H, W), zeros at masked sites, one site at a time."""
    dense = x.new_zeros(x.shape[0], x.shape[2], *grid)
    for i, (row, col) in enumerate(coords.tolist()):
        dense[:, :, row, col] = x[:, i]
    return dense


def reachable_sites(coords: torch.Tensor, grid: tuple[int, int], k: int, stride: int, padding: int) -> torch.Tensor:
    """Brute force: output sites whose k x k receptive field holds a visible input, row-major."""
    visible = {tuple(site) for site in coords.tolist()}
    out_h, out_w = ((size + 2 * padding - k) // stride + 1 for size in grid)
    offsets = [(i - padding, j - padding) for i in range(k) for j in range(k)]
    sites = [(r, c) for r in range(out_h) for c in range(out_w)
             if any((r * stride + i, c * stride + j) in visible for i, j in offsets)]
    return torch.tensor(sites, dtype=torch.long).view(-1, 2)


def dense_conv_at(conv: nn.Conv2d, x: torch.Tensor, coords: torch.Tensor, grid: tuple[int, int],
                  sites: torch.Tensor) -> torch.Tensor:
    """nn.Conv2d on the zero-filled map, read at sites (M, 2): (B, M, C_out)."""
    out = conv(zero_filled(x, coords, grid))
    return out[:, :, sites[:, 0], sites[:, 1]].transpose(1, 2)


def matching_dense(sparse: SparseConv2d) -> nn.Conv2d:
    """The nn.Conv2d with the same weights and hyper-parameters."""
    conv = nn.Conv2d(sparse.in_channels, sparse.out_channels, sparse.kernel_size, sparse.stride, sparse.padding,
                     groups=sparse.groups, bias=sparse.bias is not None).to(sparse.weight.dtype)
    conv.load_state_dict(sparse.state_dict())
    return conv


@pytest.mark.parametrize("kernel_size", [1, 3, 7])
@pytest.mark.parametrize("channels", [(3, 5), (8, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_submanifold_matches_dense_conv_at_visible_sites(kernel_size: int, channels: tuple[int, int], bias: bool,
                                                         one_thread: None) -> None:
    torch.manual_seed(kernel_size)
    coords, x = random_sites(30, seed=kernel_size), random_tokens(30, channels[0])
    sparse = SparseConv2d(*channels, kernel_size, bias=bias).double()
    with torch.no_grad():
        assert sparse.uses_spconv(x)
        y, out_coords, out_grid = sparse(x, coords, GRID)
        expected = dense_conv_at(matching_dense(sparse), x, coords, GRID, coords)
    assert out_coords is coords and out_grid == GRID
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_spconv_in_single_precision_and_reference_agree(dtype: torch.dtype, tol: float, one_thread: None) -> None:
    coords, x = random_sites(40), random_tokens(40, 6)
    sparse = SparseConv2d(6, 4, 3).double()
    with torch.no_grad():
        y, _, _ = sparse.to(dtype)(x.to(dtype), coords, GRID)
        y_ref, _, _ = dense_reference(x, coords, GRID, sparse.weight.double(), sparse.bias.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel_size, stride, padding",
                         [(3, 2, 1), (2, 2, 0), (4, 4, 0), (3, 2, 0), (7, 2, 3), (1, 2, 0)])
def test_regular_sparse_conv_matches_dense_conv_at_reachable_sites(kernel_size: int, stride: int, padding: int,
                                                                  one_thread: None) -> None:
    torch.manual_seed(0)
    coords, x = random_sites(12), random_tokens(12, 5)
    sparse = SparseConv2d(5, 6, kernel_size, stride, padding, submanifold=False).double()
    with torch.no_grad():
        assert sparse.uses_spconv(x)
        y, out_coords, out_grid = sparse(x, coords, GRID)
        expected_sites = reachable_sites(coords, GRID, kernel_size, stride, padding)
        expected = dense_conv_at(matching_dense(sparse), x, coords, GRID, expected_sites)
    torch.testing.assert_close(out_coords, expected_sites, rtol=0, atol=0)
    assert out_grid == tuple(((size + 2 * padding - kernel_size) // stride + 1 for size in GRID))
    torch.testing.assert_close(y, expected)


def test_output_sites_is_the_reachable_set() -> None:
    coords = random_sites(10, seed=3)
    sites, grid = output_sites(coords, GRID, 3, 2, 1)
    torch.testing.assert_close(sites, reachable_sites(coords, GRID, 3, 2, 1), rtol=0, atol=0)
    assert grid == (5, 4)


@pytest.mark.parametrize("kernel_size, stride, submanifold", [(3, 1, True), (7, 1, True), (3, 2, False)])
@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_matches_dense_depthwise_conv(kernel_size: int, stride: int, submanifold: bool,
                                                multiplier: int) -> None:
    torch.manual_seed(0)
    channels = 6
    coords, x = random_sites(25), random_tokens(25, channels)
    padding = kernel_size // 2
    sparse = SparseConv2d(channels, channels * multiplier, kernel_size, stride, padding, groups=channels,
                          submanifold=submanifold).double()
    with torch.no_grad():
        assert not sparse.uses_spconv(x)
        y, out_coords, _ = sparse(x, coords, GRID)
        sites = coords if submanifold else reachable_sites(coords, GRID, kernel_size, stride, padding)
        expected = dense_conv_at(matching_dense(sparse), x, coords, GRID, sites)
    torch.testing.assert_close(out_coords, sites, rtol=0, atol=0)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("groups, submanifold, stride", [(1, True, 1), (1, False, 2), (4, True, 1)])
def test_from_dense_round_trip(groups: int, submanifold: bool, stride: int) -> None:
    conv = nn.Conv2d(4, 8, 3, stride, padding=1, groups=groups).double()
    sparse = SparseConv2d.from_dense(conv, submanifold=submanifold)
    assert (sparse.stride, sparse.padding, sparse.groups, sparse.submanifold) == (stride, 1, groups, submanifold)
    assert sparse.weight.dtype == torch.float64 and sparse.weight.data_ptr() != conv.weight.data_ptr()
    back = nn.Conv2d(4, 8, 3, stride, padding=1, groups=groups).double()
    back.load_state_dict(sparse.state_dict())
    torch.testing.assert_close(back.weight, conv.weight, rtol=0, atol=0)
    torch.testing.assert_close(back.bias, conv.bias, rtol=0, atol=0)
    all_sites = random_sites(GRID[0] * GRID[1])
    x = random_tokens(all_sites.shape[0], 4)
    with torch.no_grad():
        y, out_coords, out_grid = sparse(x, all_sites, GRID)
        full = conv(zero_filled(x, all_sites, GRID))  # every site visible: the sparse conv is the dense conv
    assert out_grid == full.shape[-2:]
    torch.testing.assert_close(y, full[:, :, out_coords[:, 0], out_coords[:, 1]].transpose(1, 2))


def test_from_dense_rejects_what_it_cannot_express() -> None:
    for conv in (nn.Conv2d(2, 2, (3, 1)), nn.Conv2d(2, 2, 3, dilation=2), nn.Conv2d(2, 2, 3, padding="same"),
                 nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")):
        with pytest.raises(ValueError):
            SparseConv2d.from_dense(conv)


def reference_grads(x: torch.Tensor, coords: torch.Tensor, sparse: SparseConv2d,
                    upstream: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """y and d(sum y * upstream)/d(x, weight, bias) through dense_reference."""
    x = x.detach().requires_grad_()
    weight, bias = sparse.weight.detach().requires_grad_(), sparse.bias.detach().requires_grad_()
    y, _, _ = dense_reference(x, coords, GRID, weight, bias, sparse.stride, sparse.padding, sparse.groups,
                              sparse.submanifold)
    upstream = torch.randn_like(y) if upstream is None else upstream
    (y * upstream).sum().backward()
    return y, upstream, x.grad, weight.grad, bias.grad


def module_grads(x: torch.Tensor, coords: torch.Tensor, sparse: SparseConv2d,
                 upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_()
    sparse.zero_grad()
    y, _, _ = sparse(x, coords, GRID)
    (y * upstream).sum().backward()
    return y, x.grad, sparse.weight.grad, sparse.bias.grad


@pytest.mark.parametrize("groups, stride, submanifold", [(1, 1, True), (1, 2, False), (5, 1, True), (5, 2, False)])
def test_gradients_equal_the_reference(groups: int, stride: int, submanifold: bool) -> None:
    torch.manual_seed(0)
    coords, x = random_sites(20), random_tokens(20, 5)
    sparse = SparseConv2d(5, 10 if groups == 1 else 5, 3, stride, 1, groups, submanifold=submanifold).double()
    y_ref, upstream, *grads_ref = reference_grads(x, coords, sparse, None)
    y, *grads = module_grads(x, coords, sparse, upstream)
    torch.testing.assert_close(y, y_ref)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="spconv 2.3.8's CPU backward calls torch.cuda.current_stream")
@pytest.mark.parametrize("stride, submanifold", [(1, True), (2, False)])
def test_spconv_backward_equals_the_reference(stride: int, submanifold: bool, one_thread: None) -> None:
    coords, x = random_sites(20), random_tokens(20, 5)
    sparse = SparseConv2d(5, 7, 3, stride, 1, submanifold=submanifold).double()
    assert spconv_usable(x.requires_grad_(), sparse.weight)
    y_ref, upstream, *grads_ref = reference_grads(x, coords, sparse, None)
    y, *grads = module_grads(x, coords, sparse, upstream)
    torch.testing.assert_close(y, y_ref)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref)


def test_spconv_is_used_where_it_works(one_thread: None) -> None:
    x, weight = random_tokens(4, 3, dtype=torch.float32), torch.zeros(3, 3, 3, 3, requires_grad=True)
    with torch.no_grad():
        assert spconv_usable(x, weight) and spconv_usable(x.half(), weight)
        assert not spconv_usable(x.bfloat16(), weight) and not spconv_usable(x[:, :0], weight)
        torch.set_num_threads(2)
        assert not spconv_usable(x, weight)  # spconv's CPU loop races with more than one thread
        torch.set_num_threads(1)
    assert spconv_usable(x, weight) == torch.cuda.is_available()  # its CPU backward needs a CUDA runtime


def test_bfloat16_falls_back_to_the_dense_path() -> None:
    coords, x = random_sites(30), random_tokens(30, 4, dtype=torch.float32)
    sparse = SparseConv2d(4, 4, 3)
    with torch.no_grad():
        y, _, _ = sparse.bfloat16()(x.bfloat16(), coords, GRID)
        y_ref, _, _ = dense_reference(x.bfloat16(), coords, GRID, sparse.weight, sparse.bias)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


@pytest.mark.parametrize("submanifold", [True, False])
def test_no_visible_tokens(submanifold: bool) -> None:
    x, coords = torch.zeros(B, 0, 3), torch.zeros(0, 2, dtype=torch.long)
    with torch.no_grad():
        y, out_coords, _ = SparseConv2d(3, 4, 3, padding=1, submanifold=submanifold)(x, coords, GRID)
    assert y.shape == (B, 0, 4) and out_coords.shape == (0, 2)


@pytest.mark.parametrize("kwargs", [dict(groups=2), dict(groups=4, in_channels=4, out_channels=6),
                                    dict(stride=2), dict(kernel_size=2), dict(padding=0), dict(kernel_size=0),
                                    dict(submanifold=False, padding=-1)])
def test_bad_hyper_parameters_raise(kwargs: dict) -> None:
    args = dict(in_channels=4, out_channels=8, kernel_size=3) | kwargs
    with pytest.raises(ValueError):
        SparseConv2d(**args)


@pytest.mark.parametrize("groups", [1, 4])  # the spconv and the densified path check their inputs
def test_bad_inputs_raise(groups: int, one_thread: None) -> None:
    sparse, coords = SparseConv2d(4, 4, 3, groups=groups), random_sites(6)
    x = random_tokens(6, 4, dtype=torch.float32)
    with torch.no_grad():
        assert sparse.uses_spconv(x) == (groups == 1)
    bad_calls = [
        (ValueError, (x[0], coords, GRID)),  # no batch dim
        (ValueError, (x[..., :3], coords, GRID)),  # channel mismatch
        (ValueError, (x, coords[:5], GRID)),  # N mismatch
        (TypeError, (x, coords.float(), GRID)),  # float coords
        (ValueError, (x, coords + GRID[0], GRID)),  # off the grid
        (ValueError, (x, torch.cat([coords[:5], coords[:1]]), GRID)),  # repeated site
        (ValueError, (x, coords, (0, 7))),  # empty grid
    ]
    for error, args in bad_calls:
        with pytest.raises(error):
            sparse(*args)
    too_large = SparseConv2d(4, 4, 7, groups=groups, submanifold=False)
    with torch.no_grad(), pytest.raises(ValueError):
        too_large(x, random_sites(6, grid=(3, 3)), (3, 3))  # the kernel exceeds the grid
