"""ViT end to end: pretrain a small-input ViT-Tiny, fine-tune it in full and LoRA mode, and draw
the last block's CLS attention of pretrained, full and LoRA side by side.

MNIST by default (configs/vit_mnist.yaml: from scratch, CPU-sized). Steps:
1. pretrain with the config (its phases, on ``remaining``), unless ``--pretrained`` is given;
2. fine-tune that checkpoint on ``merged`` (the held-out 3/4/7 samples) for ``--epochs``, once
   per mode (``full``, ``lora``), from the same config with only the phases and mode changed
   (with ``--no-pretrain``: the config's own phases, from the config's pretrained backbone);
3. load each final snapshot, merge LoRA into plain weights, and write
   ``<out>/attention_<name>.png`` and a TensorBoard figure (``attention/last_block``) next to
   the fine-tuning logs. ``<out>/vit_<name>.md`` gets the test metrics and parameter counts.

    python scripts/attention_maps.py --data-dir ../shared/data
    python scripts/attention_maps.py --data-dir ../shared/data --quick   # smoke run: 2 batches an epoch
    python scripts/attention_maps.py --config configs/vit_full.yaml --data-dir /data/imagewoof2 \\
        --no-pretrain   # ImageWoof (GPU): timm's pretrained weights, the config's 5 epochs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
import yaml

from music.attention import attention_figure, cls_attention
from music.cli import main
from music.finetuning import ParameterReport, merged_state_dict
from music.module import Classifier

REPO = Path(__file__).resolve().parents[1]
LORA = {"mode": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["qkv", "fc1"],
        "extra_trainable": ["LayerNorm"]}


def fit(config: dict, name: str, args: argparse.Namespace, *extra: str) -> Path:
    path = Path(args.log_dir) / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path), "--data.data_dir", args.data_dir,
                "--trainer.logger.init_args.save_dir", args.log_dir, "--trainer.logger.init_args.name", name,
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra])
    return Path(cli.trainer.log_dir)


def load(snapshot: Path, config: dict) -> torch.nn.Module:
    """The snapshot's backbone as a plain TimmViT (LoRA merged), attention materialised."""
    import warnings

    from music.vit import TimmViT

    init = config["model"]["backbone"].get("init_args", {}) | {"fused_attention": False, "pretrained": False,
                                                               "weights_path": None}
    with warnings.catch_warnings():  # "random weights": they are replaced from the snapshot
        warnings.simplefilter("ignore")
        model = Classifier.load_from_checkpoint(snapshot, backbone=TimmViT(**init), weights_only=True)
        plain = TimmViT(**init)
    plain.load_state_dict(merged_state_dict(model.backbone))
    return plain.eval()


def main_(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "vit_mnist.yaml"))
    parser.add_argument("--data-dir", default="data", help="MNIST root (torchvision layout); downloaded there if missing")
    parser.add_argument("--log-dir", default="lightning_logs/vit")
    parser.add_argument("--out", default="results")
    parser.add_argument("--pretrained", type=Path, help="pretrain snapshot to fine-tune (skips step 1)")
    parser.add_argument("--no-pretrain", action="store_true",
                        help="skip step 1: the config's backbone is pretrained already (timm weights)")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs on `merged`")
    parser.add_argument("--images", type=int, default=6, help="test images to draw")
    parser.add_argument("--quick", action="store_true", help="2 training batches an epoch (a smoke run)")
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    if args.quick:
        config["trainer"]["limit_train_batches"] = 2
    name = Path(args.config).stem
    start = time.perf_counter()
    rows = {}
    if args.pretrained is None and not args.no_pretrain:
        log_dir = fit(config, f"{name}_pretrain", args)
        args.pretrained = log_dir / "checkpoints" / "phase-0-pretrain.ckpt"
        rows["pretrained"] = _row(log_dir, "pretrain")
    tuned = copy.deepcopy(config)
    phases = tuned["trainer"]["callbacks"][0]["init_args"]["phases"]
    if not args.no_pretrain:  # fine-tune the model just pretrained on the held-out samples
        phases[:] = [{"name": "merged", "split": "merged", "epochs": args.epochs}]
        if not args.quick:
            tuned["trainer"].pop("limit_train_batches", None)  # `merged` is small: whole epochs
    last = phases[-1]["name"]
    snapshots = {}
    for mode, finetune in (("full", {"mode": "full"}), ("lora", LORA)):
        tuned["model"]["finetune"] = finetune
        extra = ["--model.init_from", str(args.pretrained)] if args.pretrained else []
        log_dir = fit(tuned, f"{name}_{mode}", args, *extra)
        snapshots[mode] = log_dir / "checkpoints" / f"phase-{len(phases) - 1}-{last}.ckpt"
        rows[mode] = _row(log_dir, last)

    from music.data import MusicDataModule

    from music.imagefolder import ImageFolderSource

    data_args = config["data"] | {"data_dir": args.data_dir, "download": True}
    if data_args.get("image_folder"):
        data_args["image_folder"] = ImageFolderSource(**data_args["image_folder"])
    data = MusicDataModule(**data_args)
    data.setup()
    test = data.dataset("test")
    pick = torch.linspace(0, len(test) - 1, args.images).long().tolist()
    images, labels = test.__getitems__(pick)
    models = {m: load(p, config) for m, p in snapshots.items()}
    if args.pretrained is not None:
        models = {"pretrained": load(args.pretrained, config)} | models
    maps = {m: cls_attention(model, images) for m, model in models.items()}
    with torch.no_grad():
        predictions = {m: model(images).argmax(1) for m, model in models.items()}
    fig = attention_figure(images, maps, labels, predictions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"attention_{name}.png", dpi=110)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(Path(args.log_dir) / f"{name}_attention")) as writer:
        writer.add_figure("attention/last_block", fig)
    _write_table(out / f"vit_{name}.md", rows, args, time.perf_counter() - start, phases)


def _row(log_dir: Path, phase: str) -> dict:
    metrics = json.loads((log_dir / "phase_metrics.json").read_text())[phase]
    costs = json.loads((log_dir / "phase_costs.json").read_text())[phase]
    return {"acc": metrics["acc"], "f1": metrics["f1"], **costs}


def _write_table(path: Path, rows: dict, args: argparse.Namespace, seconds: float, phases: list) -> None:
    phases_note = ", ".join(f"{p['name']} ({p['split']}, {p['epochs']} epochs)" for p in phases)
    lines = [f"# ViT ({Path(args.config).name}), as measured", "",
             f"Fine-tuning phases {phases_note}; LoRA: {LORA}. Total wall time {seconds:.0f} s "
             f"({os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads).", "",
             "| model | test accuracy | macro F1 | trainable params | train time (s) |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['acc']:.2%} | {r['f1']:.4f} | {r['trainable_params']:,} | {r['train_seconds']:.0f} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main_()
