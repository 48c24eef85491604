"""What makes each baseline's item embedding the paper's. UniSRec (embeddings.MoEAdaptorEmbedding): the
language vectors are a frozen buffer while every expert's b_k and W_k and the gate's W_2 and W_3
train; the gate is a softmax over the G experts, noisy in training only; the items are
sum_k g_k (x - b_k) W_k, one whitening layer (x - b) W when G = 1; the experts' input has dropout
in training only; the padding row is zero.

    cd /work/main && python -m pytest -q tests/test_baselines.py
"""

import pytest
import torch

import train_discriminative

torch.set_num_threads(1)


def unisrec(G=8, N=40, d_l=24, d=16):
    """SASRec with UniSRec's item embedding over random language vectors (N+1, d_l), row 0 padding."""
    torch.manual_seed(0)
    lang = torch.randn(N + 1, d_l)
    lang[0] = 0
    args = dict(item_emb="unisrec", num_items=N, d=d, max_len=6, num_blocks=1, num_heads=2, dropout=0.1,
                score="cosine", eval_score="cosine", temperature=0.07, d_in=d_l, experts=G)
    return train_discriminative.build_model(args, lang)


def test_unisrec_language_vectors_stay_frozen_while_every_expert_and_the_gate_train():
    """One Adam step on the SASRec loss (no weight decay, so a value moves only by its gradient):
    the language vectors are a buffer, not a parameter, and unchanged; every expert's b_k and W_k
    and every column of the gate's W_2 and of the noise's W_3 moved."""
    model = unisrec().train()
    emb = model.item_emb
    assert "features" not in dict(emb.named_parameters()) and not emb.features.requires_grad
    before = {k: v.clone() for k, v in emb.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    model.loss(torch.randint(0, 41, (32, 6), generator=g), torch.randint(1, 41, (32,), generator=g),
               "infonce", 8, g).backward()
    opt.step()
    after = emb.state_dict()
    assert torch.equal(after["features"], before["features"])
    moved = {k: (after[k] - before[k]).abs() for k in ("W", "b", "W_gate", "W_noise")}
    assert (moved["W"].amax((0, 2)) > 0).all(), "an expert's W_k did not train"  # W (d_l, G, d)
    assert (moved["b"].amax(1) > 0).all(), "an expert's b_k did not train"  # b (G, d_l)
    assert (moved["W_gate"].amax(0) > 0).all() and (moved["W_noise"].amax(0) > 0).all()  # (d_l, G)


def test_unisrec_gate_is_a_softmax_over_the_experts_with_noise_only_in_training():
    """g (items, G) is nonnegative and sums to 1 in both modes; in training two calls differ (the
    noise), in evaluation g = softmax(x W_2) exactly and every call, and the table, is the same."""
    emb = unisrec(G=5).item_emb
    with torch.no_grad():
        emb.W_gate.normal_()
    x = emb.features[1:]  # (N, d_l)
    train_a, train_b = emb.train().gate(x), emb.gate(x)
    evals = emb.eval().gate(x)
    for g in (train_a, train_b, evals):
        assert g.shape == (40, 5) and (g >= 0).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(40))
    assert not torch.allclose(train_a, train_b), "no noise in training"
    assert torch.equal(evals, (x @ emb.W_gate).softmax(-1)) and torch.equal(evals, emb.gate(x))
    assert torch.equal(emb.table(), emb.table())


@pytest.mark.parametrize("G", [1, 3])
def test_unisrec_items_are_the_gated_sum_of_whitening_layers(G):
    """In evaluation (no dropout, no noise) item i is sum_k g_k (x_i - b_k) W_k with
    g = softmax(x_i W_2), written out expert by expert; with G = 1 the one parametric whitening
    layer (x_i - b) W of the paper's eq. 2."""
    emb = unisrec(G=G).item_emb.eval()
    with torch.no_grad():
        emb.b.normal_()
        emb.W_gate.normal_()
    x = emb.features[1:]
    g = (x @ emb.W_gate).softmax(-1)  # (N, G)
    want = (x - emb.b[0]) @ emb.W[:, 0] if G == 1 else sum(g[:, k, None] * ((x - emb.b[k]) @ emb.W[:, k]) for k in range(G))
    torch.testing.assert_close(emb.table()[1:], want)


def test_unisrec_experts_read_the_input_through_dropout_in_training_only():
    """With G = 1 (g = 1 whatever the noise), W = I and b = 0 the item is its input to the expert:
    in training the language vector with about 20% of its entries zeroed and the rest scaled by
    1/0.8 (the authors' adaptor dropout), in evaluation the language vector itself."""
    emb = unisrec(G=1, d=24).item_emb
    with torch.no_grad():
        emb.W[:, 0] = torch.eye(24)
    x, v = emb.features[1:], emb.train().table()[1:]
    assert abs((v == 0).float().mean().item() - 0.2) < 0.05
    torch.testing.assert_close(v[v != 0], x[v != 0] / 0.8)
    assert torch.equal(emb.eval().table()[1:], x)


def test_unisrec_padding_row_is_zero():
    """Row 0 is the zero vector in training and evaluation, whole table or lookups, although the
    adaptor of a zero vector is not zero (sum_k g_k (0 - b_k) W_k)."""
    emb = unisrec().item_emb
    with torch.no_grad():
        emb.b.normal_()
    assert emb.adapt(emb.features[:1]).abs().sum() > 0
    for training in (True, False):
        emb.train(training)
        assert not emb.table()[0].any() and not emb(torch.tensor([[0, 3, 0]]))[0, [0, 2]].any()
