"""Corrections for GGUF files that some supported transformers versions load wrongly.

`fix_gguf_special_tokens` -- any GGUF tokenizer whose bos/eos/unk/pad token is not the one the file
names (SmolLM2-135M-Instruct under transformers 5.17: eos and pad became <|im_start|>).
`fix_gemma3_gguf` -- the Gemma-3 (270M, Q4_K_M) GGUF under transformers 5.17.

Evidence (same file, CPU, float32, transformers 5.17.0 vs 5.24.0, separate processes):

* weights: all 237 state-dict tensors have the same names, shapes and dtypes, max abs diff 0
  (bit-identical). Both versions undo llama.cpp's +1 on the RMSNorm weights (file
  `blk.0.attn_norm.weight` mean 13.48, model `input_layernorm.weight` mean 12.48), so the model
  computes x * (1 + w) correctly in both.
* config: every field equal (rope_parameters full 1e6 / sliding 1e4, sliding_window 512,
  layer_types 5 sliding : 1 full, query_pre_attn_scalar 256, head_dim 256, no softcapping,
  gelu_pytorch_tanh, tie_word_embeddings, use_bidirectional_attention False); dtype float32 and
  sdpa in both.
* tokenizer: this is the whole difference. 5.17 routes `gemma3_text` to `GGUFGemmaConverter`,
  which builds a *Unigram* model from `tokenizer.ggml.scores`. Gemma's file is a sentencepiece
  *BPE* vocabulary whose "scores" are minus merge ranks (0 .. -255504, e.g. "▁c" -11,
  "▁capital" -4785), not log-probabilities, so Unigram's Viterbi picks the most short pieces:
  "The capital of France is" -> The|▁c|ap|it|al|▁of|▁Fr|an|ce|▁is. 5.17 also drops
  `tokenizer.ggml.add_bos_token = True` (its GGUF_TOKENIZER_MAPPING lacks the key), so no <bos>.
  5.24 builds a BPE `GemmaTokenizer` with merges rebuilt from the vocabulary in file order and
  adds <bos>: <bos>|The|▁capital|▁of|▁France|▁is, and greedy "... the capital of the country of
  France" / "... sets in the west". Fed the 5.17 token ids, the identical weights give
  "is is is is ..." and "e n t he s t ..." -- the near-chance PIQA/ARC scores.

The fix rebuilds the tokenizer the way 5.24 does (same vocabulary respelling, same merges, same
special tokens, add_bos_token=True) and leaves the model untouched. With 5.24 it is a no-op.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
# the tokenizer's special-token attributes and their `tokenizer.ggml.*` id keys
SPECIAL_TOKEN_KEYS = (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))


def _gguf_path(model, tokenizer, gguf_path) -> Path | None:
    if gguf_path is not None:
        return Path(gguf_path)
    cfg = getattr(model, "config", None)
    qc = getattr(cfg, "quantization_config", None)
    name = qc.get("gguf_file") if isinstance(qc, dict) else getattr(qc, "gguf_file", None)
    source = getattr(model, "lolcats_source", None)
    if source and str(source).endswith(".gguf") and Path(source).is_file():
        return Path(source)
    for folder in (getattr(cfg, "_name_or_path", None), getattr(tokenizer, "name_or_path", None)):
        if folder and name and (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def _needs_fix(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    unigram = backend is not None and type(backend.model).__name__ == "Unigram"
    return unigram or not getattr(tokenizer, "add_bos_token", False)


def build_gemma_gguf_tokenizer(gguf_path: str | os.PathLike):
    """A BPE `GemmaTokenizer` from a Gemma GGUF's metadata, as transformers 5.24 builds it."""
    from transformers import GemmaTokenizer
    from transformers.integrations.gguf.reader import read_gguf_metadata
    from transformers.tokenization_utils_base import generate_merges
    from tokenizers import AddedToken

    meta, _ = read_gguf_metadata(str(gguf_path), ("tokenizer.ggml.tokens",))
    if meta.get("tokenizer.ggml.model") != "llama" or not str(meta.get("general.architecture", "")).startswith("gemma"):
        raise ValueError(f"{gguf_path} is not a sentencepiece Gemma GGUF")
    # Tokens of 2+ spaces are stored as real spaces; GemmaTokenizer's normalizer writes them as "▁".
    raw = meta["tokenizer.ggml.tokens"]
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in raw]
    vocab = {t: i for i, t in enumerate(tokens)}
    # No merges in the file; the scores are not in merge order, the file order is.
    merges = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    special = {
        name: tokens[meta[f"tokenizer.ggml.{key}"]] for name, key in SPECIAL_TOKEN_KEYS if f"tokenizer.ggml.{key}" in meta
    }
    tok = GemmaTokenizer(
        vocab=vocab, merges=merges,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        **special,
    )
    types = meta.get("tokenizer.ggml.token_type") or ()
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == _CONTROL]
    if control:
        tok.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    have = tok.get_vocab()
    # As 5.24 does: checked by the file's spelling, so the all-space tokens are not added whole.
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(raw, types) if k == _USER_DEFINED and t in have]
    if user:
        tok.add_tokens(user)
    if "tokenizer.chat_template" in meta:
        tok.chat_template = meta["tokenizer.chat_template"]
    tok.name_or_path = str(Path(gguf_path).parent)
    return tok


def gguf_fields(path: str | os.PathLike) -> dict:
    """A GGUF file's metadata fields (its header; the tensors are not loaded). Reading them costs
    ~2 s for SmolLM2's file (the vocabulary is parsed): read once, pass them on."""
    from gguf import GGUFReader

    return GGUFReader(str(path)).fields


def gguf_special_token_ids(path: str | os.PathLike, fields: dict | None = None) -> dict[str, int]:
    """{"bos_token": id, ...}: the special token ids a GGUF file's metadata names (`fields`: its
    `gguf_fields`, read here when not given)."""
    fields = gguf_fields(path) if fields is None else fields
    out = {}
    for name, key in SPECIAL_TOKEN_KEYS:
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            out[name] = int(field.parts[field.data[0]][0])
    return out


def fix_gguf_special_tokens(tokenizer, gguf_path: str | os.PathLike, fields: dict | None = None):
    """The tokenizer with its bos/eos/unk/pad tokens set to those the GGUF file names, where they differ.

    transformers 5.17 loads SmolLM2-135M-Instruct's GGUF with eos = pad = <|im_start|> (id 1), where
    the file says eos_token_id 2 and padding_token_id 2 (<|im_end|>, as 5.24 loads it). The model's
    config and generation config read 2 in both versions, so generation stopped right; but a
    tokenizer's eos ends every chat turn of the training data and of the response masks. The
    vocabulary is right in both, so only the names are set. With a correct tokenizer a no-op.
    `fields`: the file's `gguf_fields`, read here when not given.
    """
    changed = {}
    for name, token_id in gguf_special_token_ids(gguf_path, fields).items():
        if not 0 <= token_id < len(tokenizer):
            continue
        want = tokenizer.convert_ids_to_tokens(token_id)
        if getattr(tokenizer, name, None) != want:
            changed[name] = (getattr(tokenizer, name, None), want)
            setattr(tokenizer, name, want)
    if changed:
        logger.info("set the GGUF tokenizer's special tokens as the file names them: %s",
                    ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return tokenizer


def gguf_architecture(path: str | os.PathLike, fields: dict | None = None) -> str:
    """`general.architecture` of a GGUF file (`fields`: its `gguf_fields`, read here when not given)."""
    field = (gguf_fields(path) if fields is None else fields)["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def fix_gemma3_gguf(model, tokenizer, gguf_path: str | os.PathLike | None = None, model_type: str | None = None):
    """(model, tokenizer) with the tokenizer rebuilt as BPE + <bos> where transformers built it wrong.

    Only for Gemma GGUF models (`model.config.model_type` gemma/gemma2/gemma3[_text]); anything else
    and an already-correct tokenizer (transformers >= 5.24) are returned unchanged. The model
    needs no change: weights and config load identically in 5.17 and 5.24. The GGUF path is taken
    from `gguf_path`, `model.lolcats_source`, or `config._name_or_path` + `quantization_config.gguf_file`.
    """
    model_type = model_type or getattr(getattr(model, "config", None), "model_type", "")
    if model_type not in ("gemma", "gemma2", "gemma3", "gemma3_text") or not _needs_fix(tokenizer):
        return model, tokenizer
    path = _gguf_path(model, tokenizer, gguf_path)
    if path is None or not path.is_file():
        raise FileNotFoundError("fix_gemma3_gguf: cannot locate the GGUF file; pass gguf_path=")
    fixed = build_gemma_gguf_tokenizer(path)
    if len(fixed) != len(tokenizer):
        raise RuntimeError(f"fix_gemma3_gguf: rebuilt tokenizer has {len(fixed)} tokens, loaded one {len(tokenizer)}")
    fixed.padding_side = tokenizer.padding_side
    logger.info("rebuilt the Gemma GGUF tokenizer as BPE with <bos> (transformers loaded %s, add_bos_token=%s)",
                type(tokenizer.backend_tokenizer.model).__name__, getattr(tokenizer, "add_bos_token", None))
    return model, fixed
