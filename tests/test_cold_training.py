"""Training with cold items (prepare.py --cold_items) never touches them: no negative drawn is
cold, the losses do not depend on the cold items' rows, and after training every per-item
parameter keeps its cold rows as they started (zero ID parts, llminit's and --train_lang's
language rows), whatever the item embedding and the loss; without cold items the negatives are
drawn exactly as before (torch.randint(1, N + 1) from the same generator).

    cd /work/main && python -m pytest -q tests/test_cold_training.py
"""

import os

import numpy as np
import pytest
import torch

import common
import train_diffusion
import train_discriminative
from conftest import prepare_embedded_toy
from embeddings import load_subspace
from train_discriminative import SampledScores

torch.set_num_threads(1)

SMALL = ["--hidden_dim", "16", "--neg_ratio", "8", "--batch_size", "64", "--device", "cpu", "--epochs", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """conftest.prepare_embedded_toy with a quarter of its items cold."""
    return prepare_embedded_toy(tmp_path_factory.mktemp("cold"), flags=["--cold_items", "0.25"])


def sasrec(cold=(), item_emb="alphafuse", N=40, seed=0, **kw):
    torch.manual_seed(seed)
    init = torch.randn(N + 1, {"morec": 24, "whitenrec": 24, "unisrec": 24}.get(item_emb, 16))
    init[0] = 0
    args = dict(item_emb=item_emb, num_items=N, d=16, max_len=6, num_blocks=1, num_heads=2, dropout=0.0,
                score="cosine", eval_score="cosine", temperature=0.07, d_in=24, d_s=8, **kw)
    return train_discriminative.build_model(args, init, cold)


def record_candidates(monkeypatch):
    """Every (P, 1 + K) candidate matrix (target, then the negatives) the sampled losses score."""
    seen, apply = [], SampledScores.apply
    monkeypatch.setattr(SampledScores, "apply", lambda u, table, idx, cos: seen.append(idx.clone()) or apply(u, table, idx, cos))
    return seen


# -----------------------------------------------------------------------------
# the loss: no cold negatives, no dependence on the cold rows; no cold items: the draws of before


@pytest.mark.parametrize("redraw", [False, True])
def test_without_cold_items_the_negatives_are_drawn_as_before(monkeypatch, redraw):
    """No cold items: the negatives are torch.randint(1, N + 1, (B, K)) from the loss's generator,
    the draws of the code before cold items existed (so such runs repeat bit for bit); with
    --redraw_negatives, the hits drawn again from the same generator."""
    seen, model = record_candidates(monkeypatch), sasrec()
    g = torch.Generator().manual_seed(3)
    seq, target = torch.randint(1, 41, (30, 6), generator=g), torch.randint(1, 41, (30,), generator=g)
    model.loss(seq, target, "infonce", 16, torch.Generator().manual_seed(7), redraw=redraw)
    g = torch.Generator().manual_seed(7)
    want = torch.randint(1, 41, (30, 16), generator=g)
    while redraw and (hit := want == target[:, None]).any():
        want[hit] = torch.randint(1, 41, (int(hit.sum()),), generator=g)
    assert torch.equal(seen[0][:, 1:], want)


@pytest.mark.parametrize("redraw", [False, True])
def test_no_negative_is_cold(monkeypatch, redraw):
    """Cold items: every negative is a warm item, each drawn about equally often."""
    cold = list(range(5, 41, 4))  # 9 of 40 items
    seen, model = record_candidates(monkeypatch), sasrec(cold)
    g = torch.Generator().manual_seed(0)
    warm = [i for i in range(1, 41) if i not in cold]
    seq, target = torch.tensor(warm)[torch.randint(0, 31, (200, 6), generator=g)], torch.tensor(warm)[:20].repeat(10)
    model.loss(seq, target, "bce", 64, g, redraw=redraw)
    neg = seen[0][:, 1:]
    assert not np.isin(neg.numpy(), cold).any()
    counts = torch.bincount(neg.flatten(), minlength=41)[warm]
    assert counts.min() > 0.8 * counts.float().mean() and (neg != target[:, None]).all() == redraw


@pytest.mark.parametrize("item_emb", ["alphafuse", "id", "llminit", "morec", "whitenrec", "unisrec"])
@pytest.mark.parametrize("loss", ["infonce", "ce", "bce"])
def test_the_loss_does_not_depend_on_the_cold_rows(item_emb, loss):
    """Changing the cold items' rows (their language rows, ID parts, table rows or adapter
    inputs) changes neither the loss nor any gradient: the model never learns of them (ce's full
    softmax leaves them out)."""
    cold = [3, 8, 21, 40]
    g = torch.Generator().manual_seed(1)
    warm = torch.tensor([i for i in range(1, 41) if i not in cold])
    seq, target = warm[torch.randint(0, 36, (50, 6), generator=g)], warm[torch.randint(0, 36, (50,), generator=g)]
    results = []
    for shift in (0.0, 5.0):
        model = sasrec(cold, item_emb)
        with torch.no_grad():
            for t in (*model.item_emb.parameters(), *model.item_emb.buffers()):
                if len(t) == 41:
                    t[cold] += shift
        value = model.loss(seq, target, loss, 16, torch.Generator().manual_seed(2))
        grads = torch.autograd.grad(value, [p for n, p in model.named_parameters() if n.startswith("encoder")])
        results.append((value, grads))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


# -----------------------------------------------------------------------------
# end to end: the cold rows of a trained run are as they started


def cold_rows(run):
    """{name: its cold rows} of every table (N+1, ·) of RUN/ckpt.pt's item embedding, but the
    adapters' frozen inputs."""
    ck = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    meta = common.load_meta(ck["config"]["data"])
    return {k: v[meta["cold_items"]] for k, v in ck["model"].items() if k.startswith("item_emb.")
            and k != "item_emb.features" and v.dim() == 2 and len(v) == meta["num_items"] + 1}


@pytest.mark.parametrize("item_emb,flags", [(e, ["--loss", loss]) for e in ("alphafuse", "id", "llminit")
                                            for loss in ("infonce", "ce", "bce")] + [("morec", ["--loss", "ce"])]
                         + [("alphafuse", ["--train_lang"]), ("alphafuse", ["--id_replace", "--loss", "ce"]),
                            ("llminit", ["--redraw_negatives"]), ("id", ["--train_on", "sequences"])])
def test_sasrec_keeps_the_cold_rows_as_they_started(data, tmp_path, item_emb, flags):
    """Two epochs with a strong weight decay (Adam's, added to the gradients): the ID parts of the
    cold items and an ID table's cold rows are zero, llminit's and --train_lang's cold rows are
    decompose.py's language coordinates (llminit's warm rows moved); morec has no such rows."""
    run = str(tmp_path / "run")
    train_discriminative.main([data, "--out", run, "--item_emb", item_emb, "--weight_decay", "0.1", *SMALL, *flags])
    lang = load_subspace(os.path.join(data, "subspace.pt"))["lang_emb"]
    meta = common.load_meta(data)
    cold, rows = meta["cold_items"], cold_rows(run)
    want = {"item_emb.id_emb": 0 * lang[cold, 8:], "item_emb.lang": lang[cold],
            "item_emb.weight": 0 * lang[cold] if item_emb == "id" else lang[cold]}
    assert rows.keys() == {"alphafuse": {"item_emb.id_emb", "item_emb.lang"}, "morec": set()}.get(item_emb, {"item_emb.weight"})
    for name, values in rows.items():
        assert torch.equal(values, want[name]), name
    if item_emb == "llminit":
        warm = [i for i in range(1, meta["num_items"] + 1) if i not in cold]
        trained = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)["model"]["item_emb.weight"]
        assert not torch.equal(trained[warm], lang[warm])


@pytest.mark.parametrize("item_emb", ["alphafuse", "id"])
def test_dreamrec_keeps_the_cold_id_rows_zero(data, tmp_path, item_emb):
    """DreamRec (no negatives; histories and targets warm): the cold ID rows start zero and stay
    zero, with weight decay."""
    run = str(tmp_path / "run")
    train_diffusion.main([data, "--out", run, "--item_emb", item_emb, "--hidden_dim", "16", "--batch_size", "64",
                          "--timesteps", "50", "--sample_steps", "5", "--lr", "1e-2", "--weight_decay", "0.1",
                          "--epochs", "2", "--device", "cpu"])
    rows = cold_rows(run)
    name = "item_emb.id_emb" if item_emb == "alphafuse" else "item_emb.weight"
    assert not rows[name].any()


@pytest.mark.parametrize("item_emb,kw", [("alphafuse", {}), ("alphafuse", {"train_lang": True}), ("id", {}),
                                         ("llminit", {})])
def test_the_cold_rows_get_no_gradient_from_any_loss(item_emb, kw):
    """keep_rows: a loss that reads every row of the table (the sum of its squares) gives the cold
    rows, as the padding row, a zero gradient, so no loss can move them; the other rows get one."""
    cold = [2, 9, 33]
    model = sasrec(cold, item_emb, **kw)
    (model.table() + 1).pow(2).sum().backward()
    tables = [p for p in model.item_emb.parameters() if len(p) == 41]
    assert len(tables) == 1 + bool(kw)
    for p in tables:
        assert not p.grad[[0, *cold]].any() and p.grad[1].any()
