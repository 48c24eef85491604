"""The DreamRec baselines of train_diffusion.py (--item_emb llminit, morec, whitenrec, idreamrec):
what makes each one, and that each trains, reloads, resumes, is evaluated and takes new items as
the other variants do. MoRec, WhitenRec and iDreamRec keep the language vectors frozen (a buffer,
unchanged by an optimizer step) while the adapter trains (iDreamRec: nothing of the item side
trains); WhitenRec's and iDreamRec's vectors are whitened (zero mean, identity covariance over the
items); LLMInit's table starts at the subspace's language coordinates and trains, and its cold rows
stay there under weight decay. End to end on prepare_toy's data with a quarter of the items cold,
embedded by test_embed.py's fake server (24-d), subspace_dreamrec.pt with d = d_l = 24.

    cd /work/main && python -m pytest -q tests/test_diffusion_baselines.py
"""

import json
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
import decompose
import embed
import evaluate
import train_diffusion
from conftest import assert_clean_error, prepare_toy, read_json, read_log, run_main
from embeddings import load_subspace
from test_recommend import start_server
from training import item_inputs

torch.set_num_threads(1)

DIM = 24  # d_l of the fake server's vectors
NEW = ["llminit", "morec", "whitenrec", "idreamrec"]
SMALL = ["--hidden_dim", "16", "--batch_size", "64", "--timesteps", "50", "--sample_steps", "5", "--lr", "1e-3",
         "--weight_decay", "0.1", "--device", "cpu", "--threads", "1"]
# model_args of a DreamRec run before these variants existed: --resume compares them, so they must stay
BASE_KEYS = {"item_emb", "num_items", "d", "max_len", "num_blocks", "num_heads", "dropout", "timesteps", "beta_start",
             "beta_end", "schedule", "w", "p_uncond", "sample_steps", "d_s", "id_init"}


@pytest.fixture(scope="module")
def server():
    srv = start_server(DIM)
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.release.set()
    srv.shutdown()
    srv.server_close()


class Runs(dict):
    """RUN folders by item embedding, each trained for one epoch (SMALL: weight decay 0.1) on first use."""

    def __init__(self, root, data):
        super().__init__()
        self.root, self.data = root, data

    def __missing__(self, item_emb):
        self[item_emb] = train(self.data, self.root / item_emb, item_emb)
        return self[item_emb]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, server):
    """prepare_toy's 40 items, 10 of them cold, embedded by the fake server; subspace_dreamrec.pt
    keeps all d_l = 24 directions (d_n = 8); runs: Runs."""
    root = tmp_path_factory.mktemp("dreamrec_baselines")
    data, _ = prepare_toy(root, flags=["--cold_items", "0.25"])
    embed.main([data, "--base_url", server, "--model", "fake", "--batch_size", "16"])
    decompose.main([data, "--dim", str(DIM), "--null_dim", "8", "--out", os.path.join(data, "subspace_dreamrec.pt")])
    items = common.read_items(data)
    return SimpleNamespace(data=data, runs=Runs(root, data), meta=common.load_meta(data),
                           ids=[it["item_id"] for it in items], texts=[it["text"] for it in items])


def train(data, out, item_emb, epochs=1, *flags):
    train_diffusion.main([data, "--out", str(out), "--item_emb", item_emb, *SMALL, "--epochs", str(epochs), *flags])
    return str(out)


def checkpoint(run, name="ckpt.pt"):
    return torch.load(os.path.join(run, name), weights_only=True)


def dreamrec(item_emb, lang=None, N=40, d_l=DIM, d=16, seed=0):
    """A tiny DreamRec over the language tensor `lang` (N+1, d_l), random by default (row 0
    padding), no dropout; d = d_l for llminit and idreamrec."""
    torch.manual_seed(seed)
    if lang is None:
        lang = torch.randn(N + 1, d_l)
        lang[0] = 0
    args = dict(item_emb=item_emb, num_items=N, d=d_l if item_emb in ("llminit", "idreamrec") else d, max_len=6,
                num_blocks=1, num_heads=1, dropout=0.0, timesteps=50, beta_start=1e-4, beta_end=0.02,
                schedule="linear", w=2.0, p_uncond=0.1, sample_steps=5, d_in=d_l)
    return train_diffusion.build_model(args, lang)


def adamw_step(model, seed=1):
    """One AdamW step (no weight decay: a value moves only by its gradient) on a random batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.loss(torch.randint(0, 41, (32, 6), generator=g), torch.randint(1, 41, (32,), generator=g), g).backward()
    opt.step()


# -----------------------------------------------------------------------------
# what makes each baseline


@pytest.mark.parametrize("item_emb", ["morec", "whitenrec", "idreamrec"])
def test_language_vectors_stay_frozen_while_the_adapter_trains(item_emb):
    """One AdamW step on the DreamRec loss: the language vectors are a buffer, not a parameter, and
    unchanged; every adapter parameter moved (morec, whitenrec); iDreamRec has no item parameter and
    its item table is unchanged, while the encoder moved."""
    model = dreamrec(item_emb).train()
    emb = model.item_emb
    assert "features" not in dict(emb.named_parameters()) and not emb.features.requires_grad
    before = {k: v.clone() for k, v in emb.state_dict().items()}
    encoder_before = [p.clone() for p in model.encoder.parameters()]
    adamw_step(model)
    after = emb.state_dict()
    assert torch.equal(after["features"], before["features"])
    params = dict(emb.named_parameters())
    if item_emb == "idreamrec":
        assert not params and torch.equal(emb.table(), before["features"])
    else:
        assert params.keys() == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
        for name in params:
            assert not torch.equal(after[name], before[name]), f"{name} did not train"
    assert any(not torch.equal(p, q) for p, q in zip(model.encoder.parameters(), encoder_before))


def test_llminit_starts_at_the_subspace_coordinates_and_trains(toy):
    """The table train_diffusion.py builds (item_inputs, then the model) is --subspace's E_lang
    (N+1, d_l), row for row; one AdamW step moves the rows of the batch's items."""
    args = SimpleNamespace(item_emb="llminit", subspace=os.path.join(toy.data, "subspace_dreamrec.pt"), num_heads=1,
                           data=toy.data)
    init, dims, _ = item_inputs(args, toy.meta)
    lang = load_subspace(args.subspace)["lang_emb"]
    assert dims["hidden_dim"] == DIM and toy.meta["num_items"] == 40
    model = dreamrec("llminit", init)
    table = model.item_emb.weight
    assert isinstance(table, torch.nn.Parameter) and torch.equal(table.detach(), lang.float())
    adamw_step(model)
    moved = (table.detach() != lang).any(1)
    assert moved[1:].sum() > 20 and not moved[0], "the table did not train (or the padding row moved)"


@pytest.mark.parametrize("item_emb", ["whitenrec", "idreamrec"])
def test_whitened_vectors_have_identity_covariance(toy, item_emb):
    """The run's frozen vectors (N, d_l) have mean 0 and sample covariance I (numpy.cov, as
    decompose.py's): whitened over the items; iDreamRec scores against exactly these vectors."""
    ck = checkpoint(toy.runs[item_emb])
    x = ck["model"]["item_emb.features"].double().numpy()
    assert x.shape == (41, DIM) and not x[0].any()
    np.testing.assert_allclose(x[1:].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(np.cov(x[1:], rowvar=False), np.eye(DIM), atol=1e-4)
    if item_emb == "idreamrec":
        model = evaluate.load_model(ck, "cpu").eval()
        assert torch.equal(model.scorer(0)[1], ck["model"]["item_emb.features"])


def test_morec_adapts_the_vectors_times_the_official_scale(toy):
    """MoRec's frozen vectors are lang_emb.npy's rows times --lang_scale, by default the official
    code's 40 (padding row 0 added), and the checkpoint's model_args say so."""
    ck = checkpoint(toy.runs["morec"])
    x = ck["model"]["item_emb.features"]
    assert ck["model_args"]["lang_scale"] == 40
    assert torch.equal(x[1:], 40 * torch.from_numpy(np.load(os.path.join(toy.data, "lang_emb.npy")))) and not x[0].any()


def test_llminit_cold_rows_keep_the_subspace_coordinates_under_weight_decay(toy):
    """With --weight_decay 0.1 (AdamW's, applied to the weights whatever their gradient) the cold
    items' rows of LLMInit's table are still the subspace's coordinates after training (they take no
    weight decay); the warm rows trained."""
    table = checkpoint(toy.runs["llminit"])["model"]["item_emb.weight"]
    lang = load_subspace(os.path.join(toy.data, "subspace_dreamrec.pt"))["lang_emb"].float()
    cold = toy.meta["cold_items"]
    warm = [i for i in range(1, toy.meta["num_items"] + 1) if i not in cold]
    assert cold and torch.equal(table[cold], lang[cold])
    assert (table[warm] != lang[warm]).any(1).all()


# -----------------------------------------------------------------------------
# end to end: train_diffusion.py, evaluate.py, --resume, recommend.py


@pytest.mark.parametrize("item_emb,d", [("llminit", DIM), ("morec", 16), ("whitenrec", 16), ("idreamrec", DIM)])
def test_smoke_reload_and_evaluate(toy, item_emb, d):
    """One epoch writes every file with a finite loss; ckpt.pt loads weights_only and rebuilds
    strictly from its model_args, whose d is d_l (llminit, idreamrec) or --hidden_dim (morec,
    whitenrec); evaluate.py reproduces metrics.json."""
    run = toy.runs[item_emb]
    for name in ("ckpt.pt", "last.pt", "log.jsonl", "metrics.json"):
        assert os.path.isfile(os.path.join(run, name)), f"{name} missing"
    log = read_log(run)
    assert [r["epoch"] for r in log] == [1] and math.isfinite(log[0]["loss"])
    ck = checkpoint(run)
    assert ck["backbone"] == "dreamrec" and ck["model_args"]["item_emb"] == item_emb and ck["model_args"]["d"] == d
    train_diffusion.build_model(ck["model_args"]).load_state_dict(ck["model"])  # strict
    metrics = read_json(os.path.join(run, "metrics.json"))
    out = os.path.join(run, "again.json")
    evaluate.main([os.path.join(run, "ckpt.pt"), "--out", out, "--device", "cpu"])
    assert read_json(out) == metrics


@pytest.mark.parametrize("item_emb", ["alphafuse", "id", *NEW])
def test_model_args_add_keys_only_for_the_new_variants(toy, item_emb):
    """The model_args that --resume compares: alphafuse's and id's are as before these variants;
    morec, whitenrec and idreamrec add d_in (= d_l), morec also its lang_scale (40), and nothing
    else; llminit adds nothing."""
    args = checkpoint(toy.runs[item_emb])["model_args"]
    extra = {"morec", "whitenrec", "idreamrec"}
    assert set(args) == BASE_KEYS | ({"d_in"} if item_emb in extra else set()) | ({"lang_scale"} if item_emb == "morec" else set())
    assert item_emb not in extra or args["d_in"] == DIM


@pytest.mark.parametrize("item_emb", NEW)
def test_resume_continues_exactly(toy, tmp_path, item_emb):
    """The one-epoch run, resumed to 2 epochs, logs the same losses and validation metrics and
    writes the same test metrics as a straight 2-epoch run."""
    resumed = str(tmp_path / "resumed")
    shutil.copytree(toy.runs[item_emb], resumed)
    train(toy.data, resumed, item_emb, 2, "--resume")
    straight = train(toy.data, tmp_path / "straight", item_emb, 2)
    r, s = read_log(resumed), read_log(straight)
    assert [x["epoch"] for x in r] == [1, 2]
    assert [x["loss"] for x in r] == [x["loss"] for x in s] and [x["valid"] for x in r] == [x["valid"] for x in s]
    assert read_json(os.path.join(resumed, "metrics.json")) == read_json(os.path.join(straight, "metrics.json"))


@pytest.mark.parametrize("item_emb", ["morec", "whitenrec", "idreamrec"])
def test_new_items_score_as_their_known_twin(toy, server, tmp_path, item_emb):
    """recommend.py --new_items on a DreamRec run: a new item with the text of known item 5 gets
    that item's row (adapter, or whitened vector), so exactly its score; all N + 3 items are ranked."""
    path = tmp_path / "new.jsonl"
    rows = [("n1", toy.texts[4]), ("n2", "a new thing"), ("n3", "another arrival")]
    path.write_text("".join(json.dumps({"item_id": i, "text": t}) + "\n" for i, t in rows))
    N = toy.meta["num_items"]
    proc = run_main("recommend.py", toy.runs[item_emb], "--history", toy.ids[20], "--new_items", path, "--base_url",
                    server, "--k", N + 3, "--include_history", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    got = {line.split("\t")[1]: float(line.split("\t")[2]) for line in proc.stdout.splitlines()}
    assert len(got) == N + 3 and got["n1"] == pytest.approx(got[toy.ids[4]], abs=1e-5)


def test_llminit_refuses_new_items(toy, server, tmp_path):
    """LLMInit has one trained row per item: --new_items is one error line naming the checkpoint."""
    path = tmp_path / "new.jsonl"
    path.write_text('{"item_id": "n1", "text": "a new thing"}\n')
    proc = run_main("recommend.py", toy.runs["llminit"], "--history", toy.ids[0], "--new_items", path, "--base_url",
                    server, "--device", "cpu")
    assert "cannot score items it was not trained on" in assert_clean_error(proc, "ckpt.pt")


def test_idreamrec_takes_d_from_the_language_vectors(toy, tmp_path):
    """iDreamRec's d is d_l whatever --hidden_dim says, so --num_heads must divide d_l = 24: 5 heads
    is one error line naming lang_emb.npy and leaves no run folder (--hidden_dim 15 is not checked)."""
    run = tmp_path / "run"
    proc = run_main("train_diffusion.py", toy.data, "--out", run, "--item_emb", "idreamrec", "--hidden_dim", "15",
                    "--num_heads", "5", "--epochs", "1", "--device", "cpu")
    assert_clean_error(proc, "lang_emb.npy")
    assert not run.exists()
