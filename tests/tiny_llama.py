"""A small random Llama (grouped-query attention, rotary, gated MLP, RMSNorm: the SmolLM2 architecture)
built from a config, and a word-level tokenizer for it: language-model tests without a download."""

from __future__ import annotations

import torch

VOCAB = 40


def word_tokenizer(vocab: int = VOCAB):
    """A tokenizer of the words `w0` .. `w{vocab-1}` (one token each)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", pad_token="w1", eos_token="w2")


def hf_llama(n_layers: int = 3, n_heads: int = 4, n_kv_heads: int = 2, vocab: int = VOCAB, seed: int = 0):
    """A random Hugging Face Llama, d_model 32, in eval mode; RMSNorm gains perturbed (they start at 1,
    where a dropped norm would not show)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=16,
                      rope_theta=10000.0, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape))
    return model


def llama_bridge(**kwargs):
    """`hf_llama(**kwargs)` in a TransformerLens `TransformerBridge` (`caap.language_models.bridge_from_hf`)."""
    from caap.language_models import bridge_from_hf

    return bridge_from_hf(hf_llama(**kwargs), word_tokenizer(kwargs.get("vocab", VOCAB)), device="cpu")
