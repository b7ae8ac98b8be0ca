"""timm Vision Transformers as MUSIC backbones, configured by typed arguments.

A thin ``nn.Module`` around ``timm.create_model`` so a ViT is named by class path in YAML like
any other backbone. timm is imported on construction only (optional extra ``music[lora]``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import Tensor, nn

from music.checkpoint import load_state_dict


class TimmViT(nn.Module):
    """A timm model (``vit_tiny_patch16_224`` by default) with a ``num_classes`` head.

    Args:
        model_name: timm model name.
        num_classes: size of the new head.
        img_size, patch_size, in_chans: override the architecture for other inputs, e.g.
            ``img_size=28, patch_size=7, in_chans=1`` for MNIST (such a model has no
            pretrained weights: it starts from scratch).
        pretrained: load timm's pretrained weights (needs them in the local cache or internet).
        weights_path: a local file of weights for the timm model (safetensors, ``.pth`` or a
            Lightning checkpoint; loaded safely). Keys of the head are skipped when its size
            differs, so ImageNet weights fit a 10-class head.
        fused_attention: timm's fused SDPA attention never materialises the attention matrix;
            ``False`` computes it explicitly so ``music.attention`` can read it.

    Without ``pretrained`` or ``weights_path`` the model starts from random weights; it says
    so with a warning, because fine-tuning a random ViT is a different experiment.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        img_size: int | None = None,
        patch_size: int | None = None,
        in_chans: int | None = None,
        pretrained: bool = False,
        weights_path: str | None = None,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        import timm
        from timm.layers import set_fused_attn

        if model_name not in timm.list_models():
            close = timm.list_models(f"*{model_name.split('_')[0]}*")[:10]
            raise ValueError(f"Unknown timm model_name={model_name!r}: e.g. {close} (timm.list_models()).")
        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"TimmViT weights_path={weights_path!r} does not exist.")
        overrides = {k: v for k, v in (("img_size", img_size), ("patch_size", patch_size),
                                       ("in_chans", in_chans)) if v is not None}
        # The switch is read when attention layers are built, hence set before create_model.
        set_fused_attn(fused_attention)
        try:
            self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **overrides)
        finally:
            set_fused_attn(True)  # leave timm's process-wide default as it was
        if weights_path is not None:
            self._load(weights_path)
        elif not pretrained:
            warnings.warn(f"TimmViT {model_name} {overrides or ''} starts from random weights (pretrained=false, "
                          "no weights_path): this trains from scratch.", stacklevel=2)

    def _load(self, path: str) -> None:
        state = load_state_dict(path)
        state = {k.removeprefix("model."): v for k, v in state.items()}
        own = self.model.state_dict()
        fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = self.model.load_state_dict(fits, strict=False).missing_keys
        classifier = self.model.get_classifier()
        prefix = next(n for n, m in self.model.named_modules() if m is classifier)
        head = {n for n, _ in classifier.named_parameters(prefix=prefix)}
        if set(missing) - head:
            raise ValueError(f"weights_path={path!r} does not fit {type(self.model).__name__}: missing "
                             f"{sorted(set(missing) - head)[:5]} ...")

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
