"""Cold items (prepare.py --cold_items): evaluate.py's cold_item group is the metric over exactly the
samples whose target is cold, training never feeds a cold item, and a trained run holds the cold
items as new items (tests/test_cold_training.py checks the training itself). Uses
test_recommend.py's toy runs (a quarter of the items cold).

    cd /work/main && python -m pytest -q tests/test_eval_cold.py
"""

import os

import numpy as np
import pytest
import torch

import common
import train_diffusion
import train_discriminative
from conftest import read_json, run_main
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


@pytest.mark.parametrize("kind", ["alphafuse", "id", "llminit", "dreamrec"])
def test_a_trained_run_holds_the_cold_items_as_it_started(toy, kind):
    """After training, a cold item's ID part (alphafuse, DreamRec-AlphaFuse) and an ID table's cold
    rows are zero and llminit's cold rows are subspace.pt's language coordinates, so the metrics of
    the run as trained are those of its cold items scored as new items (no evaluation option)."""
    model, cold = load(toy.runs[kind]), toy.meta["cold_items"]
    lang = torch.load(os.path.join(toy.data, "subspace.pt"), weights_only=True)["lang_emb"]
    emb = model.item_emb
    if kind in ("alphafuse", "dreamrec"):
        assert not emb.id_emb[cold].any() and emb.id_emb[1:].any()
        assert torch.equal(emb.table()[cold], lang[cold])
    else:
        assert torch.equal(emb.weight[cold], lang[cold] if kind == "llminit" else torch.zeros_like(lang[cold]))
