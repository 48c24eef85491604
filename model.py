"""
The torch side that the trainers and evaluate.py share: the --device check, seeding, the full-ranking metrics, the
SASRec encoder, LLM-ESR's dual-view encoder and self-distillation, and checkpoint I/O. (common.py holds what needs no torch;
embeddings.py the item embeddings.)
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


def attention_mask(seq):
    """seq (B, L) item indices, 0 = padding -> (B, L, L), True = may attend: causal, and a query may
    see earlier real items and always itself, so no row is fully masked (no NaN)."""
    L = seq.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
    return causal & ((seq > 0)[:, None, :] | torch.eye(L, dtype=torch.bool, device=seq.device))


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
        attn_mask = attention_mask(seq)  # (B, L, L)
        for i, block in enumerate(self.blocks):
            last_only = not all_positions and i == len(self.blocks) - 1
            x = block(x, attn_mask[:, None], last_only) * real[:, -x.shape[1]:, None]
        # sequences are left-padded: the last position is the newest item
        return self.ln_f(x) if all_positions else self.ln_f(x[:, -1])


# -----------------------------------------------------------------------------
# LLM-ESR's encoder and self-distillation (Liu et al., NeurIPS 2024, arXiv 2405.20646), shared by
# both backbones; its items are embeddings.DualViewEmbedding, its retrieval training.similar_users


class CrossViewAttention(torch.nn.Module):
    """LLM-ESR's cross-attention between the views ("Dual-view Modeling", sequence-level fusion): a
    view's sequence x (B, L, d) re-read through the other view's sequence y, softmax(Q K^T / sqrt(d/h)) V
    with Q = y W_Q, K = x W_K, V = x W_V. The output keeps x's values, so it stays in the view its
    items are scored in; y steers where to attend (the direction of the authors' code, its id2llm and
    llm2id). No output projection and no residual (the authors' code adds the first, and keeps
    none of x). Unlike the authors' code it is causal, with the encoder's padding-aware mask: whole
    sequences train every position on its next item, which an unmasked attention would show it."""

    def __init__(self, d, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.kv = torch.nn.Linear(d, d, bias=False), torch.nn.Linear(d, 2 * d, bias=False)

    def forward(self, x, y, attn_mask):  # x, y (B, L, d), attn_mask (B, 1, L, L) -> (B, L, d)
        B, L, d = x.shape
        h = self.num_heads
        q = self.q(y).view(B, L, h, d // h).transpose(1, 2)  # (B, h, L, d/h)
        k, v = self.kv(x).view(B, L, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, L, d/h)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(B, L, d)


class DualViewEncoder(torch.nn.Module):
    """LLM-ESR's sequence encoder: item sequences [co, se] (B, L, 2d) -> each view's sequence re-read
    by the other (CrossViewAttention), both through one shared SASRecEncoder (the paper's shared
    encoder, in one pass) -> u = [u^co, u^se] (B, 2d), or (B, L, 2d) with all_positions, scored
    against items [e^co, e^se] (embeddings.DualViewEmbedding): the logit-level fusion."""

    def __init__(self, d, max_len, num_blocks, num_heads, dropout):
        super().__init__()
        self.encoder = SASRecEncoder(d, max_len, num_blocks, num_heads, dropout)
        self.cross = torch.nn.ModuleList(CrossViewAttention(d, num_heads) for _ in range(2))  # co by se, se by co

    def forward(self, seq_emb, seq, all_positions=False):  # seq_emb (B, L, 2d), seq (B, L) indices, 0 = padding
        co, se = seq_emb.chunk(2, dim=-1)  # (B, L, d) each
        mask = attention_mask(seq)[:, None]  # (B, 1, L, L)
        x = torch.cat([self.cross[0](co, se, mask), self.cross[1](se, co, mask)])  # (2B, L, d)
        return torch.cat(self.encoder(x, seq.repeat(2, 1), all_positions).chunk(2), dim=-1)


def self_distillation(state, u, user, similar, teacher_seq):
    """LLM-ESR's retrieval augmented self-distillation L_sd: the state u (B, D = 2d) of each sample's
    user (B,) is drawn to the teacher u^T, the mean of the states of the user's N retrieved similar
    users (similar (U, N), training.similar_users), each encoded by state(teacher_seq (M, L)) -> (M, D)
    from its last L training items. Mean squared error over the B users and the D coordinates (as
    the authors' code, whose scale the paper's alpha = 0.1 was tuned on). The teacher is a constant:
    no gradient flows into it (the authors' code detaches it); it is encoded in the model's mode,
    with dropout in training as theirs. Each similar user of the batch is encoded once."""
    teachers, which = similar[user].unique(return_inverse=True)  # (M,), (B, N)
    with torch.no_grad():
        states = state(teacher_seq[teachers])  # (M, D)
    return F.mse_loss(u, states[which].mean(1))  # (B, N, D) -> (B, D)


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
