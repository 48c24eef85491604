"""Where evaluate.py writes without --out: beside CKPT, under a name derived from the options, so
that only the trainer's own protocol (test split, full ranking, no mask, --ks 10,20) rewrites the
trainer's RUN/metrics.json, which run.sh and report.py read, and then with the same bytes. The
checkpoint is a 1-epoch run of train_discriminative.py on the toy dataset of conftest.prepare_toy.

    cd /work/main && python -m pytest -q tests/test_eval_outputs.py
"""

import argparse
import os
import shutil

import pytest
import torch

import evaluate
import train_discriminative
from conftest import assert_clean_error, prepare_toy, read_json, run_main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(DATA, RUN) of a 1-epoch ID-only SASRec, d = 16."""
    root = tmp_path_factory.mktemp("eval_outputs")
    data, _ = prepare_toy(root)
    run = str(root / "run")
    train_discriminative.main([data, "--out", run, "--item_emb", "id", "--hidden_dim", "16", "--neg_ratio", "8",
                               "--batch_size", "64", "--epochs", "1", "--device", "cpu"])
    return data, run


def copy_run(run, tmp_path):
    """A copy of RUN to evaluate into (its checkpoint names the module's DATA)."""
    return str(shutil.copytree(run, tmp_path / "run"))


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


CASES = {"plain": ([], "metrics.json"), "seed-unused": (["--seed", "3"], "metrics.json"),
         "masked": (["--mask_history"], "metrics_masked.json"), "valid": (["--split", "valid"], "metrics_valid.json"),
         "ks": (["--ks", "5,10"], "metrics_k5,10.json"), "dot": (["--eval_score", "dot"], "metrics_dot.json"),
         "own-score": (["--eval_score", "cosine"], "metrics.json"),
         "sampled": (["--sampled", "5", "--seed", "3"], "metrics_sampled5_seed3.json"),
         "all": (["--split", "valid", "--mask_history", "--ks", "20,10,20"], "metrics_valid_masked_k20,10.json")}


@pytest.mark.parametrize("case", CASES)
def test_evaluate_without_out_keeps_the_trainers_metrics(trained, tmp_path, case):
    """Without --out, RUN/metrics.json stays byte-identical and the evaluation's file is the only new
    one: metrics.json itself for the trainer's protocol (SASRec draws nothing, so --seed does not
    count), else a name built from the options that differ. The old default overwrote metrics.json
    with masked, validation or sampled numbers."""
    flags, name = CASES[case]
    run = copy_run(trained[1], tmp_path)
    metrics = os.path.join(run, "metrics.json")
    before, files = read_bytes(metrics), set(os.listdir(run))
    proc = run_main("evaluate.py", os.path.join(run, "ckpt.pt"), *flags, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert read_bytes(metrics) == before, f"{case} changed the trainer's metrics.json"
    assert set(os.listdir(run)) - files == ({name} - {"metrics.json"})
    out = os.path.join(run, name)
    assert proc.stdout.splitlines()[-1] == f"wrote {out}"
    split = "valid" if "--split" in flags else "test"
    assert list(read_json(out)) == [split]
    if name != "metrics.json":  # the evaluation measured something else than the trainer did
        assert read_json(out) != read_json(metrics)


def test_evaluate_other_data_folder_needs_out(trained, tmp_path):
    """--data naming another folder than the one CKPT was trained on, without --out, is refused
    naming --data (its numbers would land in the trainer's metrics.json); RUN is left as it was.
    The same folder by another path is the trainer's protocol."""
    run = copy_run(trained[1], tmp_path)
    before = {f: read_bytes(os.path.join(run, f)) for f in os.listdir(run)}
    other = shutil.copytree(trained[0], tmp_path / "other")
    assert_clean_error(run_main("evaluate.py", os.path.join(run, "ckpt.pt"), "--data", other, "--device", "cpu"),
                       "--data")
    alias = os.path.relpath(trained[0], tmp_path)
    proc = run_main("evaluate.py", os.path.join(run, "ckpt.pt"), "--data", alias, "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {f: read_bytes(os.path.join(run, f)) for f in os.listdir(run)} == before


@pytest.mark.parametrize("backbone,seed,name", [("sasrec", 3, "metrics.json"), ("dreamrec", 0, "metrics.json"),
                                                ("dreamrec", 3, "metrics_seed3.json")])
def test_evaluate_seed_names_the_file_only_where_it_changes_the_numbers(backbone, seed, name):
    """--seed is part of the name only where something is drawn: DreamRec draws x_T from it (the
    trainer's metrics.json used seed 0), SASRec's full ranking draws nothing."""
    args = argparse.Namespace(ckpt="RUN/ckpt.pt", data=None, split="test", mask_history=False, sampled=0, seed=seed,
                              eval_score=None)
    ckpt = {"config": {"data": "DATA"}, "backbone": backbone}
    assert evaluate.default_out(args, [10, 20], ckpt) == os.path.join("RUN", name)


def test_eval_score_ranks_by_the_raw_dot_product(trained, tmp_path):
    """--eval_score dot on a cosine-trained SASRec checkpoint: the metrics of ranking by u . e, which
    is the model rebuilt with eval_score dot; a DreamRec checkpoint is refused in one line."""
    run = copy_run(trained[1], tmp_path)
    proc = run_main("evaluate.py", os.path.join(run, "ckpt.pt"), "--eval_score", "dot", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "scored by dot" in proc.stdout
    ckpt = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    model = evaluate.load_model(dict(ckpt, model_args=dict(ckpt["model_args"], eval_score="dot")), "cpu")
    want = evaluate.evaluate(model.scorer(), trained[0], evaluate.common.load_meta(trained[0]), "test", [10, 20], "cpu")
    assert read_json(os.path.join(run, "metrics_dot.json"))["test"] == want
    ckpt["backbone"] = "dreamrec"
    torch.save(ckpt, os.path.join(run, "dreamrec.pt"))
    assert_clean_error(run_main("evaluate.py", os.path.join(run, "dreamrec.pt"), "--eval_score", "dot"), "--eval_score")
