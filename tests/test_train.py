"""train_discriminative.py and evaluate.py end to end on a tiny generated dataset (60 users, 40
items, random 24-d language embeddings, decompose.py --dim 16 --null_dim 8): every item embedding
and loss trains, the checkpoint reloads and reproduces its metrics, runs are deterministic and
resumable, AlphaFuse's language coordinates stay frozen, bad input fails with one clean line.

    cd /work/main && python -m pytest -q tests/test_train.py
"""

import math
import os
import shutil

import numpy as np
import pytest
import torch

import common
from embeddings import load_subspace
import decompose
import evaluate
import train_discriminative
from conftest import assert_clean_error, prepare_toy, read_json, read_log, run_script

torch.set_num_threads(1)

SMALL = ["--hidden_dim", "16", "--neg_ratio", "8", "--batch_size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """DATA prepared from generated RecBole atomic files, with lang_emb.npy (40, 24) and subspace.pt
    (d = 16, d_s = 8, d_n = 8)."""
    root = tmp_path_factory.mktemp("train")
    out, rng = prepare_toy(root, lang_dim=24)
    decompose.main([out, "--dim", "16", "--null_dim", "8"])
    return out


def train(data, out, *flags, epochs=1):
    """train_discriminative.main in-process; returns RUN as a str."""
    train_discriminative.main([data, "--out", str(out), *SMALL, "--epochs", str(epochs), *map(str, flags)])
    return str(out)


# -----------------------------------------------------------------------------
# one epoch of every item embedding and every loss


@pytest.mark.parametrize("item_emb,loss", [("alphafuse", "infonce"), ("id", "infonce"), ("llminit", "infonce"),
                                           ("morec", "infonce"), ("whitenrec", "infonce"), ("unisrec", "infonce"),
                                           ("alphafuse", "ce"), ("alphafuse", "bce")])
def test_one_epoch_smoke(data, tmp_path, item_emb, loss):
    """One epoch writes ckpt.pt, last.pt, log.jsonl (finite loss) and metrics.json (test, every
    group, every metric finite in [0, 1]; None only for an empty group)."""
    run = train(data, tmp_path / "run", "--item_emb", item_emb, "--loss", loss)
    for name in ("ckpt.pt", "last.pt", "log.jsonl", "metrics.json"):
        assert os.path.isfile(os.path.join(run, name)), f"{name} missing"
    log = read_log(run)
    assert [r["epoch"] for r in log] == [1] and math.isfinite(log[0]["loss"])
    results = read_json(os.path.join(run, "metrics.json"))
    assert list(results) == ["test"]
    groups = results["test"]
    assert set(groups) == {"all", "head_item", "tail_item", "head_user", "tail_user"}
    assert set(groups["all"]) == {f"{m}@{k}" for m in ("HR", "NDCG", "MRR") for k in (10, 20)}
    assert all(v is not None for v in groups["all"].values())
    for group, values in groups.items():
        for name, v in values.items():
            assert v is None or (math.isfinite(v) and 0.0 <= v <= 1.0), f"{group} {name} = {v}"
    assert not [f for f in os.listdir(run) if ".tmp" in f], "temporary files left behind"


# -----------------------------------------------------------------------------
# checkpoints


@pytest.fixture(scope="module")
def alphafuse_run(data, tmp_path_factory):
    """AlphaFuse with the ID block initialised to zeros, 2 epochs."""
    return train(data, tmp_path_factory.mktemp("af") / "run", "--id_init", "zeros", epochs=2)


def test_checkpoint_loads_weights_only(alphafuse_run):
    """ckpt.pt loads with weights_only=True and holds model, optimizer, model_args, config, epoch,
    best_val; model_args rebuild the model that its state_dict fits."""
    ck = torch.load(os.path.join(alphafuse_run, "ckpt.pt"), weights_only=True)
    for key in ("model", "optimizer", "model_args", "config", "epoch", "best_val"):
        assert key in ck, key
    assert ck["epoch"] in (1, 2) and 0.0 <= ck["best_val"] <= 1.0
    assert ck["model_args"]["item_emb"] == "alphafuse" and ck["model_args"]["d"] == 16
    train_discriminative.build_model(ck["model_args"]).load_state_dict(ck["model"])  # strict


def test_evaluate_reproduces_trainer_metrics(alphafuse_run, tmp_path):
    """evaluate.py on ckpt.pt writes exactly the numbers the trainer wrote to metrics.json."""
    out = str(tmp_path / "again.json")
    evaluate.main([os.path.join(alphafuse_run, "ckpt.pt"), "--out", out, "--device", "cpu"])
    assert read_json(out) == read_json(os.path.join(alphafuse_run, "metrics.json"))


def test_masked_and_sampled_evaluation_never_rank_lower(alphafuse_run, tmp_path):
    """--mask_history and --sampled 20 only remove competitors of the target, so every metric of
    every group is at least its full-ranking value (and the files are written)."""
    ckpt = os.path.join(alphafuse_run, "ckpt.pt")
    full = read_json(os.path.join(alphafuse_run, "metrics.json"))["test"]
    for flags in (["--mask_history"], ["--sampled", "20"]):
        out = str(tmp_path / "m.json")
        evaluate.main([ckpt, "--out", out, "--device", "cpu", *flags])
        other = read_json(out)["test"]
        for group, values in full.items():
            for name, v in values.items():
                if v is not None:
                    assert other[group][name] >= v - 1e-12, f"{flags} {group} {name}: {other[group][name]} < {v}"
        if flags[0] == "--sampled":  # 20 of the 30-odd competitors: the protocol was applied
            assert other["all"]["MRR@20"] > full["all"]["MRR@20"]


def test_language_coordinates_stay_frozen(alphafuse_run, data):
    """After training, AlphaFuse's language buffer equals decompose.py's lang_emb exactly, while the
    ID block (initialised to zeros) has moved; its padding row stays zero."""
    model = torch.load(os.path.join(alphafuse_run, "last.pt"), weights_only=True)["model"]
    sub = load_subspace(os.path.join(data, "subspace.pt"))
    assert torch.equal(model["item_emb.lang"], sub["lang_emb"].float())
    id_emb = model["item_emb.id_emb"]  # (N+1, d_n)
    assert id_emb.shape == (len(sub["lang_emb"]), sub["d_n"])
    assert id_emb[1:].abs().max() > 1e-3, "the ID block did not train"
    assert torch.count_nonzero(id_emb[0]) == 0, "the padding row of the ID block moved"


# -----------------------------------------------------------------------------
# determinism and resuming


def test_same_seed_same_losses(data, tmp_path):
    """Two CPU runs with the same seed log identical losses and validation metrics; another seed
    gives different losses."""
    a = read_log(train(data, tmp_path / "a", "--seed", "5", epochs=2))
    b = read_log(train(data, tmp_path / "b", "--seed", "5", epochs=2))
    c = read_log(train(data, tmp_path / "c", "--seed", "6", epochs=2))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["valid"] for r in a] == [r["valid"] for r in b]
    assert [r["loss"] for r in a] != [r["loss"] for r in c]


@pytest.mark.parametrize("file_order", [False, True])
def test_batch_order(data, tmp_path, monkeypatch, file_order):
    """The targets each step trains on, over 2 epochs: a different permutation of train.npz's
    samples each epoch, or with --file_order (the official code's) train.npz's order every epoch."""
    seen, loss = [], train_discriminative.SASRec.loss
    monkeypatch.setattr(train_discriminative.SASRec, "loss",
                        lambda self, seq, target, *a, **k: seen.append(target.clone()) or loss(self, seq, target, *a, **k))
    train(data, tmp_path / "run", "--train_on", "windows", *(["--file_order"] if file_order else []), epochs=2)
    epochs = torch.cat(seen).view(2, -1)
    file = torch.from_numpy(np.load(os.path.join(data, "train.npz"))["target"])
    for order in epochs:
        assert sorted(order.tolist()) == sorted(file.tolist())
    assert file_order == epochs[0].equal(file) == epochs[1].equal(file)
    assert file_order == epochs[0].equal(epochs[1])


def test_redraw_negatives_draws_until_no_negative_is_the_target():
    """With 2 items every redrawn negative is the other item, so the loss is that of K copies of it;
    masking (the default) leaves some hits out and gives another loss."""
    model = train_discriminative.build_model(dict(item_emb="id", num_items=2, d=8, max_len=4, num_blocks=1,
                                                  num_heads=1, dropout=0.0, score="cosine", eval_score="cosine",
                                                  temperature=0.07))
    seq, target = torch.tensor([[0, 1, 2, 1], [0, 0, 2, 2], [1, 1, 1, 2]]), torch.tensor([1, 2, 2])
    g = torch.Generator().manual_seed(0)
    redrawn = model.loss(seq, target, "infonce", 16, g, redraw=True)
    other = (3 - target)[:, None].expand(3, 16)
    assert torch.allclose(redrawn, model.loss(seq, target, "infonce", 16, None, neg=other), atol=0, rtol=1e-6)
    assert not torch.allclose(model.loss(seq, target, "infonce", 16, g.manual_seed(0)), redrawn)


@pytest.mark.parametrize("dropout", ["0.1", "0.0"])
def test_resume_continues_exactly(data, tmp_path, dropout):
    """2 epochs, then --resume to 3, logs the same losses and validation metrics as an uninterrupted
    3-epoch run, and the resumed run continues at epoch 3 (with the default dropout and without)."""
    flags = ["--dropout", dropout]
    resumed = train(data, tmp_path / "resumed", *flags, epochs=2)
    train(data, resumed, *flags, "--resume", epochs=3)
    straight = train(data, tmp_path / "straight", *flags, epochs=3)
    r, s = read_log(resumed), read_log(straight)
    assert [x["epoch"] for x in r] == [1, 2, 3]
    assert [x["loss"] for x in r] == [x["loss"] for x in s]
    assert [x["valid"] for x in r] == [x["valid"] for x in s]
    assert read_json(os.path.join(resumed, "metrics.json")) == read_json(os.path.join(straight, "metrics.json"))


def test_resume_drops_log_lines_that_last_pt_lacks(data, tmp_path):
    """A run stopped after writing epoch 3's log line but before its last.pt (the log comes first):
    --resume from epoch 2 drops that line and runs epoch 3 again, so the log is the uninterrupted one."""
    run = train(data, tmp_path / "run", epochs=2)
    with open(os.path.join(run, "log.jsonl"), "a") as f:
        f.write('{"epoch": 3, "loss": 123.0}\n')
    train(data, run, "--resume", epochs=3)
    straight = train(data, tmp_path / "straight", epochs=3)
    assert [r["epoch"] for r in read_log(run)] == [1, 2, 3]
    assert [(r["loss"], r["valid"]) for r in read_log(run)] == [(r["loss"], r["valid"]) for r in read_log(straight)]


def test_lang_scale_multiplies_the_baselines_vectors_and_resume_refuses_another(data, tmp_path):
    """--lang_scale s feeds morec s times lang_emb.npy's rows, by default the official code's 40.
    At 1 the model_args are those from before the flag, so the runs trained then still resume;
    resuming a run with another scale is one error line naming lang_scale, and the run is as it was."""
    lang = torch.from_numpy(np.load(os.path.join(data, "lang_emb.npy")))
    for flags, scale in (((), 40.0), (("--lang_scale", 1), None), (("--lang_scale", 2.5), 2.5)):
        run = train(data, tmp_path / f"run{scale}", "--item_emb", "morec", *flags)
        ck = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
        assert ck["model_args"].get("lang_scale") == scale
        assert torch.equal(ck["model"]["item_emb.features"][1:], (scale or 1) * lang)
    log = read_log(run)
    proc = run_script("train_discriminative.py", data, "--out", run, *SMALL, "--item_emb", "morec", "--epochs", "2",
                      "--resume")
    assert_clean_error(proc, "last.pt")
    assert "lang_scale" in proc.stderr and read_log(run) == log


# -----------------------------------------------------------------------------
# bad input: one 'error:' line on stderr, no traceback, non-zero exit, no output


def test_evaluate_missing_checkpoint(tmp_path):
    """evaluate.py on a checkpoint that does not exist."""
    missing = str(tmp_path / "nope" / "ckpt.pt")
    assert_clean_error(run_script("evaluate.py", missing), missing)


def test_evaluate_not_a_trainer_checkpoint(data, tmp_path):
    """evaluate.py on a .pt file that is not a trainer checkpoint (decompose.py's subspace.pt)."""
    path = os.path.join(data, "subspace.pt")
    assert_clean_error(run_script("evaluate.py", path, "--out", tmp_path / "m.json"), path)
    assert not os.path.exists(tmp_path / "m.json")


def test_evaluate_dataset_with_other_item_count(data, alphafuse_run, tmp_path):
    """evaluate.py --data pointing at a dataset whose N differs from the checkpoint's."""
    other = str(tmp_path / "other")
    shutil.copytree(data, other)
    meta = read_json(os.path.join(other, "meta.json"))
    meta["num_items"] += 1
    meta["item_popularity"].append(0)
    common.write_json(os.path.join(other, "meta.json"), meta)
    proc = run_script("evaluate.py", os.path.join(alphafuse_run, "ckpt.pt"), "--data", other,
                      "--out", tmp_path / "m.json")
    assert_clean_error(proc, "meta.json")
    assert not os.path.exists(tmp_path / "m.json")


def test_evaluate_sampled_more_than_items(data, alphafuse_run, tmp_path):
    """evaluate.py --sampled M with M larger than the number of items."""
    proc = run_script("evaluate.py", os.path.join(alphafuse_run, "ckpt.pt"), "--sampled", "100",
                      "--out", tmp_path / "m.json")
    assert_clean_error(proc, "--sampled", "sampled")
    assert not os.path.exists(tmp_path / "m.json")


def test_train_missing_subspace(data, tmp_path):
    """train_discriminative.py --item_emb alphafuse without the subspace file: no run folder made."""
    missing = str(tmp_path / "none.pt")
    run = tmp_path / "run"
    proc = run_script("train_discriminative.py", data, "--out", run, "--subspace", missing, "--epochs", "1")
    assert_clean_error(proc, missing)
    assert not run.exists()


def test_train_subspace_with_other_item_count(data, tmp_path):
    """train_discriminative.py with a subspace whose N differs from the dataset's."""
    sub = torch.load(os.path.join(data, "subspace.pt"), weights_only=True)
    sub["lang_emb"] = sub["lang_emb"][:-1]
    path = str(tmp_path / "short.pt")
    torch.save(sub, path)
    run = tmp_path / "run"
    proc = run_script("train_discriminative.py", data, "--out", run, "--subspace", path, "--epochs", "1")
    assert_clean_error(proc, path)
    assert not run.exists()
