"""VQ-Logits output layer (Shao et al., "VQ-Logits: Compressing the Output Bottleneck of Large Language Models
via Vector Quantisation", arXiv 2505.10202), with an exact cross-entropy that never builds V-sized logits.

The full V x d output embedding is replaced by a learnable codebook C in R^{K x d} (K << V) and a fixed mapping
M: {0..V-1} -> {0..K-1}, stored as a buffer and never trained (as in the released code). With hidden states h:

    codebook logits   L_c = h C^T                              (..., K)
    scattered logits  L_v[..., i] = L_c[..., M(i)]             (..., V)   (the official code builds this)
    loss              cross-entropy of softmax(L_v) over V

Every token of cluster S_j = {i : M(i) = j} receives the same logit, so with cluster sizes |S_j|

    log Z      = log sum_i exp(L_v[i]) = logsumexp_j (L_c[j] + log |S_j|)     over non-empty clusters
    log P(v)   = L_c[M(v)] - log Z                                             (uniform within a cluster)
    NLL(y)     = log Z - L_c[M(y)]

`vq_cross_entropy` evaluates this in O(K) per token; empty clusters have log |S_j| = -inf and drop out of the
logsumexp with zero gradient. `vq_cross_entropy_reference` is the official scatter-then-softmax path, kept for tests
and timing. The mapping is initialised by k-means on pre-trained output embeddings (whose centroids also
initialise C, the official `kmeans_on_C_init`), by a balanced random assignment, or by contiguous blocks of ids.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import Tensor, nn

REDUCTIONS = ("mean", "sum", "none")
MAPPING_INITS = ("contiguous", "random")
CODEBOOK_STD = 0.02  # N(0, std^2) initial codebook without k-means; the official std 1 trains far worse
# (trainers/lm.py Config, benchmarks/results/lm_vq.md: perplexity 2426 vs 643 at K = 1024, mean of 2 seeds)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, otherwise the input's own float type (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def log_partition(cluster_logits: Tensor, cluster_sizes: Tensor) -> Tensor:
    """log Z = logsumexp_j (L_c[j] + log |S_j|) for L_c (..., K) and |S_j| (K,); returns (...,).

    Empty clusters get log 0 = -inf, whose exp and gradient are exactly 0. Computed in float32 or wider.
    """
    dtype = _compute_dtype(cluster_logits.dtype)
    log_sizes = cluster_sizes.to(dtype).log()  # (K,), -inf where |S_j| = 0
    return torch.logsumexp(cluster_logits.to(dtype) + log_sizes, dim=-1)  # (...,)


def _reduce(nll: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """Reduce per-token NLL (...,) like F.cross_entropy: 'mean' divides by the number of non-ignored targets."""
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / valid.sum()


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def vq_cross_entropy(h: Tensor, codebook: Tensor, mapping: Tensor, cluster_sizes: Tensor, targets: Tensor,
                     ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Exact cross-entropy over the full vocabulary from the K codebook logits, never building (..., V) logits.

    h (..., d), codebook C (K, d), mapping M (V,) long, cluster_sizes |S_j| (K,), targets y (...,) long.
    NLL(y) = logsumexp_j (L_c[j] + log |S_j|) - L_c[M(y)]. Targets equal to ignore_index give 0 and are left out
    of the 'mean' (all targets ignored gives NaN, as F.cross_entropy does). The matmul runs in the input dtype;
    the logsumexp and the loss are float32 (float64 for float64 inputs).
    """
    return cluster_cross_entropy(F.linear(h, codebook), mapping, cluster_sizes, targets, ignore_index, reduction)


def cluster_cross_entropy(cluster_logits: Tensor, mapping: Tensor, cluster_sizes: Tensor, targets: Tensor,
                          ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """`vq_cross_entropy` from codebook logits L_c (..., K) already computed (e.g. by `VQLogits.forward`, which
    is where ZeRO-3 gathers the codebook)."""
    _check_reduction(reduction)
    log_z = log_partition(cluster_logits, cluster_sizes)  # (...,)
    valid = targets != ignore_index  # (...,)
    target_codes = mapping[targets.masked_fill(~valid, 0)]  # (...,) M(y)
    target_logits = cluster_logits.gather(-1, target_codes.unsqueeze(-1)).squeeze(-1).to(log_z.dtype)  # (...,)
    nll = (log_z - target_logits).masked_fill(~valid, 0.0)  # (...,)
    return _reduce(nll, valid, reduction)


def vq_cross_entropy_reference(h: Tensor, codebook: Tensor, mapping: Tensor, cluster_sizes: Tensor,
                               targets: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """The official path: scatter L_v = L_c[..., M] (..., V), then F.cross_entropy. Materialises V-sized logits.

    cluster_sizes is unused (the scatter repeats each codebook logit |S_j| times); it keeps the signature shared.
    """
    _check_reduction(reduction)
    vocab_logits = F.linear(h, codebook)[..., mapping]  # (..., V)
    flat = F.cross_entropy(vocab_logits.reshape(-1, mapping.numel()), targets.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)  # (N,) or ()
    return flat.reshape(targets.shape) if reduction == "none" else flat


def cluster_sizes(mapping: Tensor, num_codes: int) -> Tensor:
    """|S_j| = #{i : M(i) = j} for mapping M (V,); returns (K,) long, zeros for empty clusters."""
    if mapping.numel() and int(mapping.max()) >= num_codes:
        raise ValueError(f"mapping has code {int(mapping.max())} >= num_codes={num_codes}")
    return torch.bincount(mapping, minlength=num_codes)


def kmeans_mapping(embeddings: Tensor, num_codes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """k-means on (pre-trained) output embeddings (V, d): centroids initialise C (K, d), labels become M (V,).

    sklearn KMeans(n_clusters=K, n_init="auto", random_state=seed), as the official `kmeans_on_C_init`. The
    centroids come back in the embeddings' dtype and device; the mapping is long on the same device.
    """
    points = embeddings.detach().to("cpu", _compute_dtype(embeddings.dtype)).numpy()  # (V, d)
    kmeans = KMeans(n_clusters=num_codes, n_init="auto", random_state=seed).fit(points)
    centroids = torch.from_numpy(kmeans.cluster_centers_).to(embeddings.device, embeddings.dtype)  # (K, d)
    mapping = torch.from_numpy(kmeans.labels_.astype(np.int64)).to(embeddings.device)  # (V,)
    return centroids, mapping


def random_mapping(vocab_size: int, num_codes: int, seed: int = 0) -> Tensor:
    """Balanced random mapping M (V,): a seeded random permutation of the ids, assigned to codes round-robin.

    Membership is random, but sizes are floor(V/K) or ceil(V/K), so every cluster is non-empty when V >= K
    (unlike i.i.d. uniform codes, which leave about K e^{-V/K} clusters empty).
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(vocab_size, generator=generator)  # (V,) token ids in random order
    mapping = torch.empty(vocab_size, dtype=torch.long)
    mapping[order] = torch.arange(vocab_size) % num_codes
    return mapping


def contiguous_mapping(vocab_size: int, num_codes: int) -> Tensor:
    """Contiguous blocks M(i) = floor(i K / V) (V,): non-decreasing in i, block sizes differ by at most one."""
    return torch.arange(vocab_size) * num_codes // vocab_size


class VQLogits(nn.Module):
    """Output layer with a learnable codebook C (K, d) and a fixed token -> code mapping M (V,) buffer.

    Without a given mapping, M is built by `init` ("contiguous" or "random", the latter seeded by `seed`); the
    codebook is drawn from N(0, codebook_std^2) with the global RNG. `from_embeddings` builds both by k-means
    instead (the centroids are the codebook).
    """

    def __init__(self, d_model: int, vocab_size: int, num_codes: int, mapping: Tensor | None = None,
                 init: str = "contiguous", seed: int = 0, codebook_std: float = CODEBOOK_STD) -> None:
        super().__init__()
        if mapping is None:
            mapping = self._initial_mapping(vocab_size, num_codes, init, seed)
        if mapping.shape != (vocab_size,):
            raise ValueError(f"mapping must have shape ({vocab_size},), got {tuple(mapping.shape)}")
        self.codebook = nn.Parameter(torch.empty(num_codes, d_model))  # (K, d)
        nn.init.normal_(self.codebook, std=codebook_std)
        self.register_buffer("mapping", mapping.long())  # (V,)
        self.register_buffer("cluster_sizes", cluster_sizes(self.mapping, num_codes))  # (K,)

    @staticmethod
    def _initial_mapping(vocab_size: int, num_codes: int, init: str, seed: int) -> Tensor:
        if init == "contiguous":
            return contiguous_mapping(vocab_size, num_codes)
        if init == "random":
            return random_mapping(vocab_size, num_codes, seed)
        raise ValueError(f"init must be one of {MAPPING_INITS}, got {init!r}")

    @classmethod
    def from_embeddings(cls, embeddings: Tensor, num_codes: int, seed: int = 0) -> VQLogits:
        """k-means on pre-trained output embeddings (V, d): centroids initialise C, labels become M."""
        centroids, mapping = kmeans_mapping(embeddings, num_codes, seed)
        vocab_size, d_model = embeddings.shape
        layer = cls(d_model, vocab_size, num_codes, mapping=mapping.cpu())
        with torch.no_grad():
            layer.codebook.copy_(centroids)
        return layer

    def cluster_logits(self, h: Tensor) -> Tensor:
        """L_c = h C^T: (..., d) -> (..., K), through `forward` (so ZeRO-3's hooks gather the codebook)."""
        return self(h)

    def forward(self, h: Tensor) -> Tensor:
        """The codebook logits L_c (..., K); use `loss` for training and `log_probs` for per-token scores."""
        return F.linear(h, self.codebook)

    def loss(self, h: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
        """Exact full-vocabulary cross-entropy of targets (...,) given h (..., d) (`vq_cross_entropy`)."""
        return cluster_cross_entropy(self(h), self.mapping, self.cluster_sizes, targets, ignore_index, reduction)

    def log_probs(self, h: Tensor) -> Tensor:
        """Exact log P(v) = L_c[M(v)] - log Z for every token: (..., d) -> (..., V), float32 or wider.

        This materialises V-sized output (meant for generation and evaluation, not the training loss).
        """
        cluster_logits = self.cluster_logits(h)  # (..., K)
        log_z = log_partition(cluster_logits, self.cluster_sizes)  # (...,)
        cluster_log_probs = cluster_logits.to(log_z.dtype) - log_z.unsqueeze(-1)  # (..., K)
        return cluster_log_probs[..., self.mapping]  # (..., V)
