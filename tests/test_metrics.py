import torch
from torch import nn

from thrifty.metrics import saved_activation_bytes, training_step
from thrifty.tuners import get_tuned_model, make_config


def test_saved_bytes_excludes_parameters_and_is_exact():
    lin = nn.Linear(16, 4)
    x = torch.randn(8, 16, requires_grad=False)
    # kept: the linear input for dW (8*16*4 B); for cross-entropy the log-softmax output, the int64 targets and
    # nll_loss's float32 total_weight scalar
    got = saved_activation_bytes(lin, lambda: training_step(lin, x, torch.zeros(8, dtype=torch.long), None))
    assert got == 8 * 16 * 4 + 8 * 4 * 4 + 8 * 8 + 4
    assert got == saved_activation_bytes(lin, lambda: training_step(lin, x, torch.zeros(8, dtype=torch.long), None))


def test_linear_probe_saves_nothing_inside_the_backbone(tiny_vit_factory):
    bs, classes = 4, 3
    results = {}
    for method in ("linear", "lora", "full"):
        model = get_tuned_model(tiny_vit_factory(0), make_config(method), classes)
        x = model.backbone.random_inputs(bs)
        y = torch.zeros(bs, dtype=torch.long)
        results[method] = saved_activation_bytes(model, lambda m=model, x=x, y=y: training_step(m, x, y, None))
    d = tiny_vit_factory(0).num_features
    assert results["linear"] == bs * d * 4 + bs * classes * 4 + bs * 8 + 4  # head input + CE only
    assert results["linear"] < results["lora"] < results["full"]
