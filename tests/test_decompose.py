"""Tests of decompose.py (the semantic space decomposition) and of FusedItemEmbedding /
load_subspace (the fused item embedding built from its output).

    cd /work/main && python -m pytest -q tests/test_decompose.py
"""

import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import common
from embeddings import FusedItemEmbedding, load_subspace
import decompose
from conftest import assert_clean_error, run_script


def spectrum_matrix(n, d_l, seed=0, sigmas=None):
    """E = Z diag(sigmas) Q^T + offset, Q a random rotation. When n > d_l the columns of Z are made
    centered and orthogonal with norm sqrt(n - 1), so numpy.cov(E) is exactly Q diag(sigmas^2) Q^T."""
    rng = np.random.default_rng(seed)
    sigmas = np.linspace(1.0, 0.1, d_l) if sigmas is None else np.asarray(sigmas)
    Q = np.linalg.qr(rng.standard_normal((d_l, d_l)))[0]
    Z = rng.standard_normal((n, d_l))
    if n > d_l:
        Z = np.linalg.qr(Z - Z.mean(axis=0))[0] * np.sqrt(n - 1)
    return (Z * sigmas) @ Q.T + rng.standard_normal(d_l), Q


def make_data(folder, emb, num_items=None, popularity=None):
    """A DATA folder written by hand: items.jsonl, meta.json and lang_emb.npy."""
    os.makedirs(folder, exist_ok=True)
    n = len(emb) if num_items is None else num_items
    with open(os.path.join(folder, "items.jsonl"), "w") as f:
        f.writelines(json.dumps({"item_id": str(i + 1), "text": f"item {i + 1}"}) + "\n" for i in range(n))
    popularity = [1] * n if popularity is None else popularity
    common.write_json(os.path.join(folder, "meta.json"),
                      {"num_items": n, "max_len": 10, "item_popularity": [0] + list(popularity),
                       "user_history_len": [1]})
    np.save(os.path.join(folder, "lang_emb.npy"), emb, allow_pickle=True)
    return str(folder)


# -----------------------------------------------------------------------------
# the decomposition


def test_eigenvalues_equal_numpy_cov_and_basis_is_orthonormal():
    """s = eigvalsh(numpy.cov(scale * E)) sorted descending; U has orthonormal columns and
    U diag(s) U^T rebuilds Sigma: the covariance convention is numpy.cov's (divide by N - 1)."""
    E, _ = spectrum_matrix(300, 40)
    mean, Sigma = decompose.weighted_covariance(E, scale=40.0)
    s, U = decompose.eigendecompose(Sigma)
    want = np.sort(np.linalg.eigvalsh(np.cov(40.0 * E, rowvar=False)))[::-1]
    np.testing.assert_allclose(s, want, rtol=0, atol=1e-10 * want[0], err_msg="eigenvalues differ from numpy.cov's")
    np.testing.assert_allclose(mean, 40.0 * E.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(U.T @ U, np.eye(40), atol=1e-12, err_msg="basis not orthonormal")
    np.testing.assert_allclose(U * s @ U.T, Sigma, atol=1e-10 * s[0])
    assert np.all(np.diff(s) <= 0), "eigenvalues not descending"


def test_standardized_language_block_has_identity_covariance():
    """E_lang = (E - mu) U[:, :d] diag(s[:d])^(-1/2) has covariance I; without standardization
    ("w/o Stand") its covariance is diag(s[:d])."""
    E, _ = spectrum_matrix(500, 30)
    mean, Sigma = decompose.weighted_covariance(E)
    s, U = decompose.eigendecompose(Sigma)
    lang = decompose.project(E, mean, decompose.projection_matrix(s, U, 12), 40.0)
    assert lang.shape == (501, 12) and lang.dtype == np.float32 and not lang[0].any()
    np.testing.assert_allclose(np.cov(lang[1:], rowvar=False), np.eye(12), atol=1e-5)
    raw = decompose.project(E, mean, decompose.projection_matrix(s, U, 12, standardize=False), 40.0)
    np.testing.assert_allclose(np.cov(raw[1:].astype(np.float64), rowvar=False), np.diag(s[:12]), atol=1e-5 * s[0])


def test_planted_null_space_is_found_by_threshold():
    """Five directions of planted tiny variance: --null_thres between the two scales picks exactly
    them as the null block, and the null block of the basis spans the planted directions; with
    clipping to d = 18 the null block is the 3 kept ones among them."""
    sigmas = np.r_[np.linspace(1.0, 0.5, 15), np.full(5, 1e-3)]
    E, Q = spectrum_matrix(2000, 20, sigmas=sigmas)
    _, Sigma = decompose.weighted_covariance(E, scale=40.0)
    s, U = decompose.eigendecompose(Sigma)
    d_s, d_n = decompose.choose_blocks(s, 20, null_thres=0.01)  # planted: (40 * 1e-3)^2 = 1.6e-3
    assert (d_s, d_n) == (15, 5)
    assert decompose.choose_blocks(s, 18, null_thres=0.01) == (15, 3), "with --dim: kept directions <= tau"
    null = U[:, d_s:]
    np.testing.assert_allclose(null @ null.T, Q[:, 15:] @ Q[:, 15:].T, atol=1e-9)


def test_fewer_items_than_dimensions_gives_finite_output():
    """N = 10 < d_l = 32: the covariance has rank 9; the 23 numerically zero directions give the
    coordinate 0 (not inf or NaN) and the others stay standardized."""
    E, _ = spectrum_matrix(10, 32)
    mean, Sigma = decompose.weighted_covariance(E)
    s, U = decompose.eigendecompose(Sigma)
    assert (s < s[0] * decompose.ZERO_RTOL).sum() == 23
    lang = decompose.project(E, mean, decompose.projection_matrix(s, U, 16), 40.0)
    assert np.isfinite(lang).all()
    assert not lang[:, 9:].any(), "numerically zero directions must give coordinate 0"
    np.testing.assert_allclose(np.cov(lang[1:, :9], rowvar=False), np.eye(9), atol=1e-4)


def test_standardize_zero_gives_the_zero_directions_unit_variance_noise():
    """--standardize_zero: each numerically zero direction's coordinate is its rounding noise
    (40 E - mu) u_j scaled to unit sample variance (what the official code's diag(s)^(-1/2) does in
    effect), the saved V scales alike, and every other coordinate is the one without the flag."""
    E, _ = spectrum_matrix(10, 32)
    mean, Sigma = decompose.weighted_covariance(E)
    s, U = decompose.eigendecompose(Sigma)
    ours = decompose.project(E, mean, decompose.projection_matrix(s, U, 16), 40.0)
    V0 = decompose.projection_matrix(s, U, 16, zero=True)
    V = V0.copy()
    official = decompose.project(E, mean, V, 40.0)
    raw = official[:, 9:].copy()  # (N+1, 7): the zero directions' rounding noise
    assert 0 < np.abs(raw).max() < 1e-6
    decompose.scale_zero_directions(official, V, s)
    np.testing.assert_array_equal(official[:, :9], ours[:, :9])
    assert not ours[:, 9:].any() and not official[0].any()
    np.testing.assert_allclose(official[1:, 9:].var(axis=0, ddof=1), 1.0, rtol=1e-5)
    sd = raw[1:].std(axis=0, ddof=1, dtype=np.float64)
    np.testing.assert_allclose(official[:, 9:], raw / sd, rtol=1e-5)
    np.testing.assert_array_equal(V[:, :9], V0[:, :9])
    np.testing.assert_allclose(V[:, 9:], V0[:, 9:] / sd, rtol=1e-12)


def test_popularity_weighting_equals_the_weighted_formula_by_hand():
    """p = (1, 1, 2) / 4 on three 2-D points: mu = sum p_i x_i = (0.5, 2), and
    Sigma = sum p_i (x_i - mu)(x_i - mu)^T / (1 - sum p_i^2) = [[0.75, -1], [-1, 4]] / 0.625.
    Equal popularities reproduce the uniform (sample covariance) result exactly."""
    E = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    mean, Sigma = decompose.weighted_covariance(E, p=[1, 1, 2], scale=1.0)
    np.testing.assert_allclose(mean, [0.5, 2.0], atol=1e-15)
    np.testing.assert_allclose(Sigma, [[1.2, -1.6], [-1.6, 6.4]], atol=1e-14)
    np.testing.assert_allclose(Sigma, np.cov(E, rowvar=False, aweights=[1, 1, 2]), atol=1e-14)
    _, equal = decompose.weighted_covariance(E, p=[3, 3, 3], scale=1.0)
    np.testing.assert_allclose(equal, np.cov(E, rowvar=False), atol=1e-14)


@pytest.mark.parametrize("order", ["C", "F"])
def test_chunked_memory_map_equals_in_memory(tmp_path, order):
    """Row blocks of 7 read from a memory-mapped .npy (C or Fortran order, or a slice of one) give the
    same rows, mean, covariance (uniform and popularity-weighted) and projection as one in-memory block."""
    E, _ = spectrum_matrix(100, 12)
    E = E.astype(np.float32)
    np.save(tmp_path / "e.npy", np.asfortranarray(E) if order == "F" else E)
    mapped = decompose.open_lang_emb(str(tmp_path / "e.npy"))
    assert isinstance(mapped, np.memmap)
    p = np.arange(100) % 5
    for weights in (None, p):
        mean_b, Sigma_b = decompose.weighted_covariance(mapped, weights, block_rows=7)
        mean, Sigma = decompose.weighted_covariance(E, weights, block_rows=100)
        np.testing.assert_allclose(mean_b, mean, rtol=1e-12)
        np.testing.assert_allclose(Sigma_b, Sigma, rtol=0, atol=1e-12 * np.abs(Sigma).max())
    sliced = np.concatenate([b for _, b in decompose.row_blocks(mapped[10:], 7)])
    np.testing.assert_array_equal(sliced, E[10:], err_msg="a sliced memory map must not re-map from the file start")
    V = np.random.default_rng(1).standard_normal((12, 5))
    np.testing.assert_array_equal(decompose.project(mapped, mean, V, block_rows=7), decompose.project(E, mean, V))


# -----------------------------------------------------------------------------
# the fused item embedding


def train_steps(emb, steps=5):
    """A few AdamW steps (with weight decay) on a loss that touches every item, padding included."""
    opt = torch.optim.AdamW(emb.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(steps):
        loss = (emb(torch.tensor([[0, 1, 2], [3, 0, 4]])) - 1).pow(2).sum() + emb.table().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_fused_embedding_trains_only_the_null_block_and_keeps_padding_zero():
    """After optimizer steps the language coordinates equal E_lang exactly, the ID block has moved
    (only in coordinates d_s..d), and the padding item is still the zero vector."""
    lang = torch.randn(6, 8)
    lang[0] = 0
    emb = FusedItemEmbedding(lang, d_s=5)
    before = emb.table().detach().clone()
    train_steps(emb)
    after = emb.table().detach()
    assert torch.equal(after[:, :5], lang[:, :5]), "language coordinates changed"
    assert not torch.allclose(after[1:, 5:], before[1:, 5:]), "the ID block did not train"
    assert not after[0].any() and not emb(torch.tensor([0, 0])).any(), "padding row not zero"
    assert [n for n, _ in emb.named_parameters()] == ["id_emb"]


def test_fused_embedding_without_null_block_is_the_language_embedding():
    """d_n = 0 (d_s = d): the fused table is exactly E_lang, and there is nothing to train."""
    lang = torch.randn(6, 8)
    lang[0] = 0
    emb = FusedItemEmbedding(lang, d_s=8)
    assert emb.id_emb.shape == (6, 0)
    assert torch.equal(emb.table(), lang) and torch.equal(emb(torch.tensor([[3, 1]])), lang[torch.tensor([[3, 1]])])


def test_fused_embedding_ablations():
    """id_init='zeros' starts at E_lang; replace=True puts ID in place of the null coordinates;
    train_lang=True ("w/o Frozen") trains the language coordinates but never the padding row."""
    lang = torch.randn(6, 8)
    lang[0] = 0
    assert torch.equal(FusedItemEmbedding(lang, 5, id_init="zeros").table(), lang)
    rep = FusedItemEmbedding(lang, 5, replace=True)
    assert torch.equal(rep.table()[:, 5:], rep.id_emb.detach()) and torch.equal(rep.table()[:, :5], lang[:, :5])
    free = FusedItemEmbedding(lang, 5, train_lang=True)
    train_steps(free)
    table = free.table().detach()
    assert not torch.allclose(table[1:, :5], lang[1:, :5]) and not table[0].any()


# -----------------------------------------------------------------------------
# the command line


def test_cli_end_to_end(tmp_path):
    """decompose.py on a hand-made DATA folder writes a file that loads with weights_only=True,
    whose lang_emb is (scale * E - mean) @ projection with a zero padding row, whose checksum is the
    sha256 of lang_emb.npy, and which load_subspace and FusedItemEmbedding accept."""
    E, _ = spectrum_matrix(60, 24)
    data = make_data(tmp_path / "data", E.astype(np.float32))
    proc = run_script("decompose.py", data, "--dim", 16, "--null_dim", 4)
    assert proc.returncode == 0, proc.stderr
    assert "N = 60" in proc.stdout and "d_l = 24" in proc.stdout and "top 16" in proc.stdout
    sub = torch.load(os.path.join(data, "subspace.pt"), weights_only=True)
    assert (sub["d_s"], sub["d_n"], sub["num_items"], sub["d_l"]) == (12, 4, 60, 24)
    assert sub["lang_emb"].shape == (61, 16) and sub["lang_emb"].dtype == torch.float32
    assert sub["basis"].shape == (24, 16) and sub["eigenvalues"].shape == (24,)
    want = (40.0 * E.astype(np.float32).astype(np.float64) - sub["mean"].numpy()) @ sub["projection"].numpy()
    np.testing.assert_allclose(sub["lang_emb"][1:].numpy(), want, atol=1e-5)
    with open(os.path.join(data, "lang_emb.npy"), "rb") as f:
        assert sub["lang_emb_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert sub["settings"] == {"data": data, "out": None, "scale": 40.0, "weighting": "uniform", "dim": 16,
                               "null_dim": 4, "null_thres": None, "no_standardize": False, "standardize_zero": False,
                               "plot": None}
    loaded = load_subspace(os.path.join(data, "subspace.pt"), num_items=60)
    assert FusedItemEmbedding(loaded["lang_emb"], loaded["d_s"]).table().shape == (61, 16)


def test_cli_threshold_keeps_all_directions(tmp_path):
    """--null_thres without --dim (the diffusion setting) keeps all d_l directions and makes the
    null block the directions with s_j <= tau; popularity weighting reads meta.json. Where
    matplotlib is installed (an optional extra), --plot also writes a PNG."""
    sigmas = np.r_[np.ones(10), np.full(6, 1e-3)]
    E, _ = spectrum_matrix(200, 16, sigmas=sigmas)
    data = make_data(tmp_path / "data", E, popularity=[i % 7 for i in range(200)])
    plot = ["--plot", tmp_path / "spectrum.png"] if importlib.util.find_spec("matplotlib") else []
    proc = run_script("decompose.py", data, "--null_thres", 0.5, "--weighting", "popularity", "--out", tmp_path / "s.pt", *plot)
    assert proc.returncode == 0, proc.stderr
    sub = torch.load(tmp_path / "s.pt", weights_only=True)
    assert (sub["d_s"], sub["d_n"]) == (10, 6) and sub["lang_emb"].shape == (201, 16)
    assert "nullity at tau = 0.5: 6 of 16" in proc.stdout
    if plot:
        assert (tmp_path / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_subspace_rejects_bad_files(tmp_path):
    """load_subspace names the file: missing, not a torch file, missing keys, wrong N."""
    good = {"mean": torch.zeros(4), "eigenvalues": torch.ones(4), "basis": torch.eye(4)[:, :3],
            "lang_emb": torch.cat([torch.zeros(1, 3), torch.ones(5, 3)]), "d_s": 2, "d_n": 1}
    torch.save(good, tmp_path / "good.pt")
    assert load_subspace(str(tmp_path / "good.pt"), num_items=5)["d_s"] == 2
    (tmp_path / "junk.pt").write_text("not a torch file")
    torch.save({k: v for k, v in good.items() if k != "d_n"}, tmp_path / "keys.pt")
    for name, n in (("missing.pt", None), ("junk.pt", None), ("keys.pt", None), ("good.pt", 6)):
        with pytest.raises(common.DataError, match=name):
            load_subspace(str(tmp_path / name), num_items=n)


def nan_row(E):
    E = E.copy()
    E[3, 2] = np.nan
    return E


def inf_row(E):
    E = E.copy()
    E[7, 0] = -np.inf
    return E


SMALL = ["--dim", "16", "--null_dim", "4"]  # the test matrices have d_l = 24 < the default d = 128
BAD_INPUTS = [  # (id, how to break the matrix or folder, flags, words the error line must hold)
    ("missing", None, SMALL, ["lang_emb.npy", "not found"]),
    ("one-dimensional", lambda E: E[:, 0], SMALL, ["lang_emb.npy", "2-D"]),
    ("integer", lambda E: E.astype(np.int64), SMALL, ["lang_emb.npy", "int64"]),
    ("object", lambda E: E.astype(object), SMALL, ["lang_emb.npy", "not a plain numeric"]),
    ("nan-row", nan_row, SMALL, ["lang_emb.npy", "row 3"]),
    ("inf-row", inf_row, SMALL, ["lang_emb.npy", "row 7"]),
    ("wrong-N", "items", SMALL, ["items.jsonl", "40 rows", "41 items"]),
    ("dim-too-large", lambda E: E, ["--dim", "32", "--null_dim", "4"], ["--dim 32", "d_l = 24"]),
    ("null-dim-too-large", lambda E: E, ["--dim", "16", "--null_dim", "16"], ["--null_dim 16"]),
    ("null-dim-negative", lambda E: E, ["--dim", "16", "--null_dim", "-1"], ["--null_dim -1"]),
    ("threshold-selects-nothing", lambda E: E, ["--null_thres", "1e-9"], ["selects none", "smallest eigenvalue"]),
    ("standardize-zero-without-standardizing", lambda E: E, ["--standardize_zero", "--no_standardize"],
     ["--standardize_zero", "--no_standardize"]),
    ("threshold-selects-everything", lambda E: E, ["--null_thres", "1e9"], ["selects all", "largest eigenvalue"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_cli_bad_input_fails_cleanly(tmp_path, case):
    """Each bad input: non-zero exit, one stderr line 'error: ...' naming the file or flag and what
    is wrong (the row, the sizes, what the threshold found), no traceback, and no output file."""
    _, breaks, flags, words = case
    E, _ = spectrum_matrix(40, 24)
    data = make_data(tmp_path / "data", E.astype(np.float32), num_items=41 if breaks == "items" else None)
    path = os.path.join(data, "lang_emb.npy")
    if breaks is None:
        os.remove(path)
    elif callable(breaks):
        np.save(path, breaks(E.astype(np.float32)), allow_pickle=True)
    proc = run_script("decompose.py", data, *flags)
    message = assert_clean_error(proc, *words[:1])
    assert all(w in message for w in words), f"error line lacks one of {words}: {message}"
    assert not [f for f in os.listdir(data) if f.startswith("subspace")], "an output file was left behind"
