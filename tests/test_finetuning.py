"""Fine-tuning modes: what each trains, LoRA merging back to plain weights, and bad settings."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run

from music.finetuning import FineTune, ParameterReport, apply_finetune, merged_state_dict
from music.models import SimpleNN
from music.module import Classifier

peft = pytest.importorskip("peft")  # the optional extra music[lora]

FULL = 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10  # 109,386
HEAD = 64 * 10 + 10


def lora_count(rank: int) -> int:
    return rank * (784 + 128) + rank * (128 + 64) + HEAD  # A (r x in) + B (out x r) on fc1, fc2; the head


@pytest.mark.parametrize(("finetune", "trainable"), [
    (FineTune(mode="full"), FULL),
    (FineTune(mode="head-only"), HEAD),
    (FineTune(mode="lora", rank=8), lora_count(8)),
    (FineTune(mode="lora", rank=2, target_modules=["fc1", "fc2"]), lora_count(2)),
    (FineTune(mode="lora", rank=4, target_modules=["fc2"]), 4 * (128 + 64) + HEAD),
    (FineTune(mode="head-only", extra_trainable=["fc2"]), HEAD + 128 * 64 + 64),
])
def test_trainable_parameter_counts(finetune, trainable):
    report = ParameterReport.of(apply_finetune(SimpleNN(), finetune))
    assert report.trainable == trainable
    assert report.total == FULL + (trainable - HEAD if finetune.mode == "lora" else 0)
    assert f"**{trainable:,}**" in report.table()


def lora_model(rank=4, alpha=8.0):
    torch.manual_seed(0)
    base = SimpleNN()
    wrapped = apply_finetune(SimpleNN(), FineTune(mode="lora", rank=rank, alpha=alpha))
    wrapped.get_base_model().load_state_dict(
        {k.replace("fc1.", "fc1.base_layer.").replace("fc2.", "fc2.base_layer."): v
         for k, v in base.state_dict().items()}, strict=False)
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:  # B starts at zero (no change); make the update non-trivial
            torch.nn.init.normal_(p, std=0.1)
    return base, wrapped


def test_lora_merge_equals_unmerged_outputs_and_w_plus_scaled_ba():
    base, wrapped = lora_model(rank=4, alpha=8.0)
    merged = merged_state_dict(wrapped)
    assert merged.keys() == base.state_dict().keys()
    plain = SimpleNN()
    plain.load_state_dict(merged)
    x = torch.randn(16, 1, 28, 28)
    assert torch.allclose(plain(x), wrapped(x), atol=1e-5)
    layer = wrapped.get_base_model().fc1
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (8.0 / 4)
    assert torch.allclose(merged["fc1.weight"], base.fc1.weight + delta, atol=1e-6)
    assert torch.equal(merged["fc3.weight"], base.fc3.weight)
    assert "lora_A" in "".join(wrapped.state_dict())  # merging worked on a copy


def test_bad_settings_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"mode='LoRA'.*\['full', 'lora', 'head-only'\]"):
        FineTune(mode="LoRA")
    with pytest.raises(ValueError, match="rank=0"):
        FineTune(mode="lora", rank=0)
    with pytest.raises(ValueError, match=r"'qkv' matches no nn.Linear.*\['fc1', 'fc2'\]"):
        apply_finetune(SimpleNN(), FineTune(mode="lora", target_modules=["qkv"]))
    with pytest.raises(ValueError, match="head='fc9'.*fc3"):
        apply_finetune(SimpleNN(), FineTune(mode="head-only", head="fc9"))
    with pytest.raises(ValueError, match="'LayerNorm' matches no module.*Linear"):
        apply_finetune(SimpleNN(), FineTune(mode="head-only", extra_trainable=["LayerNorm"]))


def test_lora_study_trains_only_adapters_and_head_and_merges_to_base_keys(shrink, tmp_path):
    """The shipped LoRA config, shrunk: frozen weights stay bit-identical to the pretrained
    ones, the snapshot reloads (weights_only) and merges to the plain model's keys."""
    torch.manual_seed(1)
    pretrained = SimpleNN().state_dict()
    torch.save(pretrained, tmp_path / "pretrained.pt")
    phases = [{"name": "class_3", "split": "class_3", "epochs": 1}, {"name": "class_4", "split": "class_4", "epochs": 1}]
    cli = run("fit", "--config", shrink("seq_finetune", "lora", phases=phases), "--trainer.limit_train_batches", "3",
              "--model.init_from", tmp_path / "pretrained.pt")
    log_dir = cli.trainer.log_dir
    costs = json.loads(open(f"{log_dir}/phase_costs.json").read())
    assert costs["class_4"]["trainable_params"] == lora_count(8)
    assert costs["class_4"]["train_seconds"] > 0
    model = Classifier.load_from_checkpoint(f"{log_dir}/checkpoints/phase-1-class_4.ckpt", backbone=SimpleNN(),
                                            weights_only=True)
    base = model.backbone.get_base_model()
    assert torch.equal(base.fc1.base_layer.weight, pretrained["fc1.weight"])
    assert not torch.equal(base.fc3.weight, pretrained["fc3.weight"])
    merged = merged_state_dict(model.backbone)
    assert merged.keys() == pretrained.keys()
    assert not torch.equal(merged["fc1.weight"], pretrained["fc1.weight"])
