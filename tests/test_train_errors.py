"""Bad input to both trainers (train_discriminative.py = SASRec, train_diffusion.py = DreamRec), run
through the CLI on a tiny generated dataset: a flag outside its range, a run folder that can't be
written, an input that fails after the run folder would have been made, and a loss that stops being
finite. Each ends with one `error:` line naming the flag, file or folder, exit 1 (argparse's 2 for
flags), no traceback, and no new or half-written file or folder; a diverged run keeps the
checkpoints of its last good epoch.

The trainers run in this process (conftest.run_main: the same stdout, stderr and exit status,
without 3-4 s of start-up per case). Real `python train_*.py` subprocesses, one argparse error and
one error after training per trainer, keep the command's own output tested: the first case of
test_flag_out_of_range (--batch_size 0) and test_nan_in_first_epoch, for both trainers.

    cd /work/main && python -m pytest -q tests/test_train_errors.py
"""

import hashlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
from model import save_checkpoint
from conftest import default_sigint, prepare_embedded_toy, REPO, assert_clean_error, read_log, run_main, run_script

SMALL = {"train_discriminative.py": ["--hidden_dim", "16", "--neg_ratio", "8", "--batch_size", "64", "--device", "cpu", "--epochs", "1"],
         "train_diffusion.py": ["--hidden_dim", "16", "--batch_size", "64", "--timesteps", "50", "--sample_steps", "5",
                                "--lr", "1e-3", "--device", "cpu", "--epochs", "1"]}
BOTH = list(SMALL)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """conftest.prepare_embedded_toy: lang_emb.npy, subspace.pt (SASRec), subspace_dreamrec.pt."""
    return prepare_embedded_toy(tmp_path_factory.mktemp("errors"))


def train(script, data, run, *flags, process=False):
    """The trainer on the small settings (later flags override them), in this process, or as a
    real command with process=True."""
    return (run_script if process else run_main)(script, data, "--out", run, *SMALL[script], *flags)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -----------------------------------------------------------------------------
# flags outside their range: argparse's error (exit 2) before anything is read or written

SHARED_BAD = [("--batch_size", "0"), ("--eval_every", "0"), ("--num_heads", "0"), ("--dropout", "1.5"),
              ("--lr", "-1"), ("--epochs", "0"), ("--patience", "0"), ("--weight_decay", "-1"),
              ("--hidden_dim", "0"), ("--num_blocks", "0"), ("--seed", "-1"), ("--threads", "0"),
              ("--progress_every", "-1")]
OWN_BAD = [("train_discriminative.py", flag, value) for flag, value in
           [("--neg_ratio", "-1"), ("--neg_ratio", "0"), ("--temperature", "0"), ("--temperature", "-1")]] + \
          [("train_diffusion.py", flag, value) for flag, value in
           [("--timesteps", "0"), ("--beta_start", "0"), ("--beta_end", "1"), ("--beta_start", "0.03")]]


@pytest.mark.parametrize("script,flag,value", [(s, f, v) for s in BOTH for f, v in SHARED_BAD] + OWN_BAD)
def test_flag_out_of_range(data, tmp_path, script, flag, value):
    """A flag value outside its range (a shared loop flag on both trainers, or the trainer's own) is
    refused by argparse naming the flag (--beta_start 0.03 > --beta_end 0.02 names either), exit 2,
    and no run folder is made. The first shared case runs as a real command."""
    run = tmp_path / "run"
    proc = train(script, data, run, flag, value, process=(flag, value) == SHARED_BAD[0])
    names = ("--beta_start", "--beta_end") if flag.startswith("--beta") else (flag,)
    assert_clean_error(proc, *names, argparse_ok=True)
    assert proc.returncode == 2, proc.stderr
    assert not run.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("script", BOTH)
def test_cuda_without_cuda_names_the_device_flag(data, tmp_path, script):
    """--device cuda on a machine without CUDA is one argparse line naming --device (it was a
    traceback from torch.Generator), and no run folder is made."""
    run = tmp_path / "run"
    proc = train(script, data, run, "--device", "cuda")
    assert_clean_error(proc, "--device", argparse_ok=True)
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr, proc.stderr
    assert not run.exists()


def test_neg_ratio_unused_by_ce_is_not_checked(data, tmp_path):
    """--loss ce draws no negatives, so --neg_ratio 0 is accepted with it (the check is per loss)."""
    proc = train("train_discriminative.py", data, tmp_path / "run", "--loss", "ce", "--neg_ratio", "0")
    assert proc.returncode == 0, proc.stderr


# -----------------------------------------------------------------------------
# a run folder that can't be made or written: one line naming it, before any training


def read_only_dir(path):
    """chmod 555 a folder; skip when writes still succeed there (root ignores the permission bits)."""
    path.mkdir()
    path.chmod(0o555)
    try:
        (path / "probe").write_text("")
    except PermissionError:
        return path
    (path / "probe").unlink()
    path.chmod(0o755)
    pytest.skip("running as root: chmod 555 does not stop writes, so a read-only folder can't be made")


@pytest.mark.parametrize("script", BOTH)
def test_out_in_read_only_parent(data, tmp_path, script):
    """--out inside a folder that is not writable: one error line naming RUN, nothing created."""
    run = read_only_dir(tmp_path / "ro") / "run"
    try:
        assert_clean_error(train(script, data, run), str(run))
        assert not run.exists()
    finally:
        run.parent.chmod(0o755)


def test_out_existing_but_read_only(data, tmp_path):
    """An existing RUN that is not writable fails before training (not after the first epoch)."""
    run = read_only_dir(tmp_path / "run")
    try:
        proc = train("train_discriminative.py", data, run)
        assert_clean_error(proc, str(run))
        assert "epoch" not in proc.stdout and os.listdir(run) == []
    finally:
        run.chmod(0o755)


@pytest.mark.parametrize("kind", ["file", "inside_file"])
def test_out_is_a_file(data, tmp_path, kind):
    """--out naming an existing file, or a path under one: one error line naming RUN, the file intact."""
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me\n")
    run = blocker if kind == "file" else blocker / "run"
    assert_clean_error(train("train_discriminative.py", data, run), str(run))
    assert blocker.read_text() == "keep me\n"


# -----------------------------------------------------------------------------
# inputs are checked before RUN is made: a bad one leaves no empty folder behind


@pytest.mark.parametrize("script", BOTH)
def test_resume_without_a_run_starts_one_and_a_fresh_start_never_replaces_one(data, tmp_path, script):
    """--resume with no RUN/last.pt starts a new run (so scripts can always pass it); the same
    command without --resume over that RUN is refused with one line naming last.pt, and the run's
    files stay as they were (a fresh start used to delete its log.jsonl)."""
    run = tmp_path / "run"
    first = train(script, data, run, "--resume")
    assert first.returncode == 0, first.stderr
    assert "does not exist yet: a new run starts" in first.stdout
    before = {name: sha256(run / name) for name in os.listdir(run)}
    assert_clean_error(train(script, data, run, "--epochs", "2"), "last.pt")
    assert {name: sha256(run / name) for name in os.listdir(run)} == before


class SendsCtrlC:
    """Pickled by torch.save: sends this process SIGINT halfway through writing the file."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGINT)
        return int, (0,)


def test_ctrl_c_inside_a_checkpoint_save_waits_for_the_whole_file(tmp_path):
    """A Ctrl-C while torch.save writes is raised as KeyboardInterrupt once the file is complete (it
    used to break the zip writer: a RuntimeError traceback, and no checkpoint)."""
    path = tmp_path / "last.pt"
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, before=torch.zeros(1000), signal=SendsCtrlC(), after=torch.ones(1000))
    assert torch.load(path, weights_only=False)["after"].sum() == 1000


@pytest.mark.parametrize("script", BOTH)
def test_ctrl_c_is_one_line_keeps_the_last_epoch_and_the_rerun_continues(data, tmp_path, script):
    """SIGINT to a real training process after its first epoch: one stderr line saying which epoch
    RUN/last.pt keeps and how to continue, exit 130, no traceback; the rerun with --resume starts
    from that epoch."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-u", os.path.join(REPO, script), data, "--out", run, *SMALL[script], "--epochs", "1000",
           "--patience", "1000"]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=default_sigint)
    try:
        for line in proc.stdout:  # the first epoch's line: last.pt holds epoch 1 or later
            if line.startswith("epoch   1 |") and "loss" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    epoch = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert proc.returncode == 130, err
    assert err.strip() == f"interrupted; {run / 'last.pt'} keeps epoch {epoch}: rerun with --resume to continue"
    assert epoch >= 1 and len(read_log(run)) in (epoch, epoch + 1)  # stopped between a log line and its last.pt
    again = train(script, data, run, "--resume", "--epochs", str(epoch + 1))
    assert again.returncode == 0, again.stderr
    assert f"resumed {run / 'last.pt'} at epoch {epoch}" in again.stdout
    assert [r["epoch"] for r in read_log(run)] == list(range(1, epoch + 2))


@pytest.mark.parametrize("script", BOTH)
def test_empty_valid_split(data, tmp_path, script):
    """A valid.npz with no samples is named before training (not a traceback after it), and no RUN is made."""
    other = tmp_path / "data"
    shutil.copytree(data, other)
    L = common.load_meta(data)["max_len"]
    empty = np.zeros(0, np.int64)
    np.savez(other / "valid.npz", seq=np.zeros((0, L), np.int64), target=empty, user=empty)
    run = tmp_path / "run"
    proc = run_main(script, other, "--out", run, *SMALL[script])
    assert_clean_error(proc, "valid.npz")
    assert not run.exists()


# -----------------------------------------------------------------------------
# a loss that stops being finite stops the run and keeps the last good checkpoint
# --lr 1e30: Adam's first step moves every weight by about 1e30, so the next forward overflows


DIVERGED = re.compile(r"^error: (.*): loss became (nan|inf|-inf) at epoch (\d+) step (\d+); (.*)$")


@pytest.mark.parametrize("script", BOTH)
def test_nan_in_first_epoch(data, tmp_path, script):
    """--lr 1e30 with 64-sample batches: the loss of step 2 of epoch 1 is not finite; the run stops
    with one line naming RUN, the epoch and the step, exit 1, and leaves no RUN (nothing good to keep).
    A real command: an error found after training starts, as the user sees it."""
    run = tmp_path / "run"
    proc = train(script, data, run, "--lr", "1e30", "--epochs", "3", process=True)
    line = assert_clean_error(proc, str(run))
    assert proc.returncode == 1
    m = DIVERGED.match(line)
    assert m and m.group(1) == str(run) and (m.group(3), m.group(4)) == ("1", "2"), line
    assert m.group(5) == "no checkpoint was written", line
    assert not run.exists()


@pytest.mark.parametrize("script", BOTH)
def test_nan_after_a_good_epoch(data, tmp_path, script):
    """--lr 1e30 with one batch per epoch: epoch 1's loss is finite (taken before the step), epoch 2's
    is not. The run stops at epoch 2 step 1 naming RUN/last.pt as the last good checkpoint, which
    holds epoch 1 (as does ckpt.pt); log.jsonl has epoch 1 only; no metrics.json, no temporary file."""
    run = tmp_path / "run"
    proc = train(script, data, run, "--lr", "1e30", "--batch_size", "1000", "--epochs", "3")
    line = assert_clean_error(proc, str(run))
    assert proc.returncode == 1
    m = DIVERGED.match(line)
    assert m and (m.group(3), m.group(4)) == ("2", "1"), line
    assert m.group(5) == f"the last good checkpoint is {run / 'last.pt'}", line
    assert sorted(os.listdir(run)) == ["ckpt.pt", "last.pt", "log.jsonl"]
    for name in ("last.pt", "ckpt.pt"):
        assert torch.load(run / name, weights_only=True)["epoch"] == 1, name
    log = read_log(run)
    assert [r["epoch"] for r in log] == [1] and math.isfinite(log[0]["loss"])


def test_nan_after_resume_leaves_checkpoints_untouched(data, tmp_path):
    """One good epoch at --lr 1e30, then --resume to 3 epochs: the resumed epoch 2 diverges at step 1;
    last.pt, ckpt.pt, log.jsonl and metrics.json keep exactly the bytes of the first run."""
    run = tmp_path / "run"
    flags = ["--lr", "1e30", "--batch_size", "1000"]
    first = train("train_discriminative.py", data, run, *flags)
    assert first.returncode == 0, first.stderr
    before = {name: sha256(run / name) for name in sorted(os.listdir(run))}
    proc = train("train_discriminative.py", data, run, *flags, "--epochs", "3", "--resume")
    line = assert_clean_error(proc, str(run))
    m = DIVERGED.match(line)
    assert m and (m.group(3), m.group(4)) == ("2", "1") and m.group(5).endswith("last.pt"), line
    assert {name: sha256(run / name) for name in sorted(os.listdir(run))} == before
