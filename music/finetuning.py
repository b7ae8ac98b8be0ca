"""How a backbone is fine-tuned, as configuration: ``full``, ``lora`` or ``head-only``.

One training code path serves all three modes: the mode only decides which parameters get
gradients (and, for LoRA, wraps target layers with Hugging Face PEFT's adapters). The LoRA
implementation is PEFT's, not ours; ``peft`` is imported only when LoRA is used (it pulls in
``transformers`` and ``accelerate``), so it lives in the optional extra ``music[lora]``.

``merged_state_dict`` folds LoRA's ``W + B A * alpha / r`` back into plain weights with the
base model's keys, so a LoRA fine-tune is an ordinary state_dict for task vectors.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

MODES = ("full", "lora", "head-only")


@dataclass
class FineTune:
    """Which parameters a fine-tuning run trains.

    Args:
        mode: ``full`` (everything), ``lora`` (low-rank adapters on ``target_modules``, plus
            the head and ``extra_trainable``), ``head-only`` (the head and ``extra_trainable``).
        rank: LoRA rank ``r``.
        alpha: LoRA ``lora_alpha``; the update is scaled by ``alpha / rank``.
        dropout: dropout on the LoRA branch's input.
        target_modules: names of the layers LoRA adapts, matched as PEFT does (a name equal to,
            or ending in ``.<name>``, e.g. ``qkv`` or ``blocks.0.attn.qkv``). ``None``: every
            ``nn.Linear`` except the head.
        head: the classifier head's module name. ``None``: the model's ``get_classifier()``
            (timm) or else its last ``nn.Linear``. The head is trained in every mode because
            a new task's head is new.
        extra_trainable: modules trained fully in ``lora`` and ``head-only`` mode: a class name
            (``LayerNorm``) or a module-name pattern (``blocks.*.norm1``).
    """

    mode: str = "full"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    head: str | None = None
    extra_trainable: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"FineTune mode={self.mode!r} is not allowed: choose one of {list(MODES)}.")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"FineTune rank={self.rank!r} is not allowed: it must be an integer >= 1.")
        if not self.alpha > 0:
            raise ValueError(f"FineTune alpha={self.alpha!r} is not allowed: it must be > 0.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"FineTune dropout={self.dropout!r} is not allowed: it must be in [0, 1).")


def apply_finetune(backbone: nn.Module, finetune: FineTune) -> nn.Module:
    """The backbone prepared for ``finetune``: frozen where the mode says, LoRA-wrapped (a
    PEFT ``PeftModel``) in ``lora`` mode. Call it once, after loading pretrained weights."""
    if finetune.mode == "full":
        backbone.requires_grad_(True)
        return backbone
    names = dict(backbone.named_modules())
    head = _head_name(backbone, finetune.head)
    trained = {head} | _matching(names, finetune.extra_trainable)
    if finetune.mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = _lora_targets(names, finetune.target_modules, head)
        config = LoraConfig(r=finetune.rank, lora_alpha=finetune.alpha, lora_dropout=finetune.dropout,
                            target_modules=targets, bias="none")
        backbone = get_peft_model(backbone, config)  # freezes everything but the adapters
        base = backbone.get_base_model()
        for name in trained:
            base.get_submodule(name).requires_grad_(True)
        return backbone
    backbone.requires_grad_(False)
    for name in trained:
        backbone.get_submodule(name).requires_grad_(True)
    return backbone


def merged_state_dict(backbone: nn.Module) -> dict:
    """Plain weights of a (possibly LoRA-wrapped) backbone, with the base model's keys: LoRA
    updates are merged into the weights of a copy; the model passed in is left as it is."""
    if hasattr(backbone, "merge_and_unload"):
        backbone = copy.deepcopy(backbone).merge_and_unload()
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def unwrap(backbone: nn.Module) -> nn.Module:
    """The base model under a PEFT wrapper (the backbone itself otherwise)."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


@dataclass
class ParameterReport:
    """Trainable and total parameters, per module; block indices are folded (``blocks.*``) so
    a repeated structure reads as one row with a module count, and a count can be traced."""

    trainable: int
    total: int
    rows: list[tuple[str, int, int, int]]  # (module pattern, modules, trainable, total)

    @classmethod
    def of(cls, model: nn.Module) -> "ParameterReport":
        groups: dict[str, list] = {}
        for name, module in unwrap(model).named_modules():
            params = list(module.parameters(recurse=False))
            if not params:
                continue
            pattern = re.sub(r"\.\d+(?=\.|$)", ".*", name.replace(".default", "")) or "(root)"
            row = groups.setdefault(pattern, [0, 0, 0])
            row[0] += 1
            row[1] += sum(p.numel() for p in params if p.requires_grad)
            row[2] += sum(p.numel() for p in params)
        rows = [(k, *v) for k, v in groups.items()]
        return cls(sum(r[2] for r in rows), sum(r[3] for r in rows), rows)

    def table(self, trainable_only: bool = False) -> str:
        lines = ["| module | count | trainable | total |", "|---|---:|---:|---:|"]
        for name, count, trainable, total in self.rows:
            if trainable or not trainable_only:
                lines.append(f"| {name} | {count} | {trainable:,} | {total:,} |")
        lines.append(f"| **all** | | **{self.trainable:,}** | **{self.total:,}** |")
        return "\n".join(lines)


def _head_name(backbone: nn.Module, head: str | None) -> str:
    names = dict(backbone.named_modules())
    if head is not None:
        if head not in names or not head:
            raise ValueError(f"FineTune head={head!r} is not a module of {type(backbone).__name__}: "
                             f"allowed are {[n for n in names if n]}.")
        return head
    if hasattr(backbone, "get_classifier"):
        classifier = backbone.get_classifier()
        return next(n for n, m in names.items() if m is classifier)
    linears = [n for n, m in names.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(backbone).__name__} has no nn.Linear to use as the head: set FineTune head.")
    return linears[-1]


def _matching(names: dict[str, nn.Module], patterns: list[str]) -> set[str]:
    found: set[str] = set()
    for pattern in patterns:
        hits = {n for n, m in names.items() if n and (type(m).__name__ == pattern or fnmatchcase(n, pattern))}
        if not hits:
            types = sorted({type(m).__name__ for m in names.values()})
            raise ValueError(f"FineTune extra_trainable entry {pattern!r} matches no module: give a class name "
                             f"({types}) or a module-name pattern (e.g. 'blocks.*.norm1').")
        found |= hits
    return found


def _lora_targets(names: dict[str, nn.Module], targets: list[str] | None, head: str) -> list[str]:
    """Exact module names LoRA adapts, so a typo fails here instead of inside PEFT."""
    linears = [n for n, m in names.items() if isinstance(m, nn.Linear) and n != head]
    if targets is None:
        if not linears:
            raise ValueError("LoRA found no nn.Linear besides the head to adapt: set FineTune target_modules.")
        return linears
    if not targets:
        raise ValueError("FineTune target_modules=[] adapts nothing: name at least one layer or use None.")
    chosen: list[str] = []
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        if not hits:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"FineTune target_modules entry {target!r} matches no nn.Linear (the head {head!r} "
                             f"excluded): allowed are {suffixes} or full names such as {linears[:3]}.")
        chosen += [n for n in hits if n not in chosen]
    return chosen
