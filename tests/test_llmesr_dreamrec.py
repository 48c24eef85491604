"""What makes train_diffusion.py --item_emb llmesr DreamRec over LLM-ESR's items and encoder: the
condition c and x0 are the two views side by side (D = 2d), and a score x0_hat . e_i is the dot
product over both; the loss adds alpha times the mean squared error of c to the mean state of the
similar users, a constant; --alpha 0 builds no teachers. End to end on test_diffusion_baselines.py's
toy data (a quarter of the items cold, the fake server's 24-d vectors): both regimes train,
evaluate.py reproduces metrics.json, --resume continues exactly, and recommend.py --new_items scores
a new item with a cold item's text as that item. (SASRec's llmesr: test_llmesr.py.)

    cd /work/main && python -m pytest -q tests/test_llmesr_dreamrec.py
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch

import evaluate
import train_diffusion
import training
from conftest import read_json, read_log, run_main
from test_diffusion_baselines import BASE_KEYS, checkpoint, server, toy, train  # noqa: F401 (fixtures)
from test_llmesr import D, D_L, L, N, dual_view_by_hand, seqs

torch.set_num_threads(1)


def dreamrec_llmesr(seed=0):
    """DreamRec-LLM-ESR over random LLM embeddings (N+1, d_l), row 0 padding, d = 8 per view."""
    torch.manual_seed(seed)
    lang = torch.randn(N + 1, D_L)
    lang[0] = 0
    args = dict(item_emb="llmesr", num_items=N, d=D, max_len=L, num_blocks=1, num_heads=2, dropout=0.1,
                timesteps=50, beta_start=1e-4, beta_end=0.02, schedule="linear", w=2.0, p_uncond=0.1,
                sample_steps=5, d_in=D_L)
    return train_diffusion.build_model(args, lang)


@torch.no_grad()
def test_condition_and_x0_are_both_views_and_the_score_their_dot_product():
    """c = [u^co, u^se] (B, 2d), each view's sequence re-read by the other and encoded by the shared
    encoder; x0 = e_target = [e^co, e^se]; the denoiser, the step MLP and the null vector work at
    2d; and the score of item i is x0_hat^co . e^co_i + x0_hat^se . e^se_i for the seeded DDIM sample."""
    model, seq = dreamrec_llmesr().eval(), seqs()
    e_co, e_se, u_co, u_se = dual_view_by_hand(model, seq)
    c = model.condition(seq)
    torch.testing.assert_close(c, torch.cat([u_co, u_se], 1))
    target = seq[:, -1] % N + 1
    torch.testing.assert_close(model.item_emb(target), torch.cat([e_co[target], e_se[target]], 1))
    assert model.null_c.shape == (2 * D,) and model.denoiser.weight.shape == (2 * D, 3 * 2 * D)
    assert model.step_mlp[-1].weight.shape == (2 * D, 2 * D)
    query, table = model.scorer(seed=3)
    x0_hat = query(seq)  # (B, 2d)
    torch.testing.assert_close(x0_hat, model.ddim_sample(c, torch.Generator().manual_seed(3)))
    torch.testing.assert_close(x0_hat @ table.T, x0_hat[:, :D] @ e_co.T + x0_hat[:, D:] @ e_se.T, rtol=1e-5, atol=1e-5)


def test_loss_adds_alpha_times_the_mse_to_the_detached_teacher_mean():
    """In both regimes L = ||f - x0||^2 + alpha mean((c - u^T)^2) with c the condition of each
    sample's last position before the null vector replaces it (p_uncond 0.5 here), u^T the mean
    condition of the user's similar users, computed by hand; the gradients of the added term are
    those of the MSE to u^T precomputed, so none flows through the teacher."""
    model = dreamrec_llmesr().eval()  # no dropout: the teachers' states are the hand computation's
    model.p_uncond = 0.5
    seq = seqs(B=6)
    model.similar = torch.tensor([[1, 2], [0, 2], [3, 4], [5, 0], [1, 3], [2, 4]])  # (U, N)
    model.teacher_seq = seq.roll(1, 0)  # (U, L): not the students' own sequences
    user, g = torch.tensor([3, 0, 5, 1, 4, 2]), lambda: torch.Generator().manual_seed(0)
    params = list(model.parameters())
    with torch.no_grad():
        teacher = model.condition(model.teacher_seq)[model.similar[user]].mean(1)  # (B, 2d)
    for target in (seq[:, -1] % N + 1, torch.roll(seq, -1, 1) * (seq > 0)):
        states = model.condition(seq, all_positions=target.dim() == 2)
        c = states[:, -1] if target.dim() == 2 else states  # (B, 2d)
        want = 0.5 * ((c - teacher) ** 2).mean()
        added = model.loss(seq, target, g(), user, 0.5) - model.loss(seq, target, g())
        torch.testing.assert_close(added, want)
        grads = torch.autograd.grad(added, params, allow_unused=True)
        ref = torch.autograd.grad(want, params, allow_unused=True)
        for (name, p), a, r in zip(model.named_parameters(), grads, ref):
            a, r = (torch.zeros_like(p) if x is None else x for x in (a, r))  # None: no gradient at all
            torch.testing.assert_close(a, r, msg=lambda m: f"{name}: {m}")


def test_alpha_zero_builds_no_teachers(toy, tmp_path, monkeypatch):
    """training.set_teachers retrieves similar users for llmesr with alpha > 0 only (not for
    another item embedding), and a DreamRec llmesr run with --alpha 0 never calls the retrieval."""
    args = SimpleNamespace(item_emb="llmesr", data=toy.data, num_heads=1, hidden_dim=D, alpha=0.1, sim_users=3)
    init, _, _ = training.item_inputs(args, toy.meta)
    for item_emb, alpha, built in (("llmesr", 0.1, True), ("llmesr", 0.0, False), ("morec", 0.1, False)):
        model = dreamrec_llmesr()
        training.set_teachers(model, SimpleNamespace(**{**vars(args), "item_emb": item_emb, "alpha": alpha}), toy.meta, init)
        assert (model.similar is not None) == built, (item_emb, alpha)
        assert not built or model.similar.shape == (len(toy.meta["user_history_len"]), 3)

    def refuse(*_):
        raise AssertionError("similar_users was called with --alpha 0")
    monkeypatch.setattr(training, "similar_users", refuse)
    run = train(toy.data, tmp_path / "run", "llmesr", 1, "--alpha", "0")
    assert os.path.isfile(os.path.join(run, "metrics.json"))


@pytest.mark.parametrize("train_on", ["windows", "sequences"])
def test_trains_evaluate_rebuilds_it_and_resume_continues_exactly(toy, tmp_path, train_on):
    """Two epochs straight and one epoch resumed to two log the same losses and validation metrics,
    and end with the same weights and test metrics; ckpt.pt's model_args are the other variants'
    plus d_in (MoRec's key), d per view, and evaluate.py reproduces metrics.json from it."""
    straight = train(toy.data, tmp_path / "straight", "llmesr", 2, "--train_on", train_on)
    resumed = train(toy.data, tmp_path / "resumed", "llmesr", 1, "--train_on", train_on)
    train(toy.data, resumed, "llmesr", 2, "--train_on", train_on, "--resume")
    r, s = read_log(resumed), read_log(straight)
    assert [x["epoch"] for x in r] == [1, 2] and all(x["loss"] == x["loss"] for x in r)  # finite: not NaN
    assert [x["loss"] for x in r] == [x["loss"] for x in s] and [x["valid"] for x in r] == [x["valid"] for x in s]
    metrics = read_json(os.path.join(straight, "metrics.json"))
    assert read_json(os.path.join(resumed, "metrics.json")) == metrics
    a, b = checkpoint(straight, "last.pt")["model"], checkpoint(resumed, "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ck = checkpoint(straight)
    assert set(ck["model_args"]) == BASE_KEYS | {"d_in", "lang_scale"} and ck["model_args"]["d"] == 16
    assert ck["model"]["item_emb.co_emb"].shape == (41, 16) and ck["model"]["null_c"].shape == (32,)
    out = os.path.join(straight, "again.json")
    evaluate.main([os.path.join(straight, "ckpt.pt"), "--out", out, "--device", "cpu"])
    assert read_json(out) == metrics


def test_a_new_twin_of_a_cold_item_scores_as_the_cold_item(toy, server, tmp_path):  # noqa: F811
    """recommend.py --new_items on a DreamRec llmesr run: a new item gets the adapter of its text's
    vector and its PCA coordinates, what training (AdamW, weight decay 0.1) left a cold item with the
    same text, so it scores as that item against the same x0_hat; all N + 3 items are ranked."""
    cold = toy.meta["cold_items"][0]
    path = tmp_path / "new.jsonl"
    rows = [("n1", toy.texts[cold - 1]), ("n2", "a new thing"), ("n3", "another arrival")]
    path.write_text("".join(json.dumps({"item_id": i, "text": t}) + "\n" for i, t in rows))
    n = toy.meta["num_items"]
    proc = run_main("recommend.py", toy.runs["llmesr"], "--history", toy.ids[20], "--new_items", path, "--base_url",
                    server, "--k", n + 3, "--include_history", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    got = {line.split("\t")[1]: float(line.split("\t")[2]) for line in proc.stdout.splitlines()}
    assert len(got) == n + 3 and got["n1"] == pytest.approx(got[toy.ids[cold - 1]], abs=1e-5)
