"""
Benchmark of embed.py through the local server: items/s end to end (the `embed.py DATA` command,
interpreter start included) against the model's own encode rate on the same batches, so the cost
of the client, HTTP and JSON shows as the difference.

    python bench/bench_embed.py                                  # ml-1m and amazon-beauty titles
    python bench/bench_embed.py --datasets ml-100k --batch_size 64 --workers 2

Texts are the title column of ../shared/data/NAME/NAME.item (movie_title for MovieLens); a dataset
that is missing is skipped. serve_embeddings.py runs on a free port; embed.py embeds into a fresh
temporary DATA (empty cache) --repeats times. The encode rate is the server's own: its /health
reports the seconds spent inside model.encode (the same batch_size texts per call as an in-process
loop would use), read before and after each run. It is measured in the same process, at the same
moment, as the end-to-end time: on a shared 2-core machine a separate in-process loop measured
before or after varied 5x with the neighbours' load (OpenMP spin-waiting), so it is no baseline.
Prints, per dataset: items, distinct texts, embed.py seconds and items/s, the encode seconds and
texts/s, and the overhead in percent; and once, the start-up time of `python -c "import embed"`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_ROOT = os.path.join(REPO, "..", "shared", "data")


def read_titles(name):
    """Title column of a RecBole .item file (tab-separated, typed header), or None if absent."""
    path = os.path.join(DATA_ROOT, name, f"{name}.item")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
        col = header.index("movie_title" if "movie_title" in header else "title")
        return [row.rstrip("\n").split("\t")[col].strip() or "(untitled)" for row in f if row.strip()]


def start_server():
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "serve_embeddings.py"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("listening on"):
            return proc, line.split()[-1]
    sys.exit("serve_embeddings.py exited before listening")


def embed_once(url, titles, args):
    """`embed.py DATA` as a subprocess on a fresh DATA -> (wall seconds, encode seconds, texts encoded)."""
    health = url.removesuffix("/v1") + "/health"
    with tempfile.TemporaryDirectory() as data:
        with open(os.path.join(data, "items.jsonl"), "w", encoding="utf-8") as f:
            for i, t in enumerate(titles):
                f.write(json.dumps({"item_id": str(i + 1), "text": t}) + "\n")
        before = requests.get(health, timeout=10).json()
        t0 = time.time()
        subprocess.run([sys.executable, os.path.join(REPO, "embed.py"), data, "--base_url", url,
                        "--batch_size", str(args.batch_size), "--workers", str(args.workers)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.time() - t0
        after = requests.get(health, timeout=10).json()
    return seconds, after["encode_seconds"] - before["encode_seconds"], after["texts"] - before["texts"]


def bench(name, args):
    titles = read_titles(name)
    if titles is None:
        print(f"{name}: skipped ({DATA_ROOT}/{name}/{name}.item not found)")
        return
    proc, url = start_server()
    try:
        requests.post(url + "/embeddings", json={"input": titles[:args.batch_size]}, timeout=60)  # warm-up
        for r in range(args.repeats):
            seconds, encode_seconds, texts = embed_once(url, titles, args)
            print(f"{name} run {r + 1}: {len(titles)} items ({texts} distinct texts): embed.py {seconds:.1f}s "
                  f"= {len(titles) / seconds:.1f} items/s; model.encode {encode_seconds:.1f}s "
                  f"= {texts / encode_seconds:.1f} texts/s; overhead {100 * (seconds / encode_seconds - 1):.1f}%",
                  flush=True)
    finally:
        proc.terminate()
        proc.wait()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-beauty"], help="folders of ../shared/data")
    parser.add_argument("--batch_size", type=int, default=32, help="embed.py --batch_size: texts per request and per encode call")
    parser.add_argument("--workers", type=int, default=4, help="embed.py --workers")
    parser.add_argument("--repeats", type=int, default=1, help="runs per dataset, each on an empty cache")
    args = parser.parse_args(argv)
    t0 = time.time()
    subprocess.run([sys.executable, "-c", "import embed"], cwd=REPO, check=True)
    print(f"start-up: python -c 'import embed' takes {time.time() - t0:.1f}s (numpy, requests, and torch via common.py)")
    for name in args.datasets:
        bench(name, args)


if __name__ == "__main__":
    main()
