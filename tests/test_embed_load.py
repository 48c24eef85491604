"""
embed.py against the real local server (serve_embeddings.py, MiniLM) made slow on purpose: under
load the run finishes without re-encoding texts over and over, and a resumed run gives the same
bytes as an uninterrupted one (real models' floats depend on the batch a text is encoded in).

    python -m pytest -q tests/test_embed_load.py
"""

import json
import os
import shutil

import pytest
import requests

from conftest import LocalServer, run_script

# The local server encodes these titles in 10 to 13 ms each on the shared 2-core VM (/health
# encode_seconds / texts over 12 batches of 64 at load average 3: least 10.2 ms, median 12.9 ms);
# sleeping 40 ms more per text makes it about 5x slower than usual.
DELAY_PER_TEXT = 0.040
WORDS = "red blue toy story film book game kitchen garden music sport travel dark light".split()


def titles(n, tag):
    """n distinct titles of 6 to 14 words (varied lengths, so that batches pad differently)."""
    return [f"{tag} item {i}: " + " ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(3 + i % 9))
            for i in range(n)]


def make_data(path, n, tag):
    path.mkdir(parents=True)
    with open(path / "items.jsonl", "w") as f:
        f.writelines(json.dumps({"item_id": str(i + 1), "text": t}) + "\n" for i, t in enumerate(titles(n, tag)))
    return path


@pytest.fixture(scope="module")
def servers():
    """Two local servers, loading their models side by side: "usual", and "slow" (5x slower)."""
    both = {"usual": LocalServer(), "slow": LocalServer("--delay_per_text", DELAY_PER_TEXT)}
    try:
        yield {name: server.wait() for name, server in both.items()}
    finally:
        for server in both.values():
            server.stop()


def embed(data, url, *flags):
    proc = run_script("embed.py", data, "--base_url", url, *flags, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_a_torn_record_resumes_to_the_same_bytes_with_a_real_model(tmp_path, servers):
    """Cut the last cache record of a finished run: the rerun re-requests that text's whole original
    batch (8 texts, not the one alone, whose floats would differ in the last bits), and
    lang_emb.npy is byte-identical to the uninterrupted run's."""
    url, health = servers["usual"].url, servers["usual"].health
    clean = make_data(tmp_path / "clean", 24, "torn")
    embed(clean, url, "--batch_size", "8", "--workers", "1")
    resumed = tmp_path / "resumed"
    shutil.copytree(clean, resumed)
    os.remove(resumed / "lang_emb.npy")
    cache = resumed / "lang_emb.cache"
    os.truncate(cache, cache.stat().st_size - 100)  # kill -9 in the middle of the last record
    before = health()["texts"]
    embed(resumed, url, "--batch_size", "8", "--workers", "1")
    assert (resumed / "lang_emb.npy").read_bytes() == (clean / "lang_emb.npy").read_bytes()
    assert health()["texts"] - before == 8


def test_under_load_the_run_finishes_encoding_no_text_more_than_twice(tmp_path, servers):
    """The server 5x slower than usual, 4 workers, --timeout 5, and 6 batches sized so that each
    takes the server about 2.4 s (3 queued take longer than the timeout): the run finishes, the
    server encodes no text more than twice, and lang_emb.npy equals the bytes of a clean run (one
    worker, a server at its usual speed).
    (A client that kept 4 requests in flight timed its own queue out over and over: texts were
    encoded 3 to 5 times.)"""
    url, health = servers["slow"].url, servers["slow"].health
    costs = []  # seconds per text now, on this machine's load: the least of 2 requests after a warm-up
    for k in range(3):
        before = health()
        requests.post(url + "/embeddings", json={"input": titles(24, f"probe{k}")}, timeout=60).raise_for_status()
        costs.append((health()["encode_seconds"] - before["encode_seconds"]) / 24)
    per_text = min(costs[1:])
    batch = max(8, round(2.4 / per_text))

    loaded = make_data(tmp_path / "loaded", 6 * batch, "load")
    embed(loaded, url, "--batch_size", batch, "--workers", "4", "--timeout", "5")
    stats = health()
    assert stats["max_encodes_per_text"] <= 2, (stats, batch, per_text)
    clean = make_data(tmp_path / "clean", 6 * batch, "load")
    embed(clean, servers["usual"].url, "--batch_size", batch, "--workers", "1")  # the same model, at full speed
    assert (loaded / "lang_emb.npy").read_bytes() == (clean / "lang_emb.npy").read_bytes()
