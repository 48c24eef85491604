"""prepare.py: every input format on small hand-written files, and the item texts built from them
(title + year, genres, brand, categories; HTML entities unescaped, whitespace normalised).

Run:  cd /work/main && python -m pytest -q tests/test_prepare_formats.py
"""

import gzip
import json
import os
import zipfile

import pytest

import common
import prepare

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def run(src, out, *flags):
    """prepare.main in-process; returns (meta, {item_id: text}, train/valid/test arrays)."""
    prepare.main([str(src), "--out", str(out), *map(str, flags)])
    meta, splits = common.load_dataset(str(out))
    items = common.read_items(str(out))
    return meta, {it["item_id"]: it["text"] for it in items}, splits


def write(path, text, encoding="utf-8"):
    """Write text to path (gzip-compressed when the name ends with .gz); returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding=encoding) as f:
        f.write(text)
    return path


def lines(rows):
    return "".join(row + "\n" for row in rows)


def user_sequences(splits):
    """{user index: [target items in time order]} read back from the samples (user split)."""
    seqs = {}
    for name in common.SPLITS:
        for u, seq, t in zip(splits[name]["user"].tolist(), splits[name]["seq"].tolist(),
                             splits[name]["target"].tolist()):
            seqs.setdefault(u, [i for i in seq if i][:1])  # the first item only shows up in histories
            seqs[u].append(t)
    return seqs


# -----------------------------------------------------------------------------
# RecBole atomic files

def test_recbole_text_columns(tmp_path):
    """RecBole: title + ' (year)', 'Genres: ...', 'Brand: ...', 'Categories: ...' joined by '. '."""
    src = tmp_path / "shop"
    write(src / "shop.inter", lines(["timestamp:float\tuser_id:token\titem_id:token\trating:float",
                                     "5\tu1\ti1\t1", "6\tu1\ti2\t2", "7\tu1\ti3\t3", "8\tu1\ti4\t4",
                                     "9\tu2\ti5\t5"]))
    write(src / "shop.item", lines([
        "item_id:token\ttitle:token_seq\tyear:token\tgenres:token_seq\tbrand:token\tcategories:token_seq",
        "i1\tToy Story\t1995\tAnimation Children's Comedy\t\t",
        "i2\tHeat (1995)\t1995\tAction\t\t",                          # the year is already there
        "i3\t  Tom &amp; Jerry   Puzzle \t\t\tAcme\tToys Puzzles Toys",  # entity, spaces, a duplicate
        "i4\t\t\t\t\t",                                            # no text at all
        "i5\tNo year\t\t\tBeta &quot;B&quot;\t"]))
    meta, text, _ = run(src, tmp_path / "out")
    assert meta["format"] == "recbole"
    assert text == {"i1": "Toy Story (1995). Genres: Animation, Children's, Comedy",
                    "i2": "Heat (1995). Genres: Action",
                    "i3": "Tom & Jerry Puzzle. Brand: Acme. Categories: Toys, Puzzles",
                    "i4": "Item i4",
                    "i5": "No year. Brand: Beta \"B\""}


@pytest.mark.parametrize("title,year,genre", [("movie_title", "release_year", "class"),
                                              ("name", "year", "genre"),
                                              ("title", "release_year", "genres")])
def test_recbole_column_aliases(tmp_path, title, year, genre):
    """Each documented alias of the title, year and genre columns is recognised."""
    src = tmp_path / "m"
    write(src / "m.inter", lines(["user_id:token\titem_id:token\ttimestamp:float", "1\t1\t1", "1\t2\t2"]))
    write(src / "m.item", lines([f"item_id:token\t{title}:token_seq\t{year}:token\t{genre}:token_seq",
                                 "1\tGoldenEye\t1995\tAction Adventure", "2\tCasino\t1995\tDrama"]))
    _, text, _ = run(src, tmp_path / "out")
    assert text == {"1": "GoldenEye (1995). Genres: Action, Adventure", "2": "Casino (1995). Genres: Drama"}


def test_recbole_source_as_inter_file_and_zip(tmp_path):
    """SOURCE may be NAME.inter (reads NAME.item beside it) or a zip holding the files at any depth."""
    inter = lines(["user_id:token\titem_id:token\ttimestamp:float", "1\t7\t2", "1\t3\t1"])
    item = lines(["item_id:token\ttitle:token_seq", "3\tThree", "7\tSeven"])
    write(tmp_path / "d" / "a.inter", inter)
    write(tmp_path / "d" / "a.item", item)
    write(tmp_path / "d" / "b.inter", lines(["user_id:token\titem_id:token\ttimestamp:float", "1\t9\t1"]))
    write(tmp_path / "d" / "b.item", lines(["item_id:token\ttitle:token_seq", "9\tNine"]))
    _, text, splits = run(tmp_path / "d" / "a.inter", tmp_path / "o1")
    assert text == {"3": "Three", "7": "Seven"}
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("deep/er/a/a.inter", inter)
        z.writestr("deep/er/a/a.item", item)
    _, text2, splits2 = run(tmp_path / "a.zip", tmp_path / "o2")
    assert text2 == text and user_sequences(splits2) == user_sequences(splits) == {0: [1, 2]}


# -----------------------------------------------------------------------------
# MovieLens raw files

def ml100k_files(genre_names=None):
    """A tiny ml-100k: u.data (no header), u.item (latin-1, 19 genre flags), optionally u.genre."""
    def flags(*on):
        return "|".join("1" if g in on else "0" for g in ML100K_GENRES)
    files = {
        "u.data": lines(["2\t1\t5\t881250949", "1\t3\t3\t881250950", "1\t1\t4\t881250940",
                         "2\t2\t1\t881250949", "1\t2\t2\t881250945"]),
        "u.item": lines([f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags('Animation', 'Comedy')}",
                         f"2|Misérables, Les (1995)|01-Jan-1995||http://x|{flags('Drama', 'Musical')}",
                         f"3|unknown||||{flags('unknown')}"]).encode("latin-1"),
    }
    if genre_names:
        files["u.genre"] = lines(f"{g}|{k}" for k, g in enumerate(genre_names)) + "\n"
    return files


ML100K_TEXT = {"1": "Toy Story (1995). Genres: Animation, Comedy",
               "2": "Misérables, Les (1995). Genres: Drama, Musical",
               "3": "unknown. Genres: unknown"}


def test_ml100k_raw_folder(tmp_path):
    """ml-100k raw folder: latin-1 titles, genre flags named by the standard 19 genres, time order."""
    for name, data in ml100k_files().items():
        (tmp_path / "ml").mkdir(exist_ok=True)
        (tmp_path / "ml" / name).write_bytes(data.encode() if isinstance(data, str) else data)
    meta, text, splits = run(tmp_path / "ml", tmp_path / "out")
    assert meta["format"] == "ml-100k"
    assert text == ML100K_TEXT
    assert user_sequences(splits) == {0: [1, 2, 3], 1: [1, 2]}  # user 2: a tie keeps file order
    assert meta["num_interactions"] == 5
    _, text2, _ = run(tmp_path / "ml" / "u.item", tmp_path / "out2")  # a file stands for its folder
    assert text2 == ML100K_TEXT


def test_ml100k_raw_zip_with_genre_file(tmp_path):
    """ml-100k zip (files in a subfolder, as GroupLens ships it): genre names come from u.genre."""
    names = [f"G{k}" for k in range(19)]
    with zipfile.ZipFile(tmp_path / "ml-100k.zip", "w") as z:
        for name, data in ml100k_files(names).items():
            z.writestr(f"ml-100k/{name}", data)
    meta, text, _ = run(tmp_path / "ml-100k.zip", tmp_path / "out")
    assert text["1"] == "Toy Story (1995). Genres: G3, G5"
    assert text["3"] == "unknown. Genres: G0"


def test_ml1m_raw(tmp_path):
    """ml-1m raw: '::'-separated ratings.dat and latin-1 movies.dat with 'Title (Year)' and genres."""
    write(tmp_path / "ml" / "ratings.dat", lines(["1::1193::5::978300760", "1::661::3::978302109",
                                                  "2::1193::4::978298413", "1::2::4::978300760"]))
    (tmp_path / "ml" / "movies.dat").write_bytes(lines([
        "2::Jumanji (1995)::Adventure|Children's|Fantasy",
        "661::Misérables, Les (1995)::Drama|Musical",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
        "5::Unused (2000)::Comedy"]).encode("latin-1"))
    meta, text, splits = run(tmp_path / "ml", tmp_path / "out")
    assert meta["format"] == "ml-1m"
    assert text == {"2": "Jumanji (1995). Genres: Adventure, Children's, Fantasy",
                    "661": "Misérables, Les (1995). Genres: Drama, Musical",
                    "1193": "One Flew Over the Cuckoo's Nest (1975). Genres: Drama"}
    assert user_sequences(splits) == {0: [3, 1, 2]}  # user 2 has one rating: no sample


# -----------------------------------------------------------------------------
# Amazon reviews 2014 / 2018 / 2023

def reviews_2014(rows):
    return lines(json.dumps({"reviewerID": u, "asin": i, "overall": 5.0, "reviewText": "fine",
                             "unixReviewTime": ts}) for u, i, ts in rows)


AMAZON_ROWS = [("A2", "B003", 1356220800), ("A1", "B002", 1356220800), ("A1", "B001", 1356134400),
               ("A2", "B001", 1356220800), ("A1", "B004", 1356307200)]


def test_amazon_2014_python_literal_meta_gz(tmp_path):
    """Amazon 2014: gzip reviews + meta lines that are Python literals; categories are lists of lists."""
    write(tmp_path / "az" / "reviews_Toys.json.gz", reviews_2014(AMAZON_ROWS))
    write(tmp_path / "az" / "meta_Toys.json.gz", lines([
        repr({"asin": "B001", "title": "Tom &amp; Jerry  Puzzle ", "brand": "Acme",
              "categories": [["Toys & Games", "Puzzles"], ["Toys & Games", "Jigsaw"]]}),
        repr({"asin": "B002", "title": "Kid's \"Best\" Ball", "categories": [["Toys & Games"]]}),
        repr({"asin": "B003", "categories": [[]], "salesRank": {"Toys": 5}}),
        repr({"asin": "B004", "title": "Yo-yo", "imUrl": "http://x"}),
        repr({"asin": "B999", "title": "never reviewed"})]))
    meta, text, splits = run(tmp_path / "az", tmp_path / "out")
    assert meta["format"] == "amazon"
    assert text == {"B001": "Tom & Jerry Puzzle. Brand: Acme. Categories: Toys & Games, Puzzles, Jigsaw",
                    "B002": "Kid's \"Best\" Ball. Categories: Toys & Games",
                    "B003": "Item B003",
                    "B004": "Yo-yo"}
    # A1: B001 (day 1), B002 (day 2), B004 (day 3); A2: B003 then B001 (a tie keeps file order)
    assert user_sequences(splits) == {0: [1, 2, 4], 1: [3, 1]}


def test_amazon_2018_json_meta(tmp_path):
    """Amazon 2018: plain JSON meta lines with a flat 'category' list and 'brand'."""
    write(tmp_path / "az" / "reviews_Books.json", reviews_2014(AMAZON_ROWS))
    write(tmp_path / "az" / "meta_Books.json", lines(json.dumps(m) for m in [
        {"asin": "B001", "title": "A &lt;Big&gt; Book", "brand": "Pen &amp; Ink",
         "category": ["Books", "Literature &amp; Fiction", "Books"]},
        {"asin": "B002", "title": "Second\tBook\n", "category": []},
        {"asin": "B003", "title": "", "brand": "Solo"},
        {"asin": "B004", "title": "Fourth", "category": ["Books"]}]))
    meta, text, _ = run(tmp_path / "az", tmp_path / "out")
    assert meta["format"] == "amazon"
    assert text == {"B001": "A <Big> Book. Brand: Pen & Ink. Categories: Books, Literature & Fiction",
                    "B002": "Second Book",
                    "B003": "Brand: Solo",
                    "B004": "Fourth. Categories: Books"}


def test_amazon_ratings_csv(tmp_path):
    """Amazon ratings-only csv (user,item,rating,timestamp; no header) with a meta file beside it."""
    write(tmp_path / "az" / "ratings_Toys.csv", lines(f"{u},{i},5.0,{ts}" for u, i, ts in AMAZON_ROWS))
    write(tmp_path / "az" / "meta_Toys.json.gz", lines(json.dumps({"asin": a, "title": f"T {a}"})
                                                        for a in ("B001", "B002", "B003", "B004")))
    meta, text, splits = run(tmp_path / "az", tmp_path / "out")
    assert text == {a: f"T {a}" for a in ("B001", "B002", "B003", "B004")}
    assert user_sequences(splits) == {0: [1, 2, 4], 1: [3, 1]}
    assert meta["num_interactions"] == 5


def test_amazon_2023_jsonl(tmp_path):
    """Amazon 2023: items keyed by parent_asin, timestamps in ms, details['Brand'], categories list."""
    reviews = [("U1", "C1", "P1", 1588615855070), ("U1", "C2", "P2", 1588615855001),
               ("U2", "C3", "P1", 1600000000000), ("U2", "C4", "P3", 1600000000000),
               ("U1", "C5", "P3", 1588615855999)]
    write(tmp_path / "az" / "Toys_and_Games.jsonl.gz", lines(json.dumps(
        {"rating": 5.0, "title": "review title", "text": "great", "images": [], "asin": a, "parent_asin": p,
         "user_id": u, "timestamp": ts, "helpful_vote": 0, "verified_purchase": True})
        for u, a, p, ts in reviews))
    write(tmp_path / "az" / "meta_Toys_and_Games.jsonl.gz", lines(json.dumps(m) for m in [
        {"main_category": "Toys", "title": "Rubik&#39;s  Cube", "store": "Acme", "parent_asin": "P1",
         "categories": ["Toys & Games", "Puzzles"], "details": {"Brand": "Acme"}, "features": []},
        {"main_category": "Toys", "title": "Kite", "store": None, "parent_asin": "P2",
         "categories": [], "details": {}},
        {"main_category": "Toys", "title": "Ball", "parent_asin": "P3", "categories": ["Toys & Games"],
         "details": {"Brand": "Bouncy"}}]))
    meta, text, splits = run(tmp_path / "az", tmp_path / "out")
    assert meta["format"] == "amazon2023"
    assert text == {"P1": "Rubik's Cube. Brand: Acme. Categories: Toys & Games, Puzzles",
                    "P2": "Kite",
                    "P3": "Ball. Brand: Bouncy. Categories: Toys & Games"}
    assert user_sequences(splits) == {0: [2, 1, 3], 1: [1, 3]}


def test_explicit_format_flag(tmp_path):
    """--format names the format instead of auto-detection and is recorded in meta.json."""
    write(tmp_path / "az" / "ratings_Toys.csv", lines(f"{u},{i},5.0,{ts}" for u, i, ts in AMAZON_ROWS))
    write(tmp_path / "az" / "meta_Toys.json", lines(json.dumps({"asin": a, "title": a})
                                                     for a in ("B001", "B002", "B003", "B004")))
    meta, text, _ = run(tmp_path / "az", tmp_path / "out", "--format", "amazon")
    assert meta["format"] == "amazon" and len(text) == 4
