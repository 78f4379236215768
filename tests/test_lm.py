"""The language model (trainers/lm.py), pure PyTorch: sizes, weight tying, the attention and output variants,
activation checkpointing, and which parameters are decayed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from lab_kernels.vq_logits import vq_cross_entropy_reference
from trainers import DataInfo
from trainers._common.contract import ConfigError
from trainers.lm import TINY, Config, LanguageModel, build, check, eval_summary, param_groups, train_step

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


def text_info() -> DataInfo:
    return DataInfo(num_classes=0, image_size=0, in_channels=0, num_train=10, num_labeled=10, vocab_size=VOCAB,
                    seq_len=12)


def saved_softmax(tmp_path, **changes) -> tuple[LanguageModel, str]:
    """A TINY softmax LM and its checkpoint directory (holding model.pt, as the orchestrator writes it)."""
    net = model(**changes)
    directory = tmp_path / "lm-softmax" / "checkpoint_000000010"
    directory.mkdir(parents=True)
    torch.save(net.state_dict(), directory / "model.pt")
    return net, str(directory)


def kmeans_config(vq_init_from: str, **changes) -> Config:
    return dataclasses.replace(TINY, output="vq", num_codes=8, vq_mapping="kmeans", vq_init_from=vq_init_from,
                               **changes)


@pytest.mark.parametrize("tied", [True, False])
def test_kmeans_mapping_clusters_the_checkpoints_output_embeddings(tmp_path, tied: bool) -> None:
    softmax, directory = saved_softmax(tmp_path, tie_embeddings=tied)
    cfg = kmeans_config(directory)
    check(cfg)
    net = build(cfg, text_info())
    embeddings = (softmax.embed if tied else softmax.head).weight.detach()  # (V, D)
    kmeans = KMeans(n_clusters=8, n_init="auto", random_state=0).fit(embeddings.numpy())
    assert np.array_equal(net.vq.mapping.numpy(), kmeans.labels_)
    torch.testing.assert_close(net.vq.codebook.detach(), torch.from_numpy(kmeans.cluster_centers_).float())
    assert torch.equal(net.vq.cluster_sizes, torch.bincount(net.vq.mapping, minlength=8))
    body = {k: v for k, v in softmax.state_dict().items() if not k.startswith("head.")}
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in body.items())  # vq_init_body: embedding, blocks, final norm


def test_kmeans_without_the_body_starts_the_body_fresh(tmp_path) -> None:
    softmax, directory = saved_softmax(tmp_path)
    net = build(kmeans_config(directory, vq_init_body=False), text_info())
    assert not torch.equal(net.blocks[0].mlp[0].weight, softmax.blocks[0].mlp[0].weight)


def test_a_bad_vq_init_from_is_a_config_error_naming_the_key(tmp_path) -> None:
    vq_net, vq_directory = saved_softmax(tmp_path, output="vq")  # a VQ checkpoint has no output embeddings
    garbage = tmp_path / "model.pt"
    garbage.write_text("not a checkpoint")
    for value in ("", str(tmp_path / "missing"), str(tmp_path / "empty_dir"), vq_directory, str(garbage)):
        (tmp_path / "empty_dir").mkdir(exist_ok=True)
        with pytest.raises(ConfigError, match="config.vq_init_from") as err:
            check(kmeans_config(value))
        assert err.value.field == "vq_init_from" and err.value.found == value
    _, directory = saved_softmax(tmp_path / "wide", d_model=32, n_heads=2)
    with pytest.raises(ConfigError, match="d_model=64"):
        check(kmeans_config(directory))
    with pytest.raises(ConfigError, match="empty unless"):
        check(dataclasses.replace(TINY, output="vq", vq_init_from=directory))
    with pytest.raises(ConfigError, match="config.vq_codebook_std"):
        check(dataclasses.replace(TINY, output="vq", vq_codebook_std=0.0))


@pytest.mark.parametrize("vq", [{"vq_mapping": "random"}, {"vq_mapping": "contiguous", "vq_codebook_std": 1.0},
                                {"vq_mapping": "kmeans"}])
def test_vq_output_loss_is_the_full_vocabulary_cross_entropy(tmp_path, vq: dict) -> None:
    if vq["vq_mapping"] == "kmeans":
        vq = {**vq, "vq_init_from": saved_softmax(tmp_path)[1]}
    net = build(dataclasses.replace(TINY, output="vq", num_codes=16, **vq), text_info())
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


def test_compiled_complex_attention_gives_the_eager_loss_and_gradients() -> None:
    data, results = batch(), []
    for compiled in (False, True):
        torch.manual_seed(0)
        net = model(attention="complex", attention_compiled=compiled)
        loss, _ = train_step(net, data, net.cfg, 0)
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in net.parameters()])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="config.attention_compiled"):
        check(dataclasses.replace(TINY, attention_compiled=True))


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
