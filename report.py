"""
Collect the runs of reproduce.sh into the README's results tables and validation-curve plots.

    python report.py runs/repro --out docs/results.md --plots docs

Reads  RUNS/<dataset>/<method>_s<seed>/metrics.json and log.jsonl (train_discriminative.py,
       train_diffusion.py) and RUNS/<dataset>/popularity/metrics.json (evaluate.py --popularity).
Writes --out: per dataset one Markdown table of the test split (full ranking): mean and sample
       standard deviation over the seeds of HR@10/20 and NDCG@10/20, NDCG@20 on head and tail
       items (the 20% most popular in training, the rest), the best epoch (validation NDCG@20)
       and the epochs and training minutes per run; then, where there are ablation runs, their
       table beside AlphaFuse's. A run without metrics.json yet (unfinished) is left out.
       --plots: curves_<dataset>.png, validation NDCG@20 over epochs per method, the mean over
       the seeds with a band of one standard deviation (needs matplotlib).
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
          "sasrec_morec": "MoRec", "sasrec_whitenrec": "WhitenRec", "sasrec_alphafuse": "AlphaFuse (SASRec)",
          "dreamrec_id": "DreamRec (ID)", "dreamrec_alphafuse": "AlphaFuse (DreamRec)",
          "ablation_nostand": "w/o Stand", "ablation_noclip": "w/o Clip (d = d_l)", "ablation_nofrozen": "w/o Frozen"}
MAIN = [m for m in LABELS if not m.startswith("ablation")]
ABLATIONS = ["sasrec_alphafuse", "ablation_nostand", "ablation_noclip", "ablation_nofrozen"]
METRICS = [("all", "HR@10"), ("all", "HR@20"), ("all", "NDCG@10"), ("all", "NDCG@20"),
           ("head_item", "NDCG@20"), ("tail_item", "NDCG@20")]
HEADER = ["HR@10", "HR@20", "NDCG@10", "NDCG@20", "NDCG@20 head", "NDCG@20 tail"]


def read_log(path):
    """log.jsonl -> list of records; [] when the run has no log (popularity)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        try:
            return [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not one JSON record per line ({e})")


def collect(dataset_dir):
    """{method: [run, ...]} with run = {metrics (test, by group), log}; finished runs only."""
    methods = {}
    for name in sorted(os.listdir(dataset_dir)):
        run_dir = os.path.join(dataset_dir, name)
        path = os.path.join(run_dir, "metrics.json")
        m = re.fullmatch(r"(.+)_s\d+", name)  # METHOD_sSEED
        if not os.path.isfile(path) or not (m or name == "popularity"):
            continue
        with open(path) as f:
            try:
                metrics = json.load(f)["test"]
            except (json.JSONDecodeError, KeyError) as e:
                raise DataError(f"{path}: not a metrics.json of the test split ({e})")
        methods.setdefault(m.group(1) if m else name, []).append(
            {"metrics": metrics, "log": read_log(os.path.join(run_dir, "log.jsonl"))})
    return methods


def mean_std(values):
    """'0.0548 ± 0.0012' over the seeds (sample std), a bare value for one seed, '-' for none
    (None is an empty group, such as no test target among the tail items)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return "-"
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v[0]:.4f}"


def table(methods, order):
    """One Markdown table, a row per method of `order` that has runs."""
    lines = ["| method | seeds | " + " | ".join(HEADER) + " | best epoch | epochs | train min/run |",
             "|---" * (len(HEADER) + 5) + "|"]
    for method in [m for m in order if m in methods]:
        runs = methods[method]
        cells = [mean_std([r["metrics"][g][k] for r in runs]) for g, k in METRICS]
        logs = [r["log"] for r in runs if r["log"]]
        if logs:
            best = [1 + int(np.argmax([rec.get("valid", {}).get("NDCG@20", -1) for rec in log])) for log in logs]
            cells += [", ".join(map(str, best)), ", ".join(str(len(log)) for log in logs),
                      f"{np.mean([sum(rec['seconds'] for rec in log) for log in logs]) / 60:.1f}"]
        else:
            cells += ["-", "-", "-"]
        lines.append(f"| {LABELS.get(method, method)} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(path, methods, title):
    """Validation NDCG@20 over epochs, one line per method: mean over seeds, band of one std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    for method in [m for m in LABELS if m in methods] + [m for m in methods if m not in LABELS]:
        curves = [{rec["epoch"]: rec["valid"]["NDCG@20"] for rec in r["log"] if "valid" in rec} for r in methods[method]]
        epochs = sorted(set().union(*curves))
        if not epochs:
            continue
        values = [[c[e] for c in curves if e in c] for e in epochs]
        mean, std = np.array([np.mean(v) for v in values]), np.array([np.std(v) for v in values])
        line, = ax.plot(epochs, mean, marker="o", ms=3, lw=1.5, label=LABELS.get(method, method),
                        ls="--" if method.startswith("ablation") else "-")
        ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
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
    parts = []
    for dataset in sorted(os.listdir(args.runs)):
        dataset_dir = os.path.join(args.runs, dataset)
        methods = collect(dataset_dir) if os.path.isdir(dataset_dir) else {}
        if not methods:
            continue
        parts.append(f"### {dataset}\n\n{table(methods, MAIN + sorted(set(methods) - set(LABELS)))}\n")
        if any(m.startswith("ablation") for m in methods):
            parts.append(f"### {dataset}, ablations of AlphaFuse (SASRec)\n\n{table(methods, ABLATIONS)}\n")
        if args.plots and any(r["log"] for runs in methods.values() for r in runs):  # not popularity alone
            plot_curves(os.path.join(args.plots, f"curves_{dataset}.png"), methods, f"{dataset}: validation NDCG@20")
    if not parts:
        raise DataError(f"{args.runs}: no finished runs (DATASET/METHOD_sSEED/metrics.json)")
    text = "\n".join(parts)
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
