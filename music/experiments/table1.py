"""The paper's Table I: one pretrained model per seed, fine-tuned sequentially and merged."""

from __future__ import annotations

import json
import time
from pathlib import Path

from sqlalchemy.engine import Engine

from music.experiments.common import (Data, Output, final_phase, fit, fmt_mean_std, machine, mean_std, results_db,
                                      reuse_or_run, spread_note, write_table)
from music.figures import save_run_figures

# The paper's reported accuracy / loss, shown only as a labelled reference column.
PAPER = {"pretrained": (0.92, 0.38), "merged": (0.70, 2.1), "sequential (after 7)": (0.88, 0.60)}
METRICS = ["loss", "acc", "precision", "recall", "f1"]


class Table1:
    """Pretrain once per seed, then fine-tune that same checkpoint sequentially (one phase per
    held-out class) and merged (all held-out samples at once); every stage is evaluated on the
    full test set. Writes ``table1.md`` and ``table1.csv`` (mean ± sample std over seeds) and
    the first seed's confusion and accuracy matrices as PNGs in ``table1_figures/``, in
    ``<output.root>/table1/`` beside the runs, or in ``output.results`` when it is set. Every
    stage's result is stored in ``<output.root>/table1/results.db`` once it has finished, and
    read back instead of trained again while its settings stay the same.

    Args:
        seeds: training seeds (``seed_everything``); the held-out samples stay those of
            ``data.split_seed`` in the configs.
        pretrain: configs of the pretraining run.
        sequential: configs of the sequential run (started from the pretrained snapshot).
        merged: configs of the merged run (started from the same snapshot).
        data: where the dataset is.
        output: where runs and tables go, threads, smoke mode.
    """

    def __init__(self, seeds: list[int] = [0], pretrain: list[str] = ["pretrain"],
                 sequential: list[str] = ["seq_finetune"], merged: list[str] = ["merged_finetune"],
                 data: Data = Data(), output: Output = Output()) -> None:
        if not seeds or len(set(seeds)) < len(seeds):
            raise ValueError(f"seeds={seeds} is not allowed: give a non-empty list of distinct seeds.")
        self.seeds, self.data, self.output = seeds, data, output
        self.configs = {"pretrain": pretrain, "sequential": sequential, "merged": merged}

    def stage(self, engine: Engine, seed: int, stage: str, pretrained: dict | None = None) -> dict:
        """One stage's run of ``seed`` (its test metrics after every phase, held-out classes,
        final snapshot and folder), from the results store or from training it; ``pretrained``:
        the pretraining stage it starts from."""
        settings = {"configs": self.configs[stage], "seed": seed, "quick": self.output.quick,
                    "trainer_args": self.output.trainer_args, "from": pretrained and pretrained["settings"]}

        def train() -> tuple[dict, Path, float]:
            start = time.perf_counter()
            overrides = {"seed_everything": seed} | ({"model.init_from": pretrained["snapshot"]} if pretrained else {})
            run = fit(self.configs[stage], f"seed_{seed}/{stage}", self.data, self.output, "table1", overrides)
            held_out = json.loads((run.run_dir / "split_manifest.json").read_text())["held_out_classes"]
            return ({"phases": run.phases, "held_out": held_out, "snapshot": str(final_phase(run.run_dir)[2].resolve()),
                     "run_dir": str(run.run_dir.resolve()), "settings": settings}, run.run_dir, time.perf_counter() - start)

        return reuse_or_run(engine, "table1", f"seed_{seed}/{stage}", settings, train)

    def one_seed(self, engine: Engine, seed: int) -> tuple[dict[str, dict], list[int], float]:
        start = time.perf_counter()
        pretrain = self.stage(engine, seed, "pretrain")
        runs = {"pretrain": pretrain, **{s: self.stage(engine, seed, s, pretrain) for s in ("sequential", "merged")}}
        trained = sum(run["wall_seconds"] for run in runs.values())
        if seed == self.seeds[0]:  # the first seed's confusion and accuracy matrices, as in TensorBoard
            for stage, run in runs.items():
                if Path(run["run_dir"]).is_dir():  # a stored run's folder may be gone: its numbers are not
                    save_run_figures(run["run_dir"], self.output.tables("table1") / "table1_figures", f"seed{seed}_{stage}")
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s ({trained:.0f} s of runs, reused ones included)")
        # in phase order: the store keeps JSON objects with sorted keys
        phases = {stage: sorted(run["phases"].items(), key=lambda item: item[1]["index"]) for stage, run in runs.items()}
        rows = {"pretrained": phases["pretrain"][-1][1], "merged": phases["merged"][-1][1]}
        rows |= {f"sequential (after {name.removeprefix('class_')})": phase for name, phase in phases["sequential"]}
        return rows, pretrain["held_out"], trained

    def run(self) -> dict[str, dict[str, list[float]]]:
        start = time.perf_counter()
        per_seed, held_out, trained = [], [], 0.0
        engine = results_db(self.output, "table1")
        for seed in self.seeds:
            rows, held_out, seconds = self.one_seed(engine, seed)
            per_seed.append(rows)
            trained += seconds
        columns = METRICS + [f"recall/{c}" for c in held_out]
        table = {stage: {c: [rows[stage][c] for rows in per_seed] for c in columns} for stage in per_seed[0]}
        self.write(table, columns, held_out, trained, time.perf_counter() - start)
        return table

    def write(self, table: dict[str, dict[str, list[float]]], columns: list[str], held_out: list[int],
              trained: float, seconds: float) -> None:
        """``table``: stage -> column -> the per-seed values, in seed order."""
        header = ["stage", "test loss", "accuracy", "precision", "recall", "F1", *(f"acc {c}" for c in held_out),
                  "paper acc / loss (reference)"]
        rows, csv_rows = [], []
        for stage, values in table.items():
            paper = PAPER.get(stage)
            rows.append([stage, *(fmt_mean_std(values[c]) for c in columns), f"{paper[0]:.2f} / {paper[1]:.2f}" if paper else ""])
            csv_rows.append({"stage": stage, **{f"{c}_{kind}": "" if v != v else f"{v:.4f}" for c in columns
                                                for kind, v in zip(("mean", "std"), mean_std(values[c])[:2])},
                             **{f"{c}_seed{seed}": f"{v:.4f}" for c in columns for seed, v in zip(self.seeds, values[c])},
                             "paper_acc": paper[0] if paper else "", "paper_loss": paper[1] if paper else ""})
        notes = (f"`music table1` with seeds {self.seeds} ({spread_note([len(self.seeds)])}"
                 f"{'' if len(self.seeds) > 1 else ': one seed, so the mean alone'}). Configs: "
                 f"pretrain {self.configs['pretrain']}, then sequential {self.configs['sequential']} and merged "
                 f"{self.configs['merged']}, both from the same pretrained snapshot. Test set: the dataset's full test "
                 "split. Precision, recall and F1 are macro averages; 'acc c' is the accuracy (recall) on class c. "
                 f"Machine: {machine(self.output.threads)}. Extra arguments: {self.output.trainer_args or 'none'}"
                 f"{'; quick (smoke) run' if self.output.quick else ''}. Wall time of the runs: {trained:.0f} s (each run's "
                 f"own, runs read back from the results store included); of this invocation: {seconds:.0f} s.")
        print(write_table(self.output.tables("table1"), "table1", "Table I, as measured", notes, header, rows, csv_rows))
