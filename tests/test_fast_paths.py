"""The fast training step and evaluation equal the obvious implementation (bench/reference.py):
the SASRec loss and every gradient on a fixed batch, a two-epoch training run's validation metrics,
the pruned full ranking; and whole-sequence training equals windows where the two coincide.

    cd /work/main && python -m pytest -q tests/test_fast_paths.py
"""

import os
import sys

import pytest
import torch

import decompose
from conftest import prepare_toy
from model import full_ranking, rank_of_target, rank_within
import train_discriminative
from train_discriminative import build_model
from training import whole_sequences

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import reference  # noqa: E402

torch.set_num_threads(1)


def sasrec(item_emb="alphafuse", N=300, d=16, L=6, blocks=1, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    init = {"alphafuse": torch.randn(N + 1, d), "llminit": torch.randn(N + 1, d),
            "morec": torch.randn(N + 1, 24), "whitenrec": torch.randn(N + 1, 24), "unisrec": torch.randn(N + 1, 24)}.get(item_emb)
    if init is not None:
        init[0] = 0
    args = dict(item_emb=item_emb, num_items=N, d=d, max_len=L, num_blocks=blocks, num_heads=2, dropout=dropout,
                score="cosine", eval_score="cosine", temperature=0.07, d_in=24, d_s=d // 2)
    return build_model(args, init)


def batch(N=300, B=40, L=6, K=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N + 1, (B, L), generator=g)
    pad = torch.randint(0, L, (B, 1), generator=g)  # left padding of 0..L-1 slots: the last item is real
    seq = seq.masked_fill(torch.arange(L) < pad, 0)
    target = torch.randint(1, N + 1, (B,), generator=g)
    neg = torch.randint(1, N + 1, (B, K), generator=g)
    neg[0, 0] = target[0]  # a negative that hits the target is masked out in both
    return seq, target, neg


@pytest.mark.parametrize("item_emb", ["alphafuse", "id", "llminit", "morec", "whitenrec", "unisrec"])
@pytest.mark.parametrize("blocks", [1, 2])
def test_loss_and_gradients_equal_the_obvious_implementation(item_emb, blocks):
    """For a fixed batch and fixed negatives, the fast InfoNCE (last-position-only last block,
    one item table per step, gathered dot products, cosine by the norms afterwards) gives the
    loss and every parameter's gradient of the obvious one to 1e-5. The item embedding runs in eval
    mode: unisrec's dropout and gate noise would be drawn for the table in one, per lookup in the
    other (its noise weights then get no gradient: zeros in both)."""
    model = sasrec(item_emb, blocks=blocks).train()
    model.item_emb.eval()
    seq, target, neg = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    fast = model.loss(seq, target, "infonce", 0, None, neg=neg)
    fast_grads = torch.autograd.grad(fast, params, materialize_grads=True)
    slow = reference.loss(model, seq, target, neg)
    slow_grads = torch.autograd.grad(slow, params, materialize_grads=True)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_unisrec_gated_sum_equals_the_equations_as_written():
    """UniSRec's adaptor (the gate applied by one batched product, the bias terms b_k W_k once per
    expert) gives the items and the gradients of W, b, W_gate and W_noise of eqs. 2-5 as written
    (reference.unisrec_items) to float rounding, in training: the same seed, the same dropout mask
    and gate noise."""
    emb = sasrec("unisrec").item_emb.train()
    with torch.no_grad():
        for p in (emb.b, emb.W_gate, emb.W_noise):
            p.normal_(0, 0.5)
    weights = torch.randn(len(emb.features), 16)
    out = []
    for items in (lambda x: emb.adapt(x), lambda x: reference.unisrec_items(emb, x)):
        torch.manual_seed(3)
        v = items(emb.features)
        out.append((v, torch.autograd.grad((v * weights).sum(), [emb.W, emb.b, emb.W_gate, emb.W_noise])))
    (ours, ours_grads), (written, written_grads) = out
    torch.testing.assert_close(ours, written)
    for a, b in zip(ours_grads, written_grads):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b)


def test_rank_within_equals_the_full_count():
    """rank_within (a pool first, full scores only where needed) gives every metric of the full
    ranking at every cut-off up to k: on random scores, on rows that are all ties, and on a NaN."""
    g = torch.Generator().manual_seed(0)
    N, B, d = 3000, 300, 8  # N + 1 > 4 * 512: the pool is used
    table, query = torch.randn(N + 1, d, generator=g), torch.randn(B, d, generator=g)
    table[0] = 0
    target = torch.randint(1, N + 1, (B,), generator=g)
    query[:5] = 0  # every score ties: the target ranks last
    query[5, 0] = float("nan")
    table[target[6]] *= 0  # its score 0 ties with every other zero row, below half the items
    table[target[7]] = table[target[7]] * 0 + table[target[8]]  # duplicated rows: an exact tie
    full = rank_of_target(query @ table.T, target)
    for k in (1, 10, 20):
        within = rank_within(query, table, target, k)
        assert torch.equal(within, full.clamp(max=k + 1)), k
    assert (full[:5] == N).all() and full[5] == N


def two_epochs(step_loss, optimizer_kwargs, data, seed=0):
    """Two epochs over `data` (shuffled, seeded) with InfoNCE, dropout 0, then validation metrics."""
    model = sasrec(N=3000, d=16, L=6, seed=seed).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, **optimizer_kwargs)
    g = torch.Generator().manual_seed(1)
    seq, target = data["train"]
    for _ in range(2):
        for idx in torch.randperm(len(target), generator=g).split(64):
            neg = torch.randint(1, 3001, (len(idx), 16), generator=g)
            loss = step_loss(model, seq[idx], target[idx], neg)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_two_epoch_run_equals_the_obvious_implementation():
    """Two epochs of the fast step (fused Adam) and of the obvious one (plain Adam) from the same
    seed, batches and negatives give the same validation metrics to the fourth decimal."""
    g = torch.Generator().manual_seed(5)
    data = {}
    for name, n in (("train", 3000), ("valid", 1500)):
        seq = torch.randint(1, 301, (n, 6), generator=g)  # 300 of the 3000 items, each seen often
        data[name] = (seq, (seq[:, -1] * 7 + 3) % 3000 + 1)  # a learnable rule: the target follows the last item
    fast = two_epochs(lambda m, s, t, neg: m.loss(s, t, "infonce", 0, None, neg=neg), {"fused": True}, data)
    slow = two_epochs(reference.loss, {}, data)
    got = full_ranking(fast.scorer(), *data["valid"])
    want = reference.metrics(slow, *data["valid"])
    for k in want:
        assert abs(got[k].mean().item() - want[k].mean().item()) < 1e-4, (k, got[k].mean(), want[k].mean())
    assert want["NDCG@20"].mean() > 0.02, "the rule was not learned (random: 0.002): the comparison says little"


def test_whole_sequences_equal_windows_where_they_coincide():
    """Every user has exactly L + 1 items: the L windows of a user and its one whole sequence hold
    the same predictions. Without position embeddings (a window's items sit at other slots) and
    dropout, with the same negatives for each (user, position), the two losses are equal."""
    N, L, K, U = 300, 6, 8, 20
    g = torch.Generator().manual_seed(3)
    items = torch.stack([torch.randperm(N, generator=g)[:L + 1] + 1 for _ in range(U)])  # (U, L+1)
    seqs, targets, users = [], [], []
    for u in range(U):  # windows as prepare.py writes them: per user, in time order, left-padded
        for t in range(1, L + 1):
            seqs.append(torch.cat([torch.zeros(L - t, dtype=torch.long), items[u, :t]]))
            targets.append(items[u, t])
            users.append(u)
    windows = {"seq": torch.stack(seqs), "target": torch.stack(targets), "user": torch.tensor(users)}
    sequences = whole_sequences(windows)
    assert torch.equal(sequences["seq"], items[:, :L]) and torch.equal(sequences["target"], items[:, 1:])
    model = sasrec(N=N, L=L).train()
    with torch.no_grad():
        model.encoder.pos.weight.zero_()
    neg = torch.randint(1, N + 1, (U * L, K), generator=g)  # window i is (user i // L, position i % L)
    by_windows = model.loss(windows["seq"], windows["target"], "infonce", K, None, neg=neg)
    by_sequences = model.loss(sequences["seq"], sequences["target"], "infonce", K, None, neg=neg)
    torch.testing.assert_close(by_sequences, by_windows, rtol=1e-5, atol=1e-6)


def test_threads_and_progress_lines(tmp_path, capsys):
    """--threads sets torch's threads (the header says so) and --progress_every 0 prints a line
    with the step, the rate and the ETA after every step, so a slow machine is never silent."""
    data, rng = prepare_toy(tmp_path, lang_dim=24)
    decompose.main([data, "--dim", "16", "--null_dim", "8"])
    threads = torch.get_num_threads()
    try:
        train_discriminative.main([data, "--out", str(tmp_path / "run"), "--epochs", "1", "--batch_size", "64",
                                   "--neg_ratio", "8", "--threads", "2", "--progress_every", "0", "--device", "cpu"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "2 threads" in out
    steps = [line for line in out.splitlines() if "| step " in line]
    assert len(steps) >= 2 and all("windows/s" in line and "ETA" in line for line in steps), out


@pytest.mark.parametrize("item_emb", ["alphafuse", "id", "llminit", "unisrec"])
def test_padding_row_stays_zero_when_the_whole_table_is_trained(item_emb):
    """table() is read whole (not by padding-aware lookups); row 0, the padding item, still gets
    no gradient and stays the zero vector through Adam steps on a loss that touches it."""
    model = sasrec(item_emb)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        loss = model.table().pow(2).sum() + model.table()[0].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not model.table()[0].any()


def test_dropout_is_nn_dropouts_math():
    """model.Dropout zeroes each entry with probability p and scales the others by 1/(1-p) in
    training (so the mean is kept), draws from torch's global generator (seeded runs repeat), and
    is the identity in eval mode."""
    from model import Dropout
    drop, x = Dropout(0.25), torch.ones(200_000)
    torch.manual_seed(0)
    y = drop.train()(x)
    assert abs((y == 0).float().mean().item() - 0.25) < 0.005
    assert torch.equal(y.unique(), torch.tensor([0.0, 1 / 0.75]))
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)
    assert torch.equal(drop.eval()(x), x)
