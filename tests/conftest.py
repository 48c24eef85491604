"""Shared test setup: puts the repository root on sys.path (tests import the stage scripts) and
names the folders tests use. Tests that need the real datasets skip when SHARED_DATA is absent.
A stage runs as a real command with run_script, or with run_main in this process (the same
CompletedProcess, without the 3-4 s of interpreter and torch start-up per run).
Commands and servers that tests start run in a process group of their own, killed whole when the
call ends, times out or is interrupted, so that nothing keeps running after pytest moves on. Their
timeouts guard against hangs only: each test bounds its work (tiny data, few epochs), not its time,
so that a slow or busy machine passes too.

Run the suite with:  cd /work/main && python -m pytest -q tests/
"""

import contextlib
import importlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import warnings

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")

# A command or a server's start-up still going after this long hangs: each does seconds of work,
# also beside another CPU-heavy process on 2 cores. A guard against hangs, no measure of speed.
HANG_TIMEOUT = 600

if REPO not in sys.path:
    sys.path.insert(0, REPO)

STARTED = []  # every process group that run_command and LocalServer started, killed at the end


@pytest.fixture(scope="session", autouse=True)
def kill_leftover_processes():
    """A safety net: a group that a test left running (say, a fixture that failed before its
    teardown) is killed when the session ends."""
    yield
    for proc in STARTED:
        kill_group(proc)


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


def default_sigint():
    """Popen's preexec_fn for a command a test will Ctrl-C: SIGINT back to its default action in
    the child. A pytest started in the background (nohup, `&`) inherits SIGINT ignored, which bash
    and Python then keep (no trap, no KeyboardInterrupt), so the command would never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_group(proc, grace=10):
    """SIGTERM to proc's process group (proc started with start_new_session=True), SIGKILL to what
    is left after `grace` seconds; the group's members that a script left behind go with it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)


def run_command(cmd, cwd=None, env=None, timeout=HANG_TIMEOUT):
    """subprocess.run(cmd, capture_output=True, text=True), in a process group of its own that is
    killed whole when the command ends (children it left running), is interrupted, or hangs past
    `timeout` seconds, which fails the test with the command and the tail of its output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                            start_new_session=True)
    STARTED.append(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} still ran after {timeout} s, a hang (it does far less work), "
                    f"and was killed with its child processes.\nstdout tail:\n{out[-2000:]}\nstderr tail:\n{err[-2000:]}")
    finally:
        kill_group(proc)
        STARTED.remove(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_script(script, *args, cwd=None, env=None, timeout=HANG_TIMEOUT):
    """Run `python REPO/<script> args...` with run_command; returns the CompletedProcess (text)."""
    return run_command([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd, env=env,
                       timeout=timeout)


@contextlib.contextmanager
def captured_fd(fd, into):
    """What is written straight to file descriptor `fd` (C code such as torch's own warnings, child
    processes) goes to a temporary file, whose text is appended to the list `into` afterwards."""
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            into.append(tmp.read().decode(errors="replace"))


def interpreter_warning_filters(module):
    """The warning filters `python script.py` starts with (CPython's defaults, the script being
    __main__) instead of pytest's, so a warning prints on stderr exactly when the command's would."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module=re.escape(module) + "$")
    warnings.showwarning = show_on_stderr


def show_on_stderr(message, category, filename, lineno, file=None, line=None):
    """Python's own way of showing a warning (pytest's would record it instead)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_main(script, *args, cwd=None, env=None):
    """Run the stage's main(args) in this process as `python REPO/<script> args...` would run, ~3 s
    faster than run_script (no interpreter or torch start-up); returns a CompletedProcess (text).
    stdout and stderr hold what Python and C code printed; sys.exit("error: ...") prints its
    message and returns 1, an int exit status is the return code, a normal return is 0. Any other
    exception propagates (where the command would print a traceback), failing the test with it.
    cwd, env (the whole environment), sys.argv, torch's thread count, the global random generators
    and the warning filters are restored afterwards. Cases that need a resource limit or another
    user on the process use run_script."""
    module = importlib.import_module(script.removesuffix(".py"))
    args = [str(a) for a in args]
    torch = sys.modules.get("torch")  # imported by the module if it uses torch at all
    threads, torch_rng = (torch.get_num_threads(), torch.get_rng_state()) if torch else (None, None)
    python_rng, numpy_rng = random.getstate(), np.random.get_state()  # the stages seed all three
    saved_cwd, saved_env, saved_argv = os.getcwd(), dict(os.environ), sys.argv
    out, err, fd_out, fd_err = io.StringIO(), io.StringIO(), [], []
    try:
        if cwd is not None:
            os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        sys.argv = [os.path.join(REPO, script), *args]  # argparse's usage names the script
        with warnings.catch_warnings(), captured_fd(1, fd_out), captured_fd(2, fd_err), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            interpreter_warning_filters(module.__name__)
            try:
                module.main(args)
                code = 0
            except SystemExit as e:
                code = e.code
                if code is None:
                    code = 0
                elif not isinstance(code, int):  # the interpreter prints any other exit value, status 1
                    print(code, file=sys.stderr)
                    code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(saved_env)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        if torch:
            torch.set_num_threads(threads)
            torch.set_rng_state(torch_rng)
    # C code's text first: it is written while the stage runs, Python's error line at its end
    return subprocess.CompletedProcess([sys.executable, script, *args], code,
                                       "".join(fd_out) + out.getvalue(), "".join(fd_err) + err.getvalue())


class LocalServer:
    """serve_embeddings.py --port 0 FLAGS, started in the background (several load their models side
    by side) in a process group of its own; .wait() returns it once it listens, with .url
    'http://127.0.0.1:PORT/v1'; .stop() kills the group."""

    def __init__(self, *flags):
        self.proc = subprocess.Popen([sys.executable, os.path.join(REPO, "serve_embeddings.py"), "--port", "0",
                                      *map(str, flags)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        STARTED.append(self.proc)

    def wait(self, timeout=HANG_TIMEOUT):
        """Until the server prints 'listening on URL'. The model loads in seconds; a server still
        silent after `timeout` seconds hangs, and is killed (its output ends, which fails the test)."""
        timed_out = threading.Event()

        def hang():
            timed_out.set()
            kill_group(self.proc)

        hung = threading.Timer(timeout, hang)
        hung.start()
        lines = []
        try:
            while not (lines and lines[-1].startswith("listening on")):
                lines.append(self.proc.stdout.readline())
                if not lines[-1]:
                    self.stop()
                    why = f"was silent for {timeout} s, a hang, and was killed" if timed_out.is_set() else "exited"
                    pytest.fail(f"serve_embeddings.py {why} before listening; its output: {lines}")
        finally:
            hung.cancel()
        self.url = lines[-1].split()[-1]
        return self

    def health(self):
        import requests
        return requests.get(self.url.removesuffix("/v1") + "/health", timeout=10).json()

    def stop(self):
        kill_group(self.proc)
        if self.proc in STARTED:
            STARTED.remove(self.proc)


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


def prepare_toy(root, users=60, items=40, seed=0, flags=(), lang_dim=0):
    """A small DATA folder made by prepare.py (with `flags`) from generated RecBole atomic files: each
    user rates 3..11 distinct items in time order; with `lang_dim`, also a lang_emb.npy (N, lang_dim)
    of standard normal draws. Returns (DATA path, the generator for further draws)."""
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
    prepare.main([str(src), "--out", out, *map(str, flags)])
    if lang_dim:
        import common
        n = common.load_meta(out)["num_items"]
        np.save(os.path.join(out, "lang_emb.npy"), rng.standard_normal((n, lang_dim)).astype(np.float32))
    return out, rng


def prepare_embedded_toy(root, flags=()):
    """prepare_toy's DATA with lang_emb.npy (N, 24) whose last 12 coordinates are tiny, subspace.pt
    (d = 16, d_n = 8, for SASRec) and subspace_dreamrec.pt (--null_thres 0.25: d = 24, the tiny
    directions as the null space, for DreamRec). Returns DATA."""
    import decompose
    out, rng = prepare_toy(root, flags=flags)
    with open(os.path.join(out, "meta.json")) as f:
        n = json.load(f)["num_items"]
    emb = rng.standard_normal((n, 24)) * np.r_[np.ones(12), np.full(12, 1e-3)]
    np.save(os.path.join(out, "lang_emb.npy"), emb.astype(np.float32))
    decompose.main([out, "--dim", "16", "--null_dim", "8"])
    decompose.main([out, "--null_thres", "0.25", "--out", os.path.join(out, "subspace_dreamrec.pt")])
    return out


def read_log(run):
    """RUN/log.jsonl as a list of dicts."""
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_json(path):
    with open(path) as f:
        return json.load(f)
