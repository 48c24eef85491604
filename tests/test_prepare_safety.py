"""prepare.py never loses data: an --out that is, holds or lies in the source (or the download
cache) is refused, --overwrite replaces only a folder that prepare.py wrote, bad flags and
unwritable locations are refused before anything is read, and a failed write leaves the
filesystem as it was. Every refusal is one 'error:' line; every check compares all bytes under
the test folder before and after.

prepare.py runs in this process (conftest.run_main: the same stdout, stderr and exit status,
without the interpreter's start-up per case). Real `python prepare.py` subprocesses: the first
case of test_out_overlapping_source_is_refused (SRC == OUT), which keeps the command's own output
tested, test_failed_write_leaves_nothing, which needs a file size limit on its process, and
test_run_main_is_the_command, which compares the two ways of running a stage.

Run:  cd /work/main && python -m pytest -q tests/test_prepare_safety.py
"""

import json
import os
import re
import resource
import subprocess
import sys
import zipfile

import pytest

import common
from conftest import REPO, assert_clean_error, run_main, run_script

INTER = "user_id:token\titem_id:token\ttimestamp:float\n1\t1\t1\n1\t2\t2\n2\t1\t3\n"
ITEM = "item_id:token\ttitle:token_seq\n1\tOne\n2\tTwo\n"
# a meta.json with the keys prepare.py writes: only the overlap check stands between it and deletion
OURS = {"source": "x", "format": "recbole", "split": "user", "num_items": 2, "num_samples": {}}
NO_NETWORK = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}


def raw_folder(path, meta=None):
    """A RecBole source folder x.inter + x.item (+ a meta.json when given)."""
    os.makedirs(path)
    for name, text in (("x.inter", INTER), ("x.item", ITEM)):
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    if meta is not None:
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump(meta, f)
    return str(path)


def zip_source(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.inter", INTER)
        z.writestr("x.item", ITEM)


def snapshot(root):
    """Every folder, file (with its bytes) and symlink under `root`."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                seen[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                seen[rel] = ("dir",)
            else:
                with open(path, "rb") as f:
                    seen[rel] = ("file", f.read())
    return seen


def refused(tmp_path, *args, names, problem, env=None, argparse_ok=False, process=False):
    """Run prepare.py in tmp_path (in this process, or as a real command with process=True): one
    clean error line naming one of `names` and saying `problem` (a regex), and not one byte, file
    or folder changed under tmp_path."""
    before = snapshot(tmp_path)
    proc = (run_script if process else run_main)("prepare.py", *args, cwd=tmp_path, env=env)
    message = assert_clean_error(proc, *names, argparse_ok=argparse_ok)
    assert re.search(problem, message, re.IGNORECASE), f"the error does not say {problem!r}: {message}"
    after = snapshot(tmp_path)
    assert after == before, f"changed: {sorted(set(before.items()) ^ set(after.items()), key=str)[:5]}"
    return message


# -----------------------------------------------------------------------------
# the output must lie apart from what is read

@pytest.mark.parametrize("source,out", [
    ("src", "src"),                    # SRC == OUT
    ("src", "src/prepared"),           # OUT inside SRC
    ("data/src", "data"),              # SRC inside OUT
    ("src/x.inter", "src"),            # a file stands for its folder
    ("link", "src"),                   # through a symlink to the source
    ("src", "link"),
    ("src", "link/../src"),            # '..' after a symlink
    ("data/d.zip", "data")])           # a zip inside OUT
def test_out_overlapping_source_is_refused(tmp_path, source, out):
    """--out equal to, inside or holding the source is refused with --overwrite, even when the
    source folder carries a prepare.py meta.json, and the source's bytes stay as they were.
    SRC == OUT runs as a real command."""
    raw_folder(tmp_path / "src", meta=OURS)
    raw_folder(tmp_path / "data" / "src", meta=None)
    with open(tmp_path / "data" / "meta.json", "w") as f:
        json.dump(OURS, f)
    zip_source(tmp_path / "data" / "d.zip")
    os.symlink("src", tmp_path / "link")
    refused(tmp_path, source, "--out", out, "--overwrite", names=["--out"], problem="source",
            process=(source, out) == ("src", "src"))


def test_run_main_is_the_command(tmp_path):
    """conftest.run_main, which most error tests here use, gives the exit status, stdout and stderr
    of the real command: for prepare.py's own error (sys.exit with the line) and for argparse's."""
    for flags in ([tmp_path / "no_such_data"], [tmp_path, "--split", "random"]):
        args = ("prepare.py", *flags, "--out", tmp_path / "out")
        real, here = run_script(*args), run_main(*args)
        assert (here.returncode, here.stdout, here.stderr) == (real.returncode, real.stdout, real.stderr)
        assert real.returncode in (1, 2) and real.stderr


def test_zip_beside_output_is_allowed(tmp_path):
    """A zip is only read, so an --out beside it (inside the zip's folder) is fine."""
    raw_folder(tmp_path / "src")
    (tmp_path / "dl").mkdir()
    zip_source(tmp_path / "dl" / "d.zip")
    proc = run_main("prepare.py", tmp_path / "dl" / "d.zip", "--out", tmp_path / "dl" / "out")
    assert proc.returncode == 0, proc.stderr
    assert common.load_meta(str(tmp_path / "dl" / "out"))["num_interactions"] == 3


def test_cache_dir_inside_out_is_refused(tmp_path):
    """A named dataset whose --cache_dir is or lies in --out is refused before any download."""
    raw_folder(tmp_path / "out", meta=OURS)
    for cache in ("out", "out/cache"):
        refused(tmp_path, "ml-1m", "--out", "out", "--overwrite", "--cache_dir", cache,
                names=["--cache_dir"], problem="out", env=NO_NETWORK)


# -----------------------------------------------------------------------------
# what --overwrite may replace

@pytest.mark.parametrize("meta", [None, '{"num_items": 2}', '["source", "format", "split"]',
                                  "not json {", b"\xff\xfe binary"])
def test_overwrite_refuses_a_folder_prepare_did_not_write(tmp_path, meta):
    """--overwrite on a folder without meta.json, or with one that prepare.py did not write
    (foreign keys, not an object, not JSON, not text), is refused and the folder kept."""
    raw_folder(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("years of work\n")
    if meta is not None:
        (tmp_path / "out" / "meta.json").write_bytes(meta if isinstance(meta, bytes) else meta.encode())
    refused(tmp_path, "src", "--out", "out", "--overwrite", names=["--out"], problem="prepare.py")


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_out_that_is_a_file_is_refused(tmp_path, flags):
    """An --out that is an existing file (or has one among its parents) is refused, --overwrite or not."""
    raw_folder(tmp_path / "src")
    (tmp_path / "notes.txt").write_text("keep me\n")
    for out in ("notes.txt", "notes.txt/out"):
        refused(tmp_path, "src", "--out", out, *flags, names=["--out", out], problem="not a folder")


def test_overwrite_replaces_a_folder_prepare_wrote(tmp_path):
    """--overwrite still replaces an output of prepare.py: new settings, old files gone, nothing
    left beside it."""
    src = raw_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert run_main("prepare.py", src, "--out", out).returncode == 0
    (out / "stale.txt").write_text("old")
    refused(tmp_path, src, "--out", out, names=["--out", str(out)], problem="exists")
    proc = run_main("prepare.py", src, "--out", out, "--overwrite", "--seed", 5, "--max_len", 3)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["items.jsonl", "meta.json", "test.npz", "train.npz", "valid.npz"]
    assert (common.load_meta(str(out))["seed"], common.load_meta(str(out))["max_len"]) == (5, 3)
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


# -----------------------------------------------------------------------------
# flags and locations, checked before anything is read

@pytest.mark.parametrize("flags,names", [(["--seed", -1], ["--seed"]),
                                         (["--kcore", -1], ["--kcore"]),
                                         (["--max_len", 0], ["--max_len"]),
                                         (["--cache_dir", ""], ["--cache_dir"])])
def test_bad_flag_values(tmp_path, flags, names):
    """A negative --seed or --kcore, a zero --max_len, an empty --cache_dir: one line naming the
    flag, before the source is read (its unreadable .inter is never reached) or downloaded."""
    problem = ">=|positive|at least|negative|empty|invalid"
    raw_folder(tmp_path / "src")
    (tmp_path / "src" / "x.inter").write_bytes(b"\x00\x01 binary")
    refused(tmp_path, "src", "--out", "out", *flags, names=names, problem=problem, argparse_ok=True)
    refused(tmp_path, "ml-1m", "--out", "out", *flags, names=names, problem=problem,
            argparse_ok=True, env=NO_NETWORK)


def test_empty_out_is_refused(tmp_path):
    """--out '' is refused with one line naming the flag."""
    raw_folder(tmp_path / "src")
    refused(tmp_path, "src", "--out", "", names=["--out"], problem="empty")


def test_cache_dir_that_is_a_file_is_refused(tmp_path):
    """A --cache_dir that is a file is refused before any download."""
    (tmp_path / "cache").write_text("not a folder\n")
    refused(tmp_path, "ml-1m", "--out", "out", "--cache_dir", "cache", names=["--cache_dir"],
            problem="not a folder", env=NO_NETWORK)


def test_read_only_parent_is_refused(tmp_path):
    """An --out in a folder we cannot write in is refused before reading, naming the folder, and
    leaves nothing (no output, no temporary folder)."""
    raw_folder(tmp_path / "src")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root?) can write in a 0o555 folder: permissions do not block it")
        for out in ("locked/out", "locked/new/out"):
            refused(tmp_path, "src", "--out", out, names=[str(locked)], problem="cannot write|permission")
    finally:
        locked.chmod(0o755)


# -----------------------------------------------------------------------------
# a write that fails halfway (a 10-byte file size limit: EFBIG, even for root)

def run_limited(*args, cwd):
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (10, 10))
    return subprocess.run([sys.executable, os.path.join(REPO, "prepare.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600, preexec_fn=limit)  # a hang guard


def test_failed_write_leaves_nothing(tmp_path):
    """A write that fails is one error line naming --out; no output, no temporary folder and no
    parent folder it made is left, and a folder that --overwrite would replace stays intact."""
    src = raw_folder(tmp_path / "src")
    assert run_main("prepare.py", src, "--out", tmp_path / "old").returncode == 0
    for args in (["--out", "new/deeper/out"], ["--out", "old", "--overwrite", "--seed", 3]):
        before = snapshot(tmp_path)
        proc = run_limited(src, *args, cwd=tmp_path)
        assert_clean_error(proc, "--out")
        assert snapshot(tmp_path) == before, sorted(set(snapshot(tmp_path)) ^ set(before))
