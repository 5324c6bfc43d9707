"""KV-head compression (thrifty.compress.kv_heads) on tiny random transformers models built here."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.compress.kv_heads import (
    KVHeadsConfig,
    compress_kv_heads_,
    find_attention_sites,
    heal_,
    kv_heads_report,
    load_compressed,
    save_compressed,
)
from thrifty.compress.kv_heads.api import plan_layer
from thrifty.compress.kv_heads.fit import complex_projection, fit_complex, fit_full, fit_mean
from thrifty.compress.kv_heads.statistics import StreamingGram, collect_statistics
from thrifty.errors import ConfigError


VOCAB, D, HEADS, HEAD_DIM = 64, 32, 8, 8


def llama(kv_heads: int, *, family: str = "llama", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = cfg_cls(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=128,
        rope_theta=100.0,  # fast rotations: positions up to 24 sweep whole turns of several frequencies
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so attention is far from uniform
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10.0)
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def duplicate_heads(model, source_of: list[int]):
    """The MHA model whose KV head j is the original model's KV head source_of[j] (GQA expanded by repetition);
    query head i reads KV head i, i.e. original head source_of[i]. Equal to `model` when source_of[i] = i // r."""
    cfg = copy.deepcopy(model.config)
    cfg.num_key_value_heads = len(source_of)
    out = type(model)(cfg).eval()
    sd = model.state_dict()
    idx = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in source_of])
    for k, v in list(sd.items()):
        if k.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            sd[k] = v[idx]
    out.load_state_dict(sd)
    return out


def batches(n: int = 4, seed: int = 3, seq: int = 24, size: int = 4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (size, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1, seq // 2 :] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits[x["attention_mask"].bool()]


# --- exactness on duplicated heads ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "values,keys,rope_keys",
    [
        ("svd_a", "svd_a", "complex"),
        ("svd_w", "svd_w", "complex"),
        ("mean", "mean", "complex"),
        ("svd_a", "svd_a", "mean"),
    ],
)
def test_duplicated_kv_heads_compress_back_exactly(family, values, keys, rope_keys):
    orig = llama(2, family=family)  # 8 query heads read 2 KV heads
    mha = duplicate_heads(orig, [i // 4 for i in range(HEADS)])
    x = batches(1, seed=9)[0]
    ref = logits(orig, x)
    torch.testing.assert_close(logits(mha, x), ref, rtol=0, atol=1e-5)
    cfg = KVHeadsConfig(kv_heads=2, values=values, keys=keys, rope_keys=rope_keys)
    compress_kv_heads_(mha, cfg, batches())
    assert mha.config.num_key_value_heads == 2
    assert mha.model.layers[0].self_attn.k_proj.weight.shape == (2 * HEAD_DIM, D)
    torch.testing.assert_close(logits(mha, x), ref, rtol=0, atol=1e-5)
    report = kv_heads_report(mha)
    assert report["kv_heads_before"] == 8 and report["layers"][0]["groups"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    if values == "svd_a":
        assert report["layers"][1]["v_rel_err"] < 1e-12 and report["layers"][1]["k_rel_err"] < 1e-12


def test_post_rope_keys_are_not_exact_under_rotation():
    """The unconstrained map fitted on post-RoPE keys does not commute with RoPE: even duplicated heads come back
    with an error (the reason for the complex strategy)."""
    orig = llama(2)
    mha = duplicate_heads(orig, [i // 4 for i in range(HEADS)])
    x = batches(1, seed=9)[0]
    compress_kv_heads_(mha, KVHeadsConfig(kv_heads=2, rope_keys="post_rope"), batches())
    assert (logits(mha, x) - logits(orig, x)).abs().max() > 1e-3
    assert kv_heads_report(mha)["layers"][0]["k_err_space"] == "post_rope"


def test_similarity_grouping_finds_scattered_duplicates():
    orig = llama(2)
    source = [0, 1, 1, 0, 1, 0, 0, 1]  # duplicates are not consecutive
    mha = duplicate_heads(orig, source)
    x = batches(1, seed=9)[0]
    ref = logits(mha, x)
    consecutive = copy.deepcopy(mha)
    compress_kv_heads_(consecutive, KVHeadsConfig(kv_heads=2), batches())
    assert (logits(consecutive, x) - ref).abs().max() > 1e-3
    compress_kv_heads_(mha, KVHeadsConfig(kv_heads=2, grouping="similarity"), batches())
    layer = kv_heads_report(mha)["layers"][0]
    assert layer["groups"] == [[0, 3, 5, 6], [1, 2, 4, 7]]
    assert layer["query_order"] == [0, 3, 5, 6, 1, 2, 4, 7]
    torch.testing.assert_close(logits(mha, x), ref, rtol=0, atol=1e-5)


def tiny_bert(seed: int = 0, duplicate: bool = True):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(seed)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    if duplicate:  # heads 1 and 3 copy the keys and values of heads 0 and 2
        with torch.no_grad():
            for layer in model.encoder.layer:
                for lin in (layer.attention.self.key, layer.attention.self.value):
                    for src, dst in ((0, 1), (2, 3)):
                        s, t = slice(src * 8, src * 8 + 8), slice(dst * 8, dst * 8 + 8)
                        lin.weight[t] = lin.weight[s]
                        lin.bias[t] = lin.bias[s]
    return model


def test_bert_mha_duplicates_compress_exactly_and_keep_shapes():
    model = tiny_bert()
    x = batches(1, seed=9)[0]
    with torch.no_grad():
        ref = model(**x).last_hidden_state
    compress_kv_heads_(model, KVHeadsConfig(kv_heads=2), batches())
    with torch.no_grad():
        out = model(**x).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    key = model.encoder.layer[0].attention.self.key
    assert key.weight.shape == (D, D)  # shapes kept: the shared head is repeated into its group's slots
    torch.testing.assert_close(key.weight[0:8], key.weight[8:16])
    report = kv_heads_report(model)
    assert report["shapes_kept"] and report["key_fit"] == {"source": "svd_a", "structure": "full", "rope": False}


# --- RoPE commutation ----------------------------------------------------------------------------------------


def rope(x, positions, head_dim, theta):
    """transformers' own rotary embedding and apply_rotary_pos_emb on x (1, 1, T, d)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim, rope_theta=theta)
    cos, sin = LlamaRotaryEmbedding(cfg)(x.float(), torch.tensor([positions]))
    return apply_rotary_pos_emb(x, x, cos.double(), sin.double())[1]


@settings(max_examples=40, deadline=None)
@given(
    half=st.integers(1, 32),
    theta=st.sampled_from([100.0, 1e4, 1e5, 5e5]),
    positions=st.lists(st.integers(0, 100_000), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_complex_scalar_map_commutes_with_rope(half, theta, positions, seed):
    d = 2 * half
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(half, 1, generator=g, dtype=torch.complex128)
    b = complex_projection(v, d)  # (d, d): one complex scalar per frequency pair
    x = torch.randn(1, 1, len(positions), d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(rope(x @ b, positions, d, theta), rope(x, positions, d, theta) @ b)
    if d >= 4 and any(p > 0 for p in positions):  # control: a generic map does not commute
        m = torch.randn(d, d, generator=g, dtype=torch.float64)
        assert (rope(x @ m, positions, d, theta) - rope(x, positions, d, theta) @ m).abs().max() > 1e-6


def test_complex_fit_is_the_per_frequency_rank1_complex_svd():
    g_heads, d, n = 3, 8, 400
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(n, g_heads * d, generator=gen, dtype=torch.float64) @ torch.randn(24, 24, generator=gen).double()
    gram = k.T @ k / n
    merge = fit_complex(gram, g_heads, d)
    # independent: complex SVD per frequency, residual = energy beyond the top singular value
    z = k.view(n, g_heads, 2, d // 2)
    z = torch.complex(z[:, :, 0], z[:, :, 1])  # (n, g, d/2)
    resid = sum(float((torch.linalg.svdvals(z[:, :, m]) ** 2)[1:].sum()) for m in range(d // 2))
    assert merge.relative_error(gram) == pytest.approx(resid / float((k**2).sum()), rel=1e-9)
    torch.testing.assert_close(merge.project.T @ merge.project, torch.eye(d, dtype=torch.float64))
    # unconstrained SVD-a is at least as good; mean pooling is no better than either
    assert fit_full(gram, g_heads, d).relative_error(gram) <= merge.relative_error(gram) + 1e-12
    assert fit_mean(g_heads, d).relative_error(gram) >= merge.relative_error(gram)


# --- folding == the unfolded two-matmul form -----------------------------------------------------------------


@pytest.mark.parametrize("rope_keys", ["complex", "mean"])
def test_fold_equals_unfolded_attention(rope_keys):
    """Folded layer vs the explicit form: caches k_G -> u = k_G E -> k_h = u B_h^T (then RoPE), same for v, into
    the original q/o projections."""
    model = llama(4, family="qwen2")  # biases, GQA 8 -> 4, compressed to 2
    sites = find_attention_sites(model)
    cfg = KVHeadsConfig(kv_heads=2, rope_keys=rope_keys)
    stats, _ = collect_statistics(model, sites, batches(), post_rope=False)
    groups, km, vm, _ = plan_layer(sites[0], 0, cfg, stats)
    attn = model.model.layers[0].self_attn
    ref_attn = copy.deepcopy(attn)
    h = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(5))
    pos = torch.arange(16)[None]
    cos, sin = model.model.rotary_emb(h, position_ids=pos)
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    def heads(lin, n):
        return lin(h).view(2, 16, n, HEAD_DIM).double()

    q, k, v = heads(ref_attn.q_proj, HEADS), heads(ref_attn.k_proj, 4), heads(ref_attn.v_proj, 4)
    k_hat, v_hat = torch.empty_like(k), torch.empty_like(v)
    for group, mk, mv in zip(groups, km, vm):
        uk = k[:, :, group].reshape(2, 16, -1) @ mk.project
        uv = v[:, :, group].reshape(2, 16, -1) @ mv.project
        for pos_in_group, head in enumerate(group):
            k_hat[:, :, head] = uk @ mk.expand[pos_in_group].T
            v_hat[:, :, head] = uv @ mv.expand[pos_in_group].T
    q, k_hat = apply_rotary_pos_emb(q.transpose(1, 2), k_hat.transpose(1, 2), cos.double(), sin.double())
    k_hat, v_hat = (t.repeat_interleave(2, dim=1) for t in (k_hat, v_hat.transpose(1, 2)))
    o = F.scaled_dot_product_attention(q, k_hat, v_hat, is_causal=True).transpose(1, 2).reshape(2, 16, -1)
    expected = (o @ ref_attn.o_proj.weight.double().T).float()

    from thrifty.compress.kv_heads.fold import fold_site_

    fold_site_(sites[0], groups, km, vm)
    attn.config.num_key_value_heads = 2
    with torch.no_grad():
        got = attn(h, position_embeddings=(cos, sin), attention_mask=None)[0]
    assert attn.k_proj.weight.shape == (2 * HEAD_DIM, D)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# --- saving ----------------------------------------------------------------------------------------------------


def test_saved_folder_loads_in_stock_transformers(tmp_path, tiny_bert_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = llama(4)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)  # any tokenizer travels with the folder
    compress_kv_heads_(model, KVHeadsConfig(kv_heads=2), batches(), calib_description="4 random batches")
    out = save_compressed(model, tmp_path / "out", tokenizer=tok)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no thrifty code involved
    x = batches(1, seed=11)[0]
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=1e-6)
    report = json.loads((out / "compression.json").read_text())
    assert report["method"] == "kv_heads" and report["kv_heads_after"] == 2
    assert report["calibration"]["description"] == "4 random batches"
    assert report["calibration"]["tokens"] == 4 * (3 * 24 + 12)
    assert len(report["layers"]) == 2 and all(0 <= e["v_rel_err"] < 1 for e in report["layers"])
    again, rep = load_compressed(out)
    torch.testing.assert_close(logits(again, x), logits(model, x), rtol=0, atol=1e-6)
    assert rep["layers"] == report["layers"]
    with pytest.raises(FileExistsError):
        save_compressed(model, out)


def test_saved_bert_loads_in_stock_transformers(tmp_path):
    from transformers import AutoModel

    model = tiny_bert(duplicate=False)
    compress_kv_heads_(model, KVHeadsConfig(kv_heads=1), batches())
    out = save_compressed(model, tmp_path / "bert")
    loaded = AutoModel.from_pretrained(out).eval()
    x = batches(1, seed=11)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).last_hidden_state, model(**x).last_hidden_state)


# --- statistics ----------------------------------------------------------------------------------------------


def test_streaming_covariance_equals_one_shot():
    model = llama(2)
    data = batches(3)
    sites = find_attention_sites(model)
    stats, seen = collect_statistics(model, sites, data, post_rope=True)
    ids = torch.cat([b["input_ids"] for b in data])
    mask = torch.cat([b["attention_mask"] for b in data]).bool()
    assert seen["tokens"] == int(mask.sum()) and seen["samples"] == 12
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
        for i, layer in enumerate(model.model.layers):
            x = layer.input_layernorm(hidden[i])
            k, v = layer.self_attn.k_proj(x), layer.self_attn.v_proj(x)
            cos, sin = model.model.rotary_emb(x, position_ids=torch.arange(ids.shape[1])[None])
            kr = apply_rotary_pos_emb(
                k.view(12, 24, 2, 8).transpose(1, 2), k.view(12, 24, 2, 8).transpose(1, 2), cos, sin
            )[1]
            kr = kr.transpose(1, 2).reshape(12, 24, 16)
            for got, full in ((stats.keys[i], k), (stats.values[i], v), (stats.post_rope_keys[i], kr)):
                rows = full[mask].double()
                torch.testing.assert_close(got.matrix, rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-9)
    # the token budget cuts inside a batch, and never keeps more than it
    limited, seen = collect_statistics(model, sites, data, calib_tokens=100)
    assert limited.tokens == 100 and seen["tokens"] == 100


def test_streaming_gram_update_order_does_not_matter():
    rows = torch.randn(300, 6, dtype=torch.float64)
    a, b = StreamingGram(6), StreamingGram(6)
    for chunk in rows.split(7):
        a.update(chunk)
    b.update(rows.flip(0))
    torch.testing.assert_close(a.matrix, rows.T @ rows / 300)
    torch.testing.assert_close(a.matrix, b.matrix)


# --- quality and healing -------------------------------------------------------------------------------------


def test_svd_a_reconstructs_better_than_mean_pooling():
    errs = {}
    for values in ("svd_a", "mean"):
        model = llama(4)
        compress_kv_heads_(model, KVHeadsConfig(kv_heads=1, values=values, rope_keys="complex"), batches())
        errs[values] = [e["v_rel_err"] for e in kv_heads_report(model)["layers"]]
    assert all(a < m for a, m in zip(errs["svd_a"], errs["mean"]))


def test_heal_trains_lora_and_merges_back():
    model = llama(4)
    compress_kv_heads_(model, KVHeadsConfig(kv_heads=1, values="mean", keys="mean"), None)
    data = batches(2, seed=4)

    def loss_of(m):
        x = data[0]
        labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
        return m(**x, labels=labels).loss

    def train(m):
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(15):
            opt.zero_grad()
            loss_of(m).backward()
            opt.step()
        return len(params)

    with torch.no_grad():
        before = float(loss_of(model))
    n_params = heal_(model, train, r=4)
    assert n_params == 2 * 4 * 2  # lora_A and lora_B of q/k/v/o in 2 layers
    attn = model.model.layers[0].self_attn
    assert all(type(getattr(attn, p)) is torch.nn.Linear for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert attn.k_proj.weight.shape == (HEAD_DIM, D)
    assert all(p.requires_grad for p in model.parameters())  # restored
    with torch.no_grad():
        assert float(loss_of(model)) < before


# --- bad requests ----------------------------------------------------------------------------------------------


def test_bad_requests_raise_config_error():
    model = llama(4)
    with pytest.raises(ConfigError, match="does not divide"):
        compress_kv_heads_(model, KVHeadsConfig(kv_heads=3), batches())
    with pytest.raises(ConfigError, match="does not compress"):
        compress_kv_heads_(model, KVHeadsConfig(kv_heads=4), batches())
    with pytest.raises(ConfigError, match="does not compress"):
        compress_kv_heads_(model, KVHeadsConfig(kv_heads=6), batches())
    with pytest.raises(ConfigError, match="no self-attention"):
        compress_kv_heads_(torch.nn.Sequential(torch.nn.Linear(4, 4)), KVHeadsConfig(kv_heads=1), batches())
    with pytest.raises(ConfigError, match="calibration batches"):
        compress_kv_heads_(model, KVHeadsConfig(kv_heads=2), None)
    for bad in (
        {"kv_heads": 0},
        {"grouping": "random"},
        {"values": "pca"},
        {"rope_keys": "svd_a"},
        {"calib_tokens": 0},
        {"heal_steps": -1},
        {"heal_lr": 0.0},
    ):
        with pytest.raises(ConfigError):
            KVHeadsConfig(**bad)
    assert model.config.num_key_value_heads == 4  # nothing was changed by the failed calls
    assert KVHeadsConfig.method == "kv_heads" and KVHeadsConfig.cli_flags == ("kv_heads", "heal_steps", "heal_lr")


def test_compress_and_save_through_a_decoder_backbone(tmp_path, tiny_bert_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thrifty.backbones.hf_decoder import HFDecoder
    from thrifty.backbones.preprocess import TextPreprocess

    bb = HFDecoder("test", llama(4), TextPreprocess(AutoTokenizer.from_pretrained(tiny_bert_dir), 24), "random")
    compress_kv_heads_(bb, KVHeadsConfig(kv_heads=2, grouping="similarity"), batches())
    assert bb.model.config.num_key_value_heads == 2
    out = save_compressed(bb, tmp_path / "bb")  # the backbone's tokenizer travels with it
    assert (out / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = batches(1, seed=11)[0]
    real = x["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(bb.logits(x)[real], logits(loaded, x), rtol=0, atol=1e-5)
