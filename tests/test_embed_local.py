"""
embed.py and serve_embeddings.py with the real all-MiniLM-L6-v2 model: the local server in a
subprocess on 127.0.0.1 (started once for the module), its two encodings, its OpenAI-style errors,
embeddings that mean something, and recommend.py --new_items through it.

    python -m pytest -q tests/test_embed_local.py
"""

import base64
import json

import numpy as np
import pytest
import requests

import embed
from conftest import LocalServer
from test_embed import make_data


@pytest.fixture(scope="module")
def local_server():
    """serve_embeddings.py on a free port (loads the model once for the module) -> base URL."""
    server = LocalServer("--max_inputs", 64, "--max_bytes", 65536).wait()
    yield server.url
    server.stop()


def test_local_server_embeds_titles_meaningfully(tmp_path, local_server, capfd):
    """embed.py with its default model name through the local server: it names the server and its
    model first, unit-norm 384-d rows, and a film is closer to its sequel than to unrelated films."""
    titles = ["Toy Story (1995). Genres: Animation, Children's, Comedy",
              "Toy Story 2 (1999). Genres: Animation, Children's, Comedy",
              "Schindler's List (1993). Genres: Drama, War",
              "Star Wars (1977). Genres: Action, Adventure, Sci-Fi",
              "The Empire Strikes Back (1980). Genres: Action, Adventure, Sci-Fi"]
    data = make_data(tmp_path, titles)
    embed.main([str(data), "--base_url", local_server, "--batch_size", "2"])
    out = capfd.readouterr().out.splitlines()
    assert out[0] == f"server {local_server} serves all-MiniLM-L6-v2: --model all-MiniLM-L6-v2 is among them", out
    E = np.load(data / "lang_emb.npy")
    assert E.shape == (5, 384) and E.dtype == np.float32
    assert np.allclose(np.linalg.norm(E, axis=1), 1, atol=1e-5)
    S = E @ E.T
    assert S[0, 1] > S[0, 2] and S[0, 1] > S[0, 3] and S[3, 4] > S[3, 2]
    assert json.load(open(data / "lang_emb.json"))["model"] == "all-MiniLM-L6-v2"


def test_local_server_float_and_base64_agree(local_server):
    """The same request in both encodings gives the same float32 vectors; /v1/models names the
    model embed.py asks for by default; /health counts the texts encoded."""
    texts = ["GoldenEye (1995)", "Heat (1995)", "Casino (1995)"]
    r = {fmt: requests.post(local_server + "/embeddings", json={"model": "all-MiniLM-L6-v2", "input": texts,
                                                                 "encoding_format": fmt}, timeout=30).json()
         for fmt in ("float", "base64")}
    E_float = np.array([d["embedding"] for d in r["float"]["data"]], dtype=np.float32)
    E_b64 = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r["base64"]["data"]])
    assert E_float.shape == (3, 384) and np.array_equal(E_float, E_b64)
    assert r["float"]["usage"]["prompt_tokens"] > 0
    models = requests.get(local_server + "/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == ["all-MiniLM-L6-v2"]
    health = requests.get(local_server.removesuffix("/v1") + "/health", timeout=5).json()
    assert health["status"] == "ok" and health["texts"] >= 6 and health["encode_seconds"] > 0


@pytest.mark.parametrize("body, status, phrase", [
    (b"not json", 400, "not valid JSON"),
    (b'{"model": "all-MiniLM-L6-v2"}', 400, "'input'"),
    (b'{"input": ["fine", ""]}', 400, "empty string"),
    (json.dumps({"input": ["a"] * 65}).encode(), 400, "at most 64"),
    (b'{"input": [1, 2, 3]}', 400, "list of strings"),
    (b'{"input": "x", "encoding_format": "int8"}', 400, "encoding_format"),
    (b'{"input": "x", "model": "text-embedding-3-large"}', 404, "not found"),
    (json.dumps({"input": ["x" * 70000]}).encode(), 413, "Content-Length"),
])
def test_local_server_rejects_bad_requests_with_openai_errors(local_server, body, status, phrase):
    """Bad requests get their status and an OpenAI-style error body naming the problem."""
    r = requests.post(local_server + "/embeddings", data=body, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert phrase in err["message"] and err["type"] and err["code"]


def test_recommend_new_items_through_the_local_server(tmp_path, local_server):
    """recommend.py --new_items with the real model: a toy dataset with a quarter of its items cold
    (never seen in training, so scored as new items), embedded by the local server, decomposed, one
    epoch of SASRec-AlphaFuse; a new item with the text of a cold one is embedded by the same server
    and scores as that item (MiniLM's rounding may differ by batch: 1e-4), and an unrelated new item
    is ranked with the rest."""
    import decompose
    import train_discriminative
    from conftest import prepare_toy, run_main
    from test_recommend import parse

    data, _ = prepare_toy(tmp_path, flags=("--cold_items", "0.25"))
    embed.main([data, "--base_url", local_server])
    decompose.main([data, "--dim", "16", "--null_dim", "8"])
    run = str(tmp_path / "run")
    train_discriminative.main([data, "--out", run, "--hidden_dim", "16", "--neg_ratio", "8", "--epochs", "1",
                               "--device", "cpu"])
    items = [json.loads(line) for line in open(f"{data}/items.jsonl")]
    cold = json.load(open(f"{data}/meta.json"))["cold_items"][0] - 1  # its line in items.jsonl
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"item_id": "twin", "text": items[cold]["text"]}) + "\n"
                   + json.dumps({"item_id": "fresh", "text": "a wooden toy train with three carriages"}) + "\n")
    history = next(it["item_id"] for k, it in enumerate(items) if k != cold)
    proc = run_main("recommend.py", run, "--history", history, "--new_items", new, "--k", len(items) + 2,
                    "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    scores = {i: s for _, i, s, _ in parse(proc.stdout)}
    assert len(scores) == len(items) + 1  # every item and both new ones, less the history's one
    assert scores["twin"] == pytest.approx(scores[items[cold]["item_id"]], abs=1e-4)
    assert "all-MiniLM-L6-v2" in proc.stderr
