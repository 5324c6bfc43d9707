import os

import pytest
import torch


torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# `thrifty train` on a tiny random ViT and the digits 1k task: seconds per epoch on a CPU
TINY_TRAIN = [
    "train",
    "--backbone",
    "timm:test_vit",
    "--random-init",
    "--image-size",
    "32",
    "--data",
    "digits:1k",
    "--test-size",
    "100",
    "--batch-size",
    "100",
    "--lr",
    "5e-3",
    "--no-progress",
]


def require_asset(ok: bool, what: str) -> None:
    """Skip when a real packaged asset is absent locally; in CI (CI=true) its absence is a failure."""
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} must be installed in CI (see .ci/run and the Makefile)")
        pytest.skip(f"{what} not installed")


@pytest.fixture(scope="session")
def tiny_vit_factory():
    from thrifty.backbones import load_backbone

    def make(seed: int = 0):
        """Random-init backbones are seeded (identical for every call); seed != 0 perturbs the weights."""
        bb = load_backbone("timm:test_vit", pretrained=False, image_size=32)
        if seed:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in bb.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
            from thrifty.backbones.base import model_fingerprint

            bb.checkpoint_hash = model_fingerprint(bb.model)
        return bb

    return make


@pytest.fixture
def tiny_vit(tiny_vit_factory):
    return tiny_vit_factory(0)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT saved as a local HF directory (config + weights + a tokenizer)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(60)], "good", "bad", "the"]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    cfg = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
    return str(path)
