"""Shared by the feature-server tests: a random test_vit checkpoint, a token file, server arguments."""

import secrets

import timm
import torch
from safetensors.torch import save_file


def write_checkpoint(path, seed=0, image_size=32):
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=image_size)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def write_token(path):
    path.write_text(secrets.token_urlsafe(32) + "\n")
    return str(path)


def server_args(checkpoint, token_file, *extra):
    common = ["--backbone", "timm:test_vit", "--checkpoint", checkpoint, "--image-size", "32", "--threads", "1"]
    return [*common, "--token-file", token_file, "--lifetime", "600", *extra]
