"""WCL: Weakly Supervised Contrastive Learning (Zheng, Wang, You, Qian, Zhang, Wang, Xu; ICCV 2021).

Spec: ../shared/papers/methods_ssl.md section 5. Official code: github.com/mingkai-zheng/WCL (= KyleZheng1997/WCL),
network/wcl.py and wcl.py.

One backbone f and two projection heads g and phi on its features h = f(x), each
Linear(D, hidden)-BN-ReLU-Linear(hidden, hidden)-BN-ReLU-Linear(hidden, out). Per view v of a batch of N images
(gathered over ranks):

    L_NCE   = SimCLR's NT-Xent over the 2N unit embeddings normalize(g(h)) at tau, self-similarity left out
    Z^v     = normalize(phi(h^v))                                                        (N, out)
    nn^v_i  = argmax_j (Z^v Z^vT - 2I)_ij                    1-nearest-neighbour graph, symmetrised (i -- nn^v_i)
    M^v_ij  = 1[i, j in the same connected component]        weak labels
    SupCon(z, Z; M)_i = -1/|P_i| sum_{j in P_i} log( exp(z_i.Z_j / tau) / sum_{k != i} exp(z_i.Z_k / tau) ),
                        P_i = {j != i : M_ij}
    L_graph = 1/2 [ SupCon(z^1, Z^1; M^2) + SupCon(z^2, Z^2; M^1) ]          cross-view mask swap
    L       = lambda_nce L_NCE + lambda_graph L_graph (+ lambda_local L_local with the K-NN multi-crop below)

Paper symbol -> Config field:
    backbone f (ResNet-50)                                        -> arch
    heads g, phi: 2048-4096-4096-256 (official code; the paper and
      the README's "slightly worse" setting: hidden 2048, out 128)  -> hidden_dim, out_dim
    tau (0.1 in both losses; official `t`)                        -> tau
    loss weights (1 : 1)                                          -> lambda_nce, lambda_graph
    SyncBN over the whole model (official)                        -> sync_bn
    K-NN based multi-crop (paper only, see below)                 -> knn_multicrop, knn_k, lambda_local
The optimizer lives in the experiment's `optim:` block (official: LARS trust 0.001 around SGD momentum 0.9,
lr 0.075 sqrt(batch), wd 1e-6, 10 warm-up epochs then cosine). The official code exempts BN and bias parameters
from weight decay and LARS; the orchestrator's default parameter groups do exactly that, so there is no
`param_groups` here.

Online linear classifier (the project's representation-method convention): `encoder.head` is trained with
cross-entropy on the detached features of both global views and reported as `online_acc`; no gradient reaches the
backbone. Labels -1 (STL-10's unlabeled extras) are left out of it. The official linear evaluation (80 epochs, SGD
Nesterov lr 3.2, batch 4096) is a later trainers/linear_probe.py run on this checkpoint. Diagnostics: `nce_acc` (top-1
of the instance discrimination, as the official log), `component_size` (images per weak-label component) and
`weak_label_precision` (share of weak-positive pairs with equal true labels; the true labels touch nothing else).

Weak labels: pure torch, not scipy. Each node of a 1-NN graph has exactly one out-edge, so the graph is a functional
graph: every connected component of its symmetrisation holds exactly one cycle (a mutual-nearest pair, or a longer
cycle under exact ties) that all its nodes reach by following nn. `connected_components` follows nn by pointer
doubling (log2 N gathers) while tracking the smallest node seen, and labels each node with the smallest node of the
cycle it reaches: the same partition as scipy's connected_components (the test checks this), computed on the
device with no host round trip or sync per step. Every rank computes the components from the same gathered
embeddings and keeps its own rows; the official code computes them on rank 0 and scatters the rows.

As in the official code, each view goes through the backbone and the heads in its own pass (BN statistics per view).
Gradients across ranks, as in the official code: the NT-Xent keys of other ranks carry no gradient, this rank's do.
In L_graph no key carries gradient, this rank's included (the official `concat_all_gather` runs under
torch.no_grad()): only the queries z^v do.

K-NN multi-crop (`knn_multicrop`, with the "multi_crop" views: x_global (B,2,C,S,S), x_local (B,k,C,s,s)). The paper
describes "a K-Nearest Neighbor based multi-crop strategy to expand the number of positive samples"; it is not in the
official code and its details are unknown. Our reading, implemented here: the two global crops give L_NCE and
L_graph as above; each local crop's z = normalize(phi(f(x_local))) is contrasted (SupCon at tau, no self term)
against the 2N global phi-embeddings of both views, and its positives are both global views of its own image and of
that image's knn_k nearest neighbours, the neighbours ranked by the image similarity 1/2 (Z^1 Z^1T + Z^2 Z^2T)
(self excluded; knn_k is capped at N - 1). L_local is the mean over all local crops; the local crops enter no other
loss and go through the backbone in one pass of their own. The keys carry no gradient, as in L_graph. knn_k = 1 and
lambda_local = 1 by default (our choices: the paper's weak labels trust only the first neighbour; the weight of
L_graph).

Differences from the official code, with reasons:
- The weak-augmentation warm-up (MoCo-v2 augmentation for the first 10 epochs, SimCLR augmentation after) is not
  implemented: the orchestrator's data pipeline cannot switch views during a run. The experiment files use the
  "two_crop" views throughout, whose pipeline (crop scale 0.2-1, jitter 0.4, grayscale 0.2, blur 0.5) is the
  MoCo-v2 augmentation of the official warm-up, not the stronger SimCLR augmentation of the later epochs.
- Self-similarities are masked with -inf and the sums taken with logsumexp, where the official code removes the
  diagonal columns and sums exp(logits): the same values, numerically safer.
- SyncBN is torch's SyncBatchNorm, which under DDP needs GPU tensors: set sync_bn false for CPU runs.
- Under the orchestrator's bf16 autocast the backbone and heads run in bf16, but the similarities, the losses and the
  1-NN graph are computed in fp32 (the official code trains in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainers import supervised
from trainers._common.backbones import Classifier, build_backbone, check_arch
from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers._common.dist import all_gather_cat


@dataclass
class Config:
    """The official ImageNet code: ResNet-50, heads 2048-4096-4096-256, tau 0.1, L_NCE : L_graph = 1 : 1, SyncBN."""

    arch: str = "resnet50"  # backbone f: resnet50 (ImageNet); experiments use wrn28_2 (CIFAR, STL-10), small_cnn
    hidden_dim: int = 4096  # hidden width of g and phi (official 4096; paper 2048)
    out_dim: int = 256  # embedding size of g and phi (official 256; paper 128)
    tau: float = 0.1  # temperature of L_NCE, L_graph and L_local
    lambda_nce: float = 1.0  # weight of L_NCE (head g)
    lambda_graph: float = 1.0  # weight of L_graph (head phi)
    sync_bn: bool = True  # SyncBatchNorm everywhere (official); needs GPUs under DDP
    knn_multicrop: bool = False  # K-NN multi-crop (paper only; our reading, module docstring); "multi_crop" views
    knn_k: int = 1  # neighbours whose global views are positives of a local crop (unknown in the paper; our choice)
    lambda_local: float = 1.0  # weight of L_local (our choice: the weight of L_graph)


TINY = Config(arch="small_cnn", hidden_dim=32, out_dim=16, sync_bn=False)


def projection_head(d_in: int, hidden: int, out: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear-BN-ReLU-Linear, as the official ProjectionHead: (B, d_in) -> (B, out)."""
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out),
    )


class WCL(nn.Module):
    """`encoder`: backbone + online linear classifier; `g`: instance-discrimination head; `phi`: weak-label head."""

    def __init__(self, encoder: Classifier, hidden_dim: int, out_dim: int):
        super().__init__()
        d = encoder.num_features
        self.encoder = encoder
        self.g = projection_head(d, hidden_dim, out_dim)
        self.phi = projection_head(d, hidden_dim, out_dim)


def build(cfg: Config, info: DataInfo) -> nn.Module:
    model = WCL(build_backbone(cfg.arch, info.in_channels, info.num_classes), cfg.hidden_dim, cfg.out_dim)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if cfg.sync_bn else model


def check(cfg: Config) -> None:
    check_arch(cfg.arch)
    if cfg.knn_k < 1:
        raise ConfigError("knn_k", "an integer >= 1", cfg.knn_k)
    if cfg.tau <= 0:
        raise ConfigError("tau", "a temperature > 0", cfg.tau)


# ---------------------------------------------------------------------------------------------- pure functions


def similarity_logits(q: torch.Tensor, keys: torch.Tensor, exclude: torch.Tensor, tau: float) -> torch.Tensor:
    """q (Q, d) . keys (M, d) / tau -> (Q, M), with -inf where `exclude` (Q, M) is True (a query's own key)."""
    return (q @ keys.T / tau).masked_fill(exclude, float("-inf"))


def nt_xent(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """SimCLR's NT-Xent: logits (Q, M) from `similarity_logits`, positive (Q,) the column of each query's other
    view -> the mean over queries of -log softmax(logits)[positive]."""
    return F.cross_entropy(logits, positive)


def sup_con(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Supervised contrastive loss: logits (Q, M) (-inf where excluded), positives (Q, M) bool (none excluded, at
    least one per row) -> the mean over queries of -(mean over the positives of log softmax(logits))."""
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)  # (Q, M)
    per_query = log_prob.masked_fill(~positives, 0.0).sum(dim=1) / positives.sum(dim=1)  # (Q,)
    return -per_query.mean()


def nearest_neighbours(sim: torch.Tensor) -> torch.Tensor:
    """(N, N) similarities -> (N,) each node's nearest other node: argmax of sim - 2I (self-similarity <= 1)."""
    return (sim - 2.0 * torch.eye(len(sim), device=sim.device, dtype=sim.dtype)).argmax(dim=1)


def connected_components(nn_index: torch.Tensor) -> torch.Tensor:
    """(N,) out-edges i -> nn_index[i] of a functional graph -> (N,) labels of the components of its symmetrisation.

    After k doublings, jump = nn^(2^k) and low[i] = min(i, nn(i), ..., nn^(2^k)(i)). Once 2^k >= N - 1, jump[i] lies
    on the cycle of i's component and low[jump[i]] is the smallest node of that cycle: one label per component.
    """
    jump = nn_index  # (N,)
    low = torch.minimum(torch.arange(len(nn_index), device=nn_index.device), nn_index)  # (N,)
    for _ in range(max(len(nn_index) - 1, 1).bit_length()):
        low = torch.minimum(low, low[jump])
        jump = jump[jump]
    return low[jump]


def knn_positives(sim: torch.Tensor, k: int) -> torch.Tensor:
    """(N, N) image similarities -> (N, N) bool: each image itself and its k nearest other images (k capped at N-1)."""
    n = len(sim)
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    nearest = (sim - 2.0 * eye).topk(min(k, n - 1), dim=1).indices  # (N, k)
    return eye.scatter(1, nearest, True)


# ---------------------------------------------------------------------------------------------- the step


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _embed(head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """(B, D) features -> (B, out) unit embeddings in fp32."""
    return F.normalize(head(h).float(), dim=1)


def _with_own_rows(z: torch.Tensor, offset: int) -> torch.Tensor:
    """(B, d) -> (N, d) gathered over ranks; this rank's rows are z itself (with gradient), the others' are not."""
    gathered = all_gather_cat(z.detach())
    return torch.cat([gathered[:offset], z, gathered[offset + len(z):]])


def instance_loss(z: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor, tau: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """L_NCE over the 2N views: z (B, d) per view of head g, rows (B,) this rank's rows of the gathered batch (the
    first is rank * B) -> the loss and the instance-discrimination top-1 accuracy."""
    offset = _rank() * len(rows)
    keys = torch.cat([_with_own_rows(z[0], offset), _with_own_rows(z[1], offset)])  # (2N, d)
    n = len(keys) // 2
    self_index, positive = torch.cat([rows, n + rows]), torch.cat([n + rows, rows])  # (2B,)
    exclude = F.one_hot(self_index, 2 * n).bool()  # (2B, 2N)
    logits = similarity_logits(torch.cat(z), keys, exclude, tau)  # (2B, 2N)
    return nt_xent(logits, positive), (logits.argmax(dim=1) == positive).float().mean()


@torch.no_grad()
def weak_labels(z_all: torch.Tensor) -> torch.Tensor:
    """(N, d) unit embeddings of one view -> (N,) component labels of their symmetrised 1-NN graph."""
    return connected_components(nearest_neighbours(z_all @ z_all.T))


def _graph_positives(labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(N,) weak labels, this rank's rows (B,) -> (B, N) bool: same component, self excluded."""
    same = labels[rows, None] == labels[None, :]  # (B, N)
    return same & ~F.one_hot(rows, len(labels)).bool()


def graph_loss(z: tuple[torch.Tensor, torch.Tensor], z_all: tuple[torch.Tensor, torch.Tensor],
               labels: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor, tau: float) -> torch.Tensor:
    """L_graph: view 1's queries z[0] (B, d) against view 1's keys z_all[0] (N, d) with view 2's weak labels, and the
    other way round. rows (B,): the queries' own rows of the keys. Only the queries carry gradient (official)."""
    exclude = F.one_hot(rows, len(z_all[0])).bool()  # (B, N)
    loss_1 = sup_con(similarity_logits(z[0], z_all[0].detach(), exclude, tau), _graph_positives(labels[1], rows))
    loss_2 = sup_con(similarity_logits(z[1], z_all[1].detach(), exclude, tau), _graph_positives(labels[0], rows))
    return (loss_1 + loss_2) / 2


def local_loss(z_local: torch.Tensor, z_all: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor, knn_k: int,
               tau: float) -> torch.Tensor:
    """L_local (K-NN multi-crop, our reading): z_local (B*k, d) the local crops of this rank's images rows (B,),
    image-major, against the global keys z_all (N, d) of both views (no gradient); positives: both global views of
    the crop's own image and of that image's knn_k nearest neighbours."""
    keys = torch.cat(z_all).detach()  # (2N, d): view 1, then view 2
    with torch.no_grad():
        images = knn_positives((z_all[0] @ z_all[0].T + z_all[1] @ z_all[1].T) / 2, knn_k)  # (N, N)
    crops_per_image = len(z_local) // len(rows)
    positives = images[rows].repeat_interleave(crops_per_image, dim=0).repeat(1, 2)  # (B*k, 2N)
    return sup_con(z_local @ keys.T / tau, positives)


def online_classifier(head: nn.Linear, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy of the linear head on detached features h (B, D); labels -1 are left out."""
    logits = head(h.detach()).float()  # (B, C)
    labelled = y >= 0
    count = labelled.sum().clamp(min=1)
    loss = (F.cross_entropy(logits, y.clamp(min=0), reduction="none") * labelled).sum() / count
    return loss, ((logits.argmax(dim=1) == y) & labelled).sum() / count


def _count_components(labels: torch.Tensor) -> torch.Tensor:
    """(N,) labels of `connected_components` -> their number: each component is labelled by one of its nodes."""
    return (labels == torch.arange(len(labels), device=labels.device)).sum()


@torch.no_grad()
def weak_label_precision(labels: torch.Tensor, y_all: torch.Tensor) -> torch.Tensor:
    """Share of weak-label positive pairs (i != j, both labelled) whose true labels agree (a diagnostic only)."""
    pairs = (labels[:, None] == labels[None, :]).fill_diagonal_(False)  # (N, N)
    pairs &= (y_all[:, None] >= 0) & (y_all[None, :] >= 0)
    agree = pairs & (y_all[:, None] == y_all[None, :])
    return agree.sum() / pairs.sum().clamp(min=1)


def _weak_label_metrics(labels: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean component size and precision of the weak labels of both views; y (B,) this rank's true labels."""
    y_all = all_gather_cat(y)  # (N,)
    components = _count_components(labels[0]) + _count_components(labels[1])
    precision = weak_label_precision(labels[0], y_all) + weak_label_precision(labels[1], y_all)
    return {"component_size": 2.0 * len(y_all) / components, "weak_label_precision": precision / 2}


def _global_views(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The two global crops (B, C, S, S) of "two_crop" or "multi_crop" batches."""
    if "x_global" in batch:
        return batch["x_global"][:, 0], batch["x_global"][:, 1]
    return batch["x1"], batch["x2"]


def _losses(z_g: tuple[torch.Tensor, torch.Tensor], z: tuple[torch.Tensor, torch.Tensor], z_local: torch.Tensor | None,
            y: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_NCE, L_graph and (with local crops) L_local from the unit embeddings of heads g and phi, and diagnostics."""
    rows = _rank() * len(y) + torch.arange(len(y), device=y.device)  # (B,) this rank's rows of the gathered batch
    loss_nce, nce_acc = instance_loss(z_g, rows, cfg.tau)
    z_all = (all_gather_cat(z[0].detach()), all_gather_cat(z[1].detach()))  # (N, out) each, no gradient
    labels = (weak_labels(z_all[0]), weak_labels(z_all[1]))  # (N,) each
    loss_graph = graph_loss(z, z_all, labels, rows, cfg.tau)
    loss = cfg.lambda_nce * loss_nce + cfg.lambda_graph * loss_graph
    metrics = {"loss_nce": loss_nce.detach(), "loss_graph": loss_graph.detach(), "nce_acc": nce_acc.detach(),
               **_weak_label_metrics(labels, y)}
    if z_local is not None:
        loss_local = local_loss(z_local, z_all, rows, cfg.knn_k, cfg.tau)
        loss = loss + cfg.lambda_local * loss_local
        metrics["loss_local"] = loss_local.detach()
    return loss, metrics


def train_step(model: nn.Module, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x1, x2 = _global_views(batch)
    h1, h2 = model.encoder.features(x1), model.encoder.features(x2)  # (B, D) each; one pass per view, as official
    z_g = (_embed(model.g, h1), _embed(model.g, h2))  # (B, out) each
    z = (_embed(model.phi, h1), _embed(model.phi, h2))  # (B, out) each
    z_local = None
    if cfg.knn_multicrop:
        z_local = _embed(model.phi, model.encoder.features(batch["x_local"].flatten(0, 1)))  # (B*k, out), image-major
    with torch.autocast(x1.device.type, enabled=False):  # similarities at tau 0.1 and the 1-NN graph in fp32
        loss, metrics = _losses(z_g, z, z_local, batch["y"], cfg)
    loss_online, online_acc = online_classifier(model.encoder.head, torch.cat([h1, h2]), batch["y"].repeat(2))
    metrics.update(loss_online=loss_online.detach(), online_acc=online_acc.detach())
    return loss + loss_online, metrics


def eval_step(model: nn.Module, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    """The online linear classifier on the backbone's features (supervised's eval)."""
    return supervised.eval_step(model.encoder, batch, cfg)


SPEC = TrainerSpec(
    name="wcl",
    paper="WCL: Weakly Supervised Contrastive Learning (Zheng et al., ICCV 2021)",
    Config=Config,
    TINY=TINY,
    views="two_crop",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    check=check,
)
