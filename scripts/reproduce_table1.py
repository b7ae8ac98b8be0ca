"""Reproduce the protocol of the paper's Table I and write what was measured.

For each seed: pretrain once (configs/pretrain.yaml), then fine-tune that same checkpoint
sequentially (configs/seq_finetune.yaml) and merged (configs/merged_finetune.yaml); every
stage is evaluated on the full test set by the phase callback. Writes ``<out>/table1.md`` and
``<out>/table1.csv``. The paper's numbers appear only in a labelled reference column.

    python scripts/reproduce_table1.py --data-dir ../shared/data --seeds 0 1 2
    python scripts/reproduce_table1.py --quick            # smoke run: 5 batches an epoch
    python scripts/reproduce_table1.py -- --trainer.accelerator cpu   # extra CLI arguments
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

from music.cli import fit_config, parse_script_args, script_parser

PAPER = {"pretrained": (0.92, 0.38), "merged": (0.70, 2.1), "sequential (after 7)": (0.88, 0.60)}
COLUMNS = ["loss", "acc", "precision", "recall", "f1", "recall/3", "recall/4", "recall/7"]


def run_config(config: str, name: str, seed: int, args: argparse.Namespace, *extra: str) -> dict:
    log_dir = fit_config(config, f"table1/seed_{seed}/{name}", args, "--seed_everything", str(seed), *extra)
    return {"log_dir": log_dir, "phases": json.loads((log_dir / "phase_metrics.json").read_text())}


def one_seed(seed: int, args: argparse.Namespace) -> dict[str, dict]:
    start = time.perf_counter()
    pretrain = run_config("pretrain.yaml", "pretrain", seed, args)
    init = ["--model.init_from", str(pretrain["log_dir"] / "checkpoints" / "phase-0-pretrain.ckpt")]
    seq = run_config("seq_finetune.yaml", "seq", seed, args, *init)
    merged = run_config("merged_finetune.yaml", "merged", seed, args, *init)
    print(f"seed {seed}: {time.perf_counter() - start:.0f} s")
    rows = {"pretrained": pretrain["phases"]["pretrain"], "merged": merged["phases"]["merged"]}
    for name in ("class_3", "class_4", "class_7"):
        rows[f"sequential (after {name[-1]})"] = seq["phases"][name]
    return rows


def summarise(per_seed: list[dict[str, dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    table = {}
    for stage in per_seed[0]:
        table[stage] = {}
        for column in COLUMNS:
            values = [rows[stage][column] for rows in per_seed]
            table[stage][column] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return table


def write(table: dict, seeds: list[int], args: argparse.Namespace, seconds: float) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "table1.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["stage", *(f"{c}_{s}" for c in COLUMNS for s in ("mean", "std")), "paper_acc", "paper_loss"])
        for stage, values in table.items():
            paper = PAPER.get(stage, ("", ""))
            writer.writerow([stage, *(f"{v:.4f}" for c in COLUMNS for v in values[c]), *paper])
    fmt = (lambda m, s: f"{m:.3f} ± {s:.3f}") if len(seeds) > 1 else (lambda m, s: f"{m:.3f}")
    header = ["stage", "test loss", "accuracy", "precision", "recall", "F1", "acc 3", "acc 4", "acc 7",
              "paper acc / loss (reference)"]
    lines = [
        "# Table I, as measured",
        "",
        f"Seeds: {seeds} (mean ± std over seeds where more than one). Test set: the full 10,000-image MNIST "
        "test set. Precision, recall and F1 are macro averages; 'acc c' is the accuracy (recall) on class c. "
        "Settings: configs/pretrain.yaml (50 epochs on `remaining`), then configs/seq_finetune.yaml "
        "(class 3, 4, 7, 10 epochs each) and configs/merged_finetune.yaml (10 epochs) from the same "
        f"pretrained checkpoint; Adam, lr 1e-3, batch 32, split_seed 0. Torch threads: {args.threads}. "
        f"Extra arguments: {args.extra or 'none'}. Wall time: {seconds:.0f} s.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for stage, values in table.items():
        paper = PAPER.get(stage)
        cells = [fmt(*values[c]) for c in COLUMNS]
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {f'{paper[0]:.2f} / {paper[1]:.2f}' if paper else ''} |")
    (out / "table1.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    return parse_script_args(parser, argv)


def run(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    start = time.perf_counter()
    table = summarise([one_seed(seed, args) for seed in args.seeds])
    write(table, args.seeds, args, time.perf_counter() - start)
    return table


if __name__ == "__main__":
    run()
