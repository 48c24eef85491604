"""What makes --item_emb rlmrec RLMRec (embeddings.RLMRecEmbedding): the language vectors are a
frozen buffer, out of the checkpoint, while the ID table and the MLP sigma train; L_info is the
InfoNCE of the paper's density ratio over the step's distinct warm items, for con and for gen;
aligned ID vectors give a lower L_info than random ones; with --align_weight 0 both trainers run
exactly as --item_emb id; both trainers train it, evaluate.py reproduces its test metrics,
recommend.py refuses --new_items for it (one trained row per item), and --resume continues exactly.

    cd /work/main && python -m pytest -q tests/test_rlmrec.py
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import evaluate
import train_diffusion
import train_discriminative
from conftest import assert_clean_error, prepare_toy, read_json, read_log, run_main
from training import with_alignment

torch.set_num_threads(1)

SASREC = ["--hidden_dim", "16", "--neg_ratio", "8", "--batch_size", "64", "--device", "cpu", "--threads", "1"]
DREAMREC = ["--hidden_dim", "16", "--batch_size", "64", "--timesteps", "50", "--sample_steps", "5", "--lr", "1e-3",
            "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """prepare_toy's DATA (60 users, 40 items) with lang_emb.npy (N, 24)."""
    out, rng = prepare_toy(tmp_path_factory.mktemp("rlmrec"), lang_dim=24)
    return out


def sasrec(align="con", cold=(), N=40, d_l=24, d=16, tau=0.2):
    """SASRec with RLMRec's item embedding over random language vectors (N+1, d_l), row 0 padding."""
    torch.manual_seed(0)
    lang = torch.randn(N + 1, d_l)
    lang[0] = 0
    args = dict(item_emb="rlmrec", num_items=N, d=d, max_len=6, num_blocks=1, num_heads=2, dropout=0.1,
                score="cosine", eval_score="cosine", temperature=0.07, d_in=d_l, align=align, align_temperature=tau)
    return train_discriminative.build_model(args, lang, cold)


# -----------------------------------------------------------------------------
# the module


@pytest.mark.parametrize("align", ["con", "gen"])
def test_language_vectors_stay_frozen_while_the_table_and_the_mlp_train(align):
    """One Adam step on the SASRec loss plus L_info (with_alignment, weight 1): s_i is a buffer, not a
    parameter nor in the state_dict (the checkpoint), and unchanged; every tensor of sigma and every
    row of the step's items moved; the padding row and the cold rows stay zero."""
    cold = [7, 30]
    model = sasrec(align, cold).train()
    emb = model.item_emb
    assert "lang" not in dict(emb.named_parameters()) and "lang" not in emb.state_dict() and not emb.lang.requires_grad
    lang, table, mlp = emb.lang.clone(), emb.weight.detach().clone(), [p.detach().clone() for p in emb.mlp.parameters()]
    g = torch.Generator().manual_seed(1)
    warm = torch.tensor([i for i in range(1, 41) if i not in cold])
    seq, target = warm[torch.randint(0, 38, (32, 6), generator=g)], warm[torch.randint(0, 38, (32,), generator=g)]
    seq[:, :2] = 0  # left padding
    loss_fn = with_alignment(lambda s, t: model.loss(s, t, "infonce", 8, g), emb, 1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn(seq, target).backward()
    opt.step()
    assert torch.equal(emb.lang, lang)
    assert all(not torch.equal(p, q) for p, q in zip(emb.mlp.parameters(), mlp)), "a tensor of sigma did not train"
    seen = torch.cat([seq.flatten(), target]).unique()[1:]
    assert (emb.weight[seen] != table[seen]).any(1).all(), "a row of the step's items did not train"
    assert not emb.weight[[0, *cold]].any()


def info_nce_by_hand(emb, items):
    """-mean_i log f(s_i, e_i) / sum_j f(s_j, e_i) over the distinct warm items, pair by pair, with
    f = exp(cos(sigma_down(s_j), e_i) / tau) (con) or exp(cos(s_j, sigma_up(e_i)) / tau) (gen)."""
    warm = sorted(i for i in set(items) if i != 0 and emb.warm[i])
    s, e, tau = emb.lang, emb.weight, emb.temperature

    def f(j, i):
        if emb.align == "con":
            return torch.exp(F.cosine_similarity(emb.mlp(s[j]), e[i], dim=0) / tau)
        return torch.exp(F.cosine_similarity(s[j], emb.mlp(e[i]), dim=0) / tau)

    return -sum(torch.log(f(i, i) / sum(f(j, i) for j in warm)) for i in warm) / len(warm)


@pytest.mark.parametrize("align", ["con", "gen"])
def test_aux_loss_is_the_infonce_of_the_density_ratio(align):
    """L_info of a batch in which an item comes twice, padding and a cold item appear, equals the
    InfoNCE written out pair by pair over the distinct warm items only (rows: e_i's side, the
    candidates: every s_j's side)."""
    emb = sasrec(align, cold=[4], N=8, d_l=5, d=3, tau=0.5).item_emb
    items = [[3, 1, 3, 0], [0, 6, 4, 8], [2, 2, 7, 1]]
    torch.testing.assert_close(emb.aux_loss(torch.tensor(items)), info_nce_by_hand(emb, sum(items, [])))


@pytest.mark.parametrize("align", ["con", "gen"])
def test_aux_loss_is_lower_for_aligned_than_for_random_id_vectors(align):
    """con: e_i = sigma_down(s_i); gen: s_i = sigma_up(e_i) (the language vectors made to fit): L_info
    is far below its value for random ID vectors."""
    emb = sasrec(align).item_emb
    items = torch.arange(41)
    with torch.no_grad():
        if align == "con":
            emb.weight.copy_(emb.mlp(emb.lang))
        else:
            emb.lang.copy_(emb.mlp(emb.weight))
        aligned = emb.aux_loss(items).item()
        emb.weight.normal_()
        shuffled = emb.aux_loss(items).item()
    assert aligned < shuffled - 1.0, (aligned, shuffled)


# -----------------------------------------------------------------------------
# both trainers


@pytest.mark.parametrize("trainer", ["sasrec", "dreamrec"])
def test_weight_zero_trains_exactly_as_id(data, tmp_path, trainer):
    """--align_weight 0: the same losses, validation and test metrics, ID table and encoder, bit for bit,
    as --item_emb id with the same seed: the MLP draws its init from a copy of the global generator,
    and 0 * L_info adds nothing to any gradient."""
    main, flags = (train_discriminative.main, SASREC) if trainer == "sasrec" else (train_diffusion.main, DREAMREC)
    runs = {}
    for item_emb in ("id", "rlmrec"):
        runs[item_emb] = str(tmp_path / item_emb)
        main([data, "--out", runs[item_emb], "--item_emb", item_emb, "--align_weight", "0", "--epochs", "2", *flags])
    a, b = read_log(runs["id"]), read_log(runs["rlmrec"])
    assert [(x["loss"], x["valid"]) for x in a] == [(x["loss"], x["valid"]) for x in b]
    assert read_json(os.path.join(runs["id"], "metrics.json")) == read_json(os.path.join(runs["rlmrec"], "metrics.json"))
    ck_id, ck = (torch.load(os.path.join(runs[k], "last.pt"), weights_only=True)["model"] for k in ("id", "rlmrec"))
    assert {k: v for k, v in ck.items() if ".mlp." not in k}.keys() == ck_id.keys()
    assert all(torch.equal(ck_id[k], ck[k]) for k in ck_id)


@pytest.mark.parametrize("trainer,align", [("sasrec", "con"), ("dreamrec", "gen")])
def test_smoke_evaluate_and_no_new_items(data, tmp_path, trainer, align):
    """One epoch writes every file with a finite loss; model_args name the variant, d_l and the
    resolved default tau; the checkpoint holds the table and sigma, not the language vectors;
    evaluate.py reproduces metrics.json; recommend.py --new_items is refused in one line."""
    run = str(tmp_path / "run")
    main, flags = (train_discriminative.main, SASREC) if trainer == "sasrec" else (train_diffusion.main, DREAMREC)
    main([data, "--out", run, "--item_emb", "rlmrec", "--align", align, "--epochs", "1", *flags])
    for name in ("ckpt.pt", "last.pt", "log.jsonl", "metrics.json"):
        assert os.path.isfile(os.path.join(run, name)), f"{name} missing"
    assert np.isfinite(read_log(run)[0]["loss"])
    ck = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    args = ck["model_args"]
    assert (args["item_emb"], args["align"], args["d_in"], args["d"]) == ("rlmrec", align, 24, 16)
    assert args["align_temperature"] == {"con": 0.2, "gen": 0.5}[align]
    assert ck["config"]["align_weight"] == {"con": 0.01, "gen": 0.1}[align]
    assert "item_emb.weight" in ck["model"] and "item_emb.mlp.0.weight" in ck["model"]
    assert not any(k.endswith(".lang") for k in ck["model"])
    out = str(tmp_path / "again.json")
    evaluate.main([os.path.join(run, "ckpt.pt"), "--out", out, "--device", "cpu"])
    assert read_json(out) == read_json(os.path.join(run, "metrics.json"))
    new = tmp_path / "new.jsonl"
    new.write_text('{"item_id": "n1", "text": "a new thing"}\n')
    first = common.read_items(data)[0]["item_id"]
    proc = run_main("recommend.py", run, "--history", str(first), "--new_items", str(new), "--device", "cpu")
    assert "'rlmrec' is a table with one trained row per item" in assert_clean_error(proc, "ckpt.pt")


def test_resume_continues_exactly(data, tmp_path):
    """The language vectors are not in last.pt: --resume reads lang_emb.npy again, and 1 epoch then
    --resume to 2 logs the same losses and metrics as a straight 2-epoch run (RLMRec-Gen, SASRec)."""
    flags = ["--item_emb", "rlmrec", "--align", "gen", *SASREC]
    resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")
    train_discriminative.main([data, "--out", resumed, "--epochs", "1", *flags])
    train_discriminative.main([data, "--out", resumed, "--epochs", "2", "--resume", *flags])
    train_discriminative.main([data, "--out", straight, "--epochs", "2", *flags])
    assert [(x["loss"], x["valid"]) for x in read_log(resumed)] == [(x["loss"], x["valid"]) for x in read_log(straight)]
    assert read_json(os.path.join(resumed, "metrics.json")) == read_json(os.path.join(straight, "metrics.json"))
