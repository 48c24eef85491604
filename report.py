"""
Collect the runs of reproduce.sh into the README's results tables and validation-curve plots.

    python report.py runs/repro --out docs/results.md --plots docs

Reads  RUNS/<dataset>/<method>_s<seed>/metrics.json and log.jsonl (train_discriminative.py,
       train_diffusion.py) and RUNS/<dataset>/popularity/metrics.json (evaluate.py --popularity).
Writes --out: per dataset one Markdown table of the test split (full ranking): mean and sample
       standard deviation over the seeds of HR@10/20 and NDCG@10/20; NDCG@20 history-masked
       (RUN/metrics_masked.json) and ranked by the raw dot product (RUN/metrics_dot.json, SASRec),
       where every seed has that file; NDCG@20 on head and tail items (the 20% most popular in
       training, the rest) and users (the 20% with the longest histories, the rest); the best
       epoch (validation NDCG@20) and the epochs and training minutes per run. A method with a
       seed whose best epoch is its last epoch has not converged: its row goes to a second table,
       never the first. Then, where there are ablation runs, their tables beside AlphaFuse's, and
       likewise the runs of AlphaFuse with one setting of the official code (official_*), and
       the language baselines beside their runs on the unscaled vectors (raw_*, --lang_scale 1). A
       run without metrics.json yet (unfinished) is left out.
       --plots: curves_<dataset>.png, validation NDCG@20 over epochs per method, the mean over
       the seeds with a band of one standard deviation up to the shortest seed's last epoch,
       then each longer seed as a thin line (needs matplotlib).
Prints the tables.
"""

import argparse
import json
import os
import re
import sys

import numpy as np

import common
from common import DataError

LABELS = {"popularity": "Popularity", "sasrec_id": "SASRec (ID)", "sasrec_llminit": "LLMInit",
          "sasrec_morec": "MoRec", "sasrec_whitenrec": "WhitenRec", "sasrec_unisrec": "UniSRec",
          "sasrec_rlmrec": "RLMRec", "sasrec_llmesr": "LLM-ESR", "sasrec_alphafuse": "AlphaFuse (SASRec)",
          "dreamrec_id": "DreamRec (ID)", "dreamrec_llminit": "LLMInit (DreamRec)", "dreamrec_morec": "MoRec (DreamRec)",
          "dreamrec_whitenrec": "WhitenRec (DreamRec)", "dreamrec_unisrec": "UniSRec (DreamRec)",
          "dreamrec_rlmrec": "RLMRec (DreamRec)", "dreamrec_llmesr": "LLM-ESR (DreamRec)", "dreamrec_idreamrec": "iDreamRec",
          "dreamrec_alphafuse": "AlphaFuse (DreamRec)",
          "ablation_nostand": "w/o Stand", "ablation_noclip": "w/o Clip (d = d_l)", "ablation_nofrozen": "w/o Frozen",
          "official_fileorder": "official batch order", "official_redraw": "official negatives",
          "official_dreamrec_zero": "official zero directions (DreamRec)",
          "raw_morec": "MoRec, unscaled", "raw_unisrec": "UniSRec, unscaled", "raw_rlmrec": "RLMRec, unscaled",
          "raw_llmesr": "LLM-ESR, unscaled"}
MAIN = [m for m in LABELS if not m.startswith(("ablation", "official", "raw"))]
ABLATIONS = ["sasrec_alphafuse", "ablation_nostand", "ablation_noclip", "ablation_nofrozen"]
OFFICIAL = ["sasrec_alphafuse", "official_fileorder", "official_redraw"]  # one official-code setting each
OFFICIAL_DREAMREC = ["dreamrec_alphafuse", "official_dreamrec_zero"]
UNSCALED = [m for e in ("morec", "unisrec", "rlmrec", "llmesr") for m in (f"sasrec_{e}", f"raw_{e}")]  # --lang_scale 40 vs 1
METRICS = [("all", "HR@10"), ("all", "HR@20"), ("all", "NDCG@10"), ("all", "NDCG@20"), ("masked", "NDCG@20"),
           ("dot", "NDCG@20"), ("head_item", "NDCG@20"), ("tail_item", "NDCG@20"), ("head_user", "NDCG@20"),
           ("tail_user", "NDCG@20")]
HEADER = ["HR@10", "HR@20", "NDCG@10", "NDCG@20", "NDCG@20 masked", "NDCG@20 dot", "head items", "tail items",
          "head users", "tail users"]
PREAMBLE = """Written by report.py from each finished run's metrics*.json and log.jsonl (reproduce.sh).
Test split, ranked against all items; mean ± sample standard deviation over the training seeds
(a bare value: one seed). NDCG@20 masked: never recommending the history's items; dot: SASRec
ranked by the raw dot product (the official code's score) instead of the cosine it trained with;
head/tail items and users: NDCG@20 of the samples whose target is among the 20% most popular
items in training or not, whose user among the 20% with the longest histories or not. Best epoch
and epochs: each seed's (validation NDCG@20, early stopping).
"""
OTHER_PROTOCOLS = {"masked": "metrics_masked.json", "dot": "metrics_dot.json"}  # group: file beside metrics.json


def read_log(path):
    """log.jsonl -> list of records; [] when the run has no log (popularity)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        try:
            log = [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not one JSON record per line ({e})")
    if not all(isinstance(r, dict) and isinstance(r.get("epoch"), int) and isinstance(r.get("seconds"), (int, float))
               for r in log):
        raise DataError(f"{path}: a line lacks the epoch or the seconds of a trainer's log")
    return log


def read_test(path):
    """metrics.json (evaluate.py) -> its test split {group: {metric: value}}."""
    metrics = common.read_json(path)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("test"), dict):
        raise DataError(f"{path}: not a metrics.json of the test split (no 'test' object)")
    every = metrics["test"].get("all")
    if not isinstance(every, dict) or not all(isinstance(every.get(k), (int, float)) for g, k in METRICS if g == "all"):
        raise DataError(f"{path}: its test split lacks the numbers of the table ({', '.join(HEADER[:4])} of 'all')")
    return metrics["test"]


def collect(dataset_dir):
    """{method: [run, ...]} with run = {metrics (test, by group; masked and dot where evaluated), log};
    finished runs only."""
    methods = {}
    for name in sorted(os.listdir(dataset_dir)):
        run_dir = os.path.join(dataset_dir, name)
        path = os.path.join(run_dir, "metrics.json")
        m = re.fullmatch(r"(.+)_s\d+", name)  # METHOD_sSEED
        if not os.path.isfile(path) or not (m or name == "popularity"):
            continue
        metrics = read_test(path)
        for group, file in OTHER_PROTOCOLS.items():
            if os.path.isfile(os.path.join(run_dir, file)):
                metrics[group] = read_test(os.path.join(run_dir, file))["all"]
        methods.setdefault(m.group(1) if m else name, []).append(
            {"metrics": metrics, "log": read_log(os.path.join(run_dir, "log.jsonl"))})
    return methods


def best_epoch(log):
    """The epoch of the best validation NDCG@20 (the first, as the trainers keep it)."""
    scores = [rec.get("valid", {}).get("NDCG@20", -1) for rec in log]
    return log[int(np.argmax(scores))]["epoch"]


def converged(runs):
    """Every seed stopped after its best epoch (a best epoch equal to the last may still improve)."""
    return all(best_epoch(r["log"]) < r["log"][-1]["epoch"] for r in runs if r["log"])


def mean_std(values):
    """'0.0548 ± 0.0012' over the seeds (sample std), a bare value for one seed, '-' for none
    (None is an empty group, such as no test target among the tail items)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return "-"
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v[0]:.4f}"


def table(methods, order):
    """One Markdown table, a row per method of `order` that has runs; a cell is '-' unless every
    seed has its group (a protocol not evaluated, or a method without logs)."""
    lines = ["| method | seeds | " + " | ".join(HEADER) + " | best epoch | epochs | train min/run |",
             "|---" * (len(HEADER) + 5) + "|"]
    for method in [m for m in order if m in methods]:
        runs = methods[method]
        cells = [mean_std([r["metrics"][g][k] for r in runs]) if all(g in r["metrics"] for r in runs) else "-"
                 for g, k in METRICS]
        logs = [r["log"] for r in runs if r["log"]]
        if logs:
            cells += [", ".join(str(best_epoch(log)) for log in logs), ", ".join(str(log[-1]["epoch"]) for log in logs),
                      f"{np.mean([sum(rec['seconds'] for rec in log) for log in logs]) / 60:.1f}"]
        else:
            cells += ["-", "-", "-"]
        lines.append(f"| {LABELS.get(method, method)} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables(title, methods, order):
    """The table of the converged methods of `order`, then the one of those that have not converged."""
    order = [m for m in order if m in methods]
    done = [m for m in order if converged(methods[m])]
    parts = [f"### {title}\n\n{table(methods, done)}\n"] if done else []
    if len(done) < len(order):
        parts.append(f"### {title}, not converged (a seed's best epoch is its last epoch)\n\n"
                     f"{table(methods, [m for m in order if m not in done])}\n")
    return parts


def plot_curves(path, methods, title):
    """Validation NDCG@20 over epochs, one line per method: the mean over the seeds, with a band of
    one standard deviation, while every seed runs; past the shortest run, each longer seed alone
    (thin), so that the mean never jumps where a seed stopped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    for method in [m for m in LABELS if m in methods] + [m for m in methods if m not in LABELS]:
        curves = [{rec["epoch"]: rec["valid"]["NDCG@20"] for rec in r["log"] if "valid" in rec} for r in methods[method]]
        epochs = sorted(set.intersection(*map(set, curves)))  # validated in every seed
        if not epochs:
            continue
        values = np.array([[c[e] for c in curves] for e in epochs])  # (epochs, seeds)
        mean, std = values.mean(1), values.std(1)
        line, = ax.plot(epochs, mean, marker="o" if len(epochs) <= 30 else None, ms=3, lw=1.5,
                        label=LABELS.get(method, method), ls="--" if method.startswith(("ablation", "official", "raw")) else "-")
        ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
        for c in curves:
            later = [e for e in sorted(c) if e >= epochs[-1]]
            if len(later) > 1:
                ax.plot(later, [c[e] for e in later], color=line.get_color(), lw=0.7, alpha=0.7, ls=line.get_linestyle())
    ax.set(xlabel="epoch", ylabel="validation NDCG@20", title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with common.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def run(args):
    if not os.path.isdir(args.runs):
        raise DataError(f"{args.runs}: no such folder of runs")
    for folder in (args.plots, os.path.dirname(args.out or "")):  # made here, as the trainers make RUN
        try:
            os.makedirs(folder or ".", exist_ok=True)
        except OSError as e:
            raise DataError(f"{folder}: cannot create the folder ({e.strerror})") from None
    parts = []
    for dataset in sorted(os.listdir(args.runs)):
        dataset_dir = os.path.join(args.runs, dataset)
        methods = collect(dataset_dir) if os.path.isdir(dataset_dir) else {}
        if not methods:
            continue
        parts += tables(dataset, methods, MAIN + sorted(set(methods) - set(LABELS)))
        if any(m.startswith("ablation") for m in methods):
            parts += tables(f"{dataset}, ablations of AlphaFuse (SASRec)", methods, ABLATIONS)
        if any(m in OFFICIAL[1:] for m in methods):
            parts += tables(f"{dataset}, AlphaFuse (SASRec) with one setting of the official code", methods, OFFICIAL)
        if any(m in OFFICIAL_DREAMREC[1:] for m in methods):
            parts += tables(f"{dataset}, AlphaFuse (DreamRec) with one setting of the official code", methods,
                            OFFICIAL_DREAMREC)
        if any(m.startswith("raw_") for m in methods):
            parts += tables(f"{dataset}, the language baselines with the official x40 and on the unscaled vectors "
                            "(--lang_scale 1)", methods, UNSCALED)
        if args.plots and any(r["log"] for runs in methods.values() for r in runs):  # not popularity alone
            plot_curves(os.path.join(args.plots, f"curves_{dataset}.png"), methods, f"{dataset}: validation NDCG@20")
    if not parts:
        raise DataError(f"{args.runs}: no finished runs (DATASET/METHOD_sSEED/metrics.json)")
    text = "\n".join([PREAMBLE] + parts)
    if args.out:
        with common.atomic_open(args.out, "w") as f:
            f.write(text)
    print(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("runs", help="folder RUNS of reproduce.sh (RUNS/DATASET/METHOD_sSEED)")
    p.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    p.add_argument("--plots", default=None, help="folder for curves_DATASET.png (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        run(args)
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        common.interrupted()


if __name__ == "__main__":
    main()
