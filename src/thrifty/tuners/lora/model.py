from __future__ import annotations

import copy

from torch import nn

from thrifty.tuners.base import TunedModel
from thrifty.tuners.lora.layer import LoraConv2d, LoraLinear
from thrifty.tuners.targeting import find_targets, set_submodule


class LoraModel(TunedModel):
    """Swaps each targeted nn.Linear of the upstream model for a `LoraLinear` (module names as in PEFT).

    Saves stock peft's layout (`peft_native`, see thrifty.tuners.peft_format): `PeftModel.from_pretrained` loads
    it on the upstream model (timm: `timm.create_model(name, num_classes=C)`, head as `modules_to_save`; Hugging
    Face encoders: `AutoModel`, head in thrifty_head.safetensors because thrifty's mean pooling has no transformers
    class), and `from_pretrained` loads LoRA directories written by stock peft."""

    peft_native = True

    def _setup(self) -> None:
        cfg = self.config
        upstream = self.backbone.model
        targets = cfg.target_modules if cfg.target_modules is not None else self.backbone.default_target_modules()
        self.targeted_module_names = find_targets(
            upstream,
            targets,
            exclude_modules=cfg.exclude_modules,
            layers_to_transform=cfg.layers_to_transform,
            layers_pattern=cfg.layers_pattern,
            types=(nn.Linear, nn.Conv2d),
        )
        for name in self.targeted_module_names:
            base = upstream.get_submodule(name)
            layer = LoraConv2d if isinstance(base, nn.Conv2d) else LoraLinear
            set_submodule(upstream, name, layer(base, cfg.r, cfg.lora_alpha, cfg.lora_dropout))

    def adapter_modules(self) -> list[nn.Module]:
        return [m for m in self.backbone.modules() if isinstance(m, LoraLinear)]

    def merge_and_unload(self) -> TunedModel:
        """A new `full`-method model (frozen) whose backbone has every LoRA update folded into its weights."""
        from thrifty.tuners.full import FullConfig, FullModel

        backbone = copy.deepcopy(self.backbone)
        for name, module in list(backbone.model.named_modules()):
            if isinstance(module, LoraLinear):
                set_submodule(backbone.model, name, module.merged())
        merged = FullModel(backbone, FullConfig(), copy.deepcopy(self.head), objective=self.objective)
        for p in merged.parameters():
            p.requires_grad_(False)
        return merged.eval()
