"""Full fine-tuning vs LoRA vs head-only on MNIST, sequential and merged, from ONE pretrained model.

Pretrains once (configs/pretrain.yaml) unless ``--pretrained`` names a checkpoint, then for
every mode runs the sequential study (configs/lora.yaml: class 3 -> 4 -> 7, 10 epochs each) and
the merged study (configs/merged_finetune.yaml: 10 epochs) with the same ``finetune`` settings
but the mode. Each final model is merged back to plain weights and turned into a task vector
against the pretrained weights, which shows that LoRA fine-tunes work with music.task_vector.
Writes ``<out>/finetuning.md`` and ``<out>/finetuning.csv``.

    python scripts/compare_finetuning.py --data-dir ../shared/data
    python scripts/compare_finetuning.py --pretrained lightning_logs/pretrain/version_0/checkpoints/phase-0-pretrain.ckpt
    python scripts/compare_finetuning.py --quick          # smoke run: 5 batches an epoch
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

from music.cli import fit_config, parse_script_args, script_parser
from music.finetuning import merged_state_dict
from music.models import SimpleNN
from music.module import Classifier
from music.task_vector import TaskVector, load_state_dict

MODES = ["full", "lora", "head-only"]
LORA = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["fc1", "fc2"]}
STUDIES = {"sequential": ("lora.yaml", "class_7", ["class_3", "class_4", "class_7"]),
           "merged": ("merged_finetune.yaml", "merged", ["merged"])}


def fit(config: str, name: str, args: argparse.Namespace, *extra: str) -> Path:
    return fit_config(config, f"finetuning/{name}", args, *extra)


def task_vector_norm(pretrained: Path, snapshot: Path) -> tuple[float, bool]:
    """Norm of (merged fine-tune - pretrained), and whether the merged keys equal the base keys."""
    model = Classifier.load_from_checkpoint(snapshot, backbone=SimpleNN(), weights_only=True)
    merged = merged_state_dict(model.backbone)
    base = load_state_dict(pretrained)
    return TaskVector.from_state_dicts(base, merged).norm(), merged.keys() == base.keys()


def run_mode(mode: str, study: str, init: Path, args: argparse.Namespace) -> dict:
    config, last, phases = STUDIES[study]
    finetune = json.dumps({"mode": mode, **LORA})
    log_dir = fit(config, f"{study}_{mode}", args, "--model.init_from", str(init), "--model.finetune", finetune)
    metrics = json.loads((log_dir / "phase_metrics.json").read_text())[last]
    costs = json.loads((log_dir / "phase_costs.json").read_text())
    snapshot = log_dir / "checkpoints" / f"phase-{len(phases) - 1}-{last}.ckpt"
    norm, same_keys = task_vector_norm(init, snapshot)
    if not same_keys:
        raise RuntimeError(f"{mode}: the merged state_dict's keys differ from the pretrained model's.")
    return {"study": study, "mode": mode, "acc": metrics["acc"], "f1": metrics["f1"],
            **{f"acc_{c}": metrics[f"recall/{c}"] for c in (3, 4, 7)},
            "trainable_params": costs[last]["trainable_params"],
            "train_seconds": sum(costs[p]["train_seconds"] for p in phases),
            "task_vector_norm": norm, "merged_keys_equal_base": same_keys, "log_dir": str(log_dir)}


def write(rows: list[dict], pretrained: dict, args: argparse.Namespace, seconds: float) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "finetuning.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Full fine-tuning vs LoRA vs head-only (SimpleNN, MNIST), as measured", "",
        f"One pretrained SimpleNN ({pretrained['source']}; test accuracy {pretrained['acc']:.2%}, macro F1 "
        f"{pretrained['f1']:.4f}) fine-tuned in each mode: sequential = class 3 -> 4 -> 7, 10 epochs each "
        "(configs/lora.yaml), merged = all 3,000 held-out samples, 10 epochs (configs/merged_finetune.yaml); "
        f"Adam lr 1e-3, batch 32, seed 0. LoRA: rank {LORA['rank']}, alpha {LORA['alpha']:g} on "
        f"{'/'.join(LORA['target_modules'])}, head fc3 trained fully; head-only trains fc3 alone. Test set: all "
        "10,000 MNIST test images after the last phase; 'acc c' is the accuracy on class c. Train time is "
        "the wall time of the training epochs (evaluation and checkpointing excluded) with "
        f"{os.cpu_count()} CPU cores, so it is indicative only. ||tau||: norm of the task vector merged fine-tune minus "
        f"pretrained (the merged keys equal the base keys in every mode). Torch threads: {args.threads}. "
        f"Extra arguments: {args.extra or 'none'}. Total wall time {seconds:.0f} s.", "",
        "| study | mode | accuracy | macro F1 | acc 3 | acc 4 | acc 7 | trainable params | train time (s) | ‖τ‖ |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['study']} | {r['mode']} | {r['acc']:.2%} | {r['f1']:.4f} | {r['acc_3']:.2%} | "
                     f"{r['acc_4']:.2%} | {r['acc_7']:.2%} | {r['trainable_params']:,} | {r['train_seconds']:.1f} | "
                     f"{r['task_vector_norm']:.3f} |")
    (out / "finetuning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--pretrained", type=Path, help="a pretrain phase snapshot to start from (skips pretraining)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    return parse_script_args(parser, argv)


def run(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    start = time.perf_counter()
    if args.pretrained is None:
        log_dir = fit("pretrain.yaml", "pretrain", args)
        args.pretrained = log_dir / "checkpoints" / "phase-0-pretrain.ckpt"
    metrics_file = args.pretrained.parent.parent / "phase_metrics.json"
    pretrained = json.loads(metrics_file.read_text())["pretrain"] | {"source": str(args.pretrained)}
    rows = [run_mode(mode, study, args.pretrained, args) for study in STUDIES for mode in args.modes]
    write(rows, pretrained, args, time.perf_counter() - start)
    return rows


if __name__ == "__main__":
    run()
