"""prepare.py --cold_items FRAC: a seeded random fraction of the items held out of training entirely
(new items for evaluate.py's cold_item group and recommend.py --new_items), checked against the
plain-Python reference of test_prepare.py and against the data a trainer is fed.

Run:  cd /work/main && python -m pytest -q tests/test_prepare_cold.py
"""

import json
import math
import os

import numpy as np
import pytest
import torch

import common
import training
from conftest import assert_clean_error, run_main
from test_prepare import assert_matches, random_rows, reference, run, write_recbole


def cold_set(meta):
    return set(meta["cold_items"])


@pytest.mark.parametrize("split,seed,frac", [("user", 0, 0.2), ("user", 3, 0.5), ("loo", 1, 0.3), ("loo", 5, 0.05)])
def test_cold_items_match_the_reference(tmp_path, split, seed, frac):
    """Every sample, popularity and history length equal the reference with the same cold items:
    no cold item in a history or a training target, valid/test samples with a cold target kept;
    floor(FRAC N) distinct items are cold, and meta.json lists them."""
    rows = random_rows(seed, min_n=3)  # loo drops shorter users, which the reference does not
    src = write_recbole(tmp_path / "src", rows, {i: f"Title {i}" for _, i, _ in rows})
    meta, splits, items = run(src, tmp_path / "out", "--split", split, "--seed", seed, "--cold_items", frac)
    cold = cold_set(meta)
    N = meta["num_items"]
    assert len(cold) == len(meta["cold_items"]) == math.floor(frac * N) and cold <= set(range(1, N + 1))
    assert meta["cold_frac"] == frac and len(items) == N  # cold items keep their text: they get embeddings
    L = meta["max_len"]
    expected = reference(rows, split, seed, L, frozenset(cold))
    assert_matches(splits, expected, L)
    assert meta["item_popularity"] == expected["popularity"]
    assert meta["user_history_len"] == expected["history_len"]
    for name, a in splits.items():
        assert not np.isin(a["seq"], list(cold)).any(), f"a cold item in a {name} history"
    assert not np.isin(splits["train"]["target"], list(cold)).any()
    held = sum(np.isin(splits[s]["target"], list(cold)).sum() for s in ("valid", "test"))
    assert held > 0, "no valid or test sample has a cold target: the test data is too small to say anything"


def test_cold_items_are_seeded_and_leave_the_user_split_alone(tmp_path):
    """The same seed gives the same files; another seed other cold items; the users of each split
    are those without --cold_items (the cold items are drawn from a generator of their own)."""
    rows = random_rows(11)
    src = write_recbole(tmp_path / "src", rows, {i: f"Title {i}" for _, i, _ in rows})
    meta_a, a, _ = run(src, tmp_path / "a", "--cold_items", 0.25)
    meta_b, b, _ = run(src, tmp_path / "b", "--cold_items", 0.25)
    meta_c, c, _ = run(src, tmp_path / "c", "--cold_items", 0.25, "--seed", 1)
    _, plain, _ = run(src, tmp_path / "plain")
    for name in ("items.jsonl", "meta.json", "train.npz", "valid.npz", "test.npz"):
        with open(tmp_path / "a" / name, "rb") as f, open(tmp_path / "b" / name, "rb") as g:
            assert f.read() == g.read(), name
    assert cold_set(meta_a) != cold_set(meta_c)
    for name in common.SPLITS:
        assert set(a[name]["user"]) <= set(plain[name]["user"])


def test_without_cold_items_meta_has_no_cold_keys(tmp_path):
    """Data prepared without the flag is what it was before: no cold keys, so no cold_item group."""
    rows = random_rows(2)
    src = write_recbole(tmp_path / "src", rows, {i: f"Title {i}" for _, i, _ in rows})
    meta, _, _ = run(src, tmp_path / "out")
    assert "cold_items" not in meta and "cold_frac" not in meta


def test_the_trainer_is_fed_no_cold_item(tmp_path):
    """What training reads (train.npz windows, and the whole sequences training.py makes of them)
    holds no cold item as an input or a target."""
    rows = random_rows(4, min_n=4)
    src = write_recbole(tmp_path / "src", rows, {i: f"Title {i}" for _, i, _ in rows})
    for split in ("user", "loo"):
        meta, splits, _ = run(src, tmp_path / split, "--split", split, "--cold_items", 0.3)
        cold = list(cold_set(meta))
        train = {k: torch.from_numpy(v) for k, v in splits["train"].items()}
        seqs = training.whole_sequences(train)
        for what, x in (("windows", train["seq"]), ("window targets", train["target"]),
                        ("sequences", seqs["seq"]), ("sequence targets", seqs["target"])):
            assert not np.isin(x.numpy(), cold).any(), f"{split}: a cold item among the training {what}"


@pytest.mark.parametrize("frac", ["1", "1.5", "-0.1", "nan"])
def test_a_cold_fraction_outside_0_1_is_one_error(tmp_path, frac):
    rows = random_rows(0)
    src = write_recbole(tmp_path / "src", rows, {i: f"Title {i}" for _, i, _ in rows})
    assert_clean_error(run_main("prepare.py", src, "--out", tmp_path / "out", "--cold_items", frac), "--cold_items")
    assert not os.path.exists(tmp_path / "out")


def test_a_cold_fraction_that_selects_no_item_is_one_error(tmp_path):
    rows = random_rows(0)
    src = write_recbole(tmp_path / "src", rows, {i: f"Title {i}" for _, i, _ in rows})
    proc = run_main("prepare.py", src, "--out", tmp_path / "out", "--cold_items", "0.001")
    assert "selects none" in assert_clean_error(proc, "--cold_items")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("bad", [[0], [1, 1], ["3"], 5, [10 ** 6]])
def test_a_bad_cold_items_list_in_meta_is_one_error(tmp_path, bad):
    """load_meta refuses a cold_items that is not a list of distinct indices in 1..N, naming meta.json."""
    rows = random_rows(0)
    src = write_recbole(tmp_path / "src", rows, {i: f"Title {i}" for _, i, _ in rows})
    run(src, tmp_path / "out", "--cold_items", 0.2)
    path = tmp_path / "out" / "meta.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(dict(meta, cold_items=bad)))
    with pytest.raises(common.DataError, match="meta.json: 'cold_items'"):
        common.load_meta(str(tmp_path / "out"))
