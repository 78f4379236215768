"""The language model (trainers/lm.py), pure PyTorch: sizes, weight tying, the attention and output variants,
activation checkpointing, and which parameters are decayed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lab_kernels.vq_logits import vq_cross_entropy_reference
from trainers import DataInfo
from trainers.lm import TINY, Config, LanguageModel, build, eval_summary, param_groups, train_step

VOCAB = 97


def model(**changes) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(dataclasses.replace(TINY, **changes), VOCAB)


def batch(size: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(VOCAB, (size, length + 1), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def test_default_config_is_gpt2_small_sized() -> None:
    with torch.device("meta"):
        net = LanguageModel(Config(), vocab_size=50257)
    assert 120e6 < sum(p.numel() for p in net.parameters()) < 130e6


def test_tied_output_shares_the_embedding_and_untied_has_its_own() -> None:
    tied, untied = model(), model(tie_embeddings=False)
    assert tied.head is None and untied.head is not None
    h = tied.hidden(batch()["input_ids"])
    torch.testing.assert_close(tied.logits(h), h @ tied.embed.weight.T)
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == VOCAB * 64


def test_the_model_is_causal() -> None:
    net = model(attention="complex").eval()
    ids = batch()["input_ids"]
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % VOCAB
    torch.testing.assert_close(net.hidden(ids)[:, :8], net.hidden(changed)[:, :8])


def test_vq_output_loss_is_the_full_vocabulary_cross_entropy() -> None:
    net = model(output="vq", num_codes=16, vq_mapping="random")
    data = batch()
    h = net.hidden(data["input_ids"])
    expected = vq_cross_entropy_reference(h, net.vq.codebook, net.vq.mapping, net.vq.cluster_sizes, data["labels"])
    torch.testing.assert_close(net.nll(h, data["labels"]), expected)
    log_probs = net.log_probs(h)  # (B, L, V), uniform within a cluster
    assert log_probs.shape == (3, 12, VOCAB)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 12))


@pytest.mark.parametrize("variant", [{"attention": "rope"}, {"attention": "complex"}, {"output": "vq"}])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(variant) -> None:
    data, grads = batch(), []
    for recompute in (False, True):
        net = model(activation_checkpointing=recompute, **variant)
        loss, _ = train_step(net, data, net.cfg, 0)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def test_delta_and_b_of_complex_attention_are_not_decayed() -> None:
    net = model(attention="complex")
    decayed = {id(p) for p in param_groups(net, net.cfg)[0]["params"]}
    names = {name for name, p in net.named_parameters() if id(p) in decayed}
    assert "blocks.0.attention.delta" not in names and "blocks.0.attention.bias" not in names
    assert "blocks.0.attention.q_proj.weight" in names
    assert not any(n.endswith(".bias") and "attention" not in n for n in names)  # norms and biases


def test_build_needs_a_vocabulary_and_perplexity_is_exp_of_the_loss() -> None:
    with pytest.raises(ValueError, match="needs a text dataset"):
        build(TINY, DataInfo(num_classes=10, image_size=16, in_channels=1, num_train=10, num_labeled=10))
    assert eval_summary({"loss": 2.0})["ppl"] == pytest.approx(7.389056, rel=1e-6)
