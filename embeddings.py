"""
The item embeddings, one module per method, each mapping item indices (...) to (..., d) and giving
every item's row at once with table(): AlphaFuse's fused embedding (with the loader of
decompose.py's subspace file), the baselines' adapters over frozen language vectors, RLMRec's
aligned ID table and LLM-ESR's dual-view items ((..., 2d)); make_item_embedding chooses among them
and the plain ID table. Row 0 is the padding item, zero.
"""

import torch
import torch.nn.functional as F

from common import DataError
from model import Dropout, load_checkpoint


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

    def adapt(self, x):  # (..., d_l) -> v (..., d), eqs. 2-3
        """v = sum_k g_k (x - b_k) W_k = sum_k g_k x W_k - sum_k g_k (b_k W_k): all experts' x W_k in
        one product (W viewed as (d_l, G d)), gated by a batched (1, G) @ (G, d) product, and the
        bias terms b_k W_k (G, d) once for all items. Subtracting them inside the (..., G, d) experts
        and gating by multiply-and-sum, as the equations read, cost 1.2x the CPU time of a table()
        forward and backward at amazon-toys' size (bench/bench_baselines.py); the two products
        with W, forward and for its gradient, are most of what is left."""
        d_l, G, d = self.W.shape
        experts = (self.drop(x) @ self.W.view(d_l, G * d)).unflatten(-1, (G, d))  # (..., G, d)
        g = self.gate(x)  # (..., G)
        return (g.unsqueeze(-2) @ experts).squeeze(-2) - g @ torch.einsum("gl,lgd->gd", self.b, self.W)


class RLMRecEmbedding(torch.nn.Embedding):
    """RLMRec's items (Ren et al., "Representation Learning with Large Language Models for
    Recommendation", WWW 2024: the density ratio modelling of its cross-view alignment, "Contrastive
    Alignment" and "Generative Alignment"):
    a trainable ID table e_i (N+1, d), looked up and read whole exactly as `id`'s nn.Embedding, plus
    a training-only loss that aligns e_i with the frozen language vector s_i (d_l) of the item's text
    by maximising the InfoNCE bound on I(e_i, s_i) with a density ratio f, over a step's items i, j
    (training.with_alignment: the distinct targets of the batch):
        L_info = -mean_i log( f(s_i, e_i) / sum_j f(s_j, e_i) )
        con (RLMRec-Con, contrastive alignment): f(s_i, e_i) = exp(cos(sigma_down(s_i), e_i) / tau)
        gen (RLMRec-Gen, generative alignment):  f(s_i, e_i) = exp(cos(s_i, sigma_up(e_i)) / tau)
    sigma_down: d_l -> (d_l + d) / 2 -> LeakyReLU -> d, sigma_up the reverse, as the authors' code
    (HKUDS/RLMRec, lightgcn_plus.py and lightgcn_gene.py); tau is their code's temperature
    (kd_temperature, re_temperature). The total loss is the backbone's plus a weight times L_info.
    NOTE where this differs from the paper: s_i is lang_emb.npy's vector of the item's text, not an
    LLM-written profile; there are no user vectors to align (a sequence model has no user table);
    RLMRec-Gen reconstructs s_i from e_i itself: the paper masks graph nodes before propagation and
    reconstructs the masked ones from their neighbours, which has no counterpart without a graph.
    Where it differs from the AlphaFuse code's RLMRec: that code minimises 1 - mean cos over all
    items every step, no negatives, no tau (weight --beta 0.1); this is the paper's InfoNCE over a
    batch, so that aligned pairs are pulled together and the other items pushed apart.
    The language vectors are a frozen buffer left out of the checkpoint (only training reads them;
    a run and its --resume read lang_emb.npy). Padding and `cold` rows stay zero and untouched, as
    `id`'s, and no cold item enters L_info: it is unseen in training."""

    def __init__(self, lang, d, align="con", temperature=0.2, cold=()):
        super().__init__(len(lang), d, padding_idx=0)  # the draws of `id`'s nn.Embedding
        if align not in ("con", "gen"):
            raise ValueError(f"align must be 'con' or 'gen', got {align!r}")
        self.align, self.temperature = align, temperature
        self.register_buffer("lang", lang, persistent=False)  # (N+1, d_l) s_i
        warm = torch.ones(len(lang), dtype=torch.bool)
        warm[[0, *cold]] = False
        self.register_buffer("warm", warm, persistent=False)  # (N+1,) the items L_info may involve
        d_l = lang.shape[1]
        sizes = (d_l, (d_l + d) // 2, d) if align == "con" else (d, (d_l + d) // 2, d_l)
        # the MLP draws its init from a copy of the global generator, which then stays where `id`
        # leaves it: the encoder's init and every dropout mask are `id`'s
        with torch.random.fork_rng(devices=[]):
            self.mlp = torch.nn.Sequential(torch.nn.Linear(*sizes[:2]), torch.nn.LeakyReLU(), torch.nn.Linear(*sizes[1:]))
            for layer in self.mlp[::2]:
                torch.nn.init.xavier_uniform_(layer.weight)  # the authors' init of their MLP's weights

    def aux_loss(self, items):
        """L_info over the distinct warm items among `items` (any shape; 0 and cold ones dropped):
        each once, so an item is never its own negative; the other items are the negatives."""
        items = items.unique()
        items = items[self.warm[items]]  # (M,)
        s, e = self.lang[items], self.weight[items]  # (M, d_l), (M, d)
        anchor, other = (e, self.mlp(s)) if self.align == "con" else (self.mlp(e), s)  # rows: e_i's side, columns: s_j's
        logits = F.normalize(anchor, dim=-1) @ F.normalize(other, dim=-1).T / self.temperature  # (M, M)
        return F.cross_entropy(logits, torch.arange(len(items), device=items.device))
class FrozenEmbedding(AdapterEmbedding):
    """iDreamRec's items (Hu et al., "Generate and Instantiate What You Prefer: Text-Guided Diffusion
    for Sequential Recommendation", arXiv 2410.13428): DreamRec's randomly initialised ID embeddings,
    trained jointly with the model, are replaced by a text embedding model's vectors of the items'
    texts, so the distribution the diffusion learns to generate stays fixed. The features (N+1, d)
    are the items themselves: no adapter, no ID, nothing of the item side trains, d = d_l; a new
    item's text gives its row. Whitened over the items (zero mean, identity covariance, all d_l
    directions) as the AlphaFuse authors' iDreamRec baseline has them (models/backbone_DreamRec.py),
    which also gives x0 the unit-variance coordinates of the noise.
    NOTE: the paper's LLM-written item descriptions and its intention instructions as extra
    conditions are not here: the items' own texts are embedded, and histories alone condition."""

    def __init__(self, features):
        torch.nn.Module.__init__(self)  # AdapterEmbedding's forward and table, without its MLP
        self.register_buffer("features", features)

    def adapt(self, x):  # (..., d) -> (..., d): the vector is the item
        return x
def principal_directions(x, d):
    """PCA of the rows x (N, d_l): their mean (d_l,) and the d directions of most variance (d_l, d),
    so that (x - mean) @ basis is sklearn's PCA(d).fit_transform(x); float64 eigh, each direction's
    sign fixed (its largest entry positive), as decompose.eigendecompose."""
    x = x.double()
    mean = x.mean(0)
    _, U = torch.linalg.eigh((x - mean).T @ (x - mean))  # ascending eigenvalues
    U = U[:, -d:].flip(1)  # (d_l, d), descending
    U = U * U.gather(0, U.abs().argmax(0, keepdim=True)).sign()
    return mean.float(), U.float()


class DualViewEmbedding(torch.nn.Module):
    """LLM-ESR's items (Liu et al., "LLM-ESR: Large Language Models Enhancement for Long-tailed
    Sequential Recommendation", NeurIPS 2024, arXiv 2405.20646, "Dual-view Modeling"): each item is
    e_i = [e^co_i, e^se_i] (2d), the two views side by side, so that a user [u^co, u^se] scores
    u^co . e^co_i + u^se . e^se_i (the logit-level fusion: concatenated representations).
    Semantic view: the item's LLM embedding E^llm_i (DATA/lang_emb.npy, d_l) is frozen (a buffer)
    and a two-layer adapter without activation reduces it, e^se_i = W_2 (W_1 E^llm_i + b_1) + b_2,
    W_1 (d_l -> d_l / 2), W_2 (d_l / 2 -> d), as the paper and the authors' code.
    Collaborative view: a trainable table E^co (N+1, d), initialised with the PCA of the LLM
    embeddings to d dimensions (all N items' texts; no interaction), the paper's dimension-reduced
    LLM embeddings. pca_mean and pca_basis are kept, so a new item's text gives its initial row.
    Row 0 (padding) is zero in both views; the `cold` items keep their PCA rows, untrained
    (keep_rows), which is what a new item gets from its text (recommend.py --new_items).
    pca=False skips the PCA (rebuilding from a checkpoint, whose state_dict holds the rows)."""

    def __init__(self, features, d, cold=(), pca=True):
        super().__init__()
        n1, d_l = features.shape  # (N+1, d_l), row 0 zero
        self.register_buffer("features", features)
        self.adapter = torch.nn.Sequential(torch.nn.Linear(d_l, d_l // 2), torch.nn.Linear(d_l // 2, d))
        mean, basis = principal_directions(features[1:], d) if pca else (torch.zeros(d_l), torch.zeros(d_l, d))
        self.register_buffer("pca_mean", mean)  # (d_l,)
        self.register_buffer("pca_basis", basis)  # (d_l, d)
        rows = self.reduce(features)
        rows[0] = 0
        self.co_emb = keep_rows(torch.nn.Parameter(rows), cold)  # (N+1, d)

    def reduce(self, x):  # (..., d_l) LLM embeddings -> (..., d) PCA coordinates
        return (x - self.pca_mean) @ self.pca_basis

    def forward(self, idx):  # (...) item indices -> (..., 2d) = [e^co, e^se]
        co = F.embedding(idx, self.co_emb, padding_idx=0)  # (..., d)
        se = self.semantic(self.features[idx]) * (idx > 0)[..., None]  # (..., d), padding stays zero
        return torch.cat([co, se], dim=-1)

    def semantic(self, x):  # (..., d_l) -> (..., d): self.adapter(x), W_2 (W_1 x + b_1) + b_2
        """Without an activation the adapter is one affine map, x (W_2 W_1)^T + W_2 b_1 + b_2: the
        same numbers up to float rounding and the same gradients for W_1, b_1, W_2, b_2, at d_l d
        multiplies per item instead of (d_l / 2)(d_l + d), half at d_l = 384, d = 128. table()
        adapts every item at every step: 1.9-2.2x less CPU time for its forward and backward at
        amazon-toys' size (bench/bench_baselines.py)."""
        first, second = self.adapter
        return F.linear(x, second.weight @ first.weight, second.weight @ first.bias + second.bias)

    def table(self):  # (N+1, 2d): every item at once
        return self.forward(torch.arange(len(self.features), device=self.features.device))


# the baselines fed the language vectors themselves, times lang_scale (whitenrec and idreamrec
# standardize them, alphafuse and llminit take decompose.py's coordinates)
RAW_INPUT = ("morec", "unisrec", "rlmrec", "llmesr")


def make_item_embedding(item_emb, num_items, d, d_in, d_s, id_init, train_lang, id_replace, init=None, cold=(),
                        experts=8, align="con", align_temperature=0.2, lang_scale=1.0):
    """The item embedding module; `init` is the language tensor it is built on (zeros as a
    placeholder when rebuilding from a checkpoint, whose state_dict then fills it). The `cold` items'
    rows (training only) never change: zero ID rows, as a new item's; llminit's language rows;
    llmesr's PCA rows. `experts`: unisrec's G; `align`, `align_temperature`: rlmrec's variant and tau.
    llmesr: d per view (2d items), PCA only from an `init`. `lang_scale`: the factor on the
    language vectors of the RAW_INPUT baselines (the official code's language_embs_scale, 40)."""
    if init is not None and item_emb in RAW_INPUT:
        init = lang_scale * init
    adapter = item_emb in ("morec", "whitenrec", "unisrec", "idreamrec")
    if item_emb == "llmesr":
        return DualViewEmbedding(torch.zeros(num_items + 1, d_in) if init is None else init, d, cold, init is not None)
    if item_emb != "id" and init is None:
        init = torch.zeros(num_items + 1, d_in if adapter or item_emb == "rlmrec" else d)
    if item_emb == "alphafuse":
        return FusedItemEmbedding(init, d_s, id_init, train_lang, id_replace, cold)
    if item_emb == "idreamrec":
        return FrozenEmbedding(init)
    if adapter:
        return MoEAdaptorEmbedding(init, d, experts) if item_emb == "unisrec" else AdapterEmbedding(init, d)
    if item_emb == "rlmrec":  # an nn.Embedding: initialised below exactly as `id`'s
        table = RLMRecEmbedding(init, d, align, align_temperature, cold)
    else:
        table = torch.nn.Embedding(num_items + 1, d, padding_idx=0)
    keep_rows(table.weight, cold)  # padding_idx guards lookups; table() is read directly
    with torch.no_grad():
        table.weight.copy_(init if item_emb == "llminit" else torch.randn(num_items + 1, d) * (id_init == "normal"))
        table.weight[[0, *cold] if item_emb != "llminit" else 0] = 0
    return table
