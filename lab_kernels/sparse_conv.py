"""GreenMIM's sparse convolution: 2-D convolutions evaluated only on the visible patches.

Spec: ../shared/papers/methods_nas_gen_llm.md section 5 (Huang et al., "Green Hierarchical Vision Transformer for
Masked Image Modeling", NeurIPS 2022; official code: LayneH/GreenMIM, modeling/sparse_conv_spconv.py and
modeling/sparse_conv_me.py). GreenMIM runs Twins' PEG (a depthwise 3x3 conv) and the patch-embedding convs on the
visible tokens only. Masking is batch-wise, so every sample shares the visible sites:

    x (B, N, C_in)   features of the N visible tokens
    coords (N, 2)    their (row, col) on the grid (H, W), integer, no duplicates, any order

Every path computes a dense convolution of the map with zeros at the masked positions, read at the output sites:

    dense(x) = x scattered into a zero (B, C_in, H, W) map
    submanifold:  y = conv2d(dense(x), padding=k//2)[coords]      output sites = input sites, same order;
                  stride 1 and an odd kernel, so the kernel is centred on each site (spconv SubMConv2d)
    regular:      y = conv2d(dense(x), stride=s, padding=p)[coords'], grid' = ((H + 2p - k)//s + 1, (W + 2p - k)//s + 1)
                  coords' = the output sites whose receptive field holds at least one visible input (the sites that
                  spconv SparseConv2d makes active), in row-major order

Facts from the official code:
- spconv 2.x (`SubMConv2d`, `SparseConv2d` subclasses) or MinkowskiEngine (`MinkowskiConvolution`,
  `MinkowskiChannelwiseConvolution`, `MinkowskiAvgPooling`; both ME conv classes are named `SparseConv2d`, so the
  channel-wise one shadows the other). The spconv wrappers tile the (L, 2) indexes over the batch, build a
  SparseConvTensor and return the features reshaped to (B, -1, C_out), without the output coordinates.
- spconv has no `groups`, so `SparseDWConv2d` densifies: it scatters to (B, C, H, W), runs the depthwise nn.Conv2d
  and gathers the visible positions back with a boolean mask over the H*W sites. It asserts groups == in_channels
  and `stride == 1` (marked FIXME).

Paths here, with the weight stored in nn.Conv2d's layout (C_out, C_in/groups, k, k) so nn.Conv2d weights load as is:
- groups == 1: spconv 2.x's native rulebook ops (`get_indice_pairs` + `indice_subm_conv` / `indice_conv`), with the
  weight permuted at call time to spconv's KRSC layout (C_out, k, k, C_in), checked numerically in the tests.
- groups == in_channels (depthwise, any channel multiplier): densify as the official code does, via
  `dense_reference`. Against an im2col gather (a (B, N, k*k, C) tensor of neighbours times the kernel), for B=8,
  C=128, 3x3, a 56x56 grid with 24.5% visible, on one thread of a shared 2-core CPU, over four runs: forward
  11-18 ms densified against 12-20 ms im2col, forward + backward 31-67 ms against 68-92 ms, so densifying stays.
  The same setting with groups=1: spconv forward 24-26 ms against 73-97 ms for `dense_reference`.
- any other groups: ValueError.
- `dense_reference` also serves where spconv 2.3.8 (the CPU-only wheel) is wrong or fails, see `spconv_usable`:
  * CPU tensors while torch runs more than one intra-op thread: the CPU gather-mm-scatter loop then returns wrong
    values for some outputs, differing from call to call (89 of 400 random small convs on 2 threads, 0 of 400 on 1
    thread). Replacing its `SpconvOps.scatter_add_cpu` by torch's `index_add_` removes it; spconv vendors its own
    libgomp next to torch's, which is the likely cause. The race is inside `indice_conv`, so such calls densify;
  * backward on a CPU tensor when torch.cuda is unavailable: `ops.indice_conv_backward` calls
    `torch.cuda.current_stream()` before its CPU branch and fails with "RuntimeError: Found no NVIDIA driver on your
    system" (with a CPU-only torch: "Torch not compiled with CUDA enabled"); with that call bypassed its CPU
    gradients are exact;
  * bfloat16: `indice_conv` raises KeyError(torch.bfloat16); an empty input: "tensor must not empty";
  * CUDA tensors with the CPU-only build (a CUDA build of spconv would take them; not tested here).

Deviations from the official code, with reasons:
- The output coordinates and grid are returned, and regular-conv outputs are sorted row-major (spconv's order is
  neither row-major nor batch-major), so the next layer knows where its tokens sit.
- spconv's modules are not used: they hold the weight in KRSC, and in spconv 2.3.8 their 1x1 shortcut multiplies by
  `weight.view(C_in, C_out)`, not the layout their k > 1 path reads, so an nn.Conv2d weight permuted to KRSC gives
  unrelated outputs for a 1x1 SubMConv2d (relative error about 1.2 measured). The rulebook ops have no shortcut.
- The depthwise conv also runs regular (strided) sparse convolution, gathering at coords', which lifts the stride-1
  FIXME; the densified conv has no reason to restrict it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from spconv.core import ConvAlgo
from spconv.cppconstants import CPU_ONLY_BUILD
from spconv.pytorch import functional as spconv_functional
from spconv.pytorch import ops as spconv_ops
from torch import Tensor, nn

Grid = tuple[int, int]
SPCONV_DTYPES = (torch.float16, torch.float32, torch.float64)  # spconv 2.3.8 raises KeyError for bfloat16


def _check_conv(kernel_size: int, stride: int, padding: int | None, submanifold: bool) -> int:
    """Validate the hyper-parameters and resolve padding: k//2 for submanifold (the only valid value), else 0."""
    if kernel_size < 1 or stride < 1:
        raise ValueError(f"kernel_size={kernel_size} and stride={stride} must be >= 1")
    if not submanifold:
        padding = 0 if padding is None else padding
        if padding < 0:
            raise ValueError(f"padding={padding} must be >= 0")
        return padding
    if stride != 1:
        raise ValueError(f"submanifold conv keeps the input sites, so stride={stride} must be 1; "
                         "use submanifold=False to downsample")
    if kernel_size % 2 == 0:
        raise ValueError(f"submanifold conv centres the kernel on each site: kernel_size={kernel_size} must be odd")
    if padding is not None and padding != kernel_size // 2:
        raise ValueError(f"submanifold conv needs padding=kernel_size//2={kernel_size // 2}, got {padding}")
    return kernel_size // 2


def _check_groups(in_channels: int, out_channels: int, groups: int) -> None:
    """Only groups=1 (spconv) and depthwise groups=in_channels (densified) are implemented."""
    depthwise = groups == in_channels and out_channels % in_channels == 0
    if groups != 1 and not depthwise:
        raise ValueError(f"groups={groups} with in_channels={in_channels}, out_channels={out_channels} is not "
                         "supported: spconv has no grouped conv; use groups=1 or depthwise groups=in_channels "
                         "(out_channels a multiple of in_channels)")


def _check_sites(x: Tensor, coords: Tensor, grid: tuple[int, int], in_channels: int) -> Grid:
    """Validate x (B, N, C_in), coords (N, 2) and grid (H, W); return grid as a tuple of ints."""
    if x.dim() != 3 or x.shape[-1] != in_channels:
        raise ValueError(f"x must be (B, N, C_in={in_channels}), got {tuple(x.shape)}")
    if coords.shape != (x.shape[1], 2):
        raise ValueError(f"coords must be (N, 2) = ({x.shape[1]}, 2) (row, col), got {tuple(coords.shape)}")
    if coords.dtype.is_floating_point or coords.dtype.is_complex or coords.dtype == torch.bool:
        raise TypeError(f"coords must be an integer tensor, got {coords.dtype}")
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid must be (H, W) with H, W >= 1, got {grid}")
    height, width = int(grid[0]), int(grid[1])
    rows, cols = coords[:, 0], coords[:, 1]
    if ((rows < 0) | (rows >= height) | (cols < 0) | (cols >= width)).any():
        raise ValueError(f"coords must lie on the grid (H, W) = ({height}, {width})")
    if (rows * width + cols).unique().numel() != coords.shape[0]:
        raise ValueError("coords must not repeat a site")
    return height, width


def output_grid(grid: Grid, kernel_size: int, stride: int, padding: int) -> Grid:
    """(H', W') of a conv with zero padding: (H + 2p - k)//s + 1 per side."""
    out = tuple((size + 2 * padding - kernel_size) // stride + 1 for size in grid)
    if min(out) < 1:
        raise ValueError(f"kernel_size={kernel_size} with padding={padding} does not fit the grid {grid}")
    return out


def output_sites(coords: Tensor, grid: Grid, kernel_size: int, stride: int, padding: int) -> tuple[Tensor, Grid]:
    """Sites of a regular sparse conv: the outputs that see at least one visible input, row-major.

    coords (N, 2) -> coords' (N', 2) long, grid' (H', W').
    """
    out_grid = output_grid(grid, kernel_size, stride, padding)
    visible = torch.zeros(1, 1, *grid, device=coords.device)
    visible[0, 0, coords[:, 0], coords[:, 1]] = 1.0
    window = torch.ones(1, 1, kernel_size, kernel_size, device=coords.device)
    hits = F.conv2d(visible, window, stride=stride, padding=padding)[0, 0]  # visible inputs per output: (H', W')
    return hits.nonzero(), out_grid


def scatter_to_dense(x: Tensor, coords: Tensor, grid: Grid) -> Tensor:
    """x (B, N, C) -> (B, C, H, W) with zeros at the masked sites."""
    dense = x.new_zeros(x.shape[0], x.shape[2], *grid)
    dense[:, :, coords[:, 0], coords[:, 1]] = x.transpose(1, 2)
    return dense


def gather_sites(dense: Tensor, coords: Tensor) -> Tensor:
    """(B, C, H, W) read at coords (N, 2) -> (B, N, C)."""
    return dense[:, :, coords[:, 0], coords[:, 1]].transpose(1, 2)


def dense_reference(x: Tensor, coords: Tensor, grid: tuple[int, int], weight: Tensor, bias: Tensor | None,
                    stride: int = 1, padding: int | None = None, groups: int = 1,
                    submanifold: bool = True) -> tuple[Tensor, Tensor, Grid]:
    """Scatter to a zero dense map, F.conv2d, read at the output sites (the definition of the module docstring).

    x (B, N, C_in), coords (N, 2), weight (C_out, C_in/groups, k, k), bias (C_out,) or None
    -> y (B, N', C_out), coords' (N', 2), grid' (H', W'). Also the densified depthwise path (groups=C_in).
    """
    kernel_size = weight.shape[-1]
    padding = _check_conv(kernel_size, stride, padding, submanifold)
    grid = _check_sites(x, coords, grid, weight.shape[1] * groups)
    dense = scatter_to_dense(x, coords, grid)  # (B, C_in, H, W)
    if submanifold:
        return gather_sites(F.conv2d(dense, weight, bias, 1, padding, 1, groups), coords), coords, grid
    out_coords, out_grid = output_sites(coords, grid, kernel_size, stride, padding)  # raises if k does not fit
    out = F.conv2d(dense, weight, bias, stride, padding, 1, groups)  # (B, C_out, H', W')
    return gather_sites(out, out_coords), out_coords, out_grid


def spconv_usable(x: Tensor, weight: Tensor) -> bool:
    """Whether spconv's native ops can run this call correctly here (reasons in the module docstring)."""
    if x.dtype not in SPCONV_DTYPES or x.numel() == 0:  # spconv's indice_conv asserts a non-empty input
        return False
    if x.device.type == "cuda":
        return not CPU_ONLY_BUILD
    if x.device.type != "cpu" or torch.get_num_threads() != 1:  # the CPU loop races with more than one thread
        return False
    needs_backward = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return not needs_backward or torch.cuda.is_available()


def _batched_indices(coords: Tensor, batch: int) -> Tensor:
    """coords (N, 2) -> spconv indices (B*N, 3) int32 of (b, row, col), batch-major."""
    batch_ids = torch.arange(batch, device=coords.device).repeat_interleave(coords.shape[0])
    return torch.cat([batch_ids[:, None], coords.repeat(batch, 1)], dim=1).int()


def _sort_row_major(features: Tensor, indices: Tensor, batch: int, grid: Grid) -> tuple[Tensor, Tensor]:
    """spconv outputs in its own order, features (B*N', C), indices (B*N', 3) -> (B, N', C), coords' (N', 2)."""
    indices = indices.long()
    order = ((indices[:, 0] * grid[0] + indices[:, 1]) * grid[1] + indices[:, 2]).argsort()
    n_out = indices.shape[0] // batch  # every sample has the same sites (batch-wise masking)
    return features[order].view(batch, n_out, features.shape[-1]), indices[order[:n_out], 1:]


def spconv_conv(x: Tensor, coords: Tensor, grid: Grid, weight: Tensor, bias: Tensor | None, stride: int,
                padding: int, submanifold: bool) -> tuple[Tensor, Tensor, Grid]:
    """SubMConv2d (submanifold) or SparseConv2d through spconv's native rulebook ops; same contract as
    `dense_reference` with groups=1. The caller validates the inputs."""
    batch, n, in_channels = x.shape
    kernel_size = weight.shape[-1]
    out_grid = grid if submanifold else output_grid(grid, kernel_size, stride, padding)  # raises if k does not fit
    indices = _batched_indices(coords, batch)  # (B*N, 3)
    out_indices, pairs, pair_counts = spconv_ops.get_indice_pairs(
        indices, batch, list(grid), ConvAlgo.Native, [kernel_size] * 2, [stride] * 2, [padding] * 2, [1, 1],
        [0, 0], submanifold, False)
    kernel = weight.permute(0, 2, 3, 1).contiguous()  # nn.Conv2d (C_out, C_in, k, k) -> spconv KRSC (C_out, k, k, C_in)
    conv = spconv_functional.indice_subm_conv if submanifold else spconv_functional.indice_conv
    features = conv(x.reshape(batch * n, in_channels).contiguous(), kernel, pairs, pair_counts,
                    out_indices.shape[0], ConvAlgo.Native)  # (B*N', C_out)
    if bias is not None:
        features = features + bias
    if submanifold:
        return features.view(batch, n, features.shape[-1]), coords, grid
    y, out_coords = _sort_row_major(features, out_indices, batch, out_grid)
    return y, out_coords, out_grid


class SparseConv2d(nn.Module):
    """Conv2d on the visible tokens: submanifold (SubMConv2d) or regular (SparseConv2d), groups 1 or depthwise.

    forward(x (B, N, C_in), coords (N, 2), grid (H, W)) -> y (B, N', C_out), coords' (N', 2), grid' (H', W').
    padding=None means k//2 for submanifold (the only valid value) and 0 otherwise, as in nn.Conv2d.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, groups: int = 1, bias: bool = True, submanifold: bool = True) -> None:
        super().__init__()
        _check_groups(in_channels, out_channels, groups)
        self.padding = _check_conv(kernel_size, stride, padding, submanifold)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.groups, self.submanifold = stride, groups, submanifold
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's initialisation, so a fresh module matches a fresh dense conv in distribution."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, submanifold: bool = True) -> SparseConv2d:
        """A sparse conv with the weights (copied) and hyper-parameters of a square, undilated, zero-padded conv."""
        (k_h, k_w), (s_h, s_w), padding = conv.kernel_size, conv.stride, conv.padding
        if isinstance(padding, str) or k_h != k_w or s_h != s_w or padding[0] != padding[1]:
            raise ValueError(f"from_dense needs a square kernel, stride and numeric padding, got {conv}")
        if conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError(f"from_dense needs dilation 1 and zero padding, got {conv}")
        sparse = cls(conv.in_channels, conv.out_channels, k_h, s_h, padding[0], conv.groups, conv.bias is not None,
                     submanifold)
        sparse = sparse.to(device=conv.weight.device, dtype=conv.weight.dtype)
        sparse.load_state_dict(conv.state_dict())
        return sparse

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, "
                f"submanifold={self.submanifold}")

    def uses_spconv(self, x: Tensor) -> bool:
        """groups=1 runs through spconv where `spconv_usable`; depthwise and the rest densify."""
        return self.groups == 1 and spconv_usable(x, self.weight)

    def forward(self, x: Tensor, coords: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor, Grid]:
        if not self.uses_spconv(x):
            return dense_reference(x, coords, grid, self.weight, self.bias, self.stride, self.padding, self.groups,
                                   self.submanifold)
        grid = _check_sites(x, coords, grid, self.in_channels)
        return spconv_conv(x, coords, grid, self.weight, self.bias, self.stride, self.padding, self.submanifold)
