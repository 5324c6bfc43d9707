"""`TunedModel`: one frozen upstream backbone + a method's few trainable modules + the objective's head.

Two kinds of method share it:
- injected methods (lora, adaptformer, full) change the backbone in place and backpropagate through it;
- side methods (linear, last, miet; `thrifty.tuners.side`) run the backbone under `torch.no_grad()`; its outputs
  are data.

Files: `adapter_config.json` + `adapter_model.safetensors` holding only trainable weights, keys
`base_model.model.<path in the upstream model>` for adapter weights and `head.weight`/`head.bias` for the head.
Methods with `peft_native = True` (lora) write what stock `peft` loads instead (`tuners/peft_format.py`: PEFT's
LoraConfig, the head as `modules_to_save` or in its own file, thrifty's keys in thrifty_config.json);
`from_pretrained` reads both layouts, and LoRA directories written by stock `peft`.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from torch import nn

from thrifty.backbones import Backbone, BackboneSpec, Inputs
from thrifty.errors import CheckpointError
from thrifty.io import load_tensors, read_json, save_tensors, write_json
from thrifty.tuners.config import TunerConfig


CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class TunedModel(nn.Module):
    """Backbone + method + head. Subclasses implement `_setup()` and, for side methods, `features()`."""

    train_backbone_mode: ClassVar[bool] = False  # True: BatchNorm/dropout of the backbone follow train()
    peft_native: ClassVar[bool] = False  # True: save_pretrained writes stock peft's layout (peft_format.py)

    def __init__(self, backbone: Backbone, config: TunerConfig, head: nn.Module, objective: str = "classification"):
        """`head` comes from the objective (thrifty.objectives; `get_tuned_model` builds it): a fresh
        Linear(D, C) for classification, Linear(D, 1) for binary, the model's own LM head for causal_lm."""
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.objective = objective
        self.head = head
        self.num_classes = getattr(head, "out_features", None)  # outputs of the head (None: an LM's own head)
        self.backbone.freeze_()
        self._setup()

    def _setup(self) -> None:
        """Inject adapters / build side modules. Parameters created here are trainable."""

    # --- forward -------------------------------------------------------------------------------------------
    def features(self, x: Inputs) -> torch.Tensor:
        """(B, D) features fed to the head (side methods override it: thrifty.tuners.side)."""
        return self.backbone.forward_features(x)

    def forward(self, x: Inputs) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)

    def train(self, mode: bool = True) -> TunedModel:
        super().train(mode)
        if mode and not self.train_backbone_mode:  # frozen backbone: keep its BatchNorm stats and dropout fixed
            self.backbone.eval()
            for m in self.adapter_modules():
                m.train(True)
        return self

    def adapter_modules(self) -> list[nn.Module]:
        """Modules inside the backbone that must follow train() (e.g. LoRA dropout)."""
        return []

    # --- parameters ----------------------------------------------------------------------------------------
    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def num_trainable(self, include_head: bool = True) -> int:
        return sum(
            p.numel() for n, p in self.trainable_named_parameters() if include_head or not n.startswith("head.")
        )

    def num_total(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        """PEFT's format."""
        t, a = self.num_trainable(), self.num_total()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    # --- state ---------------------------------------------------------------------------------------------
    def _file_key(self, name: str) -> str:
        if name.startswith("backbone.model."):
            return PREFIX + name[len("backbone.model.") :]
        return name

    def _module_key(self, key: str) -> str:
        if key.startswith(PREFIX):
            return "backbone.model." + key[len(PREFIX) :]
        return key

    def _saved_tensors(self) -> dict[str, torch.Tensor]:
        """Module-named tensors a save must hold: trainable parameters, and for methods that train the backbone's
        statistics (`train_backbone_mode`, e.g. BatchNorm running mean/var in full fine-tuning) its buffers."""
        out = dict(self.trainable_named_parameters())
        if self.train_backbone_mode:
            out.update((n, b) for n, b in self.named_buffers() if n.startswith("backbone.model."))
        return out

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only trainable weights (plus the buffers they need, see `_saved_tensors`), PEFT-style keys."""
        return {self._file_key(n): t.detach() for n, t in self._saved_tensors().items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        own = self._saved_tensors()
        wanted = {self._file_key(n) for n in own}
        missing, unexpected = sorted(wanted - state.keys()), sorted(state.keys() - wanted)
        if missing or unexpected:
            raise CheckpointError(
                f"{source} does not fit this model ({self.config.method} on {self.backbone.name}): "
                f"missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        with torch.no_grad():
            for key, value in state.items():
                t = own[self._module_key(key)]
                if t.shape != value.shape:
                    raise CheckpointError(
                        f"{source}: {key} has shape {tuple(value.shape)}, model expects "
                        f"{tuple(t.shape)}; it was saved for another backbone or num_classes"
                    )
                t.copy_(value)

    def saved_config(self) -> dict[str, Any]:
        """The flat config dict a save records: the method's config plus thrifty's keys (num_classes, backbone)."""
        cfg = self.config.to_dict()
        cfg.update(
            inference_mode=True,
            base_model_name_or_path=self.backbone.name,
            num_classes=self.num_classes,
            objective=self.objective,
            backbone_checkpoint_hash=self.backbone.checkpoint_hash,
            backbone_source=self.backbone.source,
        )
        if self.backbone.spec is not None:  # how to rebuild the backbone: `thrifty eval/quantize` read it back
            cfg["backbone_spec"] = self.backbone.spec.replace(token_file=None).to_dict()
        return cfg

    def save_pretrained(self, directory: str) -> None:
        """Write adapter_config.json + adapter_model.safetensors (atomically); see the module docstring."""
        os.makedirs(directory, exist_ok=True)
        cfg = self.saved_config()
        if self.peft_native:
            from thrifty.tuners.peft_format import write_lora_dir

            write_lora_dir(self, directory, cfg, self.adapter_state_dict())
            return
        save_tensors(
            os.path.join(directory, WEIGHTS_NAME),
            self.adapter_state_dict(),
            {"method": self.config.method, "backbone": self.backbone.name},
        )
        write_json(os.path.join(directory, CONFIG_NAME), cfg)

    @classmethod
    def from_pretrained(
        cls, backbone: Backbone, directory: str, is_trainable: bool = False, *, check_weights: bool = True
    ) -> TunedModel:
        """Rebuild the method on `backbone` and load the saved weights; refuses files made for another backbone
        (and, with `check_weights`, for other weights of the same architecture). Reads thrifty's layouts and
        LoRA directories written by stock peft (`peft_type: "LORA"`)."""
        from thrifty.tuners.registry import get_method, get_tuned_model

        cfg = read_json(os.path.join(directory, CONFIG_NAME))
        peft_cfg, state = None, None
        if "peft_type" in cfg:
            from thrifty.tuners import peft_format

            peft_cfg, (cfg, state) = cfg, peft_format.read_peft_dir(directory, cfg)
        saved = cfg.get("base_model_name_or_path")
        if saved and saved != backbone.name:
            raise CheckpointError(
                f"adapter in {directory} was trained on backbone {saved!r}, not {backbone.name!r}; "
                f"load it with --backbone {saved}"
            )
        saved_hash = cfg.get("backbone_checkpoint_hash")
        if check_weights and saved_hash and backbone.checkpoint_hash and saved_hash != backbone.checkpoint_hash:
            raise CheckpointError(
                f"adapter in {directory} was trained on other weights of {backbone.name} "
                f"(hash {saved_hash} != {backbone.checkpoint_hash}); pass the same checkpoint"
            )
        if peft_cfg is not None:
            cfg = peft_format.fit_to_backbone(cfg, peft_cfg, state, backbone, directory)
        else:
            state = load_tensors(os.path.join(directory, WEIGHTS_NAME))
        config_cls, _ = get_method(cfg["method"])
        config = config_cls.from_dict({k: v for k, v in cfg.items() if k not in _SAVED_EXTRA})
        model = get_tuned_model(backbone, config, cfg.get("num_classes"), objective=cfg.get("objective"))
        model.load_adapter_state_dict(state, directory)
        if not is_trainable:
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
        return model

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "config": self.config.to_dict(),
            "trainable_params": self.num_trainable(),
            "adapter_params": self.num_trainable(include_head=False),
            "objective": self.objective,
            "head_params": sum(p.numel() for p in self.head.parameters()),
            "total_params": self.num_total(),
        }


_SAVED_EXTRA = {
    "base_model_name_or_path",
    "num_classes",
    "objective",
    "backbone_checkpoint_hash",
    "backbone_source",
    "backbone_spec",
}


def saved_backbone_spec(directory: str) -> BackboneSpec | None:
    """The BackboneSpec a saved adapter directory was trained on (None for files that predate it or come from
    stock peft): thrifty_config.json (PEFT-native LoRA) or adapter_config.json."""
    from thrifty.tuners.peft_format import THRIFTY_CONFIG_NAME

    for name in (THRIFTY_CONFIG_NAME, CONFIG_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            spec = read_json(path).get("backbone_spec")
            if spec:
                return BackboneSpec.from_dict(spec)
    return None
