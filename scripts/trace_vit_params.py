"""Which trainable set gives the seed's 177,418 parameters on vit_tiny_patch16_224 (10 classes)?

Counts come from real models (``ParameterReport`` of ``apply_finetune``): the LoRA count of
each target at rank 1 (LoRA parameters are linear in the rank) and the size of each candidate
extra. Every combination of LoRA targets, rank 1..64 and extras that hits the target is printed.

    python scripts/trace_vit_params.py [--target 177418]
"""

from __future__ import annotations

import argparse
import itertools
import warnings

from music.finetuning import FineTune, ParameterReport, apply_finetune
from music.vit import TimmViT

TARGETS = ["qkv", "proj", "fc1", "fc2"]
EXTRAS = {"LayerNorms": ["LayerNorm"], "cls_token": None, "pos_embed": None, "patch_embed": ["model.patch_embed.proj"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=int, default=177_418)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*random weights.*")
    full = ParameterReport.of(apply_finetune(TimmViT(), FineTune(mode="full")))
    head = ParameterReport.of(apply_finetune(TimmViT(), FineTune(mode="head-only"))).trainable
    print(f"full: {full.trainable:,} trainable; head-only: {head:,}")
    per_rank = {}
    for t in TARGETS:
        lora = ParameterReport.of(apply_finetune(TimmViT(), FineTune(mode="lora", rank=1, target_modules=[t])))
        per_rank[t] = lora.trainable - head
    model = TimmViT().model
    extra = {"LayerNorms": ParameterReport.of(apply_finetune(TimmViT(), FineTune(
                 mode="head-only", extra_trainable=["LayerNorm"]))).trainable - head,
             "cls_token": model.cls_token.numel(), "pos_embed": model.pos_embed.numel(),
             "patch_embed": sum(p.numel() for p in model.patch_embed.parameters()),
             "biases": sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias") and "head" not in n)}
    print("LoRA parameters per rank:", per_rank, "\nextras:", extra)
    hits = []
    for k in range(1, len(TARGETS) + 1):
        for targets in itertools.combinations(TARGETS, k):
            unit = sum(per_rank[t] for t in targets)
            for j in range(len(extra) + 1):
                for extras in itertools.combinations(extra, j):
                    rest = args.target - head - sum(extra[e] for e in extras)
                    if rest > 0 and rest % unit == 0 and rest // unit <= 64:
                        hits.append((rest // unit, targets, extras))
    print(f"\ncombinations giving {args.target:,} (head always trained):")
    for rank, targets, extras in hits:
        print(f"  LoRA r={rank} on {'+'.join(targets)}" + (f" + {' + '.join(extras)}" if extras else ""))


if __name__ == "__main__":
    main()
