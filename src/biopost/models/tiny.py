"""Built-in tiny Qwen3-style backbones for tests and fast demos.

The tokenizer is a byte-level BPE trained in-process on the texts the run will train on (so any text
still encodes, byte by byte); the model is randomly initialised from a config. Both are saved as a normal
Hugging Face directory, so every later step loads them exactly like a hub model.
"""

from __future__ import annotations

from pathlib import Path

TINY_SIZES = {
    # name: hidden, layers, heads, kv heads, intermediate, vocab
    "tiny-s": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab=2048),
    "tiny-m": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384, vocab=4096),
}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK = ["<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_backbone(size: str, texts: list[str], path: Path, seed: int = 0, think_tokens: bool = True) -> Path:
    """Train a tokenizer on ``texts``, build a random model of ``size``, save both to ``path``.

    ``think_tokens=False`` leaves ``<think>`` tags as plain text, like backbones without thinking tokens.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny backbone {size!r}; built-in sizes: {', '.join(TINY_SIZES)}")
    if not texts:
        raise ValueError("a tiny backbone needs training texts for its tokenizer")
    dims = dict(TINY_SIZES[size])
    vocab = dims.pop("vocab")
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    raw.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    if think_tokens:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        head_dim=dims["hidden_size"] // dims["num_attention_heads"],
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **dims,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
