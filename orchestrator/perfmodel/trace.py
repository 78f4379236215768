"""The operators of one micro-batch taken from a trace of the real step, so that nothing the step does is missing.

The step of trainers/lm.py as launch.TorchEngine runs it (`train_step`, the loss divided by the accumulation
count, its backward, the running loss sum) is run on fake tensors (FakeTensorMode: shapes, dtypes and devices,
no data, no memory, no arithmetic) at the workload's own sizes with one block, and every aten call it dispatches
is recorded with its input and output shapes. Each call is then one of:

    a profiled kind   the GEMMs (mm, addmm), attention, LayerNorm, GELU, embedding and cross-entropy kernels,
                      forward and backward, predicted by their regressors (ops.FEATURES shapes)
    elementwise       any other call that writes memory (the residual adds and their gradients' accumulation, the
                      head split/merge copies, RoPE's multiplies and concatenations, reductions for the bias
                      gradients, casts): the `add` regressor at the same number of elements read and written
    dispatch          a call that only makes a view (view, transpose, t, slice, detach, ...), or one timed inside
                      another kind's micro-benchmark: no kernel, one dispatch each (compose fits its cost)

Module and gradient hooks say where each call belongs: the block's forward, and in the backward pass everything
between the gradient of the block's output and that of its input (the autograd engine runs a block's nodes
before any earlier one), is the per-block part; before the block the embedding (first stage), after it the final
norm, logits and loss (last stage). Every shape is affine in the micro-batch size, so two traces (1 and 2
sequences) give every size. Tensor parallelism is not in the trainer: a tp > 1 layout keeps the analytic operator
list of ops.py.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from orchestrator.perfmodel.ops import Op
from orchestrator.perfmodel.workload import Workload

ATTENTION = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
KIND_OF = {
    "mm": "gemm", "addmm": "gemm",
    **{name: "sdpa_fwd" for name in ATTENTION}, **{f"{name}_backward": "sdpa_bwd" for name in ATTENTION},
    "native_layer_norm": "layernorm_fwd", "native_layer_norm_backward": "layernorm_bwd",
    "gelu": "gelu_fwd", "gelu_backward": "gelu_bwd",
    "embedding": "embedding_fwd", "embedding_dense_backward": "embedding_bwd",
    "_log_softmax": "cross_entropy_fwd", "_log_softmax_backward_data": "cross_entropy_bwd",
}
INSIDE_OTHERS = {"nll_loss_forward", "nll_loss_backward"}  # timed by the cross_entropy micro-benchmarks
NO_KERNEL = {"_unsafe_view", "alias", "lift_fresh", "empty", "empty_strided", "_local_scalar_dense"}

Call = tuple[str, str, tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...], tuple[int, ...], str]


class Recorder(TorchDispatchMode):
    """Records (name, phase, input shapes, output shapes, integer arguments, region) of every aten call, the region
    ("first", "block" or "last") following the hooks `watch` puts on a one-block model."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self.phase, self.region = "fwd", "first"

    def watch(self, block: torch.nn.Module) -> None:
        def enter(_: torch.nn.Module, inputs: tuple) -> None:
            if self.phase == "fwd":  # not when activation checkpointing runs the block again in the backward pass
                self.region = "block"
                inputs[0].register_hook(lambda grad: setattr(self, "region", "first"))

        def leave(_: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            if self.phase == "fwd":
                self.region = "last"
                out.register_hook(lambda grad: setattr(self, "region", "block"))

        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        out = func(*args, **(kwargs or {}))
        if func.namespace == "aten":
            leaves = tree_leaves((args, kwargs or {}))
            inputs = tuple(tuple(a.shape) for a in leaves if isinstance(a, torch.Tensor))
            ints = tuple(a for a in leaves if isinstance(a, int) and not isinstance(a, bool))
            outputs = tuple(tuple(o.shape) for o in tree_leaves(out) if isinstance(o, torch.Tensor))
            name = func.overloadpacket.__name__
            self.calls.append((name if not func.is_view else f"view:{name}", self.phase, inputs, outputs, ints,
                               self.region))
        return out


@lru_cache(maxsize=64)
def record(d_model: int, n_heads: int, mlp_ratio: float, vocab: int, seq_len: int, tied: bool, checkpointing: bool,
           micro_batch: int) -> tuple[Call, ...]:
    """The aten calls of one micro-batch of a one-block model, on fake tensors (fp32: a bf16 run's calls have the
    same shapes; the regressors' dtype key prices them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from trainers import lm

    cfg = lm.Config(d_model=d_model, n_layers=1, n_heads=n_heads, mlp_ratio=mlp_ratio, tie_embeddings=tied,
                    activation_checkpointing=checkpointing)
    recorder = Recorder()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = lm.LanguageModel(cfg, vocab).train()
        ids = torch.randint(vocab, (micro_batch, seq_len))
        recorder.watch(model.blocks[0])
        total = torch.zeros(())
        with recorder:
            loss, _ = lm.train_step(model, {"input_ids": ids, "labels": ids}, cfg, 0)
            recorder.phase = "bwd"
            (loss / 2).backward()  # launch.TorchEngine: the loss over the accumulation count, its running sum
            total += loss.detach().float()
    return tuple(recorder.calls)


def calls(sizes: tuple, micro_batch: int) -> tuple[Call, ...]:
    """The calls at any micro-batch size, from the traces at 1 and 2 (every shape and integer argument affine)."""
    if micro_batch <= 2:
        return record(*sizes, micro_batch)
    one, two = record(*sizes, 1), record(*sizes, 2)
    if [call[0] for call in one] != [call[0] for call in two]:  # a size-dependent kernel choice: trace this size
        return record(*sizes, micro_batch)
    grow = micro_batch - 1

    def at(a: object, b: object) -> object:
        if isinstance(a, tuple):
            return tuple(at(x, y) for x, y in zip(a, b))
        return a + (b - a) * grow if isinstance(a, int) else a

    return tuple(at(x, y) for x, y in zip(one, two))


def traced_ops(w: Workload) -> tuple[Op, ...]:
    """The operators of one micro-batch of `w` (tp = 1), parts as in ops.py: per block (layer_*), the first stage's
    embedding (first_*) and the last stage's head (last_*); calls of the same kind, shape and part merged."""
    return _merged((w.d_model, w.n_heads, w.mlp_ratio, w.vocab, w.seq_len, w.tie_embeddings, w.checkpointing),
                   w.micro_batch)


@lru_cache(maxsize=256)
def _merged(sizes: tuple, micro_batch: int) -> tuple[Op, ...]:
    merged: Counter[tuple[str, tuple[int, ...], str]] = Counter()
    for name, phase, inputs, outputs, ints, region in calls(sizes, micro_batch):
        kind, shape = _classify(name, inputs, outputs, ints)
        merged[kind, shape, f"{'layer' if region == 'block' else region}_{phase}"] += 1
    return tuple(Op(kind, shape, count, part) for (kind, shape, part), count in merged.items())


def _classify(name: str, inputs: tuple, outputs: tuple, ints: tuple) -> tuple[str, tuple[int, ...]]:
    """(kind, ops.FEATURES shape) of one recorded call; ("dispatch", ()) for a call without a kernel of its own."""
    kind = KIND_OF.get(name)
    if kind is not None:
        return kind, _shape(kind, inputs, ints)
    if name.startswith("view:") or name in NO_KERNEL | INSIDE_OTHERS or not outputs:
        return "dispatch", ()
    moved = sum(math.prod(s) for s in inputs) + sum(math.prod(s) for s in outputs)
    return "add", (max(1, round(moved / 3)),)  # `add` reads two elements and writes one


def _shape(kind: str, inputs: tuple[tuple[int, ...], ...], ints: tuple[int, ...]) -> tuple[int, ...]:
    """ops.FEATURES[kind] from the call's input shapes (and integer arguments)."""
    if kind == "gemm":
        (m, k), (_, n) = inputs[-2:]
        return m, n, k
    if kind.startswith("sdpa"):
        *batch, length, head_dim = inputs[0]
        return math.prod(batch), length, head_dim
    if kind.startswith(("layernorm", "cross_entropy")):
        *rows, width = inputs[0]
        return math.prod(rows), width
    if kind.startswith("gelu"):
        return (math.prod(inputs[0]),)
    if kind == "embedding_fwd":
        (vocab, width), ids = inputs
        return math.prod(ids), width, vocab
    grad, ids = inputs[:2]  # embedding_dense_backward(grad, indices, num_weights, ...)
    return math.prod(ids), grad[-1], ints[0]
