"""Full fine-tuning vs LoRA vs head-only from one pretrained model, sequential and merged."""

from __future__ import annotations

import json
import time
from pathlib import Path

from music.checkpoint import load_state_dict
from music.experiments.common import Data, Output, final_phase, fit, machine, write_table
from music.finetuning import merged_state_dict
from music.module import Classifier
from music.runner import phase_metrics
from music.task_vector import TaskVector


class FineTuneCompare:
    """Fine-tunes ONE pretrained model in every mode, in every study, with nothing else changed:
    each study's configs plus a mode delta (``full``: none; ``lora``; ``head_only``). Each final
    model is merged back to plain weights and turned into a task vector against the pretrained
    weights, which shows that a LoRA fine-tune is an ordinary state_dict for task arithmetic.
    Writes ``finetuning.md`` and ``finetuning.csv`` in ``<output.root>/finetune-compare/``
    beside the runs, or in ``output.results`` when it is set.

    Args:
        pretrained: a pretrain snapshot to start from; ``None`` pretrains with ``pretrain`` first.
        pretrain: configs of that pretraining run.
        studies: study name -> its fine-tuning configs.
        modes: mode name -> the config delta that selects it (``[]`` for full fine-tuning).
        data: where the dataset is.
        output: where runs and tables go, threads, smoke mode.
    """

    def __init__(self, pretrained: str | None = None, pretrain: list[str] = ["pretrain"],
                 studies: dict[str, list[str]] = {"sequential": ["seq_finetune"], "merged": ["merged_finetune"]},
                 modes: dict[str, list[str]] = {"full": [], "lora": ["lora"], "head-only": ["head_only"]},
                 data: Data = Data(), output: Output = Output()) -> None:
        if not studies or not modes:
            raise ValueError(f"studies={studies} and modes={modes} must both name at least one entry.")
        self.pretrained, self.pretrain, self.studies, self.modes = pretrained, pretrain, studies, modes
        self.data, self.output = data, output

    def run_mode(self, study: str, mode: str, init: Path) -> dict:
        run_dir = fit([*self.studies[study], *self.modes[mode]], f"{study}_{mode}", self.data, self.output,
                      "finetune-compare", {"model.init_from": str(init)}).run_dir
        last, metrics, snapshot = final_phase(run_dir)
        costs = json.loads((run_dir / "phase_costs.json").read_text())
        model = Classifier.load_from_checkpoint(snapshot, weights_only=True)
        merged, base = merged_state_dict(model.backbone), load_state_dict(init)
        if merged.keys() != base.keys():
            raise RuntimeError(f"{mode}: the merged state_dict's keys differ from the pretrained model's.")
        held_out = json.loads((run_dir / "split_manifest.json").read_text())["held_out_classes"]
        return {"study": study, "mode": mode, "acc": metrics["acc"], "f1": metrics["f1"],
                **{f"acc_{c}": metrics[f"recall/{c}"] for c in held_out},
                "trainable_params": costs[last]["trainable_params"],
                "train_seconds": sum(costs[p]["train_seconds"] for p in phase_metrics(run_dir)),
                "task_vector_norm": TaskVector.from_state_dicts(base, merged).norm(), "run_dir": str(run_dir)}

    def run(self) -> list[dict]:
        start = time.perf_counter()
        init = Path(self.pretrained) if self.pretrained else final_phase(fit(self.pretrain, "pretrain", self.data,
                                                                             self.output, "finetune-compare").run_dir)[2]
        if not init.is_file():
            raise FileNotFoundError(f"pretrained={str(init)!r} does not exist: give a pretrain snapshot (.ckpt).")
        _, pretrained, _ = final_phase(init.parent.parent)
        rows = [self.run_mode(study, mode, init) for study in self.studies for mode in self.modes]
        self.write(rows, pretrained, init, time.perf_counter() - start)
        return rows

    def write(self, rows: list[dict], pretrained: dict, init: Path, seconds: float) -> None:
        held_out = [k.removeprefix("acc_") for k in rows[0] if k.startswith("acc_")]
        header = ["study", "mode", "accuracy", "macro F1", *(f"acc {c}" for c in held_out), "trainable params",
                  "train time (s)", "‖τ‖"]
        display = [[r["study"], r["mode"], f"{r['acc']:.2%}", f"{r['f1']:.4f}", *(f"{r[f'acc_{c}']:.2%}" for c in held_out),
                    f"{r['trainable_params']:,}", f"{r['train_seconds']:.1f}", f"{r['task_vector_norm']:.3f}"] for r in rows]
        notes = (f"`music finetune-compare`: one pretrained model ({init}; test accuracy {pretrained['acc']:.2%}, macro F1 "
                 f"{pretrained['f1']:.4f}) fine-tuned in each mode. Studies (configs): {self.studies}; modes (config "
                 f"deltas): {self.modes}. Accuracy and F1 on the full test split after the last phase; 'acc c' is the "
                 "accuracy on class c. Train time: wall time of the training epochs (evaluation and checkpointing "
                 "excluded), indicative only. ‖τ‖: norm of the task vector merged fine-tune minus pretrained (the "
                 f"merged keys equal the base keys in every mode). Machine: {machine(self.output.threads)}. "
                 f"Extra arguments: {self.output.trainer_args or 'none'}{'; quick (smoke) run' if self.output.quick else ''}. "
                 f"Total wall time {seconds:.0f} s.")
        print(write_table(self.output.tables("finetune-compare"), "finetuning", "Full fine-tuning vs LoRA vs head-only, as measured",
                          notes, header, display, rows))
