"""The label-correlation heads against PyTorch versions written here from the papers and the
official code (Alibaba-MIIL/ML_Decoder's MLDecoder, Kevinz-code/CSRA's MHA/CSRA) with the same
weights, finite bf16 gradients, every backbone at a non-square size, and the plug-in point."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as tnn
from flax import nnx

from annotate.losses import asymmetric_loss
from annotate.models import MODEL_NAMES, create_model
from annotate.models.heads import CSRAHead, MLDecoderHead
from parity import relative_l2


class TorchMLDecoder(tnn.Module):
    """ML-Decoder as the official module computes it (one TransformerDecoderLayerOptimal inside
    nn.TransformerDecoder, frozen nn.Embedding queries, GroupFC)."""

    def __init__(self, num_classes, groups, in_features, dim, heads, feedforward):
        super().__init__()
        self.embed = tnn.Linear(in_features, dim)
        self.queries = tnn.Parameter(torch.randn(groups, dim), requires_grad=False)
        self.norm1, self.norm2, self.norm3 = (tnn.LayerNorm(dim) for _ in range(3))
        self.attention = tnn.MultiheadAttention(dim, heads, dropout=0.1)
        self.linear1, self.linear2 = tnn.Linear(dim, feedforward), tnn.Linear(feedforward, dim)
        self.dropout = tnn.Dropout(0.1)
        self.duplicate = int(num_classes / groups + 0.999)
        self.group_fc = tnn.Parameter(torch.empty(groups, dim, self.duplicate))
        tnn.init.xavier_normal_(self.group_fc)
        self.bias = tnn.Parameter(torch.zeros(num_classes))
        self.num_classes = num_classes

    def forward(self, x):  # x [B, C, H, W]
        tokens = torch.relu(self.embed(x.flatten(2).transpose(1, 2))).transpose(0, 1)
        tgt = self.queries.unsqueeze(1).expand(-1, x.shape[0], -1)
        tgt = self.norm1(tgt + self.dropout(tgt))
        tgt = self.norm2(tgt + self.dropout(self.attention(tgt, tokens, tokens)[0]))
        tgt = self.norm3(tgt + self.dropout(self.linear2(self.dropout(torch.relu(
            self.linear1(tgt))))))
        h = tgt.transpose(0, 1)  # [B, groups, dim]
        out = torch.stack([h[:, i] @ self.group_fc[i] for i in range(h.shape[1])], dim=1)
        return out.flatten(1)[:, :self.num_classes] + self.bias


class TorchCSRA(tnn.Module):
    """CSRA's MHA: per head a bias-free 1x1 conv, scores over the class weight's norm, mean plus
    lam times the softmax-at-temperature (or max, T = 99) attention, summed over heads."""

    TEMPERATURES = {1: [1], 2: [1, 99], 4: [1, 2, 4, 99]}

    def __init__(self, in_features, num_classes, num_heads, lam):
        super().__init__()
        self.temperatures, self.lam = self.TEMPERATURES[num_heads], lam
        self.heads = tnn.ModuleList(tnn.Conv2d(in_features, num_classes, 1, bias=False)
                                    for _ in self.temperatures)

    def forward(self, x):
        logit = 0.0
        for temperature, head in zip(self.temperatures, self.heads):
            score = head(x) / torch.norm(head.weight, dim=1, keepdim=True).transpose(0, 1)
            score = score.flatten(2)
            attention = (score.max(dim=2)[0] if temperature == 99 else
                         (score * torch.softmax(score * temperature, dim=2)).sum(dim=2))
            logit = logit + score.mean(dim=2) + self.lam * attention
        return logit


def _features(height=7, width=5, channels=48, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, height, width, channels),
                                                       dtype=np.float32)


def _nchw(features: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(features.transpose(0, 3, 1, 2)))


def _linear(ours: nnx.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    ours.kernel[...] = jnp.asarray(weight.detach().numpy().T)
    if bias is not None:
        ours.bias[...] = jnp.asarray(bias.detach().numpy())


def _ml_decoder_pair() -> tuple[TorchMLDecoder, MLDecoderHead]:
    """The PyTorch ML-Decoder with non-trivial weights and ours holding the same weights."""
    torch.manual_seed(0)
    num_classes, groups, dim, heads = 30, 8, 32, 4  # 30 / 8: 4 outputs per query, 2 cut off
    reference = TorchMLDecoder(num_classes, groups, 48, dim, heads, 64).eval()
    with torch.no_grad():  # non-trivial LayerNorm and biases
        for norm in (reference.norm1, reference.norm2, reference.norm3):
            norm.weight.normal_(1.0, 0.2)
            norm.bias.normal_(0.0, 0.1)
        reference.attention.in_proj_bias.normal_(0.0, 0.1)
        reference.attention.out_proj.bias.normal_(0.0, 0.1)
        reference.bias.normal_(0.0, 0.1)
    head = MLDecoderHead(48, num_classes, num_groups=groups, embedding_dim=dim, num_heads=heads,
                         feedforward_dim=64, rngs=nnx.Rngs(0))
    _linear(head.embed, reference.embed.weight, reference.embed.bias)
    head.queries[...] = jnp.asarray(reference.queries.numpy())
    q_w, k_w, v_w = reference.attention.in_proj_weight.chunk(3)
    q_b, k_b, v_b = reference.attention.in_proj_bias.chunk(3)
    for ours, weight, bias in ((head.attention.query, q_w, q_b), (head.attention.key, k_w, k_b),
                               (head.attention.value, v_w, v_b)):
        _linear(ours, weight, bias)
    _linear(head.attention.out, reference.attention.out_proj.weight,
            reference.attention.out_proj.bias)
    for ours, theirs in ((head.norm1, reference.norm1), (head.norm2, reference.norm2),
                         (head.norm3, reference.norm3)):
        ours.scale[...] = jnp.asarray(theirs.weight.detach().numpy())
        ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())
    _linear(head.linear1, reference.linear1.weight, reference.linear1.bias)
    _linear(head.linear2, reference.linear2.weight, reference.linear2.bias)
    head.group_fc[...] = jnp.asarray(reference.group_fc.detach().numpy())
    head.group_fc_bias[...] = jnp.asarray(reference.bias.detach().numpy())
    return reference, head


def test_ml_decoder_logits_match_the_official_computation():
    reference, head = _ml_decoder_pair()
    num_classes = reference.num_classes
    head.eval()
    features = _features()
    with torch.no_grad():
        expected = reference(_nchw(features)).numpy()
    logits = np.asarray(head(jnp.asarray(features)))
    assert logits.shape == (2, num_classes) and expected.std() > 0.1
    assert relative_l2(logits, expected) < 1e-5


def test_ml_decoder_dropouts_sit_where_the_official_ones_do(monkeypatch):
    """Train mode with every dropout replaced by a deterministic stand-in: the k-th dropout called
    scales feature i of its input's last axis by 1 + 0.1 k + 0.01 i. Equal logits mean the same
    dropouts in the same order at the same places (on the queries, the attention weights, the
    attention output, inside and after the feed-forward)."""
    reference, head = _ml_decoder_pair()
    reference.train()
    head.train()

    def stand_in(calls: list, x, to_array):
        factor = 1 + 0.1 * len(calls) + 0.01 * np.arange(x.shape[-1])
        calls.append(x.shape[-1])
        return x * to_array(factor.astype(np.float32))

    torch_calls, jax_calls = [], []
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda x, p=0.5, training=True,
                        inplace=False: stand_in(torch_calls, x, torch.from_numpy))
    monkeypatch.setattr(nnx.Dropout, "__call__", lambda self, x, **kwargs: stand_in(
        jax_calls, x, jnp.asarray))
    features = _features()
    with torch.no_grad():
        expected = reference(_nchw(features)).numpy()
    logits = np.asarray(head(jnp.asarray(features)))
    assert torch_calls == jax_calls == [32, 35, 32, 64, 32]  # dim, tokens (7 x 5), dim, ffn, dim
    assert relative_l2(logits, expected) < 1e-5


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_csra_logits_match_the_official_computation(num_heads):
    torch.manual_seed(num_heads)
    reference = TorchCSRA(48, 30, num_heads, lam=0.1).eval()
    head = CSRAHead(48, 30, num_heads=num_heads, lam=0.1, rngs=nnx.Rngs(0))
    for ours, theirs in zip(head.heads, reference.heads):
        ours.kernel[...] = jnp.asarray(theirs.weight.detach().numpy()[:, :, 0, 0].T)
    features = _features(seed=num_heads)
    with torch.no_grad():
        expected = reference(_nchw(features)).numpy()
    assert relative_l2(np.asarray(head(jnp.asarray(features))), expected) < 1e-5


def _assert_same_distribution(name: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    """Shape equal; constants equal; else mean and sd within 6 sampling sds, and for large
    tensors the kurtosis too (normal 3 against uniform 1.8)."""
    assert ours.shape == theirs.shape, name
    if theirs.std() == 0:
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
        return
    sigma, n = theirs.std(), theirs.size
    assert abs(ours.mean() - theirs.mean()) < 6 * sigma / np.sqrt(n), name
    assert abs(ours.std() - sigma) < 6 * sigma / np.sqrt(2 * n), (name, ours.std(), sigma)
    if n >= 2000:
        def kurtosis(values):
            centred = values - values.mean()
            return np.mean(centred ** 4) / np.mean(centred ** 2) ** 2
        assert abs(kurtosis(ours) - kurtosis(theirs)) < 6 * np.sqrt(24 / n), name


def test_heads_start_from_the_official_modules_distributions():
    """Fresh heads at the official defaults (260 labels, 100 groups, 768 wide, 8 heads, 2048
    feed-forward; CSRA with 4 heads) against the fresh PyTorch modules, tensor by tensor."""
    torch.manual_seed(0)
    reference = TorchMLDecoder(260, 100, 512, 768, 8, 2048)
    head = MLDecoderHead(512, 260, rngs=nnx.Rngs(1))
    q_w, k_w, v_w = reference.attention.in_proj_weight.chunk(3)
    q_b, k_b, v_b = reference.attention.in_proj_bias.chunk(3)
    pairs = [("embed", head.embed, reference.embed.weight, reference.embed.bias),
             ("query", head.attention.query, q_w, q_b), ("key", head.attention.key, k_w, k_b),
             ("value", head.attention.value, v_w, v_b),
             ("out", head.attention.out, reference.attention.out_proj.weight,
              reference.attention.out_proj.bias),
             ("linear1", head.linear1, reference.linear1.weight, reference.linear1.bias),
             ("linear2", head.linear2, reference.linear2.weight, reference.linear2.bias)]
    tensors = [(f"{name}.kernel", ours.kernel[...], weight.T) for name, ours, weight, _ in pairs]
    tensors += [(f"{name}.bias", ours.bias[...], bias) for name, ours, _, bias in pairs]
    for number in (1, 2, 3):
        ours, theirs = getattr(head, f"norm{number}"), getattr(reference, f"norm{number}")
        tensors += [(f"norm{number}.scale", ours.scale[...], theirs.weight),
                    (f"norm{number}.bias", ours.bias[...], theirs.bias)]
    tensors += [("queries", head.queries[...], reference.queries),
                ("group_fc", head.group_fc[...], reference.group_fc),
                ("group_fc_bias", head.group_fc_bias[...], reference.bias)]
    csra, torch_csra = CSRAHead(512, 260, num_heads=4, rngs=nnx.Rngs(2)), TorchCSRA(512, 260, 4, 0.1)
    tensors += [(f"csra.heads.{i}", ours.kernel[...], theirs.weight[:, :, 0, 0].T)
                for i, (ours, theirs) in enumerate(zip(csra.heads, torch_csra.heads))]
    for name, ours, theirs in tensors:
        _assert_same_distribution(name, np.asarray(ours, np.float64),
                                  theirs.detach().numpy().astype(np.float64))
    arrays = len(jax.tree.leaves(nnx.state(head, nnx.Param))) + 1  # + the queries (a buffer)
    assert len(tensors) == arrays + len(csra.heads)  # every array of both heads


def test_csra_with_lam_0_is_the_normalised_average_pool():
    head = CSRAHead(48, 30, lam=0.0, rngs=nnx.Rngs(0))
    features = _features()
    kernel = np.asarray(head.heads[0].kernel[...])
    expected = features.mean(axis=(1, 2)) @ (kernel / np.linalg.norm(kernel, axis=0))
    np.testing.assert_allclose(np.asarray(head(jnp.asarray(features))), expected, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("kind", ["ml_decoder", "csra"])
def test_bf16_loss_gradients_are_finite(kind):
    """bf16 feature maps (a bf16 backbone's output) through the head, ASL, train mode: every
    gradient finite and the head's gradients not all zero."""
    options = {"num_groups": 16, "embedding_dim": 64, "num_heads": 4,
               "feedforward_dim": 128} if kind == "ml_decoder" else {"num_heads": 4}
    head = (MLDecoderHead if kind == "ml_decoder" else CSRAHead)(48, 260, rngs=nnx.Rngs(0),
                                                                    **options)
    features = jnp.asarray(_features(14, 10) * 8, jnp.bfloat16)
    targets = jnp.asarray(np.random.default_rng(1).random((2, 260)) < 0.02, jnp.float32)

    def loss(head, features):
        return asymmetric_loss(head(features), targets)

    grads, feature_grads = nnx.grad(loss, argnums=(0, 1))(head, features)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert all(np.isfinite(np.asarray(leaf, np.float32)).all() for leaf in leaves)
    assert np.isfinite(np.asarray(feature_grads, np.float32)).all()
    assert feature_grads.dtype == jnp.bfloat16
    assert sum(float(jnp.abs(leaf).sum()) for leaf in leaves) > 0


@pytest.mark.parametrize("kind", ["ml_decoder", "csra"])
@pytest.mark.parametrize("name", [name for name in MODEL_NAMES
                                  if name not in ("resnet18", "resnet50")])
def test_every_backbone_takes_the_head_at_a_non_square_size(name, kind):
    model = nnx.eval_shape(lambda: create_model(name, 260, head=kind))
    graph, state = nnx.split(model)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graph, s)(x), state,
                            jax.ShapeDtypeStruct((2, 160, 224, 3), jnp.float32))
    assert (logits.shape, logits.dtype) == ((2, 260), jnp.float32)


@pytest.mark.parametrize("num_classes, num_groups, per_query", [
    (260, 100, 3), (260, 260, 1), (260, 7, 38), (2001, 2000, 2)])
def test_ml_decoder_gives_each_query_its_labels_rounded_up(num_classes, num_groups, per_query):
    """Each query's label count is num_classes / queries rounded up, the official int(n / g +
    0.999) wherever that covers every label (260 / 100: 3); for 2001 labels in 2000 groups that
    formula gives 1 per query, 2000 logits for 2001 labels, which fails in the official code."""
    head = nnx.eval_shape(lambda: MLDecoderHead(4, num_classes, num_groups=num_groups,
                                                embedding_dim=4, num_heads=2, feedforward_dim=4,
                                                rngs=nnx.Rngs(0)))
    assert head.group_fc.shape == (min(num_groups, num_classes), 4, per_query)
    graph, state = nnx.split(head)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graph, s)(x), state,
                            jax.ShapeDtypeStruct((2, 3, 3, 4), jnp.float32))
    assert logits.shape == (2, num_classes)


@pytest.mark.parametrize("head, options, message", [
    (MLDecoderHead, {"num_groups": 0}, "num_groups = 0: must be positive"),
    (MLDecoderHead, {"embedding_dim": 64, "num_heads": 6},
     "embedding_dim = 64: must be divisible by num_heads=6"),
    (MLDecoderHead, {"dropout": 1.0}, r"dropout = 1.0: must lie in \[0, 1\)"),
    (CSRAHead, {"lam": -0.1}, "lam = -0.1: must be >= 0"),
    (CSRAHead, {"num_heads": 3}, r"num_heads = 3: use one of \[1, 2, 4, 6, 8\]")])
def test_a_head_refuses_a_bad_option_value_by_name(head, options, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        head(8, 5, rngs=nnx.Rngs(0), **options)
