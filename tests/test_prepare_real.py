"""prepare.py on the real datasets of ../shared/data (skipped, with the reason, when absent;
ml-100k also comes from RecBole's package or wheel, without a download): the sample counts of the
reference protocol and the item texts.

Run:  cd /work/main && python -m pytest -q tests/test_prepare_real.py
"""

import glob
import importlib.util
import os
import sys

import pytest

import common
import formats
from conftest import SHARED_DATA
from test_prepare import run


# each prepared once per module

def real(tmp_path_factory, name, *flags):
    src = os.path.join(SHARED_DATA, name)
    if not os.path.isdir(src):
        pytest.skip(f"real dataset not found at {src}")
    return run(src, tmp_path_factory.mktemp(name) / "out", *flags)


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return real(tmp_path_factory, "amazon-toys", "--split", "user", "--seed", 0)


@pytest.fixture(scope="module")
def ml1m(tmp_path_factory):
    # a short L keeps the 1M-interaction output small; the split itself does not depend on L
    return real(tmp_path_factory, "ml-1m", "--split", "loo", "--max_len", 5)


def ml100k_offline(tmp):
    """A folder of ml-100k's RecBole files, found without a download (tests reach no dataset host):
    ../shared/data/ml-100k, else recbole/dataset_example/ml-100k of the recbole package installed
    here, else of the RecBole wheel that `prepare.py ml-100k` leaves in its default --cache_dir
    (extracted into tmp). The three hold the same files byte for byte. Skips, naming where it
    looked, when none is there."""
    shared = os.path.join(SHARED_DATA, "ml-100k")
    if os.path.isdir(shared):
        return shared
    package = importlib.util.find_spec("recbole")
    if package and package.submodule_search_locations:
        folder = os.path.join(package.submodule_search_locations[0], "dataset_example", "ml-100k")
        if os.path.isdir(folder):
            return folder
    cache = os.path.expanduser("~/.cache/alphafuse")  # prepare.py's --cache_dir default
    wheels = sorted(glob.glob(os.path.join(cache, f"recbole-{formats.RECBOLE_WHEEL.split('==')[1]}-*.whl")))
    if not wheels:
        pytest.skip(f"ml-100k not found offline: no {shared}, no recbole package in {sys.executable}, no "
                    f"{formats.RECBOLE_WHEEL} wheel in {cache} (python -m pip download --no-deps --dest {cache} "
                    f"{formats.RECBOLE_WHEEL} puts it there)")
    # the files fetch_named reads from the wheel
    for name, (_, read) in formats.list_files(wheels[0], prefix="recbole/dataset_example/ml-100k/").items():
        (tmp / name).write_bytes(read())
    return tmp


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    src = ml100k_offline(tmp_path_factory.mktemp("ml-100k_source"))
    return run(src, tmp_path_factory.mktemp("ml-100k") / "out")


def test_real_amazon_toys_user_split(toys):
    """amazon-toys, --split user --seed 0: 117,404 / 14,298 / 14,421 samples (the reference numbers)."""
    meta, splits, items = toys
    assert meta["num_samples"] == {"train": 117404, "valid": 14298, "test": 14421}
    assert [len(splits[n]["target"]) for n in common.SPLITS] == [117404, 14298, 14421]
    assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (19124, 11758, 165247)
    assert len(items) == 11758 and all(it["text"].strip() for it in items)


def test_real_ml1m_loo(ml1m):
    """ml-1m, --split loo: each user has exactly one valid and one test sample; 3,416 items with text."""
    meta, splits, items = ml1m
    U = meta["num_users"]
    assert U == 6040
    for name in ("valid", "test"):
        assert sorted(splits[name]["user"].tolist()) == list(range(U)), name
    assert meta["num_samples"]["train"] == 999611 - 3 * U
    assert len(items) == 3416
    assert all(it["text"].strip() and not it["text"].startswith("Item ") for it in items)  # all have titles
    assert items[0] == {"item_id": "1", "text": "Toy Story (1995). Genres: Animation, Children's, Comedy"}
    assert len(meta["user_history_len"]) == U and min(meta["user_history_len"]) >= 3


def test_real_ml100k(ml100k):
    """ml-100k (RecBole files, with a rating column): 943 users, 1,682 items, texts with year and genres."""
    meta, splits, items = ml100k
    assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (943, 1682, 100000)
    assert sum(meta["num_samples"].values()) == 100000 - 943
    assert items[0] == {"item_id": "1", "text": "Toy Story (1995). Genres: Animation, Children's, Comedy"}
    assert items[1]["text"] == "GoldenEye (1995). Genres: Action, Adventure, Thriller"
