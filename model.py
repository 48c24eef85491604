"""
The torch side that the trainers and evaluate.py share: the --device check, seeding, the full-ranking metrics, the
SASRec encoder, checkpoint I/O, and AlphaFuse's fused item embedding with the loader of
decompose.py's subspace file. (common.py holds what needs no torch.)
"""

import random
import signal
import threading

import numpy as np
import torch
import torch.nn.functional as F

from common import DataError, atomic_open


def check_device(parser, name):
    """--device: cpu, cuda or cuda:N that this machine has (default: cuda when available)."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name}: not a device name (cpu, cuda, cuda:N)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def seed_everything(seed):
    """Seed Python, NumPy and torch; returns a torch.Generator for DataLoaders and samplers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# -----------------------------------------------------------------------------
# full-ranking metrics, shared by the trainers and evaluate.py

def rank_of_target(scores, target):
    """scores (B, N+1) over item indices (column 0 is padding and never counts), target (B,).
    rank = 1 + #{j != target : score_j >= score_target}: ties count against the model, so a
    constant scorer ranks every target last, and so does a NaN score of the target."""
    s_target = scores.gather(1, target[:, None])  # (B, 1)
    # the target counts itself: the "1 +". Booleans summed in int16 over blocks of at most 32767
    # columns (no overflow) vectorise several times better than one int64 sum, the default.
    rank = sum((scores[:, j:j + 32767] >= s_target).sum(1, dtype=torch.int16).long()
               for j in range(1, scores.shape[1], 32767))  # (B,)
    return rank.masked_fill(s_target[:, 0].isnan(), scores.shape[1] - 1)


def metrics_at(rank, ks):
    """rank (B,) -> {"HR@K", "NDCG@K", "MRR@K"}: per-sample float tensors, 0 beyond K."""
    out = {}
    for k in ks:
        hit = (rank <= k).float()
        out[f"HR@{k}"] = hit
        out[f"NDCG@{k}"] = hit / torch.log2(rank.float() + 1)
        out[f"MRR@{k}"] = hit / rank.float()
    return out


def rank_within(query, table, target, k, pool_size=512):
    """rank_of_target(query @ table.T, target) wherever it is <= k, and k + 1 wherever it is larger:
    what HR, NDCG and MRR at cut-offs <= k need. query (B, d), table (N+1, d), target (B,).
    Most targets rank far below k, and k items scoring at least the target's prove it: each row is
    first scored against a pool of `pool_size` items (those the batch's mean query scores highest),
    and only the rows with fewer than k pool items at or above their target get the full (N+1)
    scores. On amazon-toys that is about 20% of the rows, so evaluation does about a quarter of
    the full product. A pool item whose score ties the target's counts against it, as in the full
    ranking; the two differ only if a score lies within float rounding of the target's."""
    rank = torch.full_like(target, k + 1)
    full = torch.ones_like(target, dtype=torch.bool)  # (B,) rows whose rank may be <= k
    if len(table) > 4 * pool_size:
        s_target = (query * table[target]).sum(1, keepdim=True)  # (B, 1)
        pool = (query.mean(0) @ table.T)[1:].topk(pool_size).indices + 1  # (M,)
        above = (query @ table[pool].T).masked_fill(pool == target[:, None], float("-inf")) >= s_target
        full = above.sum(1, dtype=torch.int32) < k  # (B, M) -> (B,)
    if full.any():
        rank[full] = rank_of_target(query[full] @ table.T, target[full]).clamp(max=k + 1)
    return rank


@torch.no_grad()
def full_ranking(scorer, seq, target, ks=(10, 20), batch_size=1024, mask_history=False, sampled=0, seed=0):
    """Per-sample metrics of ranking every target against all N items (or, with `sampled` > 0,
    against that many items drawn uniformly, seeded, from those outside the history window).
    scorer = (query, table): query(seq (B, L)) -> (B, d) and table (N+1, d), scores = query @ table.T;
    seq (n, L), target (n,) on the model's device.
    mask_history: the history's items (other than the target) can't be recommended."""
    query, table = scorer
    g = torch.Generator(device=seq.device).manual_seed(seed)
    out = []
    for i in range(0, len(target), batch_size):
        s, t = seq[i:i + batch_size], target[i:i + batch_size, None]  # (B, L), (B, 1)
        q = query(s).float()  # (B, d)
        if not (mask_history or sampled):  # the plain protocol: full scores only where needed
            out.append(metrics_at(rank_within(q, table, t[:, 0], max(ks)), ks))
            continue
        scores = q @ table.T  # (B, N+1)
        if mask_history:
            s_target = scores.gather(1, t)
            scores = scores.scatter(1, s, float("-inf")).scatter(1, t, s_target)
        if sampled:
            keys = torch.rand(scores.shape, generator=g, device=scores.device)
            keys[:, 0] = 2.0  # never sample the padding, the history or the target
            keys = keys.scatter(1, s, 2.0).scatter(1, t, 2.0)
            keep = torch.zeros_like(scores, dtype=torch.bool)
            keep = keep.scatter(1, keys.topk(sampled, largest=False).indices, True).scatter(1, t, True)
            scores = scores.masked_fill(~keep, float("-inf"))
        out.append(metrics_at(rank_of_target(scores, t[:, 0]), ks))
    return {k: torch.cat([o[k] for o in out]).cpu() for k in out[0]}


# -----------------------------------------------------------------------------
# the SASRec encoder: item sequence -> user state, shared by both backbones

class Dropout(torch.nn.Module):
    """nn.Dropout's math (in training, each entry zeroed with probability p, the others scaled by
    1/(1-p)) with the mask drawn by torch.rand from the same global generator: F.dropout's
    bernoulli_ draws make it twice as slow on CPU (19 vs 10 ms forward and backward at (256, 50, 128))."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return x * ((torch.rand_like(x) >= self.p) * (1 / (1 - self.p)))


class TransformerBlock(torch.nn.Module):
    """The self-attention block of SASRec (Kang & McAuley 2018) as the official AlphaFuse code has
    it: q = LN(x) attends over the raw sequence x (keys and values) with dropout on the attention
    weights, and the heads' output, without an output projection, is added to q; then
    z = LN(q + attention) and the block's output is LN(z + dropout(W_2 ReLU(W_1 z)))."""

    def __init__(self, d, num_heads, dropout):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.ln_q, self.ln_ffn, self.ln_out = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.q, self.kv = torch.nn.Linear(d, d), torch.nn.Linear(d, 2 * d)
        self.attn_drop = Dropout(dropout)  # attend_last's; the full path drops inside SDPA
        self.ffn = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU(), torch.nn.Linear(d, d), Dropout(dropout))

    def forward(self, x, attn_mask, last_only=False):
        """x (B, L, d), attn_mask (B, 1, L, L) True = may attend -> (B, L, d), or (B, 1, d) for the
        last position alone: the queries, the norms and the feed-forward of the other positions
        feed nothing after the last block, so last_only skips them."""
        B, L, d = x.shape
        h = self.num_heads
        if last_only:
            q_in = self.ln_q(x[:, -1:])  # (B, 1, d)
            y = self.attend_last(self.q(q_in).view(B, h, d // h), x, attn_mask[:, 0, -1])  # (B, 1, d)
        else:
            q_in = self.ln_q(x)
            q = self.q(q_in).view(B, L, h, d // h).transpose(1, 2)  # (B, h, L, d/h)
            k, v = self.kv(x).view(B, L, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, L, d/h)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.dropout if self.training else 0.0)
            y = y.transpose(1, 2).reshape(B, L, d)
        z = self.ln_ffn(q_in + y)  # (B, Lq, d)
        return self.ln_out(z + self.ffn(z))

    def attend_last(self, q, x, mask):
        """The attention of one query per sequence, q (B, h, d/h), over x (B, L, d) with mask (B, L)
        -> (B, 1, d), without forming the keys and values of the L positions. With W_k, b_k, W_v, b_v
        the key and value weights of a head: q . (W_k x_j + b_k) = (W_k^T q) . x_j + q . b_k, and
        sum_j a_j (W_v x_j + b_v) = W_v (sum_j a_j x_j) + (sum_j a_j) b_v. That is 2 d^2 + 2 h L d
        multiplies per sequence instead of 2 L d^2 (L = 10, d = 128: 5x less), the same numbers up
        to float rounding, and the same gradients for every weight."""
        B, L, d = x.shape
        h = self.num_heads
        W_k, W_v = self.kv.weight.view(2, h, d // h, d)  # (h, d/h, d) each
        b_k, b_v = self.kv.bias.view(2, h, d // h)  # (h, d/h) each
        q_x = torch.einsum("bhe,hed->bhd", q, W_k)  # (B, h, d): W_k^T q
        att = torch.bmm(q_x, x.transpose(1, 2)) + (q * b_k).sum(-1, keepdim=True)  # (B, h, L)
        att = (att * (d // h) ** -0.5).masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        att = self.attn_drop(att)
        ctx = torch.bmm(att, x)  # (B, h, d): sum_j a_j x_j
        y = torch.einsum("bhd,hed->bhe", ctx, W_v) + att.sum(-1, keepdim=True) * b_v  # (B, h, d/h)
        return y.reshape(B, 1, d)


class SASRecEncoder(torch.nn.Module):
    """item_emb(seq) + learned positions -> dropout -> causal Transformer blocks, padding positions
    zeroed after each -> a final LayerNorm: the state of the last position (B, d), or of every
    position (B, L, d) with all_positions=True (whole-sequence training)."""

    def __init__(self, d, max_len, num_blocks=1, num_heads=1, dropout=0.1):
        super().__init__()
        self.pos = torch.nn.Embedding(max_len, d)
        self.drop = Dropout(dropout)
        self.blocks = torch.nn.ModuleList(TransformerBlock(d, num_heads, dropout) for _ in range(num_blocks))
        self.ln_f = torch.nn.LayerNorm(d)

    def forward(self, seq_emb, seq, all_positions=False):  # seq_emb (B, L, d), seq (B, L) indices, 0 = padding
        B, L, _ = seq_emb.shape
        real = seq > 0  # (B, L)
        x = self.drop(seq_emb + self.pos.weight[:L]) * real[..., None]
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
        # a query may see earlier real items and always itself, so no row is fully masked (no NaN)
        attn_mask = causal & (real[:, None, :] | torch.eye(L, dtype=torch.bool, device=seq.device))
        for i, block in enumerate(self.blocks):
            last_only = not all_positions and i == len(self.blocks) - 1
            x = block(x, attn_mask[:, None], last_only) * real[:, -x.shape[1]:, None]
        # sequences are left-padded: the last position is the newest item
        return self.ln_f(x) if all_positions else self.ln_f(x[:, -1])


class SampledScores(torch.autograd.Function):
    """u (P, d) against the table rows idx (P, M) -> (P, M) scores u_p . e_j, or u_p . e_j / |e_j|
    with cosine=True (u is normalised by the caller), j = idx_pm, e_j = table[j].

    The numbers and gradients of the obvious einsum over the gathered (P, M, d) candidates (with
    F.normalize for cosine, for norms above its eps 1e-12), without ever holding those candidates:
    autograd would keep them, meet them again as a (P, M, d) gradient, scatter it with index_put,
    and differentiate the norms of the whole table. Here the forward gathers 64 rows at a time
    (they stay in cache) and the backward is two sparse products with
    S = sum_pm w_pm e_p e_j^T (P, N+1), w = grad (/ |e_j| for cosine): grad_u = S table and
    grad_table = S^T u, minus c_j e_j with c_j = sum_{pm: idx_pm = j} w_pm score_pm / |e_j| for
    cosine (the derivative of 1/|e_j|). 3x faster than autograd's path at amazon-toys' windows,
    10x at ml-1m's whole sequences (P = 12,800 positions a step), before S table became an
    embedding_bag."""

    @staticmethod
    def forward(ctx, u, table, idx, cosine):
        norm = torch.linalg.vector_norm(table, dim=1).clamp_min(1e-12) if cosine else None  # (N+1,)
        scores = u.new_empty(idx.shape)  # (P, M)
        for i in range(0, len(idx), 64):  # 64 rows of candidates (64, M, d) at a time stay in cache
            E = table.index_select(0, idx[i:i + 64].flatten()).view(-1, idx.shape[1], u.shape[1])
            scores[i:i + 64] = torch.linalg.vecdot(E, u[i:i + 64, None, :])
        if cosine:
            scores = scores / norm[idx]
        ctx.save_for_backward(u, table, idx, scores, norm)
        ctx.cosine = cosine
        return scores

    @staticmethod
    def backward(ctx, grad):  # grad (P, M)
        u, table, idx, scores, norm = ctx.saved_tensors
        w = grad / norm[idx] if ctx.cosine else grad  # (P, M)
        # S table: row p is sum_m w_pm e_(idx_pm), a weighted bag of table rows (one fused kernel,
        # 8x faster than a sparse COO product at ml-1m's 11,281 positions)
        grad_u = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")  # (P, d)
        rows = torch.arange(len(idx), device=idx.device).repeat_interleave(idx.shape[1])
        S_t = torch.sparse_coo_tensor(torch.stack([idx.flatten(), rows]), w.flatten(), (len(table), len(idx)),
                                      check_invariants=False)
        grad_table = torch.sparse.mm(S_t, u)  # (N+1, d)
        if ctx.cosine:
            c = torch.zeros_like(norm).index_add_(0, idx.flatten(), (w * scores).flatten()) / norm  # (N+1,)
            grad_table.addcmul_(c[:, None], table, value=-1)
        return grad_u, grad_table, None, None


# -----------------------------------------------------------------------------
# checkpoints: plain types and tensors only, loadable with weights_only=True

def save_checkpoint(path, **fields):
    """torch.save under a temporary name, renamed once complete. A Ctrl-C meanwhile is held and
    raised after: inside torch.save it would surface as the zip writer's RuntimeError, a traceback
    instead of one line. (Python handles signals in the main thread only, where the trainers run.)"""
    held = []
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True)) if main else None
    try:
        with atomic_open(path) as f:
            torch.save(fields, f)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def load_checkpoint(path, device="cpu", what="checkpoint", missing=""):
    """torch.load(path, weights_only=True); a missing or unreadable file is a DataError naming it
    (`what` names the kind of file, `missing` adds a hint when it does not exist)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found{missing}") from None
    except Exception as e:  # torch raises several kinds for truncated or foreign files
        raise DataError(f"{path}: not a readable {what} ({type(e).__name__})") from None


# ---- the fused item embedding (AlphaFuse)

SUBSPACE_KEYS = ("mean", "eigenvalues", "basis", "lang_emb", "d_s", "d_n")


def keep_rows(param, cold=()):
    """Rows of an item table that never get a gradient, whether the table is read by lookups or
    whole (table()): row 0, the padding item, so it stays the zero vector, and the cold items
    (prepare.py --cold_items), so they stay as an item that arrives after training has them,
    whatever the loss (ce's full softmax reaches every row); returns param."""
    rows = torch.tensor([0, *cold], dtype=torch.long)
    param.register_hook(lambda g: g.index_fill(0, rows.to(g.device), 0.0))
    return param


def load_subspace(path, num_items=None):
    """decompose.py's output -> dict, checked: lang_emb float (N+1, d) with a zero padding row 0 and
    finite values, d = d_s + d_n, and N = num_items when given (from meta.json)."""
    sub = load_checkpoint(path, what="subspace file of decompose.py", missing=" (run decompose.py first)")
    if not isinstance(sub, dict) or any(k not in sub for k in SUBSPACE_KEYS):
        raise DataError(f"{path}: not a subspace file of decompose.py (keys {', '.join(SUBSPACE_KEYS)})")
    lang, d_s, d_n = sub["lang_emb"], sub["d_s"], sub["d_n"]
    if not (torch.is_tensor(lang) and lang.dim() == 2 and lang.is_floating_point() and lang.shape[1] > 0):
        raise DataError(f"{path}: lang_emb must be a 2-D float tensor (N+1, d)")
    if not (isinstance(d_s, int) and isinstance(d_n, int) and d_s >= 0 and d_n >= 0 and d_s + d_n == lang.shape[1]):
        raise DataError(f"{path}: d_s = {d_s} and d_n = {d_n} do not add up to d = {lang.shape[1]}")
    if num_items is not None and lang.shape[0] != num_items + 1:
        raise DataError(f"{path}: lang_emb has {lang.shape[0]} rows, expected N + 1 = {num_items + 1}")
    if torch.count_nonzero(lang[0]) or not torch.isfinite(lang).all():
        raise DataError(f"{path}: lang_emb has a non-zero padding row 0 or non-finite values")
    return sub


class FusedItemEmbedding(torch.nn.Module):
    """AlphaFuse's item embeddings e_i = E_lang[i] + [0_{d_s}, ID_i], a table (N+1, d), item 0 = padding.

    E_lang (decompose.py's lang_emb) is a frozen buffer; ID (N+1, d_n) is trainable and only touches
    the null coordinates d_s..d. Row 0 of both is zero and never gets a gradient (padding_idx for
    lookups, keep_rows for table()), so the padding item stays the zero vector. d_n = 0 gives the pure language embeddings.
    Ablations: train_lang=True makes E_lang a parameter initialised from it (the paper's
    "w/o Frozen"); replace=True uses e_i = [E_lang[i, :d_s], ID_i] instead of the sum.
    The `cold` items (held out of training) have ID_i = 0 and no gradient, as a new item has them.
    """

    def __init__(self, lang_emb, d_s, id_init="normal", train_lang=False, replace=False, cold=()):
        super().__init__()
        if id_init not in ("normal", "zeros"):
            raise ValueError(f"id_init must be 'normal' or 'zeros', got {id_init!r}")
        n1, d = lang_emb.shape  # (N+1, d)
        self.d_s, self.replace = d_s, replace
        lang = lang_emb.detach().to(torch.float32).clone()
        lang[0] = 0
        if train_lang:
            self.lang = keep_rows(torch.nn.Parameter(lang), cold)  # cold rows: decompose.py's projection
        else:
            self.register_buffer("lang", lang)
        self.id_emb = keep_rows(torch.nn.Parameter(torch.zeros(n1, d - d_s)), cold)  # (N+1, d_n)
        if id_init == "normal":
            with torch.no_grad():
                self.id_emb[1:].normal_()  # every row draws, so warm rows start as without cold items
                self.id_emb[list(cold)] = 0

    def forward(self, idx):  # idx (...) item indices -> (..., d)
        lang = F.embedding(idx, self.lang, padding_idx=0)  # (..., d)
        ids = F.embedding(idx, self.id_emb, padding_idx=0)  # (..., d_n)
        null = ids if self.replace else lang[..., self.d_s:] + ids  # slice at d_s: d_n = 0 works
        return torch.cat([lang[..., :self.d_s], null], dim=-1)

    def table(self):  # (N+1, d): every item's fused embedding, the forward of all rows at once
        null = self.id_emb if self.replace else self.lang[:, self.d_s:] + self.id_emb
        return torch.cat([self.lang[:, :self.d_s], null], dim=1)


# ---- the baselines' item embeddings, and the choice among all of them

class AdapterEmbedding(torch.nn.Module):
    """Frozen item features (N+1, d_in) -> adapt -> (N+1, d); the padding row 0 stays zero. MoRec and
    WhitenRec adapt with Linear, GELU, Linear."""

    def __init__(self, features, d):
        super().__init__()
        self.register_buffer("features", features)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(features.shape[1], d), torch.nn.GELU(), torch.nn.Linear(d, d))

    def adapt(self, x):  # (..., d_in) -> (..., d)
        return self.mlp(x)

    def forward(self, idx):
        return self.adapt(self.features[idx]) * (idx > 0)[..., None]  # padding stays zero

    def table(self):  # (N+1, d): every item at once
        return self.forward(torch.arange(len(self.features), device=self.features.device))


class MoEAdaptorEmbedding(AdapterEmbedding):
    """UniSRec's item representation (Hou et al., "Towards Universal Sequence Representation Learning
    for Recommender Systems", KDD 2022, Sec. 2.2): the frozen language vector x (d_l) of an item's
    text passes through G parametric whitening experts, eq. 2: x~_k = (x - b_k) W_k with b_k (d_l) and
    W_k (d_l, d) learned, no bias; a gate mixes them, eqs. 3-5: v = sum_k g_k x~_k,
    g = softmax(x W_2 + delta), delta = N(0, 1) * softplus(x W_3), the noise only in training.
    v alone is the item (the paper's inductive setting: no ID embedding), so a new item's text gives
    its row. Fine-tuning only: the adaptor trains with the sequence encoder on the target data, with
    no pre-training on other domains. Defaults as the UniSRec authors' code (props/UniSRec.yaml,
    unisrec.py), which the AlphaFuse code repeats: G = 8, dropout 0.2 on the experts' input (the
    gate reads the clean x), W_k ~ N(0, 0.02^2), b_k = W_2 = W_3 = 0.
    NOTE: one dropout mask serves all G experts (theirs draws one per expert), so that the G
    products are one; delta has no + 1e-2 (their code's, not the paper's)."""

    def __init__(self, features, d, experts=8, dropout=0.2):
        torch.nn.Module.__init__(self)  # AdapterEmbedding's forward and table, not its MLP
        self.register_buffer("features", features)
        d_l = features.shape[1]
        self.W = torch.nn.Parameter(torch.randn(d_l, experts, d) * 0.02)  # W_k = W[:, k]
        self.b = torch.nn.Parameter(torch.zeros(experts, d_l))  # b_k
        self.W_gate = torch.nn.Parameter(torch.zeros(d_l, experts))  # W_2
        self.W_noise = torch.nn.Parameter(torch.zeros(d_l, experts))  # W_3
        self.drop = Dropout(dropout)

    def gate(self, x):  # (..., d_l) -> g (..., G), eqs. 4-5
        logits = x @ self.W_gate
        if self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(x @ self.W_noise)
        return logits.softmax(-1)

    def adapt(self, x):  # (..., d_l) -> v (..., d), eqs. 2-3, with (x - b_k) W_k = x W_k - b_k W_k
        d_l, G, d = self.W.shape  # all experts in one product: W viewed as (d_l, G d)
        experts = (self.drop(x) @ self.W.view(d_l, G * d)).unflatten(-1, (G, d)) - torch.einsum("gl,lgd->gd", self.b, self.W)
        return (self.gate(x)[..., None] * experts).sum(-2)  # (..., G, d) -> (..., d)


def make_item_embedding(item_emb, num_items, d, d_in, d_s, id_init, train_lang, id_replace, init=None, cold=(),
                        experts=8):
    """The item embedding module; `init` is the language tensor it is built on (zeros as a
    placeholder when rebuilding from a checkpoint, whose state_dict then fills it). The `cold` items'
    rows (training only) never change: zero ID rows, as a new item's; llminit's language rows.
    `experts`: unisrec's G."""
    adapter = item_emb in ("morec", "whitenrec", "unisrec")
    if item_emb != "id" and init is None:
        init = torch.zeros(num_items + 1, d_in if adapter else d)
    if item_emb == "alphafuse":
        return FusedItemEmbedding(init, d_s, id_init, train_lang, id_replace, cold)
    if adapter:
        return MoEAdaptorEmbedding(init, d, experts) if item_emb == "unisrec" else AdapterEmbedding(init, d)
    table = torch.nn.Embedding(num_items + 1, d, padding_idx=0)
    keep_rows(table.weight, cold)  # padding_idx guards lookups; table() is read directly
    with torch.no_grad():
        table.weight.copy_(init if item_emb == "llminit" else torch.randn(num_items + 1, d) * (id_init == "normal"))
        table.weight[[0, *cold] if item_emb == "id" else 0] = 0
    return table
