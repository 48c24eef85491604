"""Cold items (prepare.py --cold_items): evaluate.py's cold_item group is the metric over exactly the
samples whose target is cold, training never feeds a cold item, and --cold_as_new scores the cold
items as recommend.py scores new items. Uses test_recommend.py's toy runs (a quarter of the items cold).

    cd /work/main && python -m pytest -q tests/test_eval_cold.py
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import common
import train_diffusion
import train_discriminative
from conftest import assert_clean_error, read_json, run_main
from model import full_ranking
from test_recommend import DREAMREC, SASREC, load, server, toy  # noqa: F401 (fixtures)


def per_sample(model, data):
    """Per-sample test metrics of the model, as evaluate.py ranks (full ranking, no mask)."""
    split = common.load_split(data, "test", common.load_meta(data)["num_items"])
    m = full_ranking(model.scorer(0), torch.from_numpy(split["seq"]), torch.from_numpy(split["target"]))
    return m, split["target"]


@pytest.mark.parametrize("kind", ["alphafuse", "id"])
def test_cold_item_group_is_the_metric_over_the_cold_targets(toy, tmp_path, kind):
    """The cold_item value of every metric is the mean over the test samples whose target is in
    meta.json's cold_items (and the trainer's metrics.json has the same numbers)."""
    out = tmp_path / "m.json"
    proc = run_main("evaluate.py", os.path.join(toy.runs[kind], "ckpt.pt"), "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "cold_item" in proc.stdout
    got = read_json(out)["test"]
    m, target = per_sample(load(toy.runs[kind]), toy.data)
    cold = np.isin(target, toy.meta["cold_items"])
    assert 0 < cold.sum() < len(cold)
    for name, values in m.items():
        assert got["cold_item"][name] == pytest.approx(float(values.numpy()[cold].mean()), abs=1e-7), name
        assert got["all"][name] == pytest.approx(float(values.mean()), abs=1e-7), name
    assert read_json(os.path.join(toy.runs[kind], "metrics.json"))["test"] == got


@pytest.mark.parametrize("backbone,flags", [("sasrec", ["--train_on", "windows"]), ("sasrec", ["--train_on", "sequences"]),
                                            ("dreamrec", [])])
def test_training_never_sees_a_cold_item(toy, tmp_path, monkeypatch, backbone, flags):
    """Every batch a trainer's loss gets (histories and targets, windows or whole sequences) is
    free of cold items."""
    seen = []
    cls = train_discriminative.SASRec if backbone == "sasrec" else train_diffusion.DreamRec
    original = cls.loss

    def recording_loss(self, seq, target, *args, **kwargs):
        seen.append((seq.clone(), target.clone()))
        return original(self, seq, target, *args, **kwargs)

    monkeypatch.setattr(cls, "loss", recording_loss)
    if backbone == "sasrec":
        train_discriminative.main([toy.data, "--out", str(tmp_path / "run"), *SASREC, *flags])
    else:
        train_diffusion.main([toy.data, "--out", str(tmp_path / "run"), "--subspace",
                              os.path.join(toy.data, "subspace.pt"), *DREAMREC])
    assert seen
    cold = toy.meta["cold_items"]
    for seq, target in seen:
        assert not np.isin(seq.numpy(), cold).any() and not np.isin(target.numpy(), cold).any()


def test_cold_as_new_zeroes_the_id_part_of_the_cold_items(toy, tmp_path):
    """alphafuse --cold_as_new: the metrics of the model whose cold items have a zero ID part (as
    recommend.py --new_items builds them), in RUN/metrics_coldnew.json; the trainer's file stays."""
    run = str(shutil.copytree(toy.runs["alphafuse"], tmp_path / "run"))
    before = read_json(os.path.join(run, "metrics.json"))
    proc = run_main("evaluate.py", os.path.join(run, "ckpt.pt"), "--cold_as_new", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert read_json(os.path.join(run, "metrics.json")) == before
    got = read_json(os.path.join(run, "metrics_coldnew.json"))["test"]
    model = load(run)
    with torch.no_grad():
        model.item_emb.id_emb[toy.meta["cold_items"]] = 0
    m, target = per_sample(model, toy.data)
    assert got == common.group_means(m, target, common.load_split(toy.data, "test", toy.meta["num_items"])["user"],
                                     toy.meta)


def test_cold_as_new_leaves_adapter_models_as_they_are(toy, tmp_path):
    """whitenrec embeds every item from its language vector alone: --cold_as_new changes nothing."""
    out = tmp_path / "m.json"
    proc = run_main("evaluate.py", os.path.join(toy.runs["whitenrec"], "ckpt.pt"), "--cold_as_new", "--out", out,
                    "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert read_json(out) == read_json(os.path.join(toy.runs["whitenrec"], "metrics.json"))


def test_cold_as_new_is_refused_for_an_id_table_and_for_data_without_cold_items(toy, tmp_path):
    """An ID table cannot score an item as new (one line naming the checkpoint), and data without
    cold items has nothing to score so (one line naming the flag); nothing is written."""
    out = tmp_path / "m.json"
    proc = run_main("evaluate.py", os.path.join(toy.runs["id"], "ckpt.pt"), "--cold_as_new", "--out", out)
    assert "cannot score" in assert_clean_error(proc, "ckpt.pt")
    data = shutil.copytree(toy.data, tmp_path / "data")
    meta = read_json(data / "meta.json")
    (data / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if not k.startswith("cold")}))
    proc = run_main("evaluate.py", os.path.join(toy.runs["alphafuse"], "ckpt.pt"), "--cold_as_new", "--data", data,
                    "--out", out)
    assert_clean_error(proc, "--cold_as_new")
    assert not out.exists()
