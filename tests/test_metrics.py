"""The evaluation protocol on hand-built score matrices (rank_of_target, metrics_at,
full_ranking, group_means, evaluate.py --popularity) and the SASRec encoder (SASRecEncoder):
causal, blind to padding, finite for one-item histories, fine with a batch of one.

    cd /work/main && python -m pytest -q tests/test_metrics.py
"""

import json
import math
import os

import numpy as np
import pytest
import torch

import common
from model import SASRecEncoder, full_ranking, metrics_at, rank_of_target
import evaluate

torch.set_num_threads(1)

KS = (10, 20)


def ranked(scores, target, ks=KS):
    """scores (B, N+1) as a list or tensor, target list -> (rank (B,), metrics dict)."""
    rank = rank_of_target(torch.as_tensor(scores, dtype=torch.float32), torch.tensor(target))
    return rank, metrics_at(rank, ks)


def scores_with_target_at(rank, n=30, target=7):
    """One row over N = n items where the target has exactly `rank - 1` items above it."""
    s = torch.linspace(1.0, 0.0, n)  # item j+1 gets s[j]: item 1 highest
    row = torch.cat([torch.zeros(1), s])  # column 0 = padding
    others = [j for j in range(1, n + 1) if j != target]
    row[target] = (row[others[rank - 2]] + row[others[rank - 1]]) / 2 if rank > 1 else 2.0
    return row[None]


# -----------------------------------------------------------------------------
# rank and metrics


def test_rank_one_gives_ndcg_one():
    """The best-scored target has rank 1: HR = NDCG = MRR = 1 at every K."""
    rank, m = ranked(scores_with_target_at(1), [7])
    assert rank.tolist() == [1]
    for k in KS:
        assert m[f"HR@{k}"].item() == m[f"NDCG@{k}"].item() == m[f"MRR@{k}"].item() == 1.0


def test_rank_three_gives_ndcg_half_and_mrr_third():
    """Rank 3: NDCG = 1/log2(4) = 0.5, MRR = 1/3, HR = 1."""
    rank, m = ranked(scores_with_target_at(3), [7])
    assert rank.tolist() == [3]
    assert m["NDCG@10"].item() == pytest.approx(0.5, abs=1e-7)
    assert m["MRR@10"].item() == pytest.approx(1 / 3, abs=1e-7)
    assert m["HR@10"].item() == 1.0


def test_beyond_k_gives_zero():
    """Rank 11 scores 0 at K = 10 (HR, NDCG, MRR) but counts at K = 20; rank K itself still counts."""
    rank, m = ranked(torch.cat([scores_with_target_at(11), scores_with_target_at(10)]), [7, 7])
    assert rank.tolist() == [11, 10]
    for name in ("HR", "NDCG", "MRR"):
        assert m[f"{name}@10"][0].item() == 0.0 and m[f"{name}@10"][1].item() > 0
    assert m["NDCG@20"][0].item() == pytest.approx(1 / math.log2(12), abs=1e-7)
    assert m["MRR@20"][0].item() == pytest.approx(1 / 11, abs=1e-7)


def test_constant_scorer_gets_zero():
    """Ties count against the model: a constant score ranks every target last (rank N), 0 at K < N."""
    n = 30
    rank, m = ranked(torch.full((4, n + 1), 0.5), [1, 2, 15, 30])
    assert rank.tolist() == [n] * 4
    assert all(v.sum().item() == 0.0 for v in m.values())


def test_a_tie_counts_against_the_target():
    """One other item with the target's score puts the target at rank 2, not 1."""
    row = torch.zeros(1, 11)
    row[0, 4] = row[0, 9] = 1.0
    rank, _ = ranked(row, [4])
    assert rank.tolist() == [2]


def test_padding_column_never_counts():
    """Column 0 (padding) with the highest score (even +inf) does not push the target down."""
    row = scores_with_target_at(1)
    for pad in (100.0, float("inf")):
        row[0, 0] = pad
        rank, m = ranked(row, [7])
        assert rank.tolist() == [1] and m["NDCG@10"].item() == 1.0


# -----------------------------------------------------------------------------
# full_ranking: history masking and the sampled protocol


def fixed_scorer(row):
    """A scorer (query, table) that gives every sequence the same scores row (N+1,)."""
    return lambda seq: torch.ones(len(seq), 1), row[:, None]


def test_mask_history_removes_history_but_keeps_target():
    """With history masking the history's items drop out of the ranking, the target (even when it is
    in the history window) stays: the target goes from rank 4 to rank 1."""
    n = 12
    row = torch.zeros(n + 1)
    row[[3, 5, 9]] = 10.0  # three history items above the target
    row[6] = 5.0  # the target, also in the history window
    seq = torch.tensor([[0, 0, 3, 5, 9, 6]])
    target = torch.tensor([6])
    plain = full_ranking(fixed_scorer(row), seq, target, ks=(1, 10))
    masked = full_ranking(fixed_scorer(row), seq, target, ks=(1, 10), mask_history=True)
    assert plain["MRR@10"].item() == pytest.approx(1 / 4)
    assert masked["HR@1"].item() == 1.0 and masked["MRR@10"].item() == 1.0


def sampled_case(n=40, rows=25, seed=3):
    """rows random left-padded histories of distinct items over N = n items and a target outside."""
    rng = np.random.default_rng(seed)
    seq = np.zeros((rows, 8), dtype=np.int64)
    target = np.zeros(rows, dtype=np.int64)
    for r in range(rows):
        items = rng.choice(np.arange(1, n + 1), size=1 + rng.integers(1, 9), replace=False)
        seq[r, 8 - (len(items) - 1):] = items[1:]
        target[r] = items[0]
    return torch.from_numpy(seq), torch.from_numpy(target)


@pytest.mark.parametrize("M", [5, 31])
def test_sampled_ranks_among_exactly_m_plus_one(M):
    """sampled=M: every other candidate scores above the target, so the target's rank is exactly
    M + 1 in every row (M = 31 = N - 8 - 1: every item outside a full history window of 8 and the target)."""
    n = 40
    seq, target = sampled_case(n)
    row = torch.cat([torch.zeros(1), torch.rand(n) + 1.0])
    for i in range(len(target)):  # one row per call, so that the scorer puts its target lowest
        s, t = seq[i:i + 1], target[i:i + 1]
        m = full_ranking(fixed_scorer(row.scatter(0, t, 0.0)), s, t, ks=(M, M + 1), sampled=M, seed=i)
        assert m[f"HR@{M + 1}"].item() == 1.0, f"row {i}: target beyond rank M + 1, more than M candidates"
        assert m[f"HR@{M}"].item() == 0.0, f"row {i}: target within rank M, fewer than M candidates"
        assert m[f"MRR@{M + 1}"].item() == pytest.approx(1 / (M + 1))


def test_sampled_never_draws_history_target_or_padding():
    """History items and padding score far above the target, all other items below: if any of them
    were drawn the target would lose rank 1; with M = every eligible item, none is."""
    n = 40
    seq, target = sampled_case(n)
    for M in (10, 31):
        for i in range(len(target)):
            s, t = seq[i:i + 1], target[i:i + 1]
            row = torch.full((n + 1,), -1.0)
            row[s[0]] = 100.0  # the history window and padding (index 0)
            row[t] = 0.0
            m = full_ranking(fixed_scorer(row), s, t, ks=(1,), sampled=M, seed=i)
            assert m["HR@1"].item() == 1.0, f"row {i}, M = {M}: a history item or padding was sampled"


def test_sampled_is_reproducible_with_the_same_seed():
    """Same seed, same sampled negatives (identical per-sample metrics); another seed draws others."""
    n = 40
    seq, target = sampled_case(n, rows=60)
    row = torch.cat([torch.zeros(1), torch.randn(n, generator=torch.Generator().manual_seed(0))])
    run = lambda seed: full_ranking(fixed_scorer(row), seq, target, ks=(5, 10), sampled=10, seed=seed)
    a, b, c = run(7), run(7), run(8)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["MRR@10"], c["MRR@10"]), "a different seed gave the same samples"


# -----------------------------------------------------------------------------
# groups


def test_group_means_head_and_tail():
    """Head items are the top 20% by training popularity (2 of 10), head users the top 20% by
    history length (1 of 5); each group's value is the mean over its samples."""
    meta = {"item_popularity": [0, 5, 1, 9, 3, 2, 7, 4, 8, 6, 0], "user_history_len": [3, 10, 2, 7, 1]}
    per_sample = {"NDCG@10": torch.tensor([1.0, 0.5, 0.0, 0.25])}
    target, user = np.array([3, 8, 1, 2]), np.array([1, 0, 1, 4])  # items 3, 8 head; user 1 head
    g = common.group_means(per_sample, target, user, meta)
    assert g["all"]["NDCG@10"] == pytest.approx(0.4375)
    assert g["head_item"]["NDCG@10"] == pytest.approx(0.75)
    assert g["tail_item"]["NDCG@10"] == pytest.approx(0.125)
    assert g["head_user"]["NDCG@10"] == pytest.approx(0.5)
    assert g["tail_user"]["NDCG@10"] == pytest.approx(0.375)


def test_group_means_empty_group_is_none():
    """A group without samples gives None (not NaN, not 0)."""
    meta = {"item_popularity": [0, 5, 1, 9, 3, 2, 7, 4, 8, 6, 0], "user_history_len": [3, 10, 2, 7, 1]}
    per_sample = {"HR@10": torch.tensor([1.0, 0.0])}
    g = common.group_means(per_sample, np.array([3, 8]), np.array([0, 2]), meta)
    assert g["tail_item"]["HR@10"] is None and g["head_user"]["HR@10"] is None
    assert g["head_item"]["HR@10"] == 0.5 and g["all"]["HR@10"] == 0.5


def test_popularity_recommender_ranks_most_popular_first(tmp_path):
    """evaluate.py --popularity: the most popular training item is ranked first (NDCG 1), the second
    one second (NDCG 1/log2(3)), an unpopular one beyond K (0); written to --out, nothing into DATA."""
    data = tmp_path / "data"
    data.mkdir()
    pop = [0, 2, 50, 1, 30, 0, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # item 2 first, item 4 second, item 5 last
    common.write_json(str(data / "meta.json"), {"num_items": 14, "max_len": 3, "item_popularity": pop,
                                                "user_history_len": [2, 2, 2]})
    np.savez(data / "test.npz", seq=np.array([[0, 1, 3], [0, 0, 6], [7, 8, 9]], dtype=np.int64),
             target=np.array([2, 4, 5], dtype=np.int64), user=np.array([0, 1, 2], dtype=np.int64))
    evaluate.main(["--popularity", "--data", str(data), "--ks", "1,10", "--device", "cpu", "--out", str(tmp_path / "pop.json")])
    assert sorted(os.listdir(data)) == ["meta.json", "test.npz"]
    with open(tmp_path / "pop.json") as f:
        res = json.load(f)["test"]["all"]
    assert res["HR@1"] == pytest.approx(1 / 3)
    assert res["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3)) / 3)


# -----------------------------------------------------------------------------
# the SASRec encoder


def encoder(train=False, d=8, L=6, blocks=2, heads=2):
    torch.manual_seed(0)
    enc = SASRecEncoder(d, L, num_blocks=blocks, num_heads=heads, dropout=0.2)
    return enc.train(train)


def block_outputs(enc, seq_emb, seq):
    """The output (B, L, d) of every Transformer block (captured by forward hooks) and the user
    state, read at the last position of the whole-sequence output."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone())) for b in enc.blocks]
    try:
        state = enc(seq_emb, seq, all_positions=True)[:, -1]
    finally:
        for h in hooks:
            h.remove()
    return outs, state


@pytest.mark.parametrize("blocks", [1, 2])
def test_last_position_state_equals_the_whole_sequence_output(blocks):
    """The user state computed for the last position alone (the last block skips the other
    queries) equals the last position of the whole-sequence output, with padding in the rows."""
    enc = encoder(blocks=blocks)
    seq = torch.tensor([[0, 0, 3, 1, 4, 2], [5, 2, 7, 1, 1, 3], [0, 0, 0, 0, 0, 4]])
    emb = torch.randn(3, 6, 8)
    with torch.no_grad():
        torch.testing.assert_close(enc(emb, seq), enc(emb, seq, all_positions=True)[:, -1], rtol=0, atol=1e-6)


def test_encoder_is_causal():
    """Changing the item embedding at position j leaves every block's outputs at positions < j
    unchanged and changes the output at j (and the user state, read at the last position)."""
    enc = encoder()
    seq = torch.tensor([[0, 0, 3, 1, 4, 2], [5, 2, 7, 1, 1, 3]])
    emb = torch.randn(2, 6, 8)
    with torch.no_grad():
        before, state = block_outputs(enc, emb, seq)
        for j in (3, 4, 5):
            changed = emb.clone()
            changed[:, j] += torch.randn(2, 8) * 3
            after, state2 = block_outputs(enc, changed, seq)
            for b, a in zip(before, after):
                torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
                assert (a[:, j] - b[:, j]).abs().max() > 1e-3, f"position {j} ignores its own item"
            assert (state2 - state).abs().max() > 1e-3


@pytest.mark.parametrize("train", [False, True])
def test_encoder_ignores_padding_content(train):
    """Whatever vectors sit at padded positions (seq == 0), the user state is the same."""
    enc = encoder(train)
    seq = torch.tensor([[0, 0, 0, 3, 1, 2], [0, 5, 2, 7, 1, 3]])
    emb = torch.randn(2, 6, 8)
    noisy = emb.clone()
    noisy[seq == 0] = torch.randn(int((seq == 0).sum()), 8) * 100
    torch.manual_seed(1)  # same dropout masks in train mode
    a = enc(emb, seq)
    torch.manual_seed(1)
    b = enc(noisy, seq)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_encoder_one_item_history_is_finite(train):
    """A history of one item (all padding but the last position) gives a finite state and finite
    gradients, in train and eval mode."""
    enc = encoder(train)
    seq = torch.tensor([[0, 0, 0, 0, 0, 4], [0, 0, 0, 0, 0, 1]])
    emb = torch.randn(2, 6, 8, requires_grad=True)
    state = enc(emb, seq)
    assert torch.isfinite(state).all()
    state.pow(2).sum().backward()
    assert torch.isfinite(emb.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_encoder_batch_of_one():
    """A batch of one gives a (1, d) state equal to that row's state within a larger batch."""
    enc = encoder()
    seq = torch.tensor([[0, 0, 3, 1, 4, 2], [5, 2, 7, 1, 1, 3]])
    emb = torch.randn(2, 6, 8)
    with torch.no_grad():
        both = enc(emb, seq)
        one = enc(emb[1:], seq[1:])
    assert one.shape == (1, 8)
    torch.testing.assert_close(one, both[1:], rtol=0, atol=1e-5)


def test_encoder_is_the_official_sasrec_block():
    """One block, one head, eval mode: the encoder's states at every position equal the official
    AlphaFuse code's SASRec_backbone.forward written out with the same weights: keys masked where
    the input vector sums to 0, a causal mask of -2^32 + 1, rows of padding positions zeroed, no output
    projection, the normalized queries as residual, a ReLU feed-forward with its own residual
    LayerNorm, padding zeroed, and a last LayerNorm."""
    torch.manual_seed(0)
    d, L = 8, 6
    enc = SASRecEncoder(d, L, num_blocks=1, num_heads=1, dropout=0.1).eval()
    seq = torch.tensor([[0, 0, 0, 3, 1, 2], [5, 2, 7, 1, 1, 3], [0, 0, 0, 0, 0, 4]])
    emb = torch.randn(3, L, d) * (seq > 0)[..., None]
    b = enc.blocks[0]
    W_k, W_v = b.kv.weight.split(d)
    b_k, b_v = b.kv.bias.split(d)
    with torch.no_grad():
        mask = (seq > 0).float()[..., None]  # (B, L, 1)
        x = (emb + enc.pos.weight) * mask
        q_in = b.ln_q(x)
        Q, K, V = b.q(q_in), x @ W_k.T + b_k, x @ W_v.T + b_v
        scores = Q @ K.transpose(1, 2) / d ** 0.5  # (B, L, L)
        pad = torch.full_like(scores, -2.0 ** 32 + 1)
        scores = torch.where(x.sum(-1).abs().sign()[:, None, :] == 0, pad, scores)
        scores = torch.where(torch.ones(L, L).tril() == 0, pad, scores)
        # the official query mask is sign(|sum of q_in|); a LayerNorm output sums to 0 up to rounding,
        # so that zeroes random real rows (a quirk, not the intent): the intent, padding rows, here
        att = scores.softmax(-1) * mask
        h = b.ln_ffn(att @ V + q_in)
        W_1, W_2 = b.ffn[0], b.ffn[2]
        want = enc.ln_f(b.ln_out(W_2(torch.relu(W_1(h))) + h) * mask)
        got = enc(emb, seq, all_positions=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc(emb, seq), want[:, -1], rtol=1e-5, atol=1e-5)


def test_nan_target_score_ranks_last():
    """A NaN score for the target is never a hit (NaN compares false, which would give rank 0)."""
    scores = torch.tensor([[0.0, float("nan"), 1.0, 2.0]])
    rank = rank_of_target(scores, torch.tensor([1]))
    assert rank.tolist() == [3], "a NaN target must rank last (N = 3)"
    assert metrics_at(rank, [2])["HR@2"].tolist() == [0.0]
