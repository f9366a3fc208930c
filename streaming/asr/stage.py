"""Pipeline stage around the streaming recogniser."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from ..frames import INTERNAL_RATE, AudioFrame, Frame, SpeechEnded, SpeechEnding, SpeechStarted, VoiceActivity
from ..pipeline import Stage
from .recognizer import StreamingRecognizer


class ASRStage(Stage):
    """Consumes audio and VAD events; emits PartialText and FinalText. Forwards everything.

    The recogniser runs on this stage's worker thread, never on the event loop.
    """

    def __init__(self, recognizer: StreamingRecognizer, name: str = "asr",
                 echo_until: Callable[[], float] | None = None) -> None:
        """``echo_until``: where the agent has a voice, the pipeline time up to which the
        microphone may still hear it (its last sound, plus the acoustic delay and the echo's
        tail); an utterance's pre-roll never reaches back over it."""
        super().__init__()
        self.name = name
        self.recognizer = recognizer
        self.state = recognizer.init_state()
        self.echo_until = echo_until

    def init_worker(self) -> None:
        # one intra-op thread: on 2 shared cores a second OpenMP thread only helps an idle machine
        # and slows every step 10x or more once another model or process competes (measured)
        import torch

        torch.set_num_threads(1)

    async def process(self, frame: Frame) -> None:
        rec = self.recognizer
        if isinstance(frame, AudioFrame):
            if frame.sample_rate != INTERNAL_RATE:
                raise ValueError(f"ASRStage needs {INTERNAL_RATE} Hz audio, got {frame.sample_rate} Hz")
            await self.push(frame)
            # behind real time (audio queued behind this frame): buffer only, skip the hypothesis
            hypothesise = self.backlog() == 0
            await self._emit(await self.run_blocking(rec.push, self.state, frame.mono, frame.pts, hypothesise))
            return
        if isinstance(frame, SpeechStarted):
            not_before = self.echo_until() if self.echo_until is not None else -math.inf
            await self.run_blocking(rec.start, self.state, frame.pts, not_before)
            await self.push(frame)
            return
        if isinstance(frame, VoiceActivity) and not frame.speech:
            # the voice paused: the words so far now, not at the next step or VAD's end
            await self.push(frame)
            if self.backlog() == 0:
                await self._emit(await self.run_blocking(rec.hypothesise, self.state))
            return
        if isinstance(frame, SpeechEnding):
            # the voice stopped: prepare the final while VAD decides (or drop it: the voice is back)
            await self.push(frame)
            await self.run_blocking(rec.ending, self.state, frame)
            return
        if isinstance(frame, SpeechEnded):
            await self.push(frame)
            await self._emit(await self.run_blocking(rec.end, self.state, frame.pts))
            return
        await self.push(frame)

    async def set_hotwords(self, hotwords: Iterable[str]) -> None:
        """Swap the hotword list at run time, in order with the decoding work."""
        await self.run_blocking(self.recognizer.set_hotwords, self.state, list(hotwords))

    async def flush(self) -> None:
        await self._emit(await self.run_blocking(self.recognizer.finish, self.state))

    async def _emit(self, frames: list[Frame]) -> None:
        for f in frames:
            await self.push(f)
