"""Piper text-to-speech, streamed sentence by sentence.

Piper splits text into sentences itself and synthesises each as soon as asked, so the first audio
is ready after the first sentence, not the whole reply.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streaming.errors import DuplexError

log = logging.getLogger(__name__)


@dataclass
class PiperTTS:
    voice: object
    source: str

    @classmethod
    def load(cls, model: Path, config: Path, source: str) -> "PiperTTS":
        try:
            from piper import PiperVoice
        except ImportError:
            raise DuplexError("Piper is not installed: pip install piper-tts") from None
        if not model.exists() or not config.exists():
            raise DuplexError(f"Piper voice files missing: {model} / {config}")
        try:
            voice = PiperVoice.load(str(model), config_path=str(config))
        except Exception as exc:  # onnxruntime errors have many types; name the file
            raise DuplexError(f"cannot load Piper voice {model}: {exc}") from None
        return cls(voice, source)

    @property
    def sample_rate(self) -> int:
        return int(self.voice.config.sample_rate)

    def stream(self, text: str) -> Iterator[np.ndarray]:
        """float32 mono audio at ``sample_rate``, one array per sentence."""
        text = text.strip()
        if not text:
            return
        for chunk in self.voice.synthesize(text):
            audio = np.asarray(chunk.audio_float_array, dtype=np.float32)
            if audio.size:
                yield audio
