"""recommend.py on tiny trained runs: the top-k of a history as evaluate.py scores it, many histories
as JSON lines, history exclusion, error lines; and items that arrive after training (--new_items)
embedded through a real HTTP endpoint on 127.0.0.1 (test_embed.py's fault-injecting server, which
answers deterministic vectors per text), projected with the run's subspace and ranked with the
known items, while an ID table refuses them.

    cd /work/main && python -m pytest -q tests/test_recommend.py
"""

import json
import os
import shutil
import threading
from http.server import ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
import decompose
import embed
import evaluate
import recommend
import train_diffusion
import train_discriminative
from conftest import assert_clean_error, prepare_toy, run_main, run_script
from test_embed import FakeHandler, fake_server, fake_vector  # noqa: F401 (fixture)

DIM = 32  # d_l of the endpoint's vectors; decompose keeps d = 16 of them, d_n = 8
SASREC = ["--hidden_dim", "16", "--neg_ratio", "8", "--batch_size", "64", "--epochs", "1", "--device", "cpu"]
DREAMREC = ["--batch_size", "64", "--timesteps", "50", "--sample_steps", "5", "--lr", "1e-3", "--epochs", "1",
            "--device", "cpu"]


def start_server(dim=DIM):
    """test_embed.py's fake OpenAI-compatible server (its FakeHandler), for a whole module, serving 'fake'."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeHandler)
    srv.lock, srv.release = threading.Lock(), threading.Event()
    srv.inputs, srv.payloads, srv.auth, srv.times, srv.paths, srv.gets = [], [], [], [], [], []
    srv.models, srv.faults, srv.always, srv.hang_after, srv.dim = ("fake",), [], None, None, dim
    srv.reverse = srv.ignore_format = False
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def server():
    """(server, base URL) of the endpoint that embedded the toy's items (lang_emb.json records it)."""
    srv = start_server()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.release.set()
    srv.shutdown()
    srv.server_close()


class Runs(dict):
    """RUN folders by item embedding ("dreamrec": DreamRec-AlphaFuse), each trained for one epoch
    on first use, so that a module trains only the runs its tests ask for."""

    def __init__(self, root, data):
        super().__init__()
        self.root, self.data = root, data

    def __missing__(self, kind):
        run = str(self.root / kind)
        if kind == "dreamrec":
            train_diffusion.main([self.data, "--out", run, "--subspace", os.path.join(self.data, "subspace.pt"), *DREAMREC])
        else:
            train_discriminative.main([self.data, "--out", run, "--item_emb", kind, *SASREC])
        self[kind] = run
        return run


@pytest.fixture(scope="module")
def toy(tmp_path_factory, server):
    """The toy dataset with a quarter of its items cold (prepare.py --cold_items 0.25), embedded by
    the server, decomposed (d = 16, d_n = 8), and its runs (Runs: SASRec with any item embedding,
    DreamRec-AlphaFuse)."""
    root = tmp_path_factory.mktemp("recommend")
    data, _ = prepare_toy(root, users=80, flags=["--cold_items", "0.25"])
    embed.main([data, "--base_url", server[1], "--model", "fake", "--batch_size", "16"])
    decompose.main([data, "--dim", "16", "--null_dim", "8"])
    items = common.read_items(data)
    return SimpleNamespace(data=data, runs=Runs(root, data), ids=[it["item_id"] for it in items],
                           texts=[it["text"] for it in items], meta=common.load_meta(data))


def recommend_cli(*args, **kwargs):
    return run_main("recommend.py", *args, "--device", "cpu", **kwargs)


def parse(stdout):
    """--history's lines -> [(rank, item_id, score, text)]."""
    rows = [line.split("\t") for line in stdout.splitlines()]
    assert all(len(r) == 4 for r in rows), stdout
    return [(int(r), i, float(s), t) for r, i, s, t in rows]


def load(run):
    return evaluate.load_model(torch.load(os.path.join(run, "ckpt.pt"), weights_only=True), "cpu")


@torch.no_grad()
def expected_top(model, history, L, k, exclude=True, seed=0):
    """The k best (item index, score) of one history (item indices), scored as evaluate.py does."""
    query, table = model.scorer(seed)
    seq = torch.tensor([[0] * (L - len(history[-L:])) + history[-L:]])
    scores = (query(seq).float() @ table.T)[0]
    scores[0] = float("-inf")
    if exclude:
        scores[seq[0]] = float("-inf")
    order = torch.argsort(scores, descending=True)[:k]
    return [(int(i), float(scores[i])) for i in order if scores[i] > float("-inf")]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# -----------------------------------------------------------------------------
# known items

@pytest.mark.parametrize("include", [False, True])
def test_history_lists_the_top_k_as_evaluate_scores_them(toy, include):
    """--history prints k lines rank, item id, score, text: the model's k best items with the
    scores of evaluate.py's scorer, without the history's own items unless --include_history."""
    history = [3, 17, 9]
    proc = recommend_cli(toy.runs["alphafuse"], "--history", *[toy.ids[i - 1] for i in history], "--k", 6,
                         *(["--include_history"] if include else []))
    assert proc.returncode == 0, proc.stderr
    got = parse(proc.stdout)
    want = expected_top(load(toy.runs["alphafuse"]), history, toy.meta["max_len"], 6, exclude=not include)
    assert [r for r, *_ in got] == list(range(1, 7))
    assert [i for _, i, _, _ in got] == [toy.ids[i - 1] for i, _ in want]
    assert [s for _, _, s, _ in got] == pytest.approx([s for _, s in want], abs=1e-4)
    assert [t for *_, t in got] == [toy.texts[i - 1] for i, _ in want]
    if not include:
        assert not {toy.ids[i - 1] for i in history} & {i for _, i, _, _ in got}


def test_a_long_history_keeps_its_most_recent_items(toy):
    """A history longer than L gives the list of its last L items (prepare.py's windows)."""
    L = toy.meta["max_len"]
    long = [toy.ids[i] for i in range(L + 4)]
    a = recommend_cli(toy.runs["alphafuse"], "--history", *long, "--include_history")
    b = recommend_cli(toy.runs["alphafuse"], "--history", *long[-L:], "--include_history")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout


def test_input_jsonl_gives_one_line_per_history(toy, tmp_path):
    """--input: one JSON line per history, in order, with its "user" passed through and the items
    --history gives for it; stdout and --out hold the same lines; blank lines are skipped."""
    histories = [[toy.ids[4], toy.ids[8]], [toy.ids[30]], [toy.ids[i] for i in range(12)]]
    src = write_jsonl(tmp_path / "in.jsonl", [{"user": "u1", "history": histories[0]}, "",
                                              {"history": histories[1], "extra": 1},
                                              {"user": {"id": 7}, "history": histories[2]}])
    out = tmp_path / "recs.jsonl"
    proc = recommend_cli(toy.runs["alphafuse"], "--input", src, "--out", out, "--k", 4)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line.get("user") for line in lines] == ["u1", None, {"id": 7}] and "user" not in lines[1]
    for line, history in zip(lines, histories):
        single = parse(recommend_cli(toy.runs["alphafuse"], "--history", *history, "--k", 4).stdout)
        assert [(r["rank"], r["item_id"], r["text"]) for r in line["items"]] == [(r, i, t) for r, i, _, t in single]
        assert [r["score"] for r in line["items"]] == pytest.approx([s for _, _, s, _ in single], abs=1e-4)
    to_stdout = recommend_cli(toy.runs["alphafuse"], "--input", src, "--k", 4)
    assert to_stdout.stdout == out.read_text()


def test_runs_as_a_command(toy, tmp_path):
    """`python recommend.py RUN --input FILE` prints what main() prints in-process."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"user": 1, "history": [toy.ids[0], toy.ids[9]]}])
    proc = run_script("recommend.py", toy.runs["alphafuse"], "--input", src, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == recommend_cli(toy.runs["alphafuse"], "--input", src).stdout


def test_integer_ids_in_json_match_their_string(tmp_path):
    """items.jsonl spells ids as strings; a JSON history may give integer ids."""
    index = {"12": 1, "7": 2}
    assert recommend.encode_history([12, "7"], index, 3, "x") == [0, 1, 2]
    with pytest.raises(common.DataError, match="unknown item id True"):
        recommend.encode_history([True], index, 3, "x")


@pytest.mark.parametrize("case", ["unknown-history", "unknown-input", "not-json", "empty-history", "not-a-list",
                                  "k0", "no-history", "both", "missing-run", "out-folder"])
def test_bad_input_is_one_error_line_and_no_output(toy, tmp_path, case):
    """Each mistake: one line naming the id, file (and line), flag or path, a non-zero exit, no output file."""
    run, known = toy.runs["alphafuse"], toy.ids[0]
    src, out = tmp_path / "in.jsonl", tmp_path / "recs.jsonl"
    args, lines, name = {
        "unknown-history": (["--history", known, "nope"], None, "'nope'"),
        "unknown-input": (["--input", src], [{"history": [known]}, {"history": [known, "nope"]}], f"{src}:2"),
        "not-json": (["--input", src], [{"history": [known]}, "{oops"], f"{src}:2"),
        "empty-history": (["--input", src], [{"history": []}], f"{src}:1"),
        "not-a-list": (["--input", src], [{"history": known}], f"{src}:1"),
        "k0": (["--history", known, "--k", "0"], None, "--k"),
        "no-history": ([], None, "--history"),
        "both": (["--history", known, "--input", src], [{"history": [known]}], "--input"),
        "missing-run": (["--history", known], None, "nope/ckpt.pt"),
        "out-folder": (["--history", known, "--out", tmp_path / "no" / "recs.jsonl"], None, "recs.jsonl"),
    }[case]
    if lines:
        write_jsonl(src, lines)
    target = str(tmp_path / "nope") if case == "missing-run" else run
    proc = recommend_cli(target, *args, *(["--out", out] if case.endswith("input") else []))
    assert_clean_error(proc, name, argparse_ok=True)
    assert not out.exists() and not proc.stdout


# -----------------------------------------------------------------------------
# new items

def new_items(tmp_path, toy, twin=5):
    """NEW.jsonl of three items: n1 with the text of known item `twin` (index), n2 and n3 with new texts."""
    rows = [{"item_id": "n1", "text": toy.texts[twin - 1]}, {"item_id": "n2", "text": "a brand new gadget"},
            {"item_id": "n3", "text": "another arrival"}]
    return write_jsonl(tmp_path / "new.jsonl", rows), [r["text"] for r in rows]


def test_new_items_get_the_runs_projection_and_a_zero_id_part(toy, server, tmp_path):
    """alphafuse: a new item's fused embedding is E_lang = (scale e - mean) V of its vector with a
    zero ID part; the twin of a known item gets exactly that item's language coordinates in
    subspace.pt; the known items keep their rows."""
    srv, url = server
    model = load(toy.runs["alphafuse"])
    table_before = model.item_emb.table().clone()
    ckpt = torch.load(os.path.join(toy.runs["alphafuse"], "ckpt.pt"), weights_only=True)
    args = SimpleNamespace(subspace=None, ckpt="ckpt", base_url=url, api_key_env="NO_SUCH_KEY_VARIABLE")
    d_l, to_rows = recommend.new_item_rows(args, model, ckpt, toy.data)
    _, texts = new_items(tmp_path, toy)
    E = recommend.embed_texts(args, None, toy.data, texts, d_l)
    assert d_l == DIM and np.array_equal(E, np.stack([fake_vector(t, DIM) for t in texts]))
    sub = torch.load(os.path.join(toy.data, "subspace.pt"), weights_only=True)
    want = (sub["settings"]["scale"] * E.astype(np.float64) - sub["mean"].numpy()) @ sub["projection"].numpy()
    rows = torch.from_numpy(to_rows(E)).float()
    np.testing.assert_allclose(rows.numpy(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows[0], sub["lang_emb"][5])  # the twin of item 5
    recommend.add_items(model, rows)
    N = toy.meta["num_items"]
    table = model.item_emb.table()
    assert table.shape[0] == N + 4 and torch.equal(table[:N + 1], table_before)
    torch.testing.assert_close(table[N + 1:], rows)  # language coordinates + a zero ID part
    assert not model.item_emb.id_emb[N + 1:].any()


def test_new_items_are_ranked_with_the_known_ones(toy, server, tmp_path):
    """--new_items through the endpoint: the texts are requested once, the known items keep their
    scores, the new ones score as the model scores their rows, and a history may name them."""
    srv, url = server
    path, texts = new_items(tmp_path, toy)
    N, history = toy.meta["num_items"], [toy.ids[2], toy.ids[11]]
    before = len(srv.inputs)
    proc = recommend_cli(toy.runs["alphafuse"], "--history", *history, "--new_items", path, "--base_url", url,
                         "--k", N + 3)
    assert proc.returncode == 0, proc.stderr
    assert [t for batch in srv.inputs[before:] for t in batch] == texts
    got = {i: s for _, i, s, _ in parse(proc.stdout)}
    assert {"n1", "n2", "n3"} <= set(got) and len(got) == N + 1  # N + 3 items less the 2 of the history
    plain = {i: s for _, i, s, _ in parse(recommend_cli(toy.runs["alphafuse"], "--history", *history,
                                                        "--k", N).stdout)}
    assert {i: got[i] for i in plain} == pytest.approx(plain, abs=1e-4)
    model = load(toy.runs["alphafuse"])
    args = SimpleNamespace(subspace=None, ckpt="ckpt")
    _, to_rows = recommend.new_item_rows(args, model, torch.load(os.path.join(toy.runs["alphafuse"], "ckpt.pt")), toy.data)
    recommend.add_items(model, torch.from_numpy(to_rows(np.stack([fake_vector(t, DIM) for t in texts]))).float())
    want = dict(expected_top(model, [3, 12], toy.meta["max_len"], N + 3))
    assert [got[f"n{j}"] for j in (1, 2, 3)] == pytest.approx([want[N + j] for j in (1, 2, 3)], abs=1e-4)
    named = recommend_cli(toy.runs["alphafuse"], "--history", toy.ids[2], "n2", "--new_items", path, "--base_url", url)
    assert named.returncode == 0, named.stderr
    assert "n2" not in {i for _, i, _, _ in parse(named.stdout)}  # excluded: it is in the history


def test_the_recorded_endpoint_is_used_without_base_url(toy, server, tmp_path):
    """Without --base_url the new items go to the URL lang_emb.json records, with its model."""
    srv, _ = server
    path, texts = new_items(tmp_path, toy)
    before = len(srv.payloads)
    proc = recommend_cli(toy.runs["alphafuse"], "--history", toy.ids[0], "--new_items", path)
    assert proc.returncode == 0, proc.stderr
    assert [p["model"] for p in srv.payloads[before:]] == ["fake"]
    assert srv.payloads[before]["input"] == texts


@pytest.mark.parametrize("kind", ["morec", "whitenrec", "unisrec"])
def test_adapter_models_score_a_new_twin_as_its_known_item(toy, server, tmp_path, kind):
    """morec, whitenrec and unisrec embed an item by their adapter of its language vector alone, so
    a new item with the text of a known one gets exactly that item's score."""
    path, _ = new_items(tmp_path, toy, twin=5)
    N = toy.meta["num_items"]
    proc = recommend_cli(toy.runs[kind], "--history", toy.ids[20], "--new_items", path, "--base_url", server[1],
                         "--k", N + 3, "--include_history")
    assert proc.returncode == 0, proc.stderr
    got = {i: s for _, i, s, _ in parse(proc.stdout)}
    assert len(got) == N + 3 and got["n1"] == pytest.approx(got[toy.ids[4]], abs=1e-5)


@pytest.mark.parametrize("kind", ["alphafuse", "dreamrec"])
def test_a_new_twin_of_a_cold_item_scores_as_the_cold_item(toy, server, tmp_path, kind):
    """Training never touches a cold item (prepare.py --cold_items), so its row is what
    --new_items builds for its text: the projection of its vector and a zero ID part. A new item
    with a cold item's text gets that item's row and exactly its score (SASRec and DreamRec)."""
    cold = toy.meta["cold_items"][0]
    path, texts = new_items(tmp_path, toy, twin=cold)
    N, run = toy.meta["num_items"], toy.runs[kind]
    proc = recommend_cli(run, "--history", toy.ids[20], "--new_items", path, "--base_url", server[1], "--k", N + 3,
                         "--include_history")
    assert proc.returncode == 0, proc.stderr
    got = {i: s for _, i, s, _ in parse(proc.stdout)}
    assert len(got) == N + 3 and got["n1"] == got[toy.ids[cold - 1]]
    model = load(run)
    _, to_rows = recommend.new_item_rows(SimpleNamespace(subspace=None, ckpt="ckpt"), model,
                                         torch.load(os.path.join(run, "ckpt.pt"), weights_only=True), toy.data)
    recommend.add_items(model, torch.from_numpy(to_rows(fake_vector(texts[0], DIM)[None])).float())
    table = model.item_emb.table()
    assert torch.equal(table[N + 1], table[cold])


def test_dreamrec_scores_with_its_seed_and_takes_new_items(toy, server, tmp_path):
    """DreamRec: the list of evaluate.py's scorer with --seed (x_T drawn from it), the same on a
    rerun; new items join its item table."""
    run, N, L = toy.runs["dreamrec"], toy.meta["num_items"], toy.meta["max_len"]
    a = recommend_cli(run, "--history", toy.ids[1], toy.ids[6], "--seed", 3, "--k", 5)
    b = recommend_cli(run, "--history", toy.ids[1], toy.ids[6], "--seed", 3, "--k", 5)
    assert a.returncode == 0 and a.stdout == b.stdout, a.stderr
    want = expected_top(load(run), [2, 7], L, 5, seed=3)
    got = parse(a.stdout)
    assert [i for _, i, _, _ in got] == [toy.ids[i - 1] for i, _ in want]
    assert [s for _, _, s, _ in got] == pytest.approx([s for _, s in want], abs=1e-3)  # printed to 4 decimals
    path, _ = new_items(tmp_path, toy)
    proc = recommend_cli(run, "--history", toy.ids[1], "--new_items", path, "--base_url", server[1], "--k", N + 3)
    assert proc.returncode == 0, proc.stderr
    assert {"n1", "n2", "n3"} <= {i for _, i, _, _ in parse(proc.stdout)}


def test_an_id_table_refuses_new_items_before_any_request(toy, server, tmp_path):
    """--new_items on an ID-only run: one line naming the checkpoint; nothing is sent."""
    srv, url = server
    path, _ = new_items(tmp_path, toy)
    before = len(srv.inputs)
    proc = recommend_cli(toy.runs["id"], "--history", toy.ids[0], "--new_items", path, "--base_url", url)
    assert "cannot score items it was not trained on" in assert_clean_error(proc, "ckpt.pt")
    assert len(srv.inputs) == before


@pytest.mark.parametrize("case", ["clash", "twice", "no-text", "dimension", "no-record"])
def test_bad_new_items_are_one_error_line(toy, fake_server, tmp_path, case):
    """A new id that an item already has or that repeats, a line without text, an endpoint whose
    vectors have another dimension than the run's, a DATA without lang_emb.json: one line each."""
    srv, url = fake_server(dim=DIM // 2 if case == "dimension" else DIM)
    rows = [{"item_id": "n1", "text": "new"}, {"item_id": "n2", "text": "newer"}]
    rows[1] = {"clash": {"item_id": toy.ids[3], "text": "x"}, "twice": {"item_id": "n1", "text": "x"},
               "no-text": {"item_id": "n3"}}.get(case, rows[1])
    path = write_jsonl(tmp_path / "new.jsonl", rows)
    data = toy.data
    if case == "no-record":
        data = str(shutil.copytree(toy.data, tmp_path / "data"))
        os.remove(os.path.join(data, "lang_emb.json"))
    proc = recommend_cli(toy.runs["alphafuse"], "--history", toy.ids[0], "--new_items", path, "--base_url", url,
                         "--data", data)
    name = {"dimension": f"{DIM // 2}-d", "no-record": "lang_emb.json"}.get(case, f"{path}:2")
    assert_clean_error(proc, name)
    assert not proc.stdout
