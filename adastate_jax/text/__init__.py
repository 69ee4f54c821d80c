"""Text conditioning: the one interface every generator uses, and the encoders behind it.

Text conditioning is always an embedding array `[B, text_len, text_dim]` float32, zero-padded
beyond the prompt's tokens, and nothing else (no mask: Wan attends to the zero padding too).
Every public name of the package is re-exported here (`from adastate_jax import text`).

Map of the package:
  interface.py     `TextEncoder` (the protocol), `check_text_embeddings`, what encoders share
  tokenizers.py    UMT5 tokenizers (`load_tokenizer`, `as_tokenizer`), Wan's `clean_prompt`
  umt5_encoder.py  `encode_prompts`, `UMT5TextEncoder` (the network itself: `models/umt5.py`)
  prompt_cache.py  `PromptCache`: encoded prompts on disk, in front of any encoder
  embeddings.py    precomputed embeddings: `load_embeddings`, `save_embeddings`,
                   `pad_embeddings`, `PrecomputedTextEncoder`
  words.py         PanWorld's word encoder: `WordEmbeddingEncoder`, `split_words`,
                   `panworld_word_encoder` (the frozen one every script builds)

Owns: the package's public surface (names only; no logic here).

Must not know: the DiT, streaming, anchors, training, data pipelines.
"""

from adastate_jax.text.embeddings import (
    PrecomputedTextEncoder,
    load_embeddings,
    pad_embeddings,
    save_embeddings,
)
from adastate_jax.text.interface import (
    WAN_TEXT_DIM,
    WAN_TEXT_LEN,
    TextEncoder,
    check_text_embeddings,
    weights_fingerprint,
)
from adastate_jax.text.prompt_cache import PromptCache
from adastate_jax.text.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    as_tokenizer,
    clean_prompt,
    load_tokenizer,
)
from adastate_jax.text.umt5_encoder import UMT5TextEncoder, encode_prompts
from adastate_jax.text.words import (
    PAD_WORD,
    WordEmbeddingConfig,
    WordEmbeddingEncoder,
    panworld_word_encoder,
    split_words,
)

__all__ = [
    "PAD_WORD",
    "WAN_TEXT_DIM",
    "WAN_TEXT_LEN",
    "HFTokenizer",
    "PrecomputedTextEncoder",
    "PromptCache",
    "SentencePieceTokenizer",
    "TextEncoder",
    "Tokenizer",
    "UMT5TextEncoder",
    "WordEmbeddingConfig",
    "WordEmbeddingEncoder",
    "as_tokenizer",
    "check_text_embeddings",
    "clean_prompt",
    "encode_prompts",
    "load_embeddings",
    "load_tokenizer",
    "pad_embeddings",
    "panworld_word_encoder",
    "save_embeddings",
    "split_words",
    "weights_fingerprint",
]
