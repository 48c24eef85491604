"""What makes --item_emb llmesr LLM-ESR (Liu et al., NeurIPS 2024): the LLM embeddings stay frozen
while the adapter, the collaborative table and the cross-attention train; the collaborative table
starts as the PCA of the LLM embeddings; each view's sequence is re-read by the other causally, both
through the one shared encoder; a score is the dot product of the concatenated views; the retrieval
returns the most similar other training users, by the mean LLM embedding of their training items;
the self-distillation term is zero when the teacher is the student's own state and sends no
gradient into the teacher; cold items keep their PCA rows, which is what --new_items gives a new
item's text. And end to end: both training regimes train, evaluate.py and recommend.py rebuild the run.

    cd /work/main && python -m pytest -q tests/test_llmesr.py
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_discriminative
import training
from conftest import prepare_toy, read_json, read_log, run_main
from model import attention_mask
from test_recommend import new_items, parse, recommend_cli, server, toy  # noqa: F401 (fixtures)

torch.set_num_threads(1)

N, D_L, D, L = 40, 24, 8, 6


def llmesr(cold=(), score="dot", seed=0):
    """SASRec-LLM-ESR over random LLM embeddings (N+1, d_l), row 0 padding, d = 8 per view."""
    torch.manual_seed(seed)
    lang = torch.randn(N + 1, D_L)
    lang[0] = 0
    args = dict(item_emb="llmesr", num_items=N, d=D, max_len=L, num_blocks=1, num_heads=2, dropout=0.1,
                score=score, eval_score=score, temperature=0.07, d_in=D_L)
    return train_discriminative.build_model(args, lang, cold)


def seqs(B=5, seed=1):
    """(B, L) left-padded histories of distinct items, at least one item each."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        n = int(torch.randint(1, L + 1, (1,), generator=g))
        out[b, L - n:] = torch.randperm(N, generator=g)[:n] + 1
    return out


def adam_step(model, seq, target):
    """One Adam step (no weight decay) on the InfoNCE loss; returns the parameters before it."""
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.loss(seq, target, "infonce", 8, torch.Generator().manual_seed(0)).backward()
    opt.step()
    return before


# -----------------------------------------------------------------------------
# the dual-view items

def test_semantic_view_is_the_two_layer_adapter_with_its_gradients():
    """e^se = semantic(E^llm), the adapter as one affine map x (W_2 W_1)^T + W_2 b_1 + b_2, gives the
    numbers of the two layers W_2 (W_1 x + b_1) + b_2 and the gradients of all four of their
    parameters (to float rounding), for a loss that weighs every output differently."""
    emb = llmesr().item_emb
    x, weights = emb.features, torch.randn(N + 1, D)
    grads = []
    for adapt in (emb.adapter, emb.semantic):
        out = adapt(x)
        (out * weights).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in emb.adapter.parameters()]))
        emb.zero_grad()
    (two_layers, want), (affine, got) = grads
    torch.testing.assert_close(affine, two_layers)
    assert len(want) == 4 and all(g.abs().sum() > 0 for g in want)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)


def test_llm_embeddings_stay_frozen_while_adapter_table_and_cross_attention_train():
    """One Adam step: the LLM embeddings are a buffer, not a parameter, and unchanged; the adapter's
    two layers, the collaborative table (its real rows) and both cross-attentions moved."""
    model = llmesr().train()
    emb = model.item_emb
    assert "features" not in dict(emb.named_parameters()) and not emb.features.requires_grad
    lang = emb.features.clone()
    seq = seqs()
    before = adam_step(model, seq, seq[:, -1] % N + 1)
    assert torch.equal(emb.features, lang)
    for name in ("item_emb.adapter.0.weight", "item_emb.adapter.1.weight", "encoder.cross.0.q.weight",
                 "encoder.cross.0.kv.weight", "encoder.cross.1.q.weight", "encoder.cross.1.kv.weight"):
        assert not torch.equal(dict(model.named_parameters())[name], before[name]), f"{name} did not train"
    moved = (emb.co_emb != before["item_emb.co_emb"]).any(1)
    assert moved[seq[seq > 0]].all() and not moved[0], "the collaborative rows of the batch's items did not train"


def test_collaborative_table_starts_as_the_pca_of_the_llm_embeddings():
    """E^co[1:] = the first d principal-component coordinates of the LLM embeddings, by numpy's SVD
    of the centred matrix (each column up to its sign); the padding row is zero."""
    emb = llmesr().item_emb
    X = emb.features[1:].double().numpy()
    Xc = X - X.mean(0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    want = Xc @ Vt[:D].T  # (N, d)
    got = emb.co_emb.detach()[1:].double().numpy()
    signs = np.sign((want * got).sum(0))
    np.testing.assert_allclose(got, want * signs, atol=1e-4)
    assert not emb.co_emb[0].any()


def test_cold_items_keep_their_pca_rows_and_get_no_gradient():
    """Cold items (prepare.py --cold_items): their collaborative rows are their PCA rows (not zero),
    unchanged after a full-softmax step, which reaches every row of the table."""
    model = llmesr(cold=(3, 7)).train()
    emb = model.item_emb
    rows = emb.co_emb.detach()[[3, 7]].clone()
    torch.testing.assert_close(rows, emb.reduce(emb.features[[3, 7]]))
    assert rows.abs().sum() > 0
    seq = seqs()
    seq[0, -1] = 3  # an input, so that only keep_rows stops its gradient
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.loss(seq, seq[:, -1] % N + 1, "ce", 0, None).backward()
    opt.step()
    assert torch.equal(emb.co_emb[[3, 7]], rows)


# -----------------------------------------------------------------------------
# the dual-view encoder and the score

def dual_view_by_hand(model, seq):
    """The items e^co = E^co and e^se = adapter(E^llm) (N+1, d) each, and the states u^co, u^se
    (B, d) of the histories seq (B, L): the shared encoder's states of each view's sequence re-read
    by the other through its cross-attention, written out from the model's parts."""
    emb = model.item_emb
    e_co, e_se = emb.co_emb, emb.adapter(emb.features) * (torch.arange(len(emb.features)) > 0)[:, None]
    co, se = e_co[seq], e_se[seq]  # (B, L, d)
    mask = attention_mask(seq)[:, None]
    cross, encoder = model.encoder.cross, model.encoder.encoder
    return e_co, e_se, encoder(cross[0](co, se, mask), seq), encoder(cross[1](se, co, mask), seq)


@torch.no_grad()
def test_score_is_the_dot_product_of_the_concatenated_views():
    """With --score dot, a history's score for item i is u^co . e^co_i + u^se . e^se_i, where
    e^co = E^co, e^se = adapter(E^llm), and u^co (u^se) is the shared encoder's state of the
    collaborative (semantic) sequence re-read by the other view through its cross-attention."""
    model, seq = llmesr().eval(), seqs()
    e_co, e_se, u_co, u_se = dual_view_by_hand(model, seq)
    query, table = model.scorer()
    torch.testing.assert_close(query(seq) @ table.T, u_co @ e_co.T + u_se @ e_se.T, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cross_attention_and_encoder_are_causal():
    """Changing the items after position t changes no state at positions <= t (whole-sequence
    training predicts each position's next item, which must stay unseen)."""
    model = llmesr().eval()
    seq = torch.tensor([[0, 4, 9, 2, 17, 30]])
    other = torch.tensor([[0, 4, 9, 25, 11, 8]])
    table = model.table()
    a, b = model.user_state(seq, table, all_positions=True), model.user_state(other, table, all_positions=True)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


# -----------------------------------------------------------------------------
# retrieval augmented self-distillation

def windows(histories):
    """prepare.py's windows of whole training sequences {user: [items]}: per user, in time order."""
    seq, target, user = [], [], []
    for u, items in histories.items():
        for t in range(1, len(items)):
            h = items[max(0, t - L):t]
            seq.append([0] * (L - len(h)) + h)
            target.append(items[t])
            user.append(u)
    return {"seq": torch.tensor(seq), "target": torch.tensor(target), "user": torch.tensor(user)}


def test_retrieval_returns_the_most_similar_other_training_users():
    """Items 1-2 point along axis 0, 3-4 along axis 1, 5-6 along axis 2, 7 between axes 0 and 1.
    User 0 holds {1, 2}, user 1 {1, 7} (item 1 only in a history: without it user 3 would be its
    nearest), user 2 {3, 4}, user 3 {4, 7}, user 4 {5, 4}; user 5 has no training window. Each
    user's nearest other users are known by hand, the user itself (cosine 1) is never returned, nor
    is user 5; teacher_seq holds the last L training items."""
    features = torch.zeros(8, 3)
    features[[1, 2], 0] = features[[3, 4], 1] = features[[5, 6], 2] = 1
    features[7] = torch.tensor([0.6, 0.8, 0.0])
    train = windows({0: [1, 2], 1: [1, 7], 2: [3, 4], 3: [4, 7], 4: [5, 4]})
    similar, teacher_seq = training.similar_users(train, features, 1, num_users=6)
    assert similar[:5, 0].tolist() == [1, 0, 3, 2, 2]
    similar, _ = training.similar_users(train, features, 2, num_users=6)
    for u in range(5):
        assert u not in similar[u].tolist() and 5 not in similar[u].tolist()
    assert similar[0].tolist() == [1, 3] and similar[2].tolist() == [3, 4]
    assert teacher_seq[1].tolist() == [0, 0, 0, 0, 1, 7] and teacher_seq[4].tolist() == [0, 0, 0, 0, 5, 4]


def teachers(model, user_seq):
    """Each user its own single similar user (user i <- user i), teacher_seq = user_seq."""
    model.similar = torch.arange(len(user_seq))[:, None]
    model.teacher_seq = user_seq


def test_distillation_is_zero_when_the_teacher_is_the_students_own_state():
    """A user whose retrieved similar user has the user's own sequence: L_sd = 0 (eval mode: no
    dropout draws between student and teacher); another user's sequence: L_sd > 0."""
    model = llmesr().eval()
    seq, table = seqs(), model.table()
    teachers(model, seq)
    u = model.user_state(seq, table)
    assert model.self_distillation(u, torch.arange(len(seq)), table).item() == 0
    assert model.self_distillation(u, torch.arange(len(seq)).roll(1), table).item() > 0


def test_the_teacher_is_the_mean_state_of_the_similar_users_and_gets_no_gradient():
    """L_sd = mean over users and coordinates of (u - mean_k state(S_k))^2 with the teacher a
    constant: the gradients of every parameter equal those of the MSE to a precomputed teacher."""
    model = llmesr().eval()
    seq = seqs(B=6)
    teachers(model, seq)
    model.similar = torch.tensor([[1, 2], [0, 2], [3, 4], [5, 0], [1, 3], [2, 4]])
    user = torch.tensor([0, 3, 5])
    with torch.no_grad():
        states = model.user_state(seq, model.table())
        want_teacher = states[model.similar[user]].mean(1)  # (3, 2d)
    table = model.table()
    loss = model.self_distillation(model.user_state(seq[user], table), user, table)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    table = model.table()
    ref = F.mse_loss(model.user_state(seq[user], table), want_teacher)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, ref)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            torch.testing.assert_close(g, r, msg=lambda m: f"{name}: {m}")


def test_loss_adds_alpha_times_the_distillation():
    """L = L_rank + alpha L_sd, in both regimes (windows: each window's state; whole sequences: the
    state of the last position), with the same negatives."""
    model = llmesr().eval()
    seq = seqs(B=6)
    teachers(model, seq.roll(1, 0))
    user, g = torch.arange(6), lambda: torch.Generator().manual_seed(0)
    for target, last in ((seq[:, -1] % N + 1, lambda s: s), (torch.roll(seq, -1, 1) * (seq > 0), lambda s: s[:, -1])):
        rank = model.loss(seq, target, "infonce", 8, g())
        both = model.loss(seq, target, "infonce", 8, g(), user=user, alpha=0.5)
        table = model.table()
        u = last(model.user_state(seq, table, all_positions=target.dim() == 2))
        torch.testing.assert_close(both, rank + 0.5 * model.self_distillation(u, user, table))


# -----------------------------------------------------------------------------
# end to end

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The toy dataset with random LLM embeddings lang_emb.npy (40, 24)."""
    root = tmp_path_factory.mktemp("llmesr")
    out, rng = prepare_toy(root, lang_dim=24)
    return out


@pytest.mark.parametrize("train_on,loss", [("windows", "infonce"), ("sequences", "bce")])
def test_trains_and_evaluate_rebuilds_it(data, tmp_path, train_on, loss):
    """Two epochs in either regime: finite losses, ckpt.pt whose model_args hold no key beyond the
    other runs' (d_in is MoRec's), and evaluate.py reproduces the trainer's test metrics from it."""
    run = str(tmp_path / "run")
    proc = run_main("train_discriminative.py", data, "--out", run, "--item_emb", "llmesr", "--train_on", train_on,
                    "--loss", loss, "--hidden_dim", "8", "--num_heads", "2", "--neg_ratio", "8", "--batch_size", "32",
                    "--epochs", "2", "--device", "cpu", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert all(np.isfinite(r["loss"]) for r in read_log(run)) and len(read_log(run)) == 2
    ckpt = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    assert ckpt["model"]["item_emb.co_emb"].shape == (41, 8) and ckpt["model_args"]["d_in"] == 24
    trained = read_json(os.path.join(run, "metrics.json"))
    os.remove(os.path.join(run, "metrics.json"))
    proc = run_main("evaluate.py", os.path.join(run, "ckpt.pt"), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert read_json(os.path.join(run, "metrics.json")) == trained


def test_hidden_dim_above_the_llm_dimension_is_one_error(data, tmp_path):
    """PCA gives at most d_l directions: --hidden_dim 32 over 24-d vectors is one error line."""
    proc = run_main("train_discriminative.py", data, "--out", tmp_path / "run", "--item_emb", "llmesr",
                    "--hidden_dim", "32", "--epochs", "1", "--device", "cpu")
    assert proc.returncode == 1 and "--hidden_dim 32" in proc.stderr and "Traceback" not in proc.stderr


def test_a_new_twin_of_a_cold_item_scores_as_the_cold_item(toy, server, tmp_path):  # noqa: F811
    """recommend.py --new_items: a new item gets the adapter of its text's vector and its PCA
    coordinates, what training left a cold item with the same text, so it scores as that item."""
    cold = toy.meta["cold_items"][0]
    path, _ = new_items(tmp_path, toy, twin=cold)
    n = toy.meta["num_items"]
    proc = recommend_cli(toy.runs["llmesr"], "--history", toy.ids[20], "--new_items", path, "--base_url", server[1],
                         "--k", n + 3, "--include_history")
    assert proc.returncode == 0, proc.stderr
    got = {i: s for _, i, s, _ in parse(proc.stdout)}
    assert len(got) == n + 3 and got["n1"] == pytest.approx(got[toy.ids[cold - 1]], abs=1e-5)
