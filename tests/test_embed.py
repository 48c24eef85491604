"""
embed.py against a real HTTP server on 127.0.0.1: a fault-injecting server in a thread that speaks
the OpenAI embeddings protocol and answers deterministic vectors derived from each text. The local
sentence-transformers server is in test_embed_local.py.

    python -m pytest -q tests/test_embed.py
"""

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import embed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-0123456789abcdefSECRET"
TEXTS = [f"title number {i}" for i in range(37)] + ["title number 3", "title number 5"]  # 39 items, 37 distinct
FAST = ["--batch_size", "4", "--workers", "1", "--timeout", "0.5", "--max_retries", "3",
        "--backoff_base", "0.01", "--backoff_max", "0.05", "--model", "fake"]


def make_data(path, texts=TEXTS):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "items.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"item_id": str(i + 1), "text": t}) + "\n")
    return path


def fake_vector(text, dim=8):
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def expected(texts=TEXTS, dim=8):
    return np.stack([fake_vector(t, dim) for t in texts])


# -----------------------------------------------------------------------------
# a fault-injecting OpenAI-compatible server

class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def reply(self, status, body, headers=()):
        try:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout): nothing to answer
            self.close_connection = True

    def do_GET(self):
        """/v1/models: the list srv.models, or a fault: "404", "405", "slow" (longer than FAST's
        --timeout), "garbage" (not JSON), "shape" (JSON of another structure)."""
        srv, models = self.server, self.server.models
        with srv.lock:
            srv.gets.append((self.path, len(srv.inputs)))  # and how many POSTs came before it
        if models in ("404", "405"):
            self.reply(int(models), json.dumps({"error": {"message": f"no route GET {self.path}"}}).encode())
            return
        if models == "slow":
            time.sleep(1.0)
        body = {"garbage": b"<html>", "shape": b'{"data": "fake"}'}.get(str(models)) or json.dumps(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in models]}).encode()
        self.reply(200, body)

    def do_POST(self):
        srv = self.server
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.inputs.append(req["input"])
            srv.payloads.append(req)
            srv.auth.append(self.headers.get("Authorization"))
            srv.paths.append(self.path)
            srv.times.append(time.monotonic())
            n, fault = len(srv.inputs), srv.faults.pop(0) if srv.faults else srv.always
        if srv.hang_after is not None and n > srv.hang_after:
            srv.release.wait(30)  # a request that never gets an answer
            self.close_connection = True
            return
        if fault == "drop":
            self.close_connection = True  # close without a response
            return
        if fault in ("401", "404", "500", "429"):
            message = {"401": f"Incorrect API key provided: {self.headers.get('Authorization')}",
                       "404": f"no route POST {self.path}"}.get(fault, "boom")  # servers echo what they got
            body = json.dumps({"error": {"message": message, "type": "error", "code": fault}}).encode()
            self.reply(int(fault), body, [("Retry-After", "1")] if fault == "429" else [])
            return
        if fault == "slow":
            time.sleep(1.0)  # longer than the client's --timeout 0.5
        E = expected(req["input"], req.get("dimensions") or srv.dim)
        rows = [{"object": "embedding", "index": i, "embedding": e.tolist() if req.get("encoding_format") == "float"
                 or srv.ignore_format else base64.b64encode(e.tobytes()).decode()} for i, e in enumerate(E)]
        if fault == "missing":
            rows.pop()
        if fault == "wrongdim":
            rows[0]["embedding"] = E[0][:-1].tolist()
        if fault == "nan":
            rows[0]["embedding"] = [float("nan")] + E[0][1:].tolist()
        if srv.reverse:  # some servers answer out of order: index says where each row belongs
            rows = rows[::-1]
        body = json.dumps({"object": "list", "data": rows, "model": req["model"]}).encode()
        self.reply(200, body[:len(body) // 2] if fault == "truncated" else body)


@pytest.fixture
def fake_server():
    """Factory: fake_server(faults=[...], always=None, hang_after=None, ...) -> (server, base_url).
    GET /v1/models lists `models` (FAST's --model by default); the POSTs accept any model name."""
    servers = []

    def start(faults=(), always=None, hang_after=None, dim=8, reverse=False, ignore_format=False, userinfo="", port=0,
              models=("fake",)):
        srv = ThreadingHTTPServer(("127.0.0.1", port), FakeHandler)
        srv.lock, srv.release = threading.Lock(), threading.Event()
        srv.inputs, srv.payloads, srv.auth, srv.times, srv.paths, srv.gets = [], [], [], [], [], []
        srv.models = models
        srv.faults, srv.always, srv.hang_after, srv.dim = list(faults), always, hang_after, dim
        srv.reverse, srv.ignore_format = reverse, ignore_format
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, f"http://{userinfo}127.0.0.1:{srv.server_address[1]}/v1"

    yield start
    for srv in servers:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


def requested(srv):
    return [t for batch in srv.inputs for t in batch]


def outputs(data):
    with open(data / "lang_emb.npy", "rb") as f, open(data / "lang_emb.json") as g:
        return f.read(), json.load(g)


# -----------------------------------------------------------------------------
# the client against the fault-injecting server

def test_every_fault_is_retried_and_the_output_equals_a_clean_run(tmp_path, fake_server):
    """429 (Retry-After honoured), 500, a timeout, a dropped connection, truncated JSON, a missing
    embedding, a wrong dimension and NaN each cost exactly one retry; the files equal a clean run's."""
    faults = ["429", "500", "slow", "drop", "truncated", "missing", "wrongdim", "nan"]
    srv, url = fake_server(faults=[f for fault in faults for f in (fault, None)])  # spread over batches
    embed.main([str(make_data(tmp_path / "faulty")), "--base_url", url] + FAST)
    assert len(srv.inputs) == 10 + len(faults)  # 37 distinct texts in batches of 4, one retry per fault
    assert srv.times[1] - srv.times[0] >= 1.0  # Retry-After: 1
    embed.main([str(make_data(tmp_path / "clean")), "--base_url", url] + FAST)
    assert len(srv.inputs) == 10 + len(faults) + 10
    assert outputs(tmp_path / "faulty") == outputs(tmp_path / "clean")
    assert np.array_equal(np.load(tmp_path / "clean" / "lang_emb.npy"), expected())


def test_unsorted_and_float_answers_to_base64_requests_are_accepted(tmp_path, fake_server):
    """Rows answered in reverse order (placed by index) and floats sent when base64 was asked
    (Ollama) give the right matrix without a retry."""
    srv, url = fake_server(reverse=True, ignore_format=True)
    embed.main([str(make_data(tmp_path)), "--base_url", url] + FAST)
    assert len(srv.inputs) == 10 and srv.payloads[0]["encoding_format"] == "base64"
    assert np.array_equal(np.load(tmp_path / "lang_emb.npy"), expected())


def test_identical_texts_are_requested_once_and_a_rerun_requests_nothing(tmp_path, fake_server):
    """Duplicates share one request; the cache answers a repeated run without any request."""
    srv, url = fake_server()
    data = make_data(tmp_path)
    embed.main([str(data), "--base_url", url] + FAST + ["--workers", "3"])
    assert sorted(requested(srv)) == sorted(set(TEXTS))
    first = outputs(data)
    embed.main([str(data), "--base_url", url] + FAST)
    assert len(requested(srv)) == len(set(TEXTS)) and outputs(data) == first
    meta = first[1]
    assert meta["num_items"] == 39 and meta["dimension"] == 8 and meta["model"] == "fake"
    assert meta["texts_sha256"] == hashlib.sha256(json.dumps(TEXTS).encode()).hexdigest()


def test_a_run_killed_midway_resumes_with_only_the_missing_texts(tmp_path, fake_server):
    """SIGKILL while a request hangs; the rerun asks for exactly the texts not answered before,
    and the files equal an uninterrupted run's. The key appears in no output of the killed run."""
    k = 3
    srv, url = fake_server(hang_after=k)
    data = make_data(tmp_path / "killed")
    env = dict(os.environ, OPENAI_API_KEY=KEY)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "embed.py"), str(data), "--base_url", url] + FAST
                            + ["--timeout", "60"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cache, keys = str(data / "lang_emb.cache"), {embed.cache_key("fake", None, t) for t in TEXTS}
    deadline = time.time() + 600  # a guard against a hang only: the wait ends when both have happened
    while time.time() < deadline and proc.poll() is None and not (
            len(srv.inputs) > k and len(embed.load_cache(cache, keys)[0]) == 4 * k):
        time.sleep(0.05)  # request k+1 hangs, and the k batches before it are in the cache
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    assert len(srv.inputs) == k + 1, err.decode()
    assert not (data / "lang_emb.npy").exists()
    assert KEY.encode() not in out + err
    answered = requested(srv)[:4 * k]

    srv2, url2 = fake_server()
    embed.main([str(data), "--base_url", url2] + FAST)
    assert sorted(requested(srv2)) == sorted(set(TEXTS) - set(answered))
    embed.main([str(make_data(tmp_path / "clean")), "--base_url", url2] + FAST)
    assert outputs(data)[0] == outputs(tmp_path / "clean")[0]


def test_a_torn_last_cache_record_is_ignored(tmp_path, fake_server):
    """A cache whose last record was cut mid-write (and one with trailing garbage) loses only that
    record: the rerun requests one text and writes the same files."""
    srv, url = fake_server()
    data = make_data(tmp_path)
    embed.main([str(data), "--base_url", url] + FAST)
    first = outputs(data)
    cache = data / "lang_emb.cache"
    size = cache.stat().st_size
    os.truncate(cache, size - 7)
    embed.main([str(data), "--base_url", url] + FAST)
    assert len(requested(srv)) == 37 + 1 and outputs(data) == first
    assert cache.stat().st_size == size  # the torn tail was cut off before appending
    with open(cache, "ab") as f:
        f.write(embed.MAGIC + b"\x00" * 20)
    embed.main([str(data), "--base_url", url] + FAST)
    assert len(requested(srv)) == 38 and outputs(data) == first


def test_401_fails_at_once_without_output_or_leaking_the_key(tmp_path, fake_server, monkeypatch, capfd):
    """A bad key: one request (sent as a Bearer token), no retries, the server's message in one
    error line with the key redacted even though the server echoed it, and no output files."""
    monkeypatch.setenv("MY_KEY", KEY)
    srv, url = fake_server(always="401")
    data = make_data(tmp_path)
    with pytest.raises(SystemExit) as e:
        embed.main([str(data), "--base_url", url, "--api_key_env", "MY_KEY"] + FAST + ["--workers", "4"])
    assert len(srv.inputs) == 1 and srv.auth == [f"Bearer {KEY}"]
    assert "HTTP 401" in str(e.value) and "Incorrect API key" in str(e.value) and KEY not in str(e.value)
    assert not (data / "lang_emb.npy").exists() and not (data / "lang_emb.json").exists()
    out, err = capfd.readouterr()
    assert KEY not in out + err


def test_the_key_and_url_query_are_sent_but_never_written(tmp_path, fake_server, monkeypatch, capfd):
    """With retries printing warnings and a server echoing the key, neither the key nor a secret in
    the URL's query appears on stdout, stderr or in any file under DATA; every request carries the
    query; lang_emb.json records the URL without it."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    srv, url = fake_server(faults=["500", "drop", "401"])
    data = make_data(tmp_path)
    with pytest.raises(SystemExit):
        embed.main([str(data), "--base_url", url + "?key=" + KEY] + FAST)
    embed.main([str(data), "--base_url", url + "?key=" + KEY] + FAST)
    out, err = capfd.readouterr()
    assert "warning" in err and KEY not in out + err
    assert set(srv.paths) == {"/v1/embeddings?key=" + KEY}
    for name in os.listdir(data):
        assert KEY.encode() not in (data / name).read_bytes(), name
    assert outputs(data)[1]["base_url"] == f"http://127.0.0.1:{srv.server_address[1]}/v1"


def test_gives_up_after_max_retries(tmp_path, fake_server):
    """A server that always answers 500 gets 1 + max_retries requests, then a clear error, no output."""
    srv, url = fake_server(always="500")
    data = make_data(tmp_path)
    with pytest.raises(SystemExit) as e:
        embed.main([str(data), "--base_url", url] + FAST)
    assert len(srv.inputs) == 4 and "giving up after 4 attempts" in str(e.value) and "HTTP 500" in str(e.value)
    assert not (data / "lang_emb.npy").exists()


def test_dimensions_are_sent_and_part_of_the_cache_key(tmp_path, fake_server):
    """--dimensions reaches the server and shapes the output; vectors cached for another d are not reused."""
    srv, url = fake_server()
    data = make_data(tmp_path)
    embed.main([str(data), "--base_url", url, "--dimensions", "6"] + FAST)
    assert srv.payloads[0]["dimensions"] == 6 and np.load(data / "lang_emb.npy").shape == (39, 6)
    embed.main([str(data), "--base_url", url] + FAST)
    assert "dimensions" not in srv.payloads[-1] and len(requested(srv)) == 2 * 37
    assert np.array_equal(np.load(data / "lang_emb.npy"), expected())


def test_missing_items_file_is_one_clear_error(tmp_path):
    """No items.jsonl: the error names the file."""
    with pytest.raises(SystemExit) as e:
        embed.main([str(tmp_path)])
    assert "items.jsonl" in str(e.value) and str(e.value).startswith("error:")
