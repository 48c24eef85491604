"""
serve_embeddings.py under load and at its edges, against the real server in a subprocess on
127.0.0.1: query strings, the bounded queue (503 + Retry-After), clients that leave while queued,
the /health counters, a busy port, a request sent while the model loads, and embed_local.sh waiting
for /health. One server per module (the model loads in a few seconds), slowed by --delay_per_text
so that a request stays in line long enough to observe; the loading tests start their own.

    python -m pytest -q tests/test_server.py
"""

import http.client
import json
import math
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
import requests

from conftest import REPO, LocalServer, assert_clean_error, run_script

DELAY = 0.3  # seconds per text: a 4-text request holds the encoder for over a second


@pytest.fixture(scope="module")
def server():
    """serve_embeddings.py --port 0 --delay_per_text DELAY --max_queue 1 -> 'http://127.0.0.1:PORT'."""
    server = LocalServer("--delay_per_text", DELAY, "--max_queue", 1).wait()
    yield server.url.removesuffix("/v1")
    server.stop()


def health(base):
    r = requests.get(base + "/health", timeout=5)
    assert r.status_code == 200
    return r.json()


def wait_health(base, ok, timeout=300):  # a guard against a hang only
    """Poll /health until ok(health) holds; the health that satisfied it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(base)
        if ok(h):
            return h
        time.sleep(0.01)
    pytest.fail(f"/health never satisfied the condition; last: {h}")


def send(base, texts):
    """POST texts on a connection of its own without reading the answer: the request is in the
    server's hands (its getresponse() reads the answer, its close() leaves)."""
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
    conn.request("POST", "/v1/embeddings", json.dumps({"input": texts}),
                 {"Content-Type": "application/json"})
    return conn


def unique(n):
    """n texts no other test sends."""
    return [f"text {uuid.uuid4().hex}" for _ in range(n)]


def test_listening_line_means_ready_and_query_strings_are_ignored_never_echoed(server):
    """The first request right after 'listening on' is answered; a query string (?api-version=...)
    on /v1/embeddings, /health and /v1/models does not change the route, and a 404 echoes the
    path but never the query string (it may carry a key)."""
    r = requests.get(server + "/health?probe=1", timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = requests.post(server + "/v1/embeddings?api-version=2024-02-01", json={"input": unique(1)}, timeout=30)
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
    r = requests.get(server + "/v1/models?api-version=2024-02-01", timeout=5)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "all-MiniLM-L6-v2"
    for method, path in [("GET", "/nope"), ("POST", "/v1/nope")]:
        r = requests.request(method, server + path + "?api-key=SECRET123", json={"input": "x"}, timeout=5)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert path in r.json()["error"]["message"]
        assert "SECRET123" not in r.text and "api-key" not in r.text, r.text


def test_full_queue_answers_503_with_retry_after_from_the_encode_rate(server):
    """With --max_queue 1, a request that finds one encoding and one waiting gets 503, an
    OpenAI-style error and a Retry-After of whole seconds estimated from the recent rate (5 texts in
    line at >= DELAY s each -> at least ceil(5 * DELAY)), without being encoded; the two in line
    are answered."""
    requests.post(server + "/v1/embeddings", json={"input": unique(1)}, timeout=30).raise_for_status()  # a rate
    before = health(server)
    a = send(server, unique(3))
    wait_health(server, lambda h: h["encoding"])
    b = send(server, unique(2))
    wait_health(server, lambda h: h["waiting"] == 1)
    r = requests.post(server + "/v1/embeddings", json={"input": unique(1)}, timeout=30)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "server_busy" and r.json()["error"]["type"] == "server_error"
    retry_after = r.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= math.ceil(5 * DELAY), retry_after
    assert a.getresponse().status == 200 and b.getresponse().status == 200
    after = health(server)
    assert after["rejected"] == before["rejected"] + 1
    assert after["texts"] == before["texts"] + 3 + 2  # the rejected text was never encoded


def test_client_that_leaves_while_queued_is_not_encoded(server):
    """A request whose client closes the connection while it waits for the encoder is dropped at
    its turn: 'dropped' goes up, 'texts' and 'distinct_texts' count only the request answered, and
    the server goes on serving."""
    before = health(server)
    a = send(server, unique(4))
    wait_health(server, lambda h: h["encoding"])
    b = send(server, unique(2))
    wait_health(server, lambda h: h["waiting"] == 1)
    b.close()
    assert a.getresponse().status == 200
    after = wait_health(server, lambda h: h["dropped"] == before["dropped"] + 1 and not h["waiting"])
    assert after["texts"] == before["texts"] + 4
    assert after["distinct_texts"] == before["distinct_texts"] + 4
    r = requests.post(server + "/v1/embeddings", json={"input": unique(1)}, timeout=30)
    assert r.status_code == 200


def test_health_counts_texts_distinct_texts_repeats_and_delay(server):
    """/health: 'texts' counts every text encoded, 'distinct_texts' each text once,
    'max_encodes_per_text' the most times one text was encoded, and 'encode_seconds' includes
    --delay_per_text for every text."""
    # the server's first encode is slow (warm-up): it must not be what makes up 4 * DELAY
    requests.post(server + "/v1/embeddings", json={"input": unique(1)}, timeout=30).raise_for_status()
    before = health(server)
    u1, u2 = unique(2)
    for texts in ([u1, u1, u2], [u1]):
        requests.post(server + "/v1/embeddings", json={"input": texts}, timeout=30).raise_for_status()
    after = health(server)
    assert after["texts"] == before["texts"] + 4
    assert after["distinct_texts"] == before["distinct_texts"] + 2
    assert after["max_encodes_per_text"] == max(before["max_encodes_per_text"], 3)
    assert after["encode_seconds"] - before["encode_seconds"] >= 4 * DELAY
    assert after["dropped"] == before["dropped"] and after["rejected"] == before["rejected"]


def test_busy_port_fails_at_once_with_one_line(tmp_path):
    """A port in use: one line 'error: port P on HOST is in use (...)', exit 1, and before the model
    loads: with a --model_dir that does not exist, the port is still what it reports. A missing
    --model_dir on a free port is one error line too."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for extra in ([], ["--model_dir", tmp_path / "no_model"]):
            t0 = time.monotonic()
            proc = run_script("serve_embeddings.py", "--port", port, *extra, timeout=60)
            message = assert_clean_error(proc, f"port {port} on 127.0.0.1 is in use (")
            assert proc.returncode == 1 and proc.stdout == "", message
            assert time.monotonic() - t0 < 5, "a busy port must fail before the model loads"
    proc = run_script("serve_embeddings.py", "--port", 0, "--model_dir", tmp_path / "no_model", timeout=60)
    assert_clean_error(proc, "--model_dir")
    assert proc.returncode == 1


def test_a_request_made_while_the_model_loads_waits_and_is_answered():
    """The port is printed as soon as it is bound ("bound URL"), before the model loads; a /health
    sent then is neither refused nor failed: it waits, and is answered once the model is ready."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "serve_embeddings.py"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("bound http://127.0.0.1:") and "loading the model" in first, first
        r = requests.get(first.split()[1].removesuffix(";").removesuffix("/v1") + "/health", timeout=120)
        assert r.status_code == 200 and r.json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(10)


def test_embed_local_sh_waits_for_health_then_embeds(tmp_path):
    """embed_local.sh run from another folder with a relative DATA: the server on a free port,
    embed.py naming it and its model, DATA/lang_emb.npy written, the server stopped."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "items.jsonl").write_text('{"item_id": "1", "text": "Heat (1995)"}\n')
    proc = subprocess.run(["bash", os.path.join(REPO, "embed_local.sh"), "d"], cwd=tmp_path,
                          env=dict(os.environ, PY=sys.executable), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("server http://127.0.0.1:") and "--model all-MiniLM-L6-v2 is among them" in proc.stdout
    assert (tmp_path / "d" / "lang_emb.npy").exists()
    health = proc.stdout.split()[1].removesuffix("/v1") + "/health"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # SIGTERM was sent as the script exited: gone within moments
        try:
            requests.get(health, timeout=1)
        except requests.ConnectionError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the server still answers {health} after embed_local.sh exited")


def test_embed_local_sh_reports_a_server_that_dies_while_loading(tmp_path):
    """A server that binds and then fails (here: a --model_dir that does not exist) ends
    embed_local.sh within seconds with an error line and the server's own error, embedding nothing."""
    wrapper = tmp_path / "py"
    wrapper.write_text(f'#!/bin/sh\ncase "$1" in *serve_embeddings.py) exec {sys.executable} "$@" --model_dir '
                       f'{tmp_path}/none;; esac\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "items.jsonl").write_text('{"item_id": "1", "text": "Heat (1995)"}\n')
    t0 = time.monotonic()
    proc = subprocess.run(["bash", os.path.join(REPO, "embed_local.sh"), "d"], cwd=tmp_path,
                          env=dict(os.environ, PY=str(wrapper)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and time.monotonic() - t0 < 30, proc.stderr
    assert proc.stderr.startswith("error: serve_embeddings.py stopped before it was ready")
    assert "error: --model_dir" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path / "d") == ["items.jsonl"]
