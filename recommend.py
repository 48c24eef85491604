"""
Recommend the top-k items for item histories with a trained run, and rank items that arrive after
training (a text, no interactions) with the known ones, without retraining.

    python recommend.py runs/toys_alphafuse --history B0001 B0002 B0003 --k 10
    python recommend.py runs/toys_alphafuse --input users.jsonl --out recs.jsonl
    python recommend.py runs/toys_alphafuse --history B0001 --new_items new.jsonl --base_url http://127.0.0.1:8081/v1

Reads  RUN/ckpt.pt (or RUN itself, a checkpoint file) and the DATA folder its config names:
       items.jsonl (the item ids and texts), meta.json (N, L); with --new_items also
       DATA/lang_emb.json (the endpoint and model that embedded the items, and d_l), the run's
       subspace file (alphafuse) or DATA/lang_emb.npy (whitenrec, idreamrec).
       --input FILE.jsonl: one object per line, {"history": [item ids, oldest first], "user": any}.
       --new_items NEW.jsonl: one {"item_id": str, "text": str} per line.
Writes with --history: one line per item on stdout, "rank<TAB>item_id<TAB>score<TAB>text" (the
       text's whitespace collapsed);
       with --input or --out: one JSON line per history, {"user": (if given), "items": [{"rank",
       "item_id", "score", "text"}, ...]}, to --out (written whole, or not at all) or stdout.
Item ids are the original ones of items.jsonl (and NEW.jsonl). A history keeps its most recent L
items (meta.json's max_len), left-padded as prepare.py's sequences. Scores are the model's ranking
scores, as evaluate.py computes them (DreamRec: x0_hat . e_i with x_T drawn from --seed, per batch).
Its own items are left out of a history's list unless --include_history.

New items: their texts are embedded through the endpoint and model of DATA/lang_emb.json (embed.py's
client, one request of up to 32 texts at a time; --base_url overrides the recorded URL, the key comes
from --api_key_env), and each vector e becomes what the item embedding would hold for it:
  alphafuse  E_lang = (scale * e - mean) @ V with the run's subspace (decompose.py's projection),
             plus a zero ID part: e_new = [E_lang[:d_s], E_lang[d_s:] + 0] (also with --train_lang)
  morec, unisrec  the adapter (unisrec: its MoE adaptor) applied to s e (s: the run's --lang_scale)
  llmesr     the semantic view, its adapter applied to s e, beside the collaborative view's initial
             row, s e's PCA coordinates (as a cold item keeps them): [(s e - pca_mean) pca_basis, adapter(s e)]
  whitenrec  the adapter applied to e whitened with the mean and covariance of DATA/lang_emb.npy,
             recomputed as the trainer computes them; idreamrec (DreamRec) the whitened e itself
  id, llminit, rlmrec (a trained row per item) cannot: one error line. A history may name new items too.
Training keeps a cold item's row (prepare.py --cold_items) the same way, so its text scores as it.
"""

import argparse
import contextlib
import io
import json
import os
import sys

import numpy as np
import torch

import common
import decompose
import embed
from common import DataError
from evaluate import load_model, open_run
from embeddings import load_subspace
from model import check_device

EMBED_BATCH = 32  # texts per request: the smallest default of the servers embed.py names (TEI)


def read_jsonl(path):
    """(line number, object) of each non-blank line of a JSON-lines file; DataError naming the line."""
    try:
        with open(path, "rb") as f:
            raw_lines = list(f)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    rows = []
    for lineno, raw in enumerate(raw_lines, 1):
        try:
            text = raw.decode("utf-8")
            obj = json.loads(text) if text.strip() else None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None
        if text.strip() and not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        if obj is not None:
            rows.append((lineno, obj))
    if not rows:
        raise DataError(f"{path}: no lines")
    return rows


def item_id(value):
    """An item id as items.jsonl spells it: a string, or an integer written as one."""
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def read_new_items(path, index):
    """NEW.jsonl -> (ids, texts), each id new to DATA and given once."""
    ids, texts = [], []
    for lineno, obj in read_jsonl(path):
        new_id, text = item_id(obj.get("item_id")), obj.get("text")
        if new_id is None or not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{lineno}: expected {{\"item_id\": str, \"text\": non-empty str}}")
        if new_id in index:
            raise DataError(f"{path}:{lineno}: item_id {new_id!r} is already an item of the run's items.jsonl")
        if new_id in ids:
            raise DataError(f"{path}:{lineno}: item_id {new_id!r} is given twice")
        ids.append(new_id)
        texts.append(text)
    return ids, texts


def encode_history(ids, index, L, where):
    """Item ids, oldest first -> (L,) item indices, the most recent L, left-padded with 0."""
    if not isinstance(ids, list) or not ids:
        raise DataError(f"{where}: expected a non-empty list of item ids")
    for value in ids:
        if item_id(value) not in index:
            raise DataError(f"{where}: unknown item id {value!r} (not in the run's items.jsonl or --new_items)")
    seq = [index[item_id(v)] for v in ids][-L:]
    return [0] * (L - len(seq)) + seq


# -----------------------------------------------------------------------------
# new items: language vectors -> the rows the item embedding stores -> appended to the model

def check_new_items(model, ckpt, path):
    """An item the model was not trained on can be scored by an item embedding built on language
    vectors (alphafuse: its language coordinates and a zero ID part; morec, whitenrec, unisrec: the
    adapter applied to its vector; idreamrec: its whitened vector; llmesr: the adapted vector and its
    PCA coordinates), never by a table with one trained row per item (id, llminit; rlmrec's is an
    nn.Embedding too)."""
    if isinstance(model.item_emb, torch.nn.Embedding):
        raise DataError(f"{path}: its item embedding '{ckpt['model_args'].get('item_emb')}' is a table with one "
                        "trained row per item, so it cannot score items it was not trained on (alphafuse, morec, "
                        "whitenrec, unisrec, llmesr and idreamrec can)")


def new_item_rows(args, model, ckpt, data_dir):
    """(d_l, f): f maps language vectors (M, d_l) to what the item embedding stores for new items:
    alphafuse's language coordinates, or the adapter inputs of morec, unisrec, llmesr and whitenrec
    (idreamrec's rows: whitenrec's inputs). Checks that the subspace or lang_emb.npy is the one the
    run was trained with."""
    emb, kind = model.item_emb, ckpt["model_args"].get("item_emb")
    if hasattr(emb, "id_emb"):  # alphafuse
        path = args.subspace or ckpt["config"].get("subspace")
        if not isinstance(path, str):
            raise DataError(f"{args.ckpt}: its config names no subspace file; give --subspace FILE")
        sub = load_subspace(path, len(emb.lang) - 1)
        scale = sub.get("settings", {}).get("scale") if isinstance(sub.get("settings"), dict) else None
        if not torch.is_tensor(sub.get("projection")) or not isinstance(scale, (int, float)):
            raise DataError(f"{path}: has no 'projection' or settings 'scale' (rerun decompose.py)")
        frozen = not isinstance(emb.lang, torch.nn.Parameter)  # with --train_lang the rows moved in training
        sha = ckpt["config"].get("lang_emb_sha256")
        if sub["d_s"] != emb.d_s or (frozen and not torch.equal(sub["lang_emb"].float(), emb.lang.cpu())) \
                or (sha and sub.get("lang_emb_sha256") != sha):
            raise DataError(f"{path}: not the subspace {args.ckpt} was trained with (give --subspace FILE)")
        mean, V = sub["mean"].numpy(), sub["projection"].numpy()
        return len(mean), lambda e: decompose.project(e, mean, V, scale)[1:]
    d_l = emb.features.shape[1]
    if kind in ("morec", "unisrec", "llmesr"):  # the vectors times the run's lang_scale, as make_item_embedding
        scale = ckpt["model_args"].get("lang_scale", 1.0)
        return d_l, lambda e: scale * e
    path = os.path.join(data_dir, "lang_emb.npy")  # whitenrec, idreamrec: the trainer's whitening, recomputed
    lang = decompose.open_lang_emb(path)
    mean, V = decompose.whitening(lang, path)
    if not torch.allclose(torch.from_numpy(decompose.project(lang, mean, V)), emb.features.cpu(), atol=1e-4):
        raise DataError(f"{path}: its whitened vectors differ from those {args.ckpt} was trained on")
    return d_l, lambda e: decompose.project(e, mean, V)[1:]


def embed_texts(args, parser, data_dir, texts, d_l):
    """The new items' texts -> (M, d_l) float32 through the endpoint and model of DATA/lang_emb.json."""
    path = os.path.join(data_dir, "lang_emb.json")
    info = common.read_json(path, "not found, so the model that embedded the items is unknown (embed.py writes it)")
    if not isinstance(info, dict) or not isinstance(info.get("model"), str):
        raise DataError(f"{path}: expected an object with the embedding model's name")
    if info.get("dimension") != d_l:
        raise DataError(f"{path}: records dimension {info.get('dimension')!r}, but {args.ckpt} has d_l = {d_l}")
    base_url = args.base_url or info.get("base_url")
    if not isinstance(base_url, str):
        raise DataError(f"{path}: records no base_url; give --base_url")
    # embed.py's settings and client: the same model, --dimensions, retries and key handling
    client = argparse.Namespace(base_url=base_url, model=info["model"], api_key_env=args.api_key_env,
                                dimensions=info.get("requested_dimensions"), encoding_format="base64",
                                batch_size=EMBED_BATCH, workers=1, timeout=60.0, max_retries=8,
                                backoff_base=1.0, backoff_max=60.0)
    endpoint = embed.Endpoint(client, embed.check_args(parser, client), None)
    notes = io.StringIO()  # which server answered: shown on stderr once it worked (a failure is one line)
    with contextlib.redirect_stdout(notes):
        endpoint.check_model()
        E = np.concatenate([endpoint.embed(texts[i:i + EMBED_BATCH]) for i in range(0, len(texts), EMBED_BATCH)])
    if E.shape[1] != d_l:
        raise DataError(f"{endpoint.name}: returned {E.shape[1]}-d vectors, but {path} records {d_l}-d "
                        f"vectors of model {info['model']}")
    print(f"{notes.getvalue()}embedded {len(texts)} new items with {info['model']} at {endpoint.name}", file=sys.stderr)
    return E


@torch.no_grad()
def add_items(model, rows):
    """Append items N+1..N+M to the item embedding: rows (M, ·) as new_item_rows makes them, and
    for alphafuse a zero ID part, for llmesr their PCA coordinates as the collaborative rows. The
    scorer then ranks all N+M items."""
    emb = model.item_emb
    if hasattr(emb, "id_emb"):
        lang = torch.cat([emb.lang, rows.to(emb.lang)])
        emb.lang = torch.nn.Parameter(lang) if isinstance(emb.lang, torch.nn.Parameter) else lang
        emb.id_emb = torch.nn.Parameter(torch.cat([emb.id_emb, emb.id_emb.new_zeros(len(rows), emb.id_emb.shape[1])]))
    else:
        emb.features = torch.cat([emb.features, rows.to(emb.features)])
    if hasattr(emb, "co_emb"):  # llmesr
        emb.co_emb = torch.nn.Parameter(torch.cat([emb.co_emb, emb.reduce(rows.to(emb.features))]))
    if hasattr(model, "all_items"):  # DreamRec scores item_emb(all_items)
        model.all_items = torch.arange(len(model.all_items) + len(rows), device=model.all_items.device)


# -----------------------------------------------------------------------------

@torch.no_grad()
def top_k(scorer, seqs, k, exclude_history=True, batch_size=1024):
    """The k best items of each history seqs (n, L): a list of (scores, item indices) per history,
    fewer than k where fewer items are left. scores = query(seq) @ table.T, as evaluate.py ranks."""
    query, table = scorer
    out = []
    for i in range(0, len(seqs), batch_size):
        s = seqs[i:i + batch_size]  # (B, L)
        scores = query(s).float() @ table.T  # (B, N+M+1)
        scores[:, 0] = float("-inf")  # the padding item
        if exclude_history:
            scores.scatter_(1, s, float("-inf"))
        values, idx = scores.topk(min(k, scores.shape[1] - 1))  # (B, k)
        out += [(v[v > float("-inf")].tolist(), j[v > float("-inf")].tolist()) for v, j in zip(values, idx)]
    return out


def run(args, parser):
    args.ckpt = args.run if os.path.isfile(args.run) else os.path.join(args.run, "ckpt.pt")
    ckpt, data_dir, meta = open_run(args.ckpt, args.device, args.data)
    items = common.read_items(data_dir)
    if len(items) != meta["num_items"] or any("item_id" not in it for it in items):
        raise DataError(f"{os.path.join(data_dir, 'items.jsonl')}: expected {meta['num_items']} lines with an item_id")
    ids, texts = [str(it["item_id"]) for it in items], [it["text"] for it in items]
    index = {i: k + 1 for k, i in enumerate(ids)}
    model = load_model(ckpt, args.device, args.ckpt)
    if args.new_items:  # every check before the endpoint is asked
        new_ids, new_texts = read_new_items(args.new_items, index)
        check_new_items(model, ckpt, args.ckpt)
        d_l, to_rows = new_item_rows(args, model, ckpt, data_dir)
        index.update((i, len(ids) + k + 1) for k, i in enumerate(new_ids))
        ids, texts = ids + new_ids, texts + new_texts
    L = meta["max_len"]
    if args.history:
        users, seqs = [None], [encode_history(args.history, index, L, "--history")]
    else:
        lines = read_jsonl(args.input)
        users = [obj.get("user") for _, obj in lines]
        seqs = [encode_history(obj.get("history"), index, L, f"{args.input}:{n}") for n, obj in lines]
    if args.out:
        common.check_output(args.out)
    if args.new_items:
        add_items(model, torch.from_numpy(to_rows(embed_texts(args, parser, data_dir, new_texts, d_l))).float())
    seqs = torch.tensor(seqs, dtype=torch.long, device=args.device)
    best = top_k(model.scorer(args.seed), seqs, args.k, not args.include_history, args.batch_size)
    if args.history and not args.out:
        for rank, (score, i) in enumerate(zip(*best[0]), 1):
            print(f"{rank}\t{ids[i - 1]}\t{score:.4f}\t{' '.join(texts[i - 1].split())}")  # one line each
        return
    lines = []
    for user, (scores, idx) in zip(users, best):
        recs = [{"rank": r, "item_id": ids[i - 1], "score": s, "text": texts[i - 1]}
                for r, (s, i) in enumerate(zip(scores, idx), 1)]
        lines.append(json.dumps({**({"user": user} if user is not None else {}), "items": recs}, ensure_ascii=False))
    if not args.out:
        print("\n".join(lines))
        return
    try:
        with common.atomic_open(args.out, "w") as f:
            f.write("".join(line + "\n" for line in lines))
    except OSError as e:
        raise DataError(f"{args.out}: cannot write ({e.strerror})") from None
    print(f"wrote {len(lines)} lists of up to {args.k} items to {args.out}", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("run", help="run folder RUN holding ckpt.pt (or a checkpoint file)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--history", nargs="+", metavar="ID", help="one history: item ids, oldest first")
    which.add_argument("--input", metavar="FILE.jsonl", help="many histories: lines {\"history\": [ids], \"user\": any}")
    p.add_argument("--out", default=None, help="write JSON lines here instead of stdout")
    p.add_argument("--k", type=int, default=10, help="items per history")
    p.add_argument("--include_history", action="store_true", help="also recommend the history's own items")
    # new items
    p.add_argument("--new_items", metavar="NEW.jsonl", default=None, help="items unseen in training, "
                   "lines {\"item_id\", \"text\"}: embedded, projected and ranked with the known items")
    p.add_argument("--base_url", default=None, help="embedding endpoint for --new_items (default: the one "
                   "DATA/lang_emb.json records)")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the endpoint's "
                   "API key (none sent if unset), as embed.py")
    p.add_argument("--subspace", default=None, help="alphafuse's subspace file (default: the one the run was trained with)")
    # the run
    p.add_argument("--data", default=None, help="dataset folder (default: the one the checkpoint was trained on)")
    p.add_argument("--seed", type=int, default=0, help="seed of DreamRec's x_T (SASRec draws nothing)")
    p.add_argument("--batch_size", type=int, default=1024, help="histories scored at once")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    args = p.parse_args(argv)
    if args.k < 1 or args.batch_size < 1:
        p.error(f"--k and --batch_size must be at least 1, got {args.k} and {args.batch_size}")
    args.device = check_device(p, args.device)
    try:
        run(args, p)
    except (DataError, embed.EndpointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        common.interrupted("nothing was written; rerun the same command")


if __name__ == "__main__":
    main()
