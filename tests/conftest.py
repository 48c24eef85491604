"""Shared test setup: puts the repository root on sys.path (tests import the stage scripts) and
names the folders tests use. Tests that need the real datasets skip when SHARED_DATA is absent.

Run the suite with:  cd /work/main && python -m pytest -q tests/
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")

if REPO not in sys.path:
    sys.path.insert(0, REPO)


@pytest.fixture(scope="session")
def repo():
    """The repository root (where the stage scripts live)."""
    return REPO


@pytest.fixture(scope="session")
def shared_data():
    """The real datasets folder ../shared/data; skips the test when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


def run_script(script, *args, cwd=None, env=None, timeout=120):
    """Run `python REPO/<script> args...` in a subprocess; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def assert_clean_error(proc, *names, argparse_ok=False):
    """A bad input must end with a non-zero exit and exactly one stderr line 'error: ...' that
    names the file or flag (any of `names`), and no traceback. argparse_ok also accepts
    argparse's own form (usage lines, then one 'prog: error: ...' line, exit 2)."""
    err = proc.stderr
    assert proc.returncode != 0, f"exit code 0 for a bad input; stdout:\n{proc.stdout}"
    assert "Traceback" not in err, f"traceback on stderr:\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    if argparse_ok and proc.returncode == 2 and lines and lines[0].startswith("usage:"):
        message = lines[-1]
        assert ": error: " in message, f"argparse error line expected, got:\n{err}"
    else:
        assert len(lines) == 1 and err.strip() == lines[0], f"expected one stderr line, got:\n{err}"
        message = lines[0]
        assert message.startswith("error:") and len(message) > len("error: "), message
    assert any(n in message for n in names), f"error line names none of {names}: {message}"
    return message


def prepare_toy(root, users=60, items=40, seed=0):
    """A small DATA folder made by prepare.py from generated RecBole atomic files: each user rates
    3..11 distinct items in time order. Returns (DATA path, the generator for further draws)."""
    import numpy as np
    import prepare
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(seed)
    with open(src / "toy.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u in range(users):
            for t, i in enumerate(rng.choice(items, size=rng.integers(3, 12), replace=False)):
                f.write(f"u{u}\ti{i}\t{1000 + t}\n")
    with open(src / "toy.item", "w") as f:
        f.write("item_id:token\ttitle:token_seq\n")
        f.writelines(f"i{i}\tthing number {i}\n" for i in range(items))
    out = str(root / "data")
    prepare.main([str(src), "--out", out])
    return out, rng


def read_log(run):
    """RUN/log.jsonl as a list of dicts."""
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_json(path):
    with open(path) as f:
        return json.load(f)
