"""Tokenizers as checkpoints ship them, and the one vocabulary check every paired mode runs.

* :func:`load_tokenizer` reads ``tokenizer.json`` when present, else the SentencePiece
  ``tokenizer.model`` a ``use_fast=False`` LLaMA/Vicuna checkpoint ships (transformers converts it;
  this needs ``sentencepiece`` + ``protobuf``). The converted tokenizer is checked against
  SentencePiece itself on probe texts, so a conversion that tokenizes differently is refused.
* :func:`check_vocab_compat` refuses a drafter/target pair whose shared token ids name different
  tokens. Extraction (every mode), L6 training and speculative decoding call it: the drafter is fed,
  or drafts, token ids of the target's vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from egpt_core.errors import ConfigError

#: texts a converted SentencePiece tokenizer must encode exactly as SentencePiece does
PROBE_TEXTS = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER:",
    "What are the key elements in this scene?\nDescribe the following scene. ASSISTANT:",
    "The scene shows a road with cars, a red car on the left, a blue truck moving right, trees and buildings.",
    "Two  spaces, digits 0123456789 and punctuation: (a) [b] {c} ; ' \" ! ?",
)
# (no text starts with a space: there transformers' LLaMA tokenizer and SentencePiece differ by design)

#: how many disagreeing ids an error message lists
SHOWN_IDS = 5

Vocabulary = Sequence[str | None]


def load_tokenizer(ckpt: str | Path, subfolder: str | None = None):
    """The checkpoint's tokenizer: ``tokenizer.json``, else the SentencePiece ``tokenizer.model``.

    ConfigError when the directory has neither, or when a converted ``tokenizer.model`` does not
    encode the probe texts exactly as SentencePiece does.
    """
    from transformers import AutoTokenizer

    from egpt_core.models.loading import _quiet_transformers

    root = Path(ckpt) / subfolder if subfolder else Path(ckpt)
    has_json = (root / "tokenizer.json").is_file()
    has_spm = (root / "tokenizer.model").is_file()
    if not has_json and not has_spm:
        raise ConfigError(f"{root}: no tokenizer (expected tokenizer.json or the SentencePiece tokenizer.model)")
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(root))
    except ImportError as exc:  # sentencepiece / protobuf absent
        raise ConfigError(f"{root}: loading tokenizer.model needs the sentencepiece and protobuf packages "
                          f"(pip install sentencepiece protobuf): {exc}") from exc
    if not has_json:
        tok = _restore_sentencepiece_unknowns(tok)
        check_sentencepiece_fidelity(tok, root / "tokenizer.model")
    return tok


def _restore_sentencepiece_unknowns(tok):
    """SentencePiece maps a character its model cannot represent to ``<unk>``; transformers'
    conversion builds a byte-fallback BPE without an unk token, which *drops* such characters when
    the model has no byte pieces. Give the converted model SentencePiece's unk (rebuilt from JSON, so
    no cache holds the old behaviour)."""
    from tokenizers import Tokenizer

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or tok.unk_token is None:
        return tok
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("unk_token") is not None:
        return tok
    vocab = model.get("vocab") or {}
    if model.get("byte_fallback") and all(f"<0x{b:02X}>" in vocab for b in range(256)):
        return tok  # every byte has a piece: nothing can be unknown
    model["unk_token"] = tok.unk_token
    tok._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return tok


def check_sentencepiece_fidelity(tok, model_file: Path, texts: Sequence[str] = PROBE_TEXTS) -> None:
    """ConfigError unless ``tok`` encodes ``texts`` (no special tokens added) like SentencePiece."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    for text in texts:
        want = sp.encode(text)
        got = tok(text, add_special_tokens=False).input_ids
        if got != want:
            i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise ConfigError(
                f"{model_file}: the converted tokenizer disagrees with SentencePiece on {text[:40]!r}… at token "
                f"{i} (transformers {got[i:i + 3]} vs sentencepiece {want[i:i + 3]}); ship a tokenizer.json "
                "written by the tokenizer that made the training data")


def vocab_tokens(tok_or_vocab: Any) -> list[str | None]:
    """Id-ordered token strings of a tokenizer (added tokens included), or of a token->id mapping or
    an id-ordered list; ids nothing maps to are None."""
    if isinstance(tok_or_vocab, Sequence) and not isinstance(tok_or_vocab, str):
        return list(tok_or_vocab)
    vocab: Mapping[str, int] = tok_or_vocab if isinstance(tok_or_vocab, Mapping) else tok_or_vocab.get_vocab()
    out: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        out[int(i)] = token
    return out


def check_vocab_compat(drafter: Any, target: Any, drafter_name: str = "drafter",
                       target_name: str = "target") -> int:
    """Refuse a pair whose shared token ids name different tokens (ConfigError); returns the number
    of shared ids.

    Both sides are Vicuna-derived: the target may append tokens (Video-LLaVA: 32064 vs 32000), so
    only ids below the smaller vocabulary are compared. Each side is a tokenizer, a token->id
    mapping or an id-ordered token list (e.g. a store's recorded target vocabulary).
    """
    d, t = vocab_tokens(drafter), vocab_tokens(target)
    n = min(len(d), len(t))
    bad = [i for i in range(n) if d[i] != t[i]]
    if bad:
        shown = ", ".join(f"id {i}: {d[i]!r} vs {t[i]!r}" for i in bad[:SHOWN_IDS])
        raise ConfigError(
            f"{drafter_name} and {target_name} tokenizers differ on {len(bad)} of the {n} shared ids ({shown}); "
            "the drafter is fed and drafts the target's token ids, so both must use one vocabulary "
            "(pair checkpoints fine-tuned from the same Vicuna tokenizer)")
    return n


__all__ = ["PROBE_TEXTS", "check_sentencepiece_fidelity", "check_vocab_compat", "load_tokenizer", "vocab_tokens"]
