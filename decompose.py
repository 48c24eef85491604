"""
Semantic space decomposition (AlphaFuse): eigendecompose the covariance of the items' language
embeddings, keep the first d directions, split them into a language block (d_s directions of most
variance) and a null block (the next d_n: where the ID embeddings will live), and write the
standardized, frozen language coordinates E_lang.

    python decompose.py DATA                                  # SASRec setting: d = 128, d_n = 64
    python decompose.py DATA --null_thres 0.25 --out DATA/subspace_dreamrec.pt   # DreamRec: d = d_l
    python decompose.py DATA --plot docs/spectrum.png         # also draw the spectrum (both files or neither)

Reads  DATA/lang_emb.npy float (N, d_l), row i = item i+1; DATA/items.jsonl (to check N);
       DATA/meta.json (only for --weighting popularity).
Writes FILE (default DATA/subspace.pt), a dict for torch.load(FILE, weights_only=True):
    mean         float64 (d_l,)    mu of the scaled embeddings X = scale * E
    eigenvalues  float64 (d_l,)    s, descending, of their covariance Sigma
    basis        float64 (d_l, d)  U[:, :d], orthonormal columns
    projection   float64 (d_l, d)  V, with E_lang = (scale * E - mean) @ V (also for new items)
    lang_emb     float32 (N+1, d)  row 0 = padding (zeros), row i = E_lang of item i
    d_s, d_n     int               language coordinates [0, d_s), null (ID) coordinates [d_s, d)
    num_items, d_l, settings (the flags), lang_emb_sha256 (equals `sha256sum DATA/lang_emb.npy`)
Prints N, d_l, the variance held by the top 16/64/128 directions, the blocks and their eigenvalues.

NOTE choices that the paper leaves open or the official code does differently:
- Sigma = sum_i p_i (x_i - mu)(x_i - mu)^T / (1 - sum_i p_i^2) = numpy.cov(X, rowvar=False,
  aweights=p): for uniform p the usual sample covariance (divide by N - 1, the official np.cov).
  The official popularity mode, np.cov((X - mu) * sqrt(p)), is about N times smaller (its tau does not transfer).
- --null_thres without --dim keeps all d_l directions; with --dim the null block is the kept
  directions with s_j <= tau. Defaults: --dim 128 --null_dim 64 (the official SASRec setting).
- A numerically zero direction (s_j < s_max * 1e-12: always when N <= d_l, and 3 of the 384 of
  all-MiniLM-L6-v2, two of whose outputs are always 0) gets the standardized coordinate 0, not
  rounding noise blown up to unit variance, inf or NaN. The official code divides it by sqrt(s_j)
  of rounding size, which turns its float32 rounding noise into coordinates of about unit
  variance; --standardize_zero does that on purpose, scaling the noise to unit sample variance.
- Eigenvector signs are fixed (largest-magnitude entry positive), so reruns give the same file.
- The .npy is mapped one row block (64 MB in float64) at a time and read twice (Sigma in one
  shifted float64 pass, then E_lang): beyond Python and torch, memory is the output plus ~0.2 GB.
"""

import argparse
import hashlib
import importlib.util
import mmap
import os
import sys
import time

import numpy as np
import torch

import common
from common import DataError

DEFAULT_DIM, DEFAULT_NULL_DIM = 128, 64  # the official SASRec setting
ZERO_RTOL = 1e-12  # eigenvalues below s_max * ZERO_RTOL count as numerically zero
BLOCK_BYTES = 1 << 26  # float64 bytes per row block

# -----------------------------------------------------------------------------
# reading the embeddings

def open_lang_emb(path):
    """Check the .npy header and memory-map it (no data read): a 2-D floating array, N >= 2."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (run embed.py first)")
    try:
        emb = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a plain numeric .npy array ({e})") from None
    if not isinstance(emb, np.ndarray) or emb.ndim != 2:
        raise DataError(f"{path}: shape {getattr(emb, 'shape', '?')}, expected a 2-D array (N, d_l)")
    if not np.issubdtype(emb.dtype, np.floating):
        raise DataError(f"{path}: dtype {emb.dtype}, expected a floating type")
    if emb.shape[0] < 2 or emb.shape[1] < 1:
        raise DataError(f"{path}: shape {emb.shape}, needs at least 2 items and 1 dimension")
    return emb


def row_blocks(emb, block_rows=None):
    """Yield (start, rows start..start+b) of an (N, d_l) array, as stored (float32 usually). A C-order
    memory map is re-mapped one block at a time, because a single map of the whole file keeps every
    page it has read resident: the resident memory stays about one block however large the file."""
    n, d_l = emb.shape
    block_rows = block_rows or max(1, BLOCK_BYTES // (8 * d_l))
    for start in range(0, n, block_rows):
        b = min(block_rows, n - start)
        if isinstance(emb, np.memmap) and isinstance(emb.base, mmap.mmap) and emb.flags.c_contiguous:  # unsliced
            yield start, np.memmap(emb.filename, emb.dtype, "r", emb.offset + start * d_l * emb.itemsize, (b, d_l))
        else:
            yield start, emb[start:start + b]


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def non_finite_error(emb, start, b, path):
    """Name the first row of emb[start:start+b] with a NaN or inf (row r describes item r+1)."""
    bad = np.flatnonzero(~np.isfinite(emb[start:start + b]).all(axis=1))
    where = f"row {start + bad[0]} (item {start + bad[0] + 1})" if len(bad) else f"rows {start}..{start + b - 1}"
    return DataError(f"{path}: {where} has NaN or inf values{'' if len(bad) else ' (float64 overflow)'}")


# -----------------------------------------------------------------------------
# the decomposition

def weighted_covariance(emb, p=None, scale=40.0, block_rows=None, path="lang_emb.npy"):
    """mu = sum_i p_i x_i and Sigma = sum_i p_i (x_i - mu)(x_i - mu)^T / (1 - sum_i p_i^2) of the
    scaled rows x_i = scale * e_i, i.e. numpy.cov(X, rowvar=False, aweights=p); p uniform if None.
    One float64 pass over row blocks of E, shifted by c (the first block's mean): with m = mean - c,
    Sigma = (S2 / W - m m^T) / (1 - W2 / W^2) loses nothing to cancellation as m is small. The
    scale is applied to the results (scale * mu, scale^2 * Sigma), which saves a pass over E."""
    n, d_l = emb.shape
    w = np.ones(n) if p is None else np.asarray(p, dtype=np.float64)  # (N,) unnormalized weights
    c, S1, S2 = None, np.zeros(d_l), np.zeros((d_l, d_l))
    for start, e in row_blocks(emb, block_rows):
        with np.errstate(invalid="ignore", over="ignore"):  # a NaN or inf is reported by row below
            if c is None:
                c = e.mean(axis=0, dtype=np.float64)  # (d_l,)
            x = np.subtract(e, c, dtype=np.float64)  # (b, d_l)
            wb = w[start:start + len(x)]
            S1 += wb @ x
            if p is not None:
                x *= np.sqrt(wb)[:, None]
            S2 += x.T @ x  # (d_l, d_l); x.T @ x of one buffer runs as BLAS syrk, half a matmul
        if not np.isfinite(S2.diagonal()).all():
            raise non_finite_error(emb, start, len(x), path)
    W, W2 = w.sum(), (w * w).sum()
    m = S1 / W
    Sigma = (S2 / W - np.outer(m, m)) * (scale**2 / (1 - W2 / W**2))
    return scale * (c + m), (Sigma + Sigma.T) / 2


def eigendecompose(Sigma):
    """Sigma = U diag(s) U^T, s descending (eigh in float64; rounding's tiny negatives -> 0)."""
    s, U = np.linalg.eigh(Sigma)
    s, U = np.maximum(s[::-1], 0.0), U[:, ::-1]
    U = U * np.sign(U[np.abs(U).argmax(axis=0), np.arange(len(s))])  # sign: largest entry > 0
    return s, np.ascontiguousarray(U)


def choose_blocks(s, dim, null_dim=None, null_thres=None, path="lang_emb.npy"):
    """Keep the first d directions (clipping) and return (d_s, d_n): the null (ID) block is the last
    d_n of the kept directions, given (--null_dim) or those with s_j <= tau (--null_thres)."""
    if null_thres is None:
        return dim - null_dim, null_dim
    d_n = int((s[:dim] <= null_thres).sum())
    if d_n == 0:
        raise DataError(f"{path}: --null_thres {null_thres} selects none of the {dim} kept directions "
                        f"(their smallest eigenvalue is {s[dim - 1]:.4g}, in units of --scale)")
    if d_n == dim:
        raise DataError(f"{path}: --null_thres {null_thres} selects all {dim} kept directions "
                        f"(the largest eigenvalue is {s[0]:.4g}), leaving no language block")
    return dim - d_n, d_n


def not_zero(s, d):
    """(d,) bool: which of the first d directions are not numerically zero (s_j > s_max * ZERO_RTOL)."""
    return s[:d] > s[0] * ZERO_RTOL


def projection_matrix(s, U, d, standardize=True, zero=False):
    """V = U[:, :d] diag(s[:d])^(-1/2), (d_l, d). A numerically zero direction gets a zero column,
    so its standardized coordinate is 0; zero=True keeps u_j there instead (its coordinate is
    rounding noise, for scale_zero_directions). standardize=False: V = U[:, :d] (the "w/o Stand" ablation)."""
    if not standardize:
        return U[:, :d].copy()
    keep = not_zero(s, d)
    inv_sqrt = np.ones(d) if zero else np.zeros(d)  # what the numerically zero directions get
    inv_sqrt[keep] = s[:d][keep] ** -0.5
    return U[:, :d] * inv_sqrt


def scale_zero_directions(lang_emb, V, s):
    """In place: the coordinates of the numerically zero directions (rounding noise) scaled to unit
    sample variance over the items, and V's columns alike, so that new items get the same treatment:
    what the official code's diag(s)^(-1/2) does in effect (--standardize_zero)."""
    zero = ~not_zero(s, V.shape[1])  # the columns projection_matrix(zero=True) left unscaled
    sd = lang_emb[1:, zero].std(axis=0, ddof=1, dtype=np.float64)  # (z,)
    sd[sd == 0] = 1  # exact zeros stay 0
    lang_emb[:, zero] /= sd.astype(np.float32)
    V[:, zero] /= sd


def whitening(emb, path="lang_emb.npy"):
    """(mean, V) whitening the rows of emb over all d_l directions, project(emb, mean, V): the
    features of WhitenRec and iDreamRec, computed by the trainers and again by recommend.py."""
    mean, Sigma = weighted_covariance(emb, path=path)
    s, U = eigendecompose(Sigma)
    return mean, projection_matrix(s, U, len(s))


def project(emb, mean, V, scale=40.0, block_rows=None):
    """E_lang = (scale * E - mean) V = E (scale V) - mean V, in float64 by row blocks, stored as
    float32 (N+1, d) with the zero padding row 0."""
    out = np.zeros((len(emb) + 1, V.shape[1]), dtype=np.float32)
    scaled_V, shift = scale * V, mean @ V  # (d_l, d), (d,)
    for start, e in row_blocks(emb, block_rows):
        out[1 + start:1 + start + len(e)] = np.asarray(e, dtype=np.float64) @ scaled_V - shift  # (b, d)
    return out


# -----------------------------------------------------------------------------
# report

def spectrum_report(s, d, d_s, d_n, null_thres):
    total = s.sum()
    held = ", ".join(f"top {k}: {s[:k].sum() / total:.1%}" for k in (16, 64, 128) if k <= len(s))
    zero = int((s < s[0] * ZERO_RTOL).sum())
    lines = [f"variance held by the top directions: {held}",
             f"numerically zero directions (s < s_max * {ZERO_RTOL:g}): {zero} of {len(s)}",
             f"kept d = {d} of {len(s)} directions; language block d_s = {d_s} (s {s[0]:.4g} .. "
             f"{s[max(d_s - 1, 0)]:.4g}), null (ID) block d_n = {d_n}"
             + (f" (s {s[d_s]:.4g} .. {s[d - 1]:.4g})" if d_n else "")]
    if null_thres is not None:
        lines.append(f"nullity at tau = {null_thres:g}: {int((s <= null_thres).sum())} of {len(s)} directions")
    return lines


def plot_spectrum(f, s, d_s, d, null_thres, title):
    """The eigenvalues on a log scale with d_s, d and tau marked, as PNG into the open file f (matplotlib only when asked)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    j, shown = np.arange(1, len(s) + 1), s >= s[0] * ZERO_RTOL  # numerically zero ones would squash the axis
    hidden = f" ({len(s) - shown.sum()} numerically zero not shown)" if not shown.all() else ""
    ax.semilogy(j[shown], s[shown], lw=1.5, color="k", label=f"eigenvalue $s_j${hidden}")
    ax.axvspan(d_s + 0.5, d + 0.5, color="tab:orange", alpha=0.25, label=f"null (ID) block, $d_n$ = {d - d_s}")
    ax.axvline(d_s + 0.5, color="tab:blue", ls="--", lw=1, label=f"$d_s$ = {d_s}")
    if d < len(s):
        ax.axvline(d + 0.5, color="tab:red", ls="--", lw=1, label=f"$d$ = {d} (clipped beyond)")
    if null_thres is not None:
        ax.axhline(null_thres, color="tab:green", ls=":", lw=1, label=f"$\\tau$ = {null_thres:g}")
    ax.set(xlabel="direction j (eigenvalues descending)", ylabel="$s_j$ (log)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f, format="png")
    plt.close(fig)


def write_outputs(out, result, plot=None, plot_args=()):
    """The .pt (and the PNG with --plot) written last and together: both go to temporary names,
    then both are renamed, so a failure leaves neither (not a plot without its subspace file)."""
    with common.atomic_outputs(*filter(None, (out, plot))) as tmps:
        with open(tmps[0], "wb") as f:
            torch.save(result, f)
        if plot:
            with open(tmps[1], "wb") as f:
                plot_spectrum(f, *plot_args)


# -----------------------------------------------------------------------------


def check_flags(args):
    """The flags alone; returns (d or None for d_l, d_n or None for the threshold)."""
    if args.null_dim is not None and args.null_thres is not None:
        raise DataError("give --null_dim or --null_thres, not both")
    if not (np.isfinite(args.scale) and args.scale > 0):
        raise DataError(f"--scale {args.scale}: must be a positive number")
    by_thres = args.null_thres is not None
    dim = args.dim if args.dim is not None or by_thres else DEFAULT_DIM
    if dim is not None and dim < 1:
        raise DataError(f"--dim {dim}: must be at least 1")
    null_dim = args.null_dim if args.null_dim is not None or by_thres else DEFAULT_NULL_DIM
    if null_dim is not None and not 0 <= null_dim < dim:
        raise DataError(f"--null_dim {null_dim}: must be >= 0 and < --dim {dim}")
    if args.standardize_zero and args.no_standardize:
        raise DataError("--standardize_zero and --no_standardize contradict each other: give one")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise DataError("--plot needs matplotlib (pip install matplotlib)")
    return dim, null_dim


def popularity_weights(data_dir, n):
    """p_i proportional to the training popularity of item i (meta.json, checked by load_meta)."""
    path = os.path.join(data_dir, "meta.json")
    meta = common.load_meta(data_dir)
    if meta["num_items"] != n:
        raise DataError(f"{path}: num_items {meta['num_items']}, but lang_emb.npy has {n} rows")
    pop = np.asarray(meta["item_popularity"][1:], dtype=np.float64)
    if (pop > 0).sum() < 2:
        raise DataError(f"{path}: item_popularity must have at least 2 popular items")
    return pop


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("data", help="prepared dataset folder DATA (reads DATA/lang_emb.npy)")
    parser.add_argument("--out", default=None, help="output file (default DATA/subspace.pt)")
    parser.add_argument("--scale", type=float, default=40.0, help="multiply E by this first (official 40; sets the units of s and tau)")
    parser.add_argument("--weighting", choices=("uniform", "popularity"), default="uniform", help="item weights p_i of mu and Sigma: uniform, or training popularity from meta.json")
    parser.add_argument("--dim", type=int, default=None, help=f"d, leading directions kept (default {DEFAULT_DIM}; all d_l when only --null_thres is given)")
    parser.add_argument("--null_dim", type=int, default=None, help=f"d_n, the null (ID) block = the last d_n kept directions (default {DEFAULT_NULL_DIM})")
    parser.add_argument("--null_thres", type=float, default=None, help="tau: the null (ID) block = the kept directions with eigenvalue s_j <= tau")
    parser.add_argument("--no_standardize", action="store_true", help="E_lang = (E - mu) U[:, :d], without diag(s)^(-1/2) (the paper's 'w/o Stand')")
    parser.add_argument("--standardize_zero", action="store_true", help="numerically zero directions give rounding noise of unit variance, as in the official code (default: coordinate 0)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also draw the spectrum to this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = args.out or os.path.join(args.data, "subspace.pt")
    path = os.path.join(args.data, "lang_emb.npy")
    try:
        dim, null_dim = check_flags(args)
        emb = open_lang_emb(path)
        n, d_l = emb.shape
        num_items = len(common.read_items(args.data))
        if num_items != n:
            raise DataError(f"{path}: {n} rows, but {os.path.join(args.data, 'items.jsonl')} has {num_items} items")
        dim = d_l if dim is None else dim
        if dim > d_l:
            raise DataError(f"{path}: --dim {dim} is larger than d_l = {d_l}")
        p = popularity_weights(args.data, n) if args.weighting == "popularity" else None
        for target in filter(None, (out, args.plot)):
            common.check_output(target)
        print(f"{path}: N = {n} items, d_l = {d_l}, scale {args.scale:g}, {args.weighting} weights")

        mean, Sigma = weighted_covariance(emb, p, args.scale, path=path)
        s, U = eigendecompose(Sigma)
        if s[0] == 0:
            raise DataError(f"{path}: all rows are identical (zero covariance)")
        d_s, d_n = choose_blocks(s, dim, null_dim, args.null_thres, path)
        V = projection_matrix(s, U, dim, not args.no_standardize, args.standardize_zero)
        lang_emb = project(emb, mean, V, args.scale)  # (N+1, d)
        if args.standardize_zero:
            scale_zero_directions(lang_emb, V, s)
        print("\n".join(spectrum_report(s, dim, d_s, d_n, args.null_thres)))

        settings = dict(vars(args), dim=dim, null_dim=null_dim)  # the flags as resolved
        result = {"mean": torch.from_numpy(mean), "eigenvalues": torch.from_numpy(s.copy()),
                  "basis": torch.from_numpy(U[:, :dim].copy()), "projection": torch.from_numpy(V),
                  "lang_emb": torch.from_numpy(lang_emb), "d_s": d_s, "d_n": d_n, "num_items": n,
                  "d_l": d_l, "settings": settings, "lang_emb_sha256": file_sha256(path)}
        title = f"{os.path.basename(os.path.abspath(args.data))}: N = {n}, d_l = {d_l}"
        write_outputs(out, result, args.plot, (s, d_s, dim, args.null_thres, title))
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        common.interrupted()
    print(f"wrote {out}: lang_emb {tuple(lang_emb.shape)} float32, d_s = {d_s}, d_n = {d_n}"
          + (f"; spectrum plot {args.plot}" if args.plot else "") + f" ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
