"""UMT5 tokenizers and Wan's prompt cleaning.

Owns: `Tokenizer` (the protocol: prompts -> ids, mask [B, text_len] int32, plus an `identity`
string), `SentencePieceTokenizer` (a `.model` used as T5 uses it), `HFTokenizer` (a `transformers`
tokenizer called as Wan calls it), `load_tokenizer` (local files only, nothing is downloaded),
`as_tokenizer`, `clean_prompt`; `_file_digest`, the content digest in a tokenizer's identity
(`files.sha256_file`, shortened).

Must not know: the UMT5 model, embeddings, caches, the DiT, streaming, training. Files it reads
are the ones it is handed.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from adastate_jax import files


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning ('whitespace'): fix text (ftfy, if installed), unescape HTML twice,
    collapse runs of whitespace to one space, strip."""
    try:
        import ftfy  # optional, as in Wan

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class Tokenizer(Protocol):
    identity: str

    def tokenize(self, prompts: Sequence[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
        """prompts -> (token ids [B, text_len] int32, attention mask [B, text_len] int32)."""
        ...


class SentencePieceTokenizer:
    """A sentencepiece `.model` used the way T5 tokenizers use it: pieces, then `</s>`; truncated
    to text_len - 1 pieces so `</s>` always ends the sequence; padded with the pad id."""

    def __init__(self, model_file: str):
        import sentencepiece

        self.path = os.path.abspath(model_file)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self.eos_id = self.sp.eos_id()
        self.pad_id = max(self.sp.pad_id(), 0)
        if self.eos_id < 0:
            raise ValueError(f"{self.path}: sentencepiece model has no </s> (eos) piece, which T5 needs")
        self.identity = f"sentencepiece:{_file_digest(self.path)}"

    def tokenize(self, prompts, text_len):
        ids = np.full((len(prompts), text_len), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), text_len), np.int32)
        for i, p in enumerate(prompts):
            pieces = self.sp.encode(p)[: text_len - 1] + [self.eos_id]
            ids[i, : len(pieces)] = pieces
            mask[i, : len(pieces)] = 1
        return ids, mask


class HFTokenizer:
    """A `transformers` tokenizer, called as Wan calls it (max_length padding, truncation, </s>)."""

    def __init__(self, tokenizer, identity: str | None = None):
        self.tok = tokenizer
        if getattr(tokenizer, "pad_token", None) is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no pad token; T5 tokenizers use '<pad>'"
            )
        self.identity = identity or f"hf:{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}"

    def tokenize(self, prompts, text_len):
        out = self.tok(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="np",
        )
        return np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a UMT5 tokenizer from local files (nothing is downloaded).

    path: a Hugging Face tokenizer directory (e.g. a local copy of `google/umt5-xxl`: its
    `tokenizer.json` or `spiece.model`), a `tokenizer.json` file, or a sentencepiece `.model` file.
    For exact parity with Wan prefer the Hugging Face directory or `tokenizer.json`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"tokenizer file {path!r} does not exist "
            "(give a tokenizer directory, tokenizer.json or spiece.model)"
        )
    import transformers

    if os.path.isdir(path):
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as auto_err:
            if not os.path.exists(os.path.join(path, "spiece.model")):
                raise ValueError(
                    f"{path}: cannot load a tokenizer from this directory ({auto_err})"
                ) from auto_err
            tok = transformers.T5Tokenizer.from_pretrained(path, local_files_only=True)
        digest = ",".join(
            f"{f}={_file_digest(os.path.join(path, f))}"
            for f in sorted(os.listdir(path))
            if f in ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")
        )
        return HFTokenizer(tok, identity=f"hf-dir:{digest}")
    if path.endswith(".json"):
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_file=path, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
        )
        return HFTokenizer(tok, identity=f"hf-json:{_file_digest(path)}")
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    raise ValueError(
        f"{path}: not a tokenizer (expected a directory, a tokenizer.json or a sentencepiece .model)"
    )


def as_tokenizer(tokenizer) -> Tokenizer:
    """A path, a `Tokenizer`, or a `transformers` tokenizer object -> `Tokenizer`."""
    if tokenizer is None:
        raise ValueError(
            "encoding prompts with UMT5 needs a tokenizer file: pass the path of a local copy of "
            "google/umt5-xxl's tokenizer (its directory, tokenizer.json or spiece.model), "
            "or use precomputed embeddings (load_embeddings)"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    if hasattr(tokenizer, "tokenize") and hasattr(tokenizer, "identity"):
        return tokenizer
    if callable(tokenizer):
        return HFTokenizer(tokenizer)
    raise TypeError(f"not a tokenizer: {type(tokenizer).__name__}")


def _file_digest(path: str) -> str:
    return files.sha256_file(path)[:16]
