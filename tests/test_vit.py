"""timm ViT backbones: parameter counts (the seed's), small-input forward, attention maps."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("peft")

from music.attention import cls_attention  # noqa: E402
from music.finetuning import FineTune, ParameterReport, apply_finetune  # noqa: E402
from music.vit import TimmViT  # noqa: E402


@pytest.fixture(scope="module")
def small():
    with pytest.warns(UserWarning, match="random weights"):
        return TimmViT(img_size=28, patch_size=7, in_chans=1, fused_attention=False).eval()


def test_vit_tiny_counts_match_the_seed():
    """Full: 5,526,346 trainable (the seed's count). LoRA r=8 on qkv and fc1 plus the LayerNorms
    and the head: 177,418, the seed's LoRA count (one of the combinations that give it)."""
    with pytest.warns(UserWarning, match="from scratch"):
        vit = TimmViT("vit_tiny_patch16_224", num_classes=10, pretrained=False)
    assert ParameterReport.of(vit).trainable == 5_526_346
    lora = apply_finetune(vit, FineTune(mode="lora", rank=8, target_modules=["qkv", "fc1"],
                                        extra_trainable=["LayerNorm"]))
    report = ParameterReport.of(lora)
    assert report.trainable == 177_418
    rows = {name: (count, trainable) for name, count, trainable, _ in report.rows}
    assert rows["model.blocks.*.attn.qkv.lora_A"] == (12, 12 * 8 * 192)
    assert rows["model.head"] == (1, 1930)
    assert rows["model.blocks.*.attn.proj"][1] == 0


def test_small_input_forward_and_attention_map_shape(small):
    x = torch.randn(3, 1, 28, 28)
    assert small(x).shape == (3, 10)
    maps = cls_attention(small, x)
    assert maps.shape == (3, 4, 4)  # 28 / 7 patches a side
    assert (maps >= 0).all() and (maps.sum((1, 2)) <= 1 + 1e-5).all()


def test_fused_attention_cannot_be_read():
    with pytest.warns(UserWarning, match="random weights"):
        fused = TimmViT(img_size=28, patch_size=7, in_chans=1, fused_attention=True)
    with pytest.raises(RuntimeError, match="fused_attention=False"):
        cls_attention(fused, torch.randn(1, 1, 28, 28))


def test_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="Unknown timm model_name='vit_tiny_patch16'"):
        TimmViT("vit_tiny_patch16")
