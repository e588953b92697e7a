"""Tiny models, a word-level tokenizer and a corpus, made locally in seconds: what the tests (and the
demo) build their checkpoints from, with no network.

`build_tiny_model` saves a small random model of one of several architectures with
save_pretrained (optionally sharded); `build_word_tokenizer` makes a word-level tokenizer that fits
its vocabulary; `CORPUS` is a few sentences of that vocabulary; `fine_tune` stands in for training.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import transformers

TINY_CONFIGS = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=192),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=192),
    ),
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=1, intermediate_size=192, head_dim=16),
    ),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_head=4)),
}


def build_tiny_model(
    arch: str,
    directory: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    shard_size: str | None = None,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
):
    """Save a random `arch` model (vocab 256) with save_pretrained; return the model."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config_cls, model_cls, extra = TINY_CONFIGS[arch]
    if arch == "gpt2":
        config = getattr(transformers, config_cls)(
            vocab_size=256, n_embd=hidden, n_layer=layers, n_positions=128, **extra
        )
    else:
        extra = {**extra, "intermediate_size": 3 * hidden}
        config = getattr(transformers, config_cls)(
            vocab_size=256, hidden_size=hidden, num_hidden_layers=layers, max_position_embeddings=128, **extra
        )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


CORPUS = """
the cat sat on the mat . the dog sat on the log . a bird sang in the tree .
sparse adapters train a few weights of the model and leave the rest alone .
the seed regenerates the indices so the file holds little more than the values .
"""


def fine_tune(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for training: change a random 3% of the elements of every parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            mask = torch.rand(p.shape, generator=gen) < 0.03
            noise = torch.randn(p.shape, generator=gen) * 0.05
            p.copy_(torch.where(mask, (p.float() + noise).to(p.dtype), p))


WORD_SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
# One line per turn, every piece a vocabulary word, so rendered chats tokenize without <unk>.
WORD_CHAT_TEMPLATE = (
    "{% for message in messages %}<s> {{ message['role'] }} : {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def build_word_tokenizer(
    words: Iterable[str], directory: str | Path | None = None, chat_template: bool = True
) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer made locally, sized for `build_tiny_model` (at most 256 entries).

    Ids 0..3 are <pad> <unk> <s> </s>, then every word in first-seen order. Each item of `words` is
    split the way the tokenizer splits text (whitespace and punctuation), so whole sentences may be
    passed. With `chat_template`, the role words and ":" join the vocabulary and a one-line-per-turn
    template is set. Saved with save_pretrained when `directory` is given.
    """
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    split = pre_tokenizers.Whitespace()
    roles = ["system", "user", "assistant", ":"] if chat_template else []
    vocab = {token: i for i, token in enumerate(WORD_SPECIAL_TOKENS)}
    for item in [*words, *roles]:
        for piece, _ in split.pre_tokenize_str(item):
            vocab.setdefault(piece, len(vocab))
    if len(vocab) > 256:
        raise ValueError(f"{len(vocab)} vocabulary entries; tiny models have room for 256")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    # Registered as special so "<s>" is matched whole instead of being split into "<", "s", ">".
    tok.add_special_tokens(list(WORD_SPECIAL_TOKENS))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        fast.chat_template = WORD_CHAT_TEMPLATE
    if directory is not None:
        fast.save_pretrained(directory)
    return fast
