"""prepare.py: the split protocol against a plain-Python reference, k-core, meta.json. The real
datasets are in test_prepare_real.py, input formats and item texts in test_prepare_formats.py, bad
input and named-dataset downloads in test_prepare_errors.py.

Run:  cd /work/main && python -m pytest -q tests/test_prepare.py
"""

import json
import math
import os
import re
from collections import Counter, defaultdict

import numpy as np
import pytest

import common
import prepare

INTER_HEADER = "item_id:token\trating:float\tuser_id:token\ttimestamp:float"  # columns in any order


def write_recbole(folder, rows, items, name="toy"):
    """rows: (user, item, timestamp) in file order; items: {item_id: title}. Returns the folder."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.inter"), "w", encoding="utf-8") as f:
        f.write(INTER_HEADER + "\n")
        for u, i, ts in rows:
            f.write(f"{i}\t4.0\t{u}\t{ts}\n")
    with open(os.path.join(folder, f"{name}.item"), "w", encoding="utf-8") as f:
        f.write("item_id:token\ttitle:token_seq\n")
        for i, title in items.items():
            f.write(f"{i}\t{title}\n")
    return str(folder)


def run(src, out, *flags):
    """prepare.main in-process; returns (meta, splits, items) as the loaders of common.py read them."""
    prepare.main([str(src), "--out", str(out), *map(str, flags)])
    meta, splits = common.load_dataset(str(out))
    return meta, splits, common.read_items(str(out))


def random_rows(seed, n_users=40, min_n=1, max_n=14):
    """Random interactions with many timestamp ties, rows of all users shuffled together so that
    file order differs from time order. Ids are integers whose string order differs from numeric."""
    rng = np.random.default_rng(seed)
    users = rng.choice(np.arange(1, 2000), size=n_users, replace=False)
    item_ids = rng.choice(np.arange(1, 2000), size=60, replace=False)
    rows = []
    for u in users:
        for _ in range(rng.integers(min_n, max_n + 1)):
            ts = 1_000_000_000 + int(rng.integers(0, 12)) / 2  # half-steps: timestamp is a float column
            rows.append((str(u), str(rng.choice(item_ids)), str(ts) if ts % 1 else str(int(ts))))
    order = rng.permutation(len(rows))
    return [rows[k] for k in order]


def sorted_ids(ids):
    """Ascending, numerically when every id is an integer, else as strings."""
    ids = set(ids)
    if all(re.fullmatch(r"-?\d+", i) for i in ids):
        return sorted(ids, key=int)
    return sorted(ids)


def reference(rows, split, seed, L, cold=frozenset()):
    """The data protocol written out with plain loops: expected samples per split and meta.
    `cold`: item indices held out (prepare.py --cold_items): never in a history or a training
    target, never counted; a sample needs one item of history."""
    by_user = defaultdict(list)
    for pos, (u, i, ts) in enumerate(rows):
        by_user[u].append((float(ts), pos, i))  # (time, file position) = a stable sort by time
    item_index = {i: k + 1 for k, i in enumerate(sorted_ids(i for _, i, _ in rows))}
    users = sorted_ids(by_user)
    seqs = [[item_index[i] for _, _, i in sorted(by_user[u])] for u in users]
    U, N = len(users), len(item_index)

    if split == "user":
        perm = np.random.default_rng(seed).permutation(U)
        n_train, n_valid = math.floor(0.8 * U), math.floor(0.1 * U)
        split_of = {}
        for k, u in enumerate(perm):
            split_of[int(u)] = "train" if k < n_train else "valid" if k < n_train + n_valid else "test"
    samples = {"train": [], "valid": [], "test": []}
    popularity = [0] * (N + 1)
    for u, s in enumerate(seqs):
        n = len(s)
        for t in range(1, n + 1):  # 1-based position of the target s_t
            if split == "user":
                name = split_of[u]
            else:
                name = "train" if t <= n - 2 else "valid" if t == n - 1 else "test"
            history = [i for i in s[:t - 1] if i not in cold][-L:]
            if history and not (name == "train" and s[t - 1] in cold):
                samples[name].append(([0] * (L - len(history)) + history, s[t - 1], u))
        if split == "user":
            counted = s if split_of[u] == "train" else []
        else:
            counted = s[:n - 2]  # the training part of a leave-one-out sequence
        for i in counted:
            popularity[i] += i not in cold
    history_len = [sum(i not in cold for i in (s if split == "user" else s[:len(s) - 2])) for s in seqs]
    return {"users": users, "items": list(item_index), "seqs": seqs, "samples": samples,
            "popularity": popularity, "history_len": history_len}


def assert_matches(splits, expected, L):
    """The npz arrays equal the reference samples exactly, in order."""
    for name in common.SPLITS:
        exp = expected["samples"][name]
        got = splits[name]
        assert got["seq"].shape == (len(exp), L), name
        want_seq = np.array([e[0] for e in exp], dtype=np.int64).reshape(-1, L)
        np.testing.assert_array_equal(got["seq"], want_seq, err_msg=f"{name}.npz seq")
        np.testing.assert_array_equal(got["target"], np.array([e[1] for e in exp], dtype=np.int64),
                                      err_msg=f"{name}.npz target")
        np.testing.assert_array_equal(got["user"], np.array([e[2] for e in exp], dtype=np.int64),
                                      err_msg=f"{name}.npz user")


# -----------------------------------------------------------------------------
# the split protocol against the reference

@pytest.mark.parametrize("seed,max_len", [(0, None), (1, 3), (7, None), (123, 1)])
def test_user_split_matches_reference(tmp_path, seed, max_len):
    """--split user: every sample (history, target, user) and its split equal the reference."""
    rows = random_rows(seed)
    src = write_recbole(tmp_path / "src", rows, {i: f"Title {i}" for _, i, _ in rows})
    flags = ["--split", "user", "--seed", seed] + (["--max_len", max_len] if max_len else [])
    meta, splits, items = run(src, tmp_path / "out", *flags)
    L = max_len or 10
    expected = reference(rows, "user", seed, L)
    assert_matches(splits, expected, L)
    assert [it["item_id"] for it in items] == expected["items"]
    assert meta["max_len"] == L and meta["split"] == "user" and meta["seed"] == seed
    assert meta["item_popularity"] == expected["popularity"]
    assert meta["user_history_len"] == expected["history_len"]
    assert meta["num_samples"] == {k: len(v) for k, v in expected["samples"].items()}
    assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (
        len(expected["users"]), len(expected["items"]), len(rows))


@pytest.mark.parametrize("seed,max_len", [(0, None), (3, 4), (11, 2)])
def test_loo_split_matches_reference(tmp_path, seed, max_len):
    """--split loo: train targets s_2..s_{n-2}, valid s_{n-1}, test s_n, histories from the full sequence."""
    rows = random_rows(seed, min_n=3)
    src = write_recbole(tmp_path / "src", rows, {i: f"Title {i}" for _, i, _ in rows})
    flags = ["--split", "loo", "--seed", seed] + (["--max_len", max_len] if max_len else [])
    meta, splits, items = run(src, tmp_path / "out", *flags)
    L = max_len or 50
    expected = reference(rows, "loo", seed, L)
    assert_matches(splits, expected, L)
    U = len(expected["users"])
    assert meta["num_samples"]["valid"] == meta["num_samples"]["test"] == U
    assert meta["item_popularity"] == expected["popularity"]
    assert meta["user_history_len"] == expected["history_len"]
    assert meta["max_len"] == L and meta["split"] == "loo"


def test_loo_drops_users_with_fewer_than_3(tmp_path, capsys):
    """--split loo drops (and reports) users with < 3 interactions before items are indexed."""
    rows = random_rows(9, min_n=1, max_n=5)
    n = Counter(u for u, _, _ in rows)
    kept = [r for r in rows if n[r[0]] >= 3]
    dropped = len([u for u in n if n[u] < 3])
    assert 0 < dropped < len(n) and {i for _, i, _ in kept} != {i for _, i, _ in rows}
    src = write_recbole(tmp_path / "src", rows, {i: f"Title {i}" for _, i, _ in rows})
    capsys.readouterr()
    meta, splits, items = run(src, tmp_path / "out", "--split", "loo", "--max_len", 4)
    out = capsys.readouterr().out
    expected = reference(kept, "loo", 0, 4)
    assert_matches(splits, expected, 4)
    assert [it["item_id"] for it in items] == expected["items"]
    assert (meta["num_users"], meta["num_interactions"]) == (len(expected["users"]), len(kept))
    assert meta["user_history_len"] == expected["history_len"]
    assert re.search(rf"\b{dropped}\b", out) and "drop" in out.lower(), f"no count of dropped users:\n{out}"


def test_user_split_partitions_users(tmp_path):
    """--split user: no user in two splits; floor(0.8U) train users, floor(0.1U) valid, the rest test."""
    rows = random_rows(5, n_users=57, min_n=2)
    src = write_recbole(tmp_path / "src", rows, {i: f"Title {i}" for _, i, _ in rows})
    meta, splits, _ = run(src, tmp_path / "out", "--split", "user", "--seed", 5)
    users = {name: set(splits[name]["user"].tolist()) for name in common.SPLITS}
    assert not users["train"] & users["valid"] and not users["train"] & users["test"]
    assert not users["valid"] & users["test"]
    assert [len(users[n]) for n in common.SPLITS] == [45, 5, 7]  # 57 users, each with >= 2 interactions
    assert users["train"] | users["valid"] | users["test"] == set(range(57))


def test_seed_changes_only_the_user_assignment(tmp_path):
    """Same seed: identical files; another seed: another user partition, same samples overall."""
    rows = random_rows(2, min_n=2)
    src = write_recbole(tmp_path / "src", rows, {i: f"T {i}" for _, i, _ in rows})
    _, a, _ = run(src, tmp_path / "a", "--seed", 0)
    _, b, _ = run(src, tmp_path / "b", "--seed", 0)
    _, c, _ = run(src, tmp_path / "c", "--seed", 1)
    for name in common.SPLITS:
        for key in ("seq", "target", "user"):
            np.testing.assert_array_equal(a[name][key], b[name][key])
    assert set(a["train"]["user"].tolist()) != set(c["train"]["user"].tolist())

    def all_pairs(splits):
        return sorted((u, t) for n in common.SPLITS
                      for u, t in zip(splits[n]["user"].tolist(), splits[n]["target"].tolist()))
    assert all_pairs(a) == all_pairs(c)


def test_left_padding_chronological_and_stable_ties(tmp_path):
    """Histories are left-padded, oldest first; rows with equal timestamps keep their file order."""
    rows = [("1", "40", "300"), ("1", "10", "100"),   # file order differs from time order
            ("1", "30", "200"), ("1", "20", "200"),   # a tie: 30 before 20, as in the file
            ("1", "50", "400")]
    src = write_recbole(tmp_path / "src", rows, {i: f"T{i}" for i in ("10", "20", "30", "40", "50")})
    _, splits, items = run(src, tmp_path / "out", "--split", "loo", "--max_len", 3)
    idx = {it["item_id"]: k + 1 for k, it in enumerate(items)}
    a, b, c, d, e = (idx[i] for i in ("10", "30", "20", "40", "50"))  # the expected time order
    assert splits["train"]["seq"].tolist() == [[0, 0, a], [0, a, b]]
    assert splits["train"]["target"].tolist() == [b, c]
    assert splits["valid"]["seq"].tolist() == [[a, b, c]] and splits["valid"]["target"].tolist() == [d]
    assert splits["test"]["seq"].tolist() == [[b, c, d]] and splits["test"]["target"].tolist() == [e]


def test_ids_sorted_numerically_or_as_strings(tmp_path):
    """Integer ids sort numerically (9 < 10 < 100); other ids sort as strings."""
    rows = [("10", "100", "1"), ("9", "9", "2"), ("100", "10", "3"), ("10", "9", "4"), ("9", "100", "5")]
    src = write_recbole(tmp_path / "num", rows, {"100": "a", "9": "b", "10": "c"})
    meta, splits, items = run(src, tmp_path / "o1")
    assert [it["item_id"] for it in items] == ["9", "10", "100"]
    assert meta["user_history_len"] == [2, 2, 1]  # users 9, 10, 100
    rows = [("u10", "b7", "1"), ("u9", "B8", "2"), ("u9", "b10", "3"), ("u10", "b10", "4")]
    src = write_recbole(tmp_path / "str", rows, {"b7": "x", "B8": "y", "b10": "z"})
    meta, _, items = run(src, tmp_path / "o2")
    assert [it["item_id"] for it in items] == ["B8", "b10", "b7"]
    assert meta["num_users"] == 2


def test_integer_ids_beyond_int64(tmp_path):
    """Integer ids too large for int64 (e.g. 64-bit hashes) still sort numerically: 2 < 2**64 - 1."""
    big = str(2**64 - 1)  # as a string it sorts before "2"
    rows = [("1", big, "1"), ("1", "2", "2"), ("2", "2", "3"), ("2", big, "4")]
    src = write_recbole(tmp_path / "src", rows, {big: "Big", "2": "Two"})
    _, _, items = run(src, tmp_path / "out")
    assert [it["item_id"] for it in items] == ["2", big]


def test_only_interacted_items_are_kept(tmp_path):
    """Items of the .item file that no interaction mentions are not in items.jsonl."""
    rows = [("1", "5", "1"), ("1", "3", "2"), ("2", "5", "3")]
    src = write_recbole(tmp_path / "src", rows, {"1": "unused", "3": "three", "5": "five", "7": "unused"})
    meta, _, items = run(src, tmp_path / "out")
    assert items == [{"item_id": "3", "text": "three"}, {"item_id": "5", "text": "five"}]
    assert meta["num_items"] == 2 and meta["item_popularity"][0] == 0


def test_kcore_is_iterated(tmp_path):
    """--kcore 2 repeats until every user and item has >= 2 interactions (one pass is not enough)."""
    # D has one interaction -> u3 keeps only C -> u3 goes -> C drops to one (u1) -> C goes.
    rows = [("1", "A", "1"), ("1", "B", "2"), ("1", "C", "3"),
            ("2", "A", "1"), ("2", "B", "2"),
            ("3", "C", "1"), ("3", "D", "2")]
    src = write_recbole(tmp_path / "src", rows, {i: f"item {i}" for i in "ABCD"})
    meta, splits, items = run(src, tmp_path / "out", "--kcore", 2)
    assert [it["item_id"] for it in items] == ["A", "B"]
    assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (2, 2, 4)
    assert meta["kcore"] == 2 and meta["user_history_len"] == [2, 2]
    meta0, _, items0 = run(src, tmp_path / "out0")
    assert meta0["kcore"] == 0 and meta0["num_items"] == 4 and meta0["num_interactions"] == 7


def test_meta_and_summary(tmp_path, capsys):
    """meta.json has every documented key; the printed summary gives the counts."""
    rows = random_rows(4, min_n=2)
    src = write_recbole(tmp_path / "src", rows, {i: f"T {i}" for _, i, _ in rows})
    capsys.readouterr()
    meta, _, _ = run(src, tmp_path / "out")
    out = capsys.readouterr().out
    for key in ("source", "format", "split", "seed", "max_len", "kcore", "num_users", "num_items",
                "num_interactions", "num_samples", "item_popularity", "user_history_len"):
        assert key in meta, key
    assert meta["format"] == "recbole"
    assert sum(meta["item_popularity"]) == sum(meta["user_history_len"][u] for u in
                                               set(np.load(tmp_path / "out" / "train.npz")["user"].tolist()))
    with open(tmp_path / "out" / "meta.json") as f:
        assert json.load(f) == meta
    for n in (meta["num_users"], meta["num_items"], meta["num_interactions"], *meta["num_samples"].values()):
        assert re.search(rf"\b{n:,}\b|\b{n}\b", out), f"{n} not in the summary:\n{out}"
