"""VQ-Logits: the O(K) exact cross-entropy equals the official scatter-over-V path, and the mappings are sound."""

from __future__ import annotations

import pytest
import torch

from lab_kernels.vq_logits import (
    CODEBOOK_STD,
    VQLogits,
    cluster_sizes,
    contiguous_mapping,
    kmeans_mapping,
    random_mapping,
    vq_cross_entropy,
    vq_cross_entropy_reference,
)

V, K, D = 97, 12, 16


def problem(mapping: torch.Tensor, dtype: torch.dtype = torch.float64, seed: int = 0) -> dict:
    """Random h (2, 5, D), codebook (K, D) and targets (2, 5) with two ignored positions."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (2, 5), generator=generator)
    targets[0, 1] = targets[1, 4] = -100
    return {
        "h": torch.randn(2, 5, D, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(),
        "codebook": torch.randn(K, D, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(),
        "mapping": mapping,
        "cluster_sizes": cluster_sizes(mapping, K),
        "targets": targets,
    }


def uneven_mapping() -> torch.Tensor:
    mapping = torch.randint(0, K, (V,), generator=torch.Generator().manual_seed(1))
    assert cluster_sizes(mapping, K).unique().numel() > 1
    return mapping


def grads(loss: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.autograd.grad(loss, (inputs["h"], inputs["codebook"]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_matches_reference(reduction: str) -> None:
    inputs = problem(uneven_mapping())
    loss = vq_cross_entropy(**inputs, reduction=reduction)
    expected = vq_cross_entropy_reference(**inputs, reduction=reduction)
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_gradients_match_reference() -> None:
    inputs = problem(uneven_mapping())
    for actual, expected in zip(grads(vq_cross_entropy(**inputs), inputs),
                                grads(vq_cross_entropy_reference(**inputs), inputs)):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_empty_clusters_are_finite_and_match_reference() -> None:
    mapping = 2 * torch.randint(0, K // 2, (V,), generator=torch.Generator().manual_seed(2))  # odd codes unused
    inputs = problem(mapping)
    assert (inputs["cluster_sizes"][1::2] == 0).all()
    loss = vq_cross_entropy(**inputs)
    expected = vq_cross_entropy_reference(**inputs)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for actual, reference in zip(grads(loss, inputs), grads(expected, inputs)):
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, reference, rtol=1e-10, atol=1e-12)


def test_log_probs_normalised_uniform_within_clusters_and_consistent_with_loss() -> None:
    layer = VQLogits(D, V, K, mapping=uneven_mapping()).double()
    inputs = problem(layer.mapping)
    h, targets = inputs["h"], inputs["targets"]
    log_probs = layer.log_probs(h)  # (2, 5, V)
    assert log_probs.shape == (2, 5, V)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, 5, dtype=torch.float64))
    for code in range(K):
        members = log_probs[..., layer.mapping == code]
        torch.testing.assert_close(members, members[..., :1].expand_as(members))
    valid = targets != -100
    target_log_probs = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(layer.loss(h, targets, reduction="none")[valid], -target_log_probs[valid])


def test_layer_buffers_and_initialisations() -> None:
    layer = VQLogits(D, V, K, init="random", seed=3)
    assert [name for name, _ in layer.named_parameters()] == ["codebook"]
    assert set(layer.state_dict()) == {"codebook", "mapping", "cluster_sizes"}
    assert torch.equal(layer.mapping, random_mapping(V, K, seed=3))
    assert torch.equal(VQLogits(D, V, K).mapping, contiguous_mapping(V, K))
    assert layer(torch.randn(3, D)).shape == (3, K)
    with pytest.raises(ValueError):
        VQLogits(D, V, K, init="learned")


@pytest.mark.parametrize("std", [None, 0.02, 1.0])
def test_codebook_is_drawn_at_the_given_std(std: float | None) -> None:
    torch.manual_seed(0)
    layer = VQLogits(64, V, 256, **({} if std is None else {"codebook_std": std}))  # 16k draws
    expected = CODEBOOK_STD if std is None else std
    assert layer.codebook.std().item() == pytest.approx(expected, rel=0.03)
    assert abs(layer.codebook.mean().item()) < 0.03 * expected


def separated_embeddings(groups: int = 4, per_group: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight blobs around far-apart centres: (groups * per_group, D) embeddings and their true groups."""
    generator = torch.Generator().manual_seed(4)
    centres = 10.0 * torch.randn(groups, D, generator=generator)
    truth = torch.arange(groups).repeat_interleave(per_group)
    return centres[truth] + 0.01 * torch.randn(truth.numel(), D, generator=generator), truth


def test_kmeans_mapping_recovers_separated_clusters() -> None:
    embeddings, truth = separated_embeddings()
    centroids, mapping = kmeans_mapping(embeddings, 4, seed=0)
    assert centroids.shape == (4, D) and mapping.shape == truth.shape and mapping.dtype == torch.long
    same_truth = truth[:, None] == truth[None, :]
    same_code = mapping[:, None] == mapping[None, :]
    assert torch.equal(same_code, same_truth)
    for code in range(4):
        torch.testing.assert_close(centroids[code], embeddings[mapping == code].mean(0), rtol=0, atol=1e-4)


def test_layer_from_embeddings_uses_centroids_and_labels() -> None:
    embeddings, _ = separated_embeddings()
    centroids, mapping = kmeans_mapping(embeddings, 4, seed=0)
    layer = VQLogits.from_embeddings(embeddings, 4, seed=0)
    assert torch.equal(layer.mapping, mapping)
    torch.testing.assert_close(layer.codebook.detach(), centroids)
    assert layer.cluster_sizes.tolist() == [25] * 4


def test_random_mapping_covers_every_cluster_and_is_seeded() -> None:
    mapping = random_mapping(V, K, seed=5)
    sizes = cluster_sizes(mapping, K)
    assert mapping.shape == (V,) and (sizes > 0).all() and sizes.max() - sizes.min() <= 1
    assert torch.equal(mapping, random_mapping(V, K, seed=5))
    assert not torch.equal(mapping, random_mapping(V, K, seed=6))


@pytest.mark.parametrize(("vocab_size", "num_codes"), [(97, 12), (96, 12), (12, 12), (1000, 7)])
def test_contiguous_mapping_is_balanced_monotone_blocks(vocab_size: int, num_codes: int) -> None:
    mapping = contiguous_mapping(vocab_size, num_codes)
    sizes = cluster_sizes(mapping, num_codes)
    assert mapping[0] == 0 and mapping[-1] == num_codes - 1
    assert (mapping.diff() >= 0).all() and (mapping.diff() <= 1).all()
    assert sizes.sum() == vocab_size and sizes.max() - sizes.min() <= 1


def test_cluster_sizes_rejects_out_of_range_codes() -> None:
    assert cluster_sizes(torch.tensor([0, 2, 2]), 4).tolist() == [1, 0, 2, 0]
    with pytest.raises(ValueError):
        cluster_sizes(torch.tensor([0, 4]), 4)


def test_bfloat16_inputs_give_float32_accurate_loss() -> None:
    inputs = problem(uneven_mapping(), dtype=torch.bfloat16)
    inputs["codebook"] = (0.1 * inputs["codebook"].detach()).requires_grad_()
    loss = vq_cross_entropy(**inputs)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    exact = {**inputs, "h": inputs["h"].detach().double(), "codebook": inputs["codebook"].detach().double()}
    torch.testing.assert_close(loss.double(), vq_cross_entropy_reference(**exact), rtol=0, atol=1e-2)
    h_grad, codebook_grad = grads(loss, inputs)
    assert h_grad.dtype == torch.bfloat16 and torch.isfinite(h_grad).all() and torch.isfinite(codebook_grad).all()
