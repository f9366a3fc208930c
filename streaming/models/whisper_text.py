"""Whisper's tokenizer and special tokens.

The tokenizer is the ``tokenizer.json`` (Hugging Face ``tokenizers`` format) that ships with every
Whisper checkpoint, CTranslate2's included. English-only models (``.en``) take no language or task
token; multilingual ones take ``<|xx|>`` and ``<|transcribe|>`` or ``<|translate|>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import DuplexError


@dataclass(frozen=True)
class DecodeRules:
    """Token suppression, as Whisper checkpoints specify it."""

    #: never generated (symbols, speaker tags, ...)
    suppress: tuple[int, ...] = ()
    #: not generated as the first token (blank, end of text)
    suppress_begin: tuple[int, ...] = ()


class WhisperTokenizer:
    def __init__(self, path: Path, multilingual: bool) -> None:
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise DuplexError(f"cannot read Whisper tokenizer {path}: {exc}") from None
        self.multilingual = multilingual
        self.eot = self._special("<|endoftext|>")
        self.sot = self._special("<|startoftranscript|>")
        self.sot_prev = self._special("<|startofprev|>")
        self.no_timestamps = self._special("<|notimestamps|>")
        self.transcribe = self._special("<|transcribe|>")
        self.translate = self._special("<|translate|>")
        self.timestamp_begin = self.no_timestamps + 1
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.languages = {
            t[2:-2]: i
            for t, i in vocab.items()
            if t.startswith("<|") and t.endswith("|>") and 2 <= len(t) - 4 <= 3 and t[2:-2].isalpha() and t[2:-2].islower()
            and self.sot < i < self.translate
        }

    def _special(self, text: str) -> int:
        i = self._tok.token_to_id(text)
        if i is None:
            raise DuplexError(f"Whisper tokenizer has no {text} token")
        return i

    def prompt(self, language: str | None = "en", task: str = "transcribe", timestamps: bool = False) -> list[int]:
        seq = [self.sot]
        if self.multilingual:
            if language is not None:
                if language not in self.languages:
                    raise DuplexError(f"Whisper does not know language {language!r}")
                seq.append(self.languages[language])
            seq.append(self.translate if task == "translate" else self.transcribe)
        elif task == "translate":
            raise DuplexError("an English-only Whisper model cannot translate; use a multilingual one")
        if not timestamps:
            seq.append(self.no_timestamps)
        return seq

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i < self.eot])

    def token_text(self, i: int) -> str:
        return self._tok.decode([i])
