"""The embedding API: the agent as a library inside your own tool.

::

    from agent.api import DuplexAgent
    from streaming.frames import FinalText, PartialText

    async with DuplexAgent.from_config({"asr": {"hotwords": ["Dashwood"]}}) as agent:
        await agent.push_audio(pcm, sample_rate=16000)      # from any source, any rate
        async for event in agent.events():                  # typed events, in order
            if isinstance(event, FinalText):
                print(event.text)

Events are frozen dataclasses (``agent.session.EVENT_TYPES``): ``SpeechStarted`` / ``SpeechEnded``
(voice activity), ``PartialText`` (the hypothesis while the user speaks: ``stable`` words will not
change), ``FinalText`` (an utterance's transcript with word times), ``AgentText`` (a clause of the
agent's reply, as it goes to the voice), ``TurnEvent`` (``agent_start``, ``agent_end``, ``barge_in``),
``AgentAudio`` (the agent's voice), ``Metrics`` (latency and lag after each final) and
``ErrorFrame`` (a recoverable problem). ``AgentText``, ``TurnEvent`` and ``AgentAudio`` carry the
agent turn's number in ``reply``.

By default the agent holds a full-duplex conversation: it answers when the user's turn ends, yields
when the user talks over it, and its voice comes out as ``AgentAudio`` blocks of 20 ms at 16 kHz,
in real time — play them as they come. ``dialogue=False`` makes a transcripts-only agent (captions
tools), which does not load the LLM.

``push_audio`` and ``events`` usually run in two tasks. ``events()`` ends after ``finish()`` (no more
audio: the last utterance is closed and delivered, and answered) or when the agent closes.

The agent is one ``agent.session.Session`` around models loaded once; several agents can share
models with ``DuplexAgent(models=...)``. The MQTT service (``duplex serve``) runs one such session
per site.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from streaming.errors import ConfigError
from streaming.frames import Frame

from .config import DuplexConfig, load_config
from .session import Session, SharedModels


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def config_from(source: str | os.PathLike[str] | Mapping[str, Any] | DuplexConfig | None) -> DuplexConfig:
    """A validated config from a TOML file, a dict (``{"asr": {"language": "en"}}`` or
    ``{"asr.language": "en"}``) layered over ``configs/default.toml``, or a ready ``DuplexConfig``.
    Unlike the CLI, the library ignores ``$DUPLEX_*`` variables and the per-user file: an embedder's
    agent behaves the same on every machine."""
    if isinstance(source, DuplexConfig):
        return source
    if source is None:
        return load_config(None, environ={}, use_user_default=False)
    if isinstance(source, Mapping):
        flat = _flatten(source)
        bad = [k for k in flat if "." not in k]
        if bad:
            raise ConfigError(f"invalid config: {bad[0]!r} is not inside a section (write e.g. {{'asr': {{...}}}})")
        return load_config(None, flat, environ={}, use_user_default=False)
    return load_config(Path(source), environ={}, use_user_default=False)


class DuplexAgent:
    """A full-duplex agent session. Create with ``from_config`` and use as an async context manager;
    entering loads the models (seconds, off the event loop) unless ``models`` were given."""

    def __init__(self, cfg: DuplexConfig, models: SharedModels | None = None, *, preload_tts: bool = False,
                 dialogue: bool | None = None) -> None:
        self.cfg = cfg
        self._models = models
        self._own_models = models is None
        self._preload_tts = preload_tts
        self._dialogue = dialogue
        self._session: Session | None = None

    @classmethod
    def from_config(
        cls, config: str | os.PathLike[str] | Mapping[str, Any] | DuplexConfig | None = None, *,
        models: SharedModels | None = None, preload_tts: bool = False, dialogue: bool | None = None,
    ) -> "DuplexAgent":
        """``config``: a TOML file path, a dict of overrides, a ``DuplexConfig``, or None for the
        defaults. ``dialogue``: hold a conversation (True) or only transcribe (False); None, the
        default, is a conversation unless ``models`` were given without the LLM. ``preload_tts``
        loads the voice up front, so the first ``say`` of a transcripts-only agent starts at once."""
        return cls(config_from(config), models, preload_tts=preload_tts, dialogue=dialogue)

    async def __aenter__(self) -> "DuplexAgent":
        if self._models is None:
            llm = self._dialogue is not False
            self._models = await asyncio.to_thread(SharedModels.load, self.cfg, tts=self._preload_tts, llm=llm)
        self._session = await Session(self._models, self.cfg, name="agent", dialogue=self._dialogue).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.aclose()
        if self._own_models and self._models is not None:
            self._models.close()

    @property
    def session(self) -> Session:
        if self._session is None:
            raise RuntimeError("use the agent inside `async with DuplexAgent.from_config(...) as agent:`")
        return self._session

    @property
    def models(self) -> SharedModels:
        if self._models is None:
            raise RuntimeError("the models are loaded when the agent is entered")
        return self._models

    # -- the session's shape --------------------------------------------------------------

    async def push_audio(self, pcm: np.ndarray | bytes, sample_rate: int = 16000, channels: int | None = None) -> None:
        """Audio from any source: float in [-1, 1] or int16 arrays, shape (n,) or (n, channels), or
        s16le bytes. Resampled to 16 kHz mono. Waits when recognition is a queue's length behind."""
        await self.session.push_audio(pcm, sample_rate, channels)

    def events(self) -> AsyncIterator[Frame]:
        """Typed events in order (see the module docstring). One consumer."""
        return self.session.events()

    @property
    def dialogue(self) -> bool:
        """True when the agent holds a conversation, False when it only transcribes."""
        return self.session.dialogue

    async def say(self, text: str) -> int:
        """Speak ``text`` with Piper; the audio arrives as ``AgentAudio`` events. Returns the turn
        number (``reply``) when the turn is done or interrupted. In a conversation it waits for the
        agent's turn in progress, and the dialogue remembers it as the agent's words."""
        return await self.session.say(text)

    async def interrupt(self) -> bool:
        """Stop speaking now (a ``TurnEvent`` ``barge_in`` with reason ``interrupt`` follows); in a
        conversation the dialogue keeps only what the user heard. False if nothing was playing."""
        return await self.session.interrupt()

    async def set_hotwords(self, hotwords: Iterable[str]) -> tuple[str, ...]:
        """Words and phrases the recogniser should favour, from now on."""
        return await self.session.set_hotwords(hotwords)

    async def set_mode(self, mode: str, target: str | None = None) -> None:
        """``"dialogue"`` (answer), ``"captions"`` (text only: the agent stops answering; with
        ``target`` each utterance's translation comes as ``TranslatedText`` events, never spoken)
        or ``"interpreter"`` (with ``target``, e.g. ``"es"``: each utterance is translated as its
        words become stable and spoken; ``TranslatedText`` events, which are ``AgentText``). An
        unsupported language pair raises ``ValueError`` naming the installed pairs."""
        await self.session.set_mode(mode, target)

    async def set_language(self, language: str) -> None:
        """The language the user speaks (multilingual models), or ``"auto"``."""
        await self.session.set_language(language)

    async def reset(self) -> None:
        """Forget the conversation so far (the dialogue starts afresh)."""
        await self.session.reset()

    async def flush(self) -> None:
        """Close the open utterance now; returns once its final is among the events."""
        await self.session.flush()

    async def finish(self) -> None:
        """No more audio: the last utterance is closed (and answered, in a conversation) and
        ``events()`` ends after it."""
        await self.session.finish()
