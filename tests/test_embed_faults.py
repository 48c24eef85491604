"""
embed.py's handling of mistakes and secrets, through its command line against the fault-injecting
server of tests/test_embed.py (real HTTP on 127.0.0.1): flags and keys that no retry can fix fail
before any request, credentials never reach a printed line, batches are fixed by item order.

    python -m pytest -q tests/test_embed_faults.py
"""

import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import embed
from conftest import REPO, assert_clean_error, run_script
from test_embed import FAST, KEY, TEXTS, expected, fake_server, make_data, outputs  # noqa: F401 (fixture)


def run_main(capfd, *args):
    """embed.main(args) in this process (it can reach the fake server's thread) -> CompletedProcess."""
    try:
        embed.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)  # what the interpreter prints for sys.exit("error: ...")
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.mark.parametrize("flags, name", [
    (["--timeout", "0"], "--timeout"),
    (["--dimensions", "-5"], "--dimensions"),
    (["--backoff_base", "-1"], "--backoff_base"),
    (["--backoff_max", "nan"], "--backoff_max"),
    (["--base_url", "127.0.0.1:{port}/v1"], "--base_url"),         # no scheme
    (["--base_url", "ftp://127.0.0.1:{port}/v1"], "--base_url"),
    (["--base_url", "http://127.0.0.1:x{port}/v1"], "--base_url"),  # the port is not a number
])
def test_a_flag_no_retry_can_fix_fails_before_any_request(tmp_path, fake_server, capfd, flags, name):
    """Each mistake: one argparse error naming the flag, no request, no file written in DATA."""
    srv, url = fake_server()
    data = make_data(tmp_path)
    port = srv.server_address[1]
    proc = run_main(capfd, data, "--base_url", url, *FAST, *[f.format(port=port) for f in flags])
    assert_clean_error(proc, name, argparse_ok=True)
    assert srv.inputs == [] and sorted(os.listdir(data)) == ["items.jsonl"]


@pytest.mark.parametrize("key", [KEY + "\r\nX-Injected: 1", "sk-\u043a\u043b\u044e\u0447-" + KEY, "Bearer " + KEY])
def test_a_key_that_cannot_be_a_header_fails_once_without_being_printed(tmp_path, fake_server, capfd, monkeypatch, key):
    """A key with CR/LF, a non-Latin-1 character or a space: one error naming the variable, no
    request, no retry, and no part of the key on any output."""
    monkeypatch.setenv("MY_KEY", key)
    srv, url = fake_server()
    proc = run_main(capfd, make_data(tmp_path), "--base_url", url, "--api_key_env", "MY_KEY", *FAST)
    assert_clean_error(proc, "MY_KEY")
    assert srv.inputs == [] and KEY not in proc.stdout + proc.stderr and "retry" not in proc.stderr


def test_user_and_password_in_the_url_are_refused_and_never_sent(tmp_path, fake_server, capfd, monkeypatch):
    """--base_url with user:password@ is one error naming the flag, before any request (requests
    would send it as HTTP Basic auth in place of the key, which servers echo): the password
    appears nowhere, in plain or in base64."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    srv, url = fake_server(always="401", userinfo="user:hunter2pw@")
    proc = run_main(capfd, make_data(tmp_path), "--base_url", url, *FAST)
    assert_clean_error(proc, "--base_url", argparse_ok=True)
    assert srv.inputs == []
    assert "hunter2pw" not in proc.stdout + proc.stderr and "aHVudGVyMnB3" not in proc.stderr  # base64 'hunter2pw'


def test_a_netrc_entry_never_replaces_the_key(tmp_path, fake_server, monkeypatch):
    """requests sends ~/.netrc credentials as HTTP Basic auth when no auth is given: the key (and
    no netrc password) goes out as a Bearer token."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login user password hunter2pw\n")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    srv, url = fake_server()
    embed.main([str(make_data(tmp_path / "data")), "--base_url", url] + FAST)
    assert set(srv.auth) == {f"Bearer {KEY}"}


def test_the_url_query_is_sent_and_scrubbed_from_a_404_echo(tmp_path, fake_server, capfd):
    """The query reaches the server ({base path}/embeddings?{query}); the server's 404 that echoes
    it back is one error line with the secret value scrubbed, and no cache file is left."""
    srv, url = fake_server(always="404")
    data = make_data(tmp_path)
    proc = run_main(capfd, data, "--base_url", f"{url}?api-version=2024-02-01&key={KEY}", *FAST)
    message = assert_clean_error(proc, "HTTP 404")
    assert srv.paths == [f"/v1/embeddings?api-version=2024-02-01&key={KEY}"]
    assert KEY not in proc.stdout + proc.stderr and "no route POST /v1/embeddings" in message
    assert sorted(os.listdir(data)) == ["items.jsonl"]


def test_a_refused_connection_at_the_start_fails_at_once_with_a_hint(tmp_path):
    """Nothing listening on the port: with the default retry settings (8 retries from 1 s, which
    took 212 s before), one error line within seconds says to start the server; no cache file."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    data = make_data(tmp_path)
    t0 = time.time()
    proc = run_script("embed.py", data, "--base_url", f"http://127.0.0.1:{port}/v1")
    assert_clean_error(proc, "serve_embeddings.py")
    assert "refused" in proc.stderr and time.time() - t0 < 60  # with retries it took 212 s
    assert sorted(os.listdir(data)) == ["items.jsonl"]


def test_a_failed_run_leaves_no_cache_file(tmp_path, fake_server, capfd):
    """A run that fails before its first vector (a server answering 500 until retries run out)
    creates no DATA/lang_emb.cache, not even an empty one."""
    srv, url = fake_server(always="500")
    data = make_data(tmp_path)
    proc = run_main(capfd, data, "--base_url", url, *FAST)
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1].startswith("error:") and "giving up" in proc.stderr
    assert len(srv.inputs) == 4 and sorted(os.listdir(data)) == ["items.jsonl"]  # 1 + 3 retries, no other batch


def test_a_folder_named_like_the_cache_is_one_error_line(tmp_path):
    """DATA/lang_emb.cache being a directory: one error line naming it, no traceback."""
    data = make_data(tmp_path)
    (data / "lang_emb.cache").mkdir()
    assert_clean_error(run_script("embed.py", data, "--base_url", "http://127.0.0.1:9/v1"), "lang_emb.cache")


def test_a_non_utf8_items_line_is_one_error_line(tmp_path):
    """A line of items.jsonl that is not UTF-8: one error line naming the file (common.read_items)."""
    data = make_data(tmp_path)
    with open(data / "items.jsonl", "ab") as f:
        f.write(b'{"item_id": "40", "text": "caf\xe9"}\n')
    assert_clean_error(run_script("embed.py", data, "--base_url", "http://127.0.0.1:9/v1"), "items.jsonl")


def test_import_embed_leaves_torch_out():
    """embed.py starts without importing torch (seconds on a loaded machine)."""
    code = "import sys, embed; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_torn_record_rerequests_its_whole_original_batch(tmp_path, fake_server):
    """Batches are the distinct texts cut every --batch_size in item order: after the last record
    is torn, the resumed run requests that text's whole original batch, exactly as it was sent."""
    srv, url = fake_server()
    data = make_data(tmp_path, TEXTS[:30])  # 30 distinct texts: batches of 4, the last one holds 2
    embed.main([str(data), "--base_url", url] + FAST + ["--workers", "3"])
    assert sorted(srv.inputs) == sorted(TEXTS[i:min(i + 4, 30)] for i in range(0, 30, 4))
    first = outputs(data)
    cache = data / "lang_emb.cache"
    last = cache.read_bytes()[-(embed.RECORD.size + 4 * 8):]  # the last record stored: which text?
    torn = next(t for t in TEXTS[:30] if embed.cache_key("fake", None, t) == last[4:36])
    os.truncate(cache, cache.stat().st_size - 3)
    embed.main([str(data), "--base_url", url] + FAST)
    assert len(srv.inputs) == 8 + 1 and torn in srv.inputs[-1] and srv.inputs[-1] in srv.inputs[:-1]
    assert outputs(data) == first


def test_a_refused_connection_mid_run_is_retried(tmp_path, fake_server, capfd):
    """Once the server has answered, a refused connection is a restarting server, not a wrong URL:
    the run retries until a server listens on the port again, and finishes with every vector."""
    srv, url = fake_server(faults=[None, "drop"])  # the second request: connection closed, no answer
    port = srv.server_address[1]

    def restart():
        deadline = time.time() + 600  # a guard against a hang only
        while len(srv.inputs) < 2 and time.time() < deadline:
            time.sleep(0.005)
        srv.shutdown()
        srv.server_close()  # nothing listens on the port: connections are refused
        time.sleep(0.5)
        fake_server(port=port)

    threading.Thread(target=restart).start()
    proc = run_main(capfd, make_data(tmp_path), "--base_url", url, *FAST, "--backoff_base", "0.2", "--backoff_max", "1", "--max_retries", "6")
    assert proc.returncode == 0 and "refused" in proc.stderr, proc.stderr
    assert np.array_equal(np.load(tmp_path / "lang_emb.npy"), expected())


def test_vectors_of_another_dimension_than_the_cached_ones_stop_at_once(tmp_path, fake_server, capfd):
    """A server answering 6-d vectors where the cache holds 8-d ones for the same model name (the
    weights changed): one request, one error line naming the cache, no retry, no output."""
    srv, url = fake_server()
    data = make_data(tmp_path, TEXTS[:8])
    embed.main([str(data), "--base_url", url] + FAST)
    make_data(tmp_path, TEXTS[:12])  # 4 new texts to request
    os.remove(data / "lang_emb.npy")
    srv6, url6 = fake_server(dim=6)
    capfd.readouterr()
    proc = run_main(capfd, data, "--base_url", url6, *FAST, "--workers", "4")
    assert_clean_error(proc, "lang_emb.cache")
    assert "6-d" in proc.stderr and len(srv6.inputs) == 1 and not (data / "lang_emb.npy").exists()


def test_the_server_and_its_models_are_named_before_the_first_request(tmp_path, fake_server, capfd):
    """Before any text is sent, one GET {base_url}/models (with the URL's query) and one stdout line
    naming the server (no query, no key) and what it serves, --model among them."""
    srv, url = fake_server(models=["other-model", "fake"])
    proc = run_main(capfd, make_data(tmp_path), "--base_url", f"{url}?key={KEY}", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert srv.gets == [(f"/v1/models?key={KEY}", 0)] and len(srv.inputs) == 10
    assert proc.stdout.splitlines()[0] == f"server {url} serves other-model, fake: --model fake is among them"
    assert KEY not in proc.stdout + proc.stderr
    proc = run_main(capfd, tmp_path, "--base_url", "http://127.0.0.1:9/v1", *FAST)  # all cached: asks nobody
    assert proc.returncode == 0 and proc.stdout.startswith("wrote") and len(srv.gets) == 1, proc.stdout


def test_a_server_serving_another_model_is_one_error_line_and_sends_nothing(tmp_path, fake_server, capfd):
    """The report's case: another server holds the port and embeds whatever it is asked with its
    own model. One error line naming the URL, --model and what it serves; no text sent, no file."""
    srv, url = fake_server(models=["nomic-embed-text:v1.5"])
    data = make_data(tmp_path)
    proc = run_main(capfd, data, "--base_url", url, *FAST)
    message = assert_clean_error(proc, f"{url}/models serves nomic-embed-text:v1.5, not --model fake")
    assert srv.inputs == [] and sorted(os.listdir(data)) == ["items.jsonl"], message


def test_ollama_latest_tag_counts_as_the_bare_name(tmp_path, fake_server, capfd):
    """Ollama lists "name:latest" and embeds with "name": that is the model asked for."""
    srv, url = fake_server(models=["fake:latest"])
    proc = run_main(capfd, make_data(tmp_path), "--base_url", url, *FAST)
    assert proc.returncode == 0 and "serves fake:latest: --model fake is among them" in proc.stdout, proc.stderr


@pytest.mark.parametrize("models, why", [("404", "HTTP 404: no route GET /v1/models"), ("405", "HTTP 405"),
                                         ("garbage", "JSONDecodeError"), ("shape", "unexpected answer"),
                                         ("slow", "ReadTimeout")])
def test_a_server_without_a_models_list_is_a_note_and_embedding_goes_on(tmp_path, fake_server, capfd, models, why):
    """No /models route (some providers), a body that is not a model list, or no answer within
    --timeout: one stdout note saying why, then every vector as usual, no retry of the GET."""
    srv, url = fake_server(models=models)
    proc = run_main(capfd, make_data(tmp_path), "--base_url", url, *FAST)
    assert proc.returncode == 0, proc.stderr
    note = proc.stdout.splitlines()[0]
    assert note.startswith(f"note: {url}/models: ") and why in note and note.endswith("the model unconfirmed"), note
    assert len(srv.gets) == 1 and np.array_equal(np.load(tmp_path / "lang_emb.npy"), expected())

