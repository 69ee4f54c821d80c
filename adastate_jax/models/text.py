"""Text conditioning: the one interface every generator uses, and the encoders behind it.

Text conditioning is always an embedding array `[B, text_len, text_dim]` float32, zero-padded
beyond the prompt's tokens, and nothing else (no mask: Wan attends to the zero padding too).
Wan: 512 x 4096 from UMT5-XXL, keeping the real tokens' embeddings and zero-padding to 512.

Owns:
- `TextEncoder`: the protocol (`encode(prompts) -> [B, text_len, text_dim]`, `text_len`,
  `text_dim`, `cache_identity()`), satisfied by every encoder below and by `PromptCache`.
- Tokenizers for UMT5 (`load_tokenizer`: a Hugging Face tokenizer directory or `tokenizer.json`,
  or a sentencepiece `.model`), Wan's prompt cleaning, `encode_prompts`, `UMT5TextEncoder`.
- `PromptCache`: encoded prompts on disk (atomic writes, verified reads), so repeats cost nothing.
- Precomputed embeddings as first-class input: `load_embeddings`, `save_embeddings`,
  `pad_embeddings`, `PrecomputedTextEncoder`.
- `WordEmbeddingEncoder`: the tiny learned text encoder for PanWorld (words -> table -> optional
  MLP), same shape contract as the UMT5 path.

Must not know: the DiT, streaming, anchors, training, data sets. Files it reads are the ones it is
handed (tokenizer, embeddings, its cache directory).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import html
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adastate_jax.models.umt5 import UMT5Config, UMT5Encoder, load_umt5

log = logging.getLogger(__name__)

WAN_TEXT_LEN = 512
WAN_TEXT_DIM = 4096

# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns prompts into conditioning `[B, text_len, text_dim]` float32."""

    text_len: int
    text_dim: int

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """prompts (B strings) -> [B, text_len, text_dim] float32, zero rows beyond each prompt."""
        ...

    def cache_identity(self) -> str:
        """A string that changes whenever the same prompt would encode differently."""
        ...


def check_text_embeddings(emb, text_len: int | None = None, text_dim: int | None = None, what: str = "text"):
    """Raise a ValueError naming `what` unless emb is [B, text_len, text_dim] (None = any)."""
    shape = tuple(np.shape(emb))
    want = ("B", text_len if text_len is not None else "T", text_dim if text_dim is not None else "D")
    if (
        len(shape) != 3
        or (text_len is not None and shape[1] != text_len)
        or (text_dim is not None and shape[2] != text_dim)
    ):
        raise ValueError(
            f"{what}: text embeddings must have shape [{', '.join(map(str, want))}], got {shape}"
        )


def _as_prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(
            f"prompts must be a list of strings, got a single string {prompts!r}: wrap it in a list"
        )
    out = list(prompts)
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is {type(p).__name__}, not str: {p!r}")
    return out


# --------------------------------------------------------------------------------------------
# Tokenizers (UMT5)
# --------------------------------------------------------------------------------------------


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
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# UMT5 prompt encoding
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _apply_module(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def _run_encoder(encoder, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if isinstance(encoder, nnx.Module):
        graphdef, state = nnx.split(encoder)
        return np.asarray(_apply_module(graphdef, state, jnp.asarray(ids), jnp.asarray(mask)), np.float32)
    return np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask)), np.float32)


def encode_prompts(
    encoder: UMT5Encoder | Callable,
    tokenizer,
    prompts: Sequence[str],
    text_len: int = WAN_TEXT_LEN,
    batch_size: int = 8,
    clean: bool = True,
) -> np.ndarray:
    """Prompts -> UMT5 conditioning [B, text_len, d_model] float32, as Wan builds it.

    Each prompt is cleaned (Wan's 'whitespace' cleaning), tokenized to text_len (truncated, `</s>`
    appended, padded), encoded with the attention mask, and every position after its last real
    token is set to zero (Wan keeps the real tokens' embeddings and zero-pads to text_len).
    encoder: a `UMT5Encoder` (run jitted) or any callable (ids [B, L], mask [B, L]) -> [B, L, D].
    tokenizer: a tokenizer path (see `load_tokenizer`) or object; None raises, naming what is needed.
    Prompts run in batches of `batch_size`; a smaller batch is padded to a power of two, so few
    shapes are ever compiled.
    """
    prompts = _as_prompt_list(prompts)
    tok = as_tokenizer(tokenizer)
    if clean:
        prompts = [clean_prompt(p) for p in prompts]
    ids, mask = tok.tokenize(prompts, text_len)  # [B, text_len] each
    if ids.shape != (len(prompts), text_len) or mask.shape != ids.shape:
        raise ValueError(
            f"tokenizer returned ids {ids.shape} / mask {mask.shape}, expected {(len(prompts), text_len)}"
        )
    outs = []
    for start in range(0, len(prompts), batch_size):
        b_ids, b_mask = ids[start : start + batch_size], mask[start : start + batch_size]
        n = len(b_ids)
        padded = min(batch_size, 1 << (n - 1).bit_length())  # few compiled shapes: 1, 2, 4, .., batch_size
        if padded > n:
            b_ids = np.concatenate([b_ids, np.repeat(b_ids[-1:], padded - n, 0)])
            b_mask = np.concatenate([b_mask, np.repeat(b_mask[-1:], padded - n, 0)])
        hidden = _run_encoder(encoder, b_ids, b_mask)[:n]  # [n, text_len, D]
        outs.append(hidden * b_mask[:n, :, None].astype(np.float32))
    if not outs:
        raise ValueError("encode_prompts got no prompts")
    return np.concatenate(outs)  # [B, text_len, D]


class UMT5TextEncoder:
    """UMT5 + tokenizer behind the `TextEncoder` interface (Wan: text_len 512, text_dim 4096)."""

    def __init__(
        self,
        encoder: UMT5Encoder,
        tokenizer,
        text_len: int = WAN_TEXT_LEN,
        batch_size: int = 8,
        weights_identity: str | None = None,
    ):
        self.encoder = encoder
        self.tokenizer = as_tokenizer(tokenizer)
        self.text_len = int(text_len)
        self.text_dim = int(encoder.config.d_model)
        self.batch_size = batch_size
        self._weights_identity = weights_identity

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        tokenizer,
        config: UMT5Config | None = None,
        layout: str = "hf",
        text_len: int = WAN_TEXT_LEN,
        shardings=None,
    ) -> UMT5TextEncoder:
        """Convert a PyTorch UMT5 checkpoint (see `umt5.load_umt5`) and attach a tokenizer."""
        config = config or UMT5Config()
        encoder = load_umt5(checkpoint, config, layout=layout, shardings=shardings)
        return cls(
            encoder, tokenizer, text_len=text_len, weights_identity=f"{layout}:{_path_stamp(checkpoint)}"
        )

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        return encode_prompts(self.encoder, self.tokenizer, prompts, self.text_len, self.batch_size)

    def cache_identity(self) -> str:
        if self._weights_identity is None:
            self._weights_identity = weights_fingerprint(self.encoder)
        return json.dumps(
            {
                "kind": "umt5",
                "config": dataclasses.asdict(self.encoder.config),
                "tokenizer": self.tokenizer.identity,
                "weights": self._weights_identity,
                "text_len": self.text_len,
            },
            sort_keys=True,
        )


def _path_stamp(path: str) -> str:
    """Absolute path + size + mtime of a file, or of every file in a directory."""
    path = os.path.abspath(path)
    files = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    parts = []
    for f in files:
        st = os.stat(f)
        parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@jax.jit
def _leaf_sums(leaves):
    return [
        jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.abs(x.astype(jnp.float32)))]) for x in leaves
    ]


def weights_fingerprint(module: nnx.Module) -> str:
    """A cheap fingerprint of a module's parameters: paths, shapes, dtypes, sum and abs-sum of each.

    Any training step or different initialisation changes it; it is not a cryptographic hash.
    """
    state = nnx.state(module, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    sums = _leaf_sums([leaf for _, leaf in flat])
    h = hashlib.sha256()
    for (path, leaf), s in zip(flat, sums):
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}:".encode())
        h.update(np.asarray(s, np.float32).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Prompt cache
# --------------------------------------------------------------------------------------------


class PromptCache:
    """Encoded prompts on disk, in front of any `TextEncoder` (and itself a `TextEncoder`).

    One `.npz` per (encoder identity, prompt, text_len), named by the SHA-256 of the three. A file
    holds the embedding without its trailing zero rows, the prompt, the key and a digest of the
    data; reads verify all of them and the shape, so a corrupt, truncated or foreign file is
    recomputed and rewritten (with a warning), never used. Writes go to a temporary file in the
    same directory and are moved into place with `os.replace` (atomic: readers never see a
    partial file; concurrent writers of one prompt write the same bytes).
    """

    def __init__(self, directory: str | os.PathLike, encoder: TextEncoder):
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.encoder = encoder
        self.text_len = int(encoder.text_len)
        self.text_dim = int(encoder.text_dim)
        self._identity = encoder.cache_identity()
        self.hits = 0
        self.misses = 0
        self.corrupt = 0

    def cache_identity(self) -> str:
        return self._identity

    def key(self, prompt: str) -> str:
        blob = json.dumps(
            {"encoder": self._identity, "prompt": prompt, "text_len": self.text_len}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, prompt: str) -> str:
        return os.path.join(self.directory, self.key(prompt) + ".npz")

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """prompts -> [B, text_len, text_dim] float32; only prompts not on disk reach the encoder."""
        prompts = _as_prompt_list(prompts)
        out = np.zeros((len(prompts), self.text_len, self.text_dim), np.float32)
        todo: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            emb = self._read(p)
            if emb is None:
                todo.setdefault(p, []).append(i)
            else:
                self.hits += 1
                out[i] = emb
        if todo:
            new = self.encoder.encode(list(todo))  # each distinct missing prompt once
            check_text_embeddings(
                new, self.text_len, self.text_dim, what=f"{type(self.encoder).__name__}.encode"
            )
            for (p, rows), emb in zip(todo.items(), new):
                self.misses += 1
                self._write(p, emb)
                out[rows] = emb
        return out

    def _read(self, prompt: str) -> np.ndarray | None:
        path = self.path(prompt)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                emb = np.asarray(f["embedding"])
                stored_key, stored_prompt = str(f["key"]), str(f["prompt"])
                stored_len, digest = int(f["text_len"]), str(f["digest"])
            problems = []
            if stored_key != self.key(prompt) or stored_prompt != prompt:
                problems.append("it belongs to another prompt or encoder")
            if stored_len != self.text_len:
                problems.append(f"text_len {stored_len} != {self.text_len}")
            if (
                emb.dtype != np.float32
                or emb.ndim != 2
                or emb.shape[1] != self.text_dim
                or len(emb) > self.text_len
            ):
                problems.append(
                    f"embedding {emb.dtype}{list(emb.shape)} is not "
                    f"float32 [<= {self.text_len}, {self.text_dim}]"
                )
            elif _digest(emb) != digest:
                problems.append("its data does not match its digest")
            if problems:
                raise ValueError("; ".join(problems))
        except Exception as e:  # corrupt zip, missing field, wrong content: recompute
            self.corrupt += 1
            log.warning("prompt cache file %s is unusable (%s: %s); recomputing", path, type(e).__name__, e)
            return None
        full = np.zeros((self.text_len, self.text_dim), np.float32)
        full[: len(emb)] = emb
        return full

    def _write(self, prompt: str, emb: np.ndarray) -> None:
        emb = np.asarray(emb, np.float32)
        nonzero = np.flatnonzero(np.any(emb != 0, axis=1))
        trimmed = np.ascontiguousarray(emb[: (nonzero[-1] + 1) if len(nonzero) else 0])  # [n, text_dim]
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    embedding=trimmed,
                    key=np.str_(self.key(prompt)),
                    prompt=np.str_(prompt),
                    text_len=np.int64(self.text_len),
                    digest=np.str_(_digest(trimmed)),
                )
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path(prompt))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(
        f"{arr.dtype}{arr.shape}".encode() + np.ascontiguousarray(arr).tobytes()
    ).hexdigest()


# --------------------------------------------------------------------------------------------
# Precomputed embeddings
# --------------------------------------------------------------------------------------------

_EMBEDDING_KEYS = ("embeddings", "embedding", "context", "text")


def load_embeddings(
    path: str | os.PathLike,
    text_len: int | None = None,
    text_dim: int | None = None,
    key: str | None = None,
) -> np.ndarray:
    """Precomputed text conditioning from `.npy`, `.npz` or `.safetensors` -> [B, text_len, text_dim] f32.

    Accepts [T, D] (one prompt) or [B, T, D]. With `text_len`, shorter sequences are zero-padded
    (Wan's rule for prompts shorter than 512 tokens) and longer ones are an error; with `text_dim`
    the feature size must match. `key` picks the array in a multi-array file (default: the only
    array, or one named embeddings / embedding / context / text). Every error names the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"embedding file {path!r} does not exist")
    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{path}: cannot read as .npy ({type(e).__name__}: {e})") from e
    elif path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:
                arr = f[_pick_name(path, f.files, key)]
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
    elif path.endswith(".safetensors"):
        from adastate_jax.models.convert import SafetensorsSource

        try:
            src = SafetensorsSource([path])
        except ValueError as e:
            raise ValueError(f"{path}: cannot read as .safetensors ({e})") from e
        arr = src.load(_pick_name(path, src.keys(), key))
    else:
        raise ValueError(f"{path}: unsupported embedding file type (use .npy, .npz or .safetensors)")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: embeddings must be [T, D] or [B, T, D], got shape {tuple(arr.shape)}")
    if not np.issubdtype(np.dtype(arr.dtype), np.floating) and arr.dtype.name != "bfloat16":
        raise ValueError(f"{path}: embeddings must be floating point, got {arr.dtype}")
    if text_dim is not None and arr.shape[2] != text_dim:
        raise ValueError(
            f"{path}: embeddings have shape {tuple(arr.shape)}, expected text_dim {text_dim} (last axis)"
        )
    if text_len is not None and arr.shape[1] > text_len:
        raise ValueError(
            f"{path}: embeddings have shape {tuple(arr.shape)}, longer than text_len {text_len} (axis 1)"
        )
    arr = np.asarray(arr, np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{path}: embeddings contain NaN or inf")
    if text_len is not None and arr.shape[1] < text_len:
        arr = np.concatenate(
            [arr, np.zeros((arr.shape[0], text_len - arr.shape[1], arr.shape[2]), np.float32)], 1
        )
    return arr


def _pick_name(path: str, names: Sequence[str], key: str | None) -> str:
    """The array to use in a multi-array file: `key`, the only one, or a conventional name."""
    names = list(names)
    if key is not None:
        if key not in names:
            raise ValueError(f"{path}: no array named {key!r}; it holds {names}")
        return key
    if len(names) == 1:
        return names[0]
    found = [k for k in _EMBEDDING_KEYS if k in names]
    if not found:
        raise ValueError(f"{path}: holds several arrays {names}; pass key= to choose one")
    return found[0]


def save_embeddings(path: str | os.PathLike, embeddings: np.ndarray, prompts: Sequence[str] | None = None):
    """Write [B, T, D] embeddings (and optionally their prompts) to `.npz`, atomically."""
    path = os.fspath(path)
    check_text_embeddings(embeddings, what=path)
    arrays = {"embeddings": np.asarray(embeddings, np.float32)}
    if prompts is not None:
        prompts = _as_prompt_list(prompts)
        if len(prompts) != len(embeddings):
            raise ValueError(f"{path}: {len(prompts)} prompts for {len(embeddings)} embeddings")
        arrays["prompts"] = np.asarray(prompts, dtype=np.str_)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def pad_embeddings(embeddings: Sequence[np.ndarray], text_len: int = WAN_TEXT_LEN) -> np.ndarray:
    """Per-prompt real-token embeddings [n_i, D] -> [B, text_len, D] zero-padded (Wan's rule)."""
    if not embeddings:
        raise ValueError("pad_embeddings got no embeddings")
    dims = {np.shape(e)[-1] for e in embeddings}
    if len(dims) != 1 or any(np.ndim(e) != 2 for e in embeddings):
        raise ValueError(
            f"pad_embeddings needs [n_i, D] arrays with one D, got {[np.shape(e) for e in embeddings]}"
        )
    out = np.zeros((len(embeddings), text_len, dims.pop()), np.float32)
    for i, e in enumerate(embeddings):
        if len(e) > text_len:
            raise ValueError(f"embedding {i} has {len(e)} tokens, more than text_len {text_len}")
        out[i, : len(e)] = e
    return out


class PrecomputedTextEncoder:
    """A `TextEncoder` that looks prompts up in precomputed embeddings (no model needed).

    `from_file(path)` reads a `.npz` written by `save_embeddings(path, embeddings, prompts)`.
    """

    def __init__(
        self, table: Mapping[str, np.ndarray], text_len: int | None = None, name: str = "precomputed"
    ):
        if not table:
            raise ValueError(f"{name}: no precomputed embeddings")
        shapes = {tuple(np.shape(v)) for v in table.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"{name}: every embedding must be [T, D] with one shape, got {sorted(shapes)}")
        T, D = next(iter(shapes))
        self.text_len = int(text_len or T)
        self.text_dim = int(D)
        self.name = name
        self._table = {
            p: pad_embeddings([np.asarray(v, np.float32)], self.text_len)[0] for p, v in table.items()
        }

    @classmethod
    def from_file(cls, path: str | os.PathLike, text_len: int | None = None) -> PrecomputedTextEncoder:
        path = os.fspath(path)
        emb = load_embeddings(path, text_len=text_len, key="embeddings")
        try:
            with np.load(path, allow_pickle=False) as f:
                prompts = [str(p) for p in f["prompts"]]
        except KeyError:
            raise ValueError(
                f"{path}: has no 'prompts' array (write it with save_embeddings(..., prompts))"
            ) from None
        if len(prompts) != len(emb):
            raise ValueError(f"{path}: {len(prompts)} prompts for {len(emb)} embeddings")
        return cls(dict(zip(prompts, emb)), text_len=text_len, name=path)

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        prompts = _as_prompt_list(prompts)
        missing = [p for p in prompts if p not in self._table]
        if missing:
            raise KeyError(f"{self.name}: no precomputed embedding for prompt(s) {missing}")
        return np.stack([self._table[p] for p in prompts])

    def cache_identity(self) -> str:
        h = hashlib.sha256()
        for p in sorted(self._table):
            h.update(p.encode() + b"\0" + self._table[p].tobytes())
        return f"precomputed:{h.hexdigest()[:16]}"


# --------------------------------------------------------------------------------------------
# PanWorld: a tiny learned word-embedding encoder
# --------------------------------------------------------------------------------------------

_STRIP = ".,;:!?\"'()[]{}"
PAD_WORD = "<pad>"


def split_words(prompt: str) -> list[str]:
    """Prompt -> lowercase whitespace tokens, with surrounding punctuation (.,;:!?"'()[]{}) stripped."""
    words = (w.strip(_STRIP) for w in prompt.lower().split())
    return [w for w in words if w]


@dataclasses.dataclass(frozen=True)
class WordEmbeddingConfig:
    """vocab: the known words (lowercase, no whitespace); word i gets id i + 1, id 0 is padding.
    A leading "<pad>" entry is taken as that padding id, so `data.panworld.prompt_vocabulary()`
    can be passed as is and its `prompt_ids` fed straight to the encoder.
    text_len / text_dim: output shape. mlp_hidden: hidden width of an optional per-token MLP
    (Linear, GELU-tanh, Linear; text_dim in and out) after the table; None = the table rows are
    the output. positional: add a learned embedding per token position (word order matters)."""

    vocab: tuple[str, ...]
    text_len: int = 16
    text_dim: int = 32
    mlp_hidden: int | None = None
    positional: bool = True
    param_dtype: str = "float32"

    def __post_init__(self):
        vocab = tuple(self.vocab)
        if vocab and vocab[0] == PAD_WORD:
            vocab = vocab[1:]
        object.__setattr__(self, "vocab", vocab)
        if not self.vocab:
            raise ValueError("WordEmbeddingConfig.vocab is empty")
        seen = set()
        for w in self.vocab:
            if not isinstance(w, str) or not w or w != w.lower() or split_words(w) != [w]:
                raise ValueError(
                    f"vocabulary word {w!r} must be a non-empty lowercase word "
                    "without spaces or edge punctuation"
                )
            if w in seen or w == PAD_WORD:
                raise ValueError(f"vocabulary word {w!r} appears twice (or {PAD_WORD!r} not first)")
            seen.add(w)
        if self.text_len < 1 or self.text_dim < 1:
            raise ValueError(f"text_len {self.text_len} and text_dim {self.text_dim} must be positive")


@functools.lru_cache(maxsize=16)
def _word_index(vocab: tuple[str, ...]) -> dict[str, int]:
    return {w: i + 1 for i, w in enumerate(vocab)}  # 0 = padding


def _small_param(value):
    # Tiny encoder: replicated everywhere (a vocabulary of a few dozen words need not divide a mesh).
    return nnx.Param(value, sharding_names=(None,) * value.ndim, eager_sharding=False)


class WordEmbeddingEncoder(nnx.Module):
    """PanWorld text encoder: prompt words -> ids -> learned table (+ positions) -> optional MLP.

    `tokenize(prompts)` -> ids, mask [B, text_len] (id 0 = padding; unknown word -> KeyError naming
    it); `__call__(ids, mask)` -> [B, text_len, text_dim] float32 with zero rows at padding
    (traceable: train it jointly with the DiT); `encode(prompts)` = both, as numpy (`TextEncoder`).
    """

    def __init__(self, config: WordEmbeddingConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.text_len, self.text_dim = config.text_len, config.text_dim
        pd = jnp.dtype(config.param_dtype)
        V, D = len(config.vocab) + 1, config.text_dim

        def normal(shape, std):
            return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(pd)

        self.table = _small_param(normal((V, D), 1.0))  # [V, D]; row 0 (padding) is never used
        self.positions = (
            _small_param(normal((config.text_len, D), 0.1)) if config.positional else None
        )  # [L, D]
        if config.mlp_hidden is not None:
            H = config.mlp_hidden
            self.mlp_in = _small_param(normal((D, H), D**-0.5))  # [D, H]
            self.mlp_in_bias = _small_param(jnp.zeros((H,), pd))
            self.mlp_out = _small_param(normal((H, D), H**-0.5))  # [H, D]
            self.mlp_out_bias = _small_param(jnp.zeros((D,), pd))
        else:
            self.mlp_in = self.mlp_in_bias = self.mlp_out = self.mlp_out_bias = None

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """prompts -> (ids [B, text_len] int32, mask [B, text_len] int32)."""
        prompts = _as_prompt_list(prompts)
        L = self.config.text_len
        index = _word_index(self.config.vocab)
        ids = np.zeros((len(prompts), L), np.int32)
        for b, p in enumerate(prompts):
            words = split_words(p)
            unknown = [w for w in words if w not in index]
            if unknown:
                raise KeyError(
                    f"word(s) {unknown} of prompt {p!r} not in the WordEmbeddingEncoder vocabulary "
                    f"({len(index)} words: {', '.join(list(index)[:12])}{', ...' if len(index) > 12 else ''})"
                )
            if len(words) > L:
                raise ValueError(f"prompt {p!r} has {len(words)} words, more than text_len {L}")
            ids[b, : len(words)] = [index[w] for w in words]
        return ids, (ids != 0).astype(np.int32)

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """ids [B, n] int (0 = pad, n <= text_len; zero-padded to text_len), mask [B, n] (default
        ids != 0) -> [B, text_len, text_dim] float32 with zero rows at padding."""
        L = self.config.text_len
        if ids.ndim != 2 or ids.shape[1] > L:
            raise ValueError(f"ids must be [B, n] with n <= text_len {L}, got shape {ids.shape}")
        if mask is None:
            mask = ids != 0
        if mask.shape != ids.shape:
            raise ValueError(f"mask shape {mask.shape} does not match ids {ids.shape}")
        if ids.shape[1] < L:
            pad = ((0, 0), (0, L - ids.shape[1]))
            ids, mask = jnp.pad(ids, pad), jnp.pad(mask, pad)
        x = jnp.take(self.table[...], ids, axis=0).astype(jnp.float32)  # [B, L, D]
        if self.positions is not None:
            x = x + self.positions[...].astype(jnp.float32)[None]
        if self.mlp_in is not None:
            h = jnp.einsum("BLD,DH->BLH", x, self.mlp_in[...].astype(jnp.float32)) + self.mlp_in_bias[...]
            h = jax.nn.gelu(h, approximate=True)  # [B, L, H]
            x = jnp.einsum("BLH,HD->BLD", h, self.mlp_out[...].astype(jnp.float32)) + self.mlp_out_bias[...]
        return x * (mask != 0)[..., None].astype(jnp.float32)

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        ids, mask = self.tokenize(prompts)
        return _run_encoder(self, ids, mask)

    def cache_identity(self) -> str:
        cfg = dataclasses.asdict(self.config)
        return json.dumps(
            {"kind": "words", "config": cfg, "weights": weights_fingerprint(self)}, sort_keys=True
        )
