"""Bad input to evaluate.py and decompose.py (and to the loaders of common.py behind them): each
case ends with exit status 1 (or argparse's 2), one stderr line 'error: ...' naming the file or
flag, no traceback, and no new or half-written file. The checkpoint is a 1-epoch run of
train_discriminative.py on the toy dataset of conftest.prepare_toy (60 users, 40 items).

The stages run in this process (conftest.run_main: the same stdout, stderr and exit status,
without 3-4 s of start-up per case). Real `python evaluate.py` / `python decompose.py`
subprocesses keep the commands' own output tested: the ks-zero case (an argparse error) and the
bare-tensor case (an error from a loader) for evaluate.py, and
test_decompose_non_utf8_items_line_names_file_and_line for decompose.py.

    cd /work/main && python -m pytest -q tests/test_eval_errors.py
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import common
import train_discriminative
from conftest import assert_clean_error, prepare_toy, run_main, run_script


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(DATA with lang_emb.npy (40, 24), RUN/ckpt.pt of a 1-epoch ID-only SASRec, d = 16)."""
    root = tmp_path_factory.mktemp("eval_errors")
    data, rng = prepare_toy(root, lang_dim=24)
    run = str(root / "run")
    train_discriminative.main([data, "--out", run, "--item_emb", "id", "--hidden_dim", "16", "--neg_ratio", "8",
                               "--batch_size", "64", "--epochs", "1", "--device", "cpu"])
    return data, os.path.join(run, "ckpt.pt")


def copy_data(data, tmp_path):
    """A copy of DATA to break (the module's DATA stays intact)."""
    return shutil.copytree(data, tmp_path / "data")


def read_only_folder(tmp_path):
    """A folder with mode 0o555; skips the test where that does not stop writes (root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    if os.access(folder, os.W_OK):
        pytest.skip("this user may write to a read-only folder (root), so the case cannot happen here")
    return folder


def evaluate_fails(tmp_path, *args, names, out=None, argparse_ok=False, process=False):
    """Run evaluate.py (in this process, or as a real command with process=True) with --out in a
    fresh folder; the run must fail cleanly naming one of `names` and leave that folder empty.
    Returns the error line."""
    folder = tmp_path / "out"
    folder.mkdir()
    proc = (run_script if process else run_main)("evaluate.py", *args, "--out", out or folder / "m.json")
    message = assert_clean_error(proc, *names, argparse_ok=argparse_ok)
    assert os.listdir(folder) == [], f"files left behind: {os.listdir(folder)}"
    return message


# -----------------------------------------------------------------------------
# evaluate.py: flags


@pytest.mark.parametrize("flags,name", [
    (["--ks", "0"], "--ks"), (["--ks", "abc"], "--ks"), (["--ks", ""], "--ks"), (["--ks", "10,-5"], "--ks"),
    (["--batch_size", "0"], "--batch_size"), (["--sampled", "-1"], "--sampled"), (["--threads", "0"], "--threads")],
    ids=["ks-zero", "ks-word", "ks-empty", "ks-negative", "batch-zero", "sampled-negative", "threads-zero"])
def test_evaluate_bad_flag_is_refused(toy, tmp_path, flags, name):
    """A cut-off K < 1 (which would write @0 metrics), a K that is not an integer, a batch size < 1
    or a negative --sampled is an argparse error naming the flag; nothing is written. --ks 0 runs
    as a real command."""
    evaluate_fails(tmp_path, toy[1], *flags, names=[name], argparse_ok=True, process=flags == ["--ks", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_evaluate_cuda_without_cuda_names_the_device_flag(toy, tmp_path):
    """--device cuda on a machine without CUDA says so and names --device (not 'unreadable
    checkpoint')."""
    message = evaluate_fails(tmp_path, toy[1], "--device", "cuda", names=["--device"], argparse_ok=True)
    assert "CUDA is not available" in message


@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
def test_evaluate_unwritable_out_is_refused_before_ranking(toy, tmp_path, where):
    """--out in a folder that does not exist, or --out naming a folder: one line naming it, nothing
    ranked or written."""
    out = tmp_path / "out" / ("nope/m.json" if where == "missing-folder" else "")
    message = evaluate_fails(tmp_path, toy[1], names=[str(out)], out=out)
    assert "folder" in message


def test_evaluate_out_in_read_only_folder(toy, tmp_path):
    """--out in a read-only folder: one line naming it, nothing written."""
    out = read_only_folder(tmp_path) / "m.json"
    assert_clean_error(run_main("evaluate.py", toy[1], "--out", out), str(out))
    assert not out.exists()


# -----------------------------------------------------------------------------
# evaluate.py: checkpoints that do not fit


def broken_checkpoint(ckpt, tmp_path, change):
    """A copy of the checkpoint passed through change(dict) -> object; returns its path."""
    path = str(tmp_path / "broken.pt")
    torch.save(change(torch.load(ckpt, weights_only=True)), path)
    return path


def without_data(ck):
    del ck["config"]["data"]
    return ck


def with_model_args(**changes):
    return lambda ck: dict(ck, model_args={**ck["model_args"], **changes})


MISFITS = {"bare-tensor": lambda ck: torch.zeros(3), "no-config-data": without_data,
           "config-not-a-dict": lambda ck: dict(ck, config=None), "other-d": with_model_args(d=32),
           "other-blocks": with_model_args(num_blocks=2), "unknown-arg": with_model_args(bogus=1)}


@pytest.mark.parametrize("case", MISFITS)
def test_evaluate_checkpoint_that_does_not_fit_names_it(toy, tmp_path, case):
    """A checkpoint that is a bare tensor, that names no dataset folder, or whose model_args do not
    build a model that its weights fit: one line naming the checkpoint. The bare tensor runs as a
    real command."""
    path = broken_checkpoint(toy[1], tmp_path, MISFITS[case])
    evaluate_fails(tmp_path, path, names=[path], process=case == "bare-tensor")


def test_evaluate_checkpoint_with_other_max_len(toy, tmp_path):
    """A dataset folder prepared with another history length L than the checkpoint's (which would
    rank silently on a shorter window) is refused, naming meta.json and the checkpoint."""
    data = copy_data(toy[0], tmp_path)
    meta = common.load_meta(data)
    common.write_json(os.path.join(data, "meta.json"), dict(meta, max_len=meta["max_len"] - 4))
    for split in common.SPLITS:
        with np.load(os.path.join(data, f"{split}.npz")) as z:
            arrays = dict(z)
        np.savez(os.path.join(data, f"{split}.npz"), **dict(arrays, seq=arrays["seq"][:, 4:]))
    message = evaluate_fails(tmp_path, toy[1], "--data", data, names=["meta.json"])
    assert "max_len" in message and toy[1] in message


# -----------------------------------------------------------------------------
# evaluate.py: splits and meta.json (through a checkpoint and through --popularity)


def break_test_split(data, case):
    """Rewrite DATA/test.npz: a user index >= U, a negative one, or no samples at all."""
    path = os.path.join(data, "test.npz")
    with np.load(path) as z:
        arrays = dict(z)
    U = len(common.load_meta(data)["user_history_len"])
    if case == "user-too-large":
        arrays["user"][0] = U
    elif case == "user-negative":
        arrays["user"][0] = -1
    else:
        arrays = {k: v[:0] for k, v in arrays.items()}
    np.savez(path, **arrays)
    return path


SPLIT_CASES = [("user-too-large", False), ("user-negative", False), ("empty", False),
               ("user-negative", True), ("empty", True)]


@pytest.mark.parametrize("case,popularity", SPLIT_CASES, ids=[f"{c}{'-popularity' * p}" for c, p in SPLIT_CASES])
def test_evaluate_bad_test_split_names_the_npz(toy, tmp_path, case, popularity):
    """A user index outside 0..U-1 (U = len(user_history_len); a negative one would silently wrap
    into the wrong head/tail user group) or an empty test.npz: one line naming test.npz."""
    data = copy_data(toy[0], tmp_path)
    path = break_test_split(data, case)
    source = ["--popularity"] if popularity else [toy[1]]
    message = evaluate_fails(tmp_path, *source, "--data", data, names=[path])
    assert ("no samples" if case == "empty" else "user indices") in message


@pytest.mark.parametrize("key,value", [("item_popularity", lambda v: ["many"] * len(v)),
                                       ("user_history_len", lambda v: [[h] for h in v]),
                                       ("num_users", lambda v: v + 7)], ids=["words", "nested", "other-count"])
def test_evaluate_popularity_bad_meta_names_it(toy, tmp_path, key, value):
    """--popularity with a meta.json whose popularity entries are words, whose user histories are
    nested lists, or whose num_users disagrees with user_history_len: one line naming meta.json."""
    data = copy_data(toy[0], tmp_path)
    meta = common.load_meta(data)
    common.write_json(os.path.join(data, "meta.json"), dict(meta, **{key: value(meta[key])}))
    message = evaluate_fails(tmp_path, "--popularity", "--data", data, names=[os.path.join(data, "meta.json")])
    assert key in message


# -----------------------------------------------------------------------------
# decompose.py: items.jsonl, meta.json and its two outputs


def test_decompose_non_utf8_items_line_names_file_and_line(toy, tmp_path):
    """items.jsonl with a Latin-1 byte on line 3: one line naming items.jsonl:3, no output (a real
    command)."""
    data = copy_data(toy[0], tmp_path)
    path = os.path.join(data, "items.jsonl")
    with open(path, "rb") as f:
        lines = f.readlines()
    lines[2] = b'{"item_id": "i2", "text": "caf\xe9 number 2"}\n'
    with open(path, "wb") as f:
        f.writelines(lines)
    message = assert_clean_error(run_script("decompose.py", data, "--dim", "16", "--null_dim", "8"), path)
    assert f"{path}:3:" in message and "UTF-8" in message
    assert not os.path.exists(os.path.join(data, "subspace.pt"))


BAD_POPULARITY = {"string": lambda v: "lots", "string-in-list": lambda v: v[:-1] + ["1"],
                  "nested": lambda v: [[x] for x in v], "ragged": lambda v: v[:-1] + [[1, 2]],
                  "nan": lambda v: v[:-1] + [float("nan")], "inf": lambda v: v[:-1] + [float("inf")],
                  "negative": lambda v: v[:-1] + [-3]}


@pytest.mark.parametrize("case", BAD_POPULARITY)
def test_decompose_popularity_weighting_bad_item_popularity(toy, tmp_path, case):
    """--weighting popularity with an item_popularity that is not a flat list of finite numbers >= 0
    (a word, a quoted number, nested lists, NaN, inf, a negative count): one line naming meta.json,
    no output. (A word, NaN, inf and a negative count were refused before load_meta checked the
    values; they stay as guards. The quoted number and nested lists were not.)"""
    data = copy_data(toy[0], tmp_path)
    meta = common.load_meta(data)
    with open(os.path.join(data, "meta.json"), "w") as f:  # json writes NaN and Infinity as Python reads them
        json.dump(dict(meta, item_popularity=BAD_POPULARITY[case](meta["item_popularity"])), f)
    proc = run_main("decompose.py", data, "--dim", "16", "--null_dim", "8", "--weighting", "popularity")
    assert_clean_error(proc, os.path.join(data, "meta.json"))
    assert not os.path.exists(os.path.join(data, "subspace.pt"))


@pytest.mark.parametrize("out", ["a-folder", "name-too-long"])
def test_decompose_failed_save_leaves_no_plot(toy, tmp_path, out):
    """With --plot, a .pt that cannot be saved (--out is a folder; or a name whose temporary file
    is longer than the file system allows, which only the save finds out) leaves no PNG either."""
    data = copy_data(toy[0], tmp_path)
    pt = tmp_path / ("subspace.pt" if out == "a-folder" else "x" * 250 + ".pt")
    if out == "a-folder":
        pt.mkdir()
    png = tmp_path / "spectrum.png"
    proc = run_main("decompose.py", data, "--dim", "16", "--null_dim", "8", "--out", pt, "--plot", png)
    assert_clean_error(proc, str(pt))
    assert not png.exists(), "the plot was written although the subspace file was not"
    assert sorted(os.listdir(tmp_path)) == sorted(["data"] + ([pt.name] if out == "a-folder" else []))


def test_decompose_plot_in_read_only_folder_leaves_no_pt(toy, tmp_path):
    """--plot into a read-only folder: one line naming the PNG, and no .pt written."""
    data = copy_data(toy[0], tmp_path)
    png = read_only_folder(tmp_path) / "spectrum.png"
    proc = run_main("decompose.py", data, "--dim", "16", "--null_dim", "8", "--plot", png)
    assert_clean_error(proc, str(png))
    assert not os.path.exists(os.path.join(data, "subspace.pt"))


# -----------------------------------------------------------------------------
# evaluate.py: flags that would write where they should not, or change nothing


def test_evaluate_popularity_without_out_writes_nothing_into_data(toy, tmp_path):
    """--popularity without --out (which wrote DATA/popularity.json) names --out, and DATA is left
    as it was: only prepare.py, embed.py and decompose.py write there."""
    data = copy_data(toy[0], tmp_path)
    before = sorted(os.listdir(data))
    assert_clean_error(run_main("evaluate.py", "--popularity", "--data", data, "--device", "cpu"), "--out")
    assert sorted(os.listdir(data)) == before


def test_evaluate_mask_history_with_sampled_is_refused(toy, tmp_path):
    """--mask_history --sampled M is an argparse error: the sampled items already lie outside the
    history window, so the mask would change nothing while the header said 'history masked'."""
    message = evaluate_fails(tmp_path, toy[1], "--mask_history", "--sampled", "5", names=["--mask_history"],
                             argparse_ok=True)
    assert "--sampled" in message
