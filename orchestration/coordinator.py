"""The coordinator: turns what the agent hears into what it says, and when.

It is the last stage of the listening pipeline (audio -> AEC -> VAD -> ASR -> here). It feeds the
turn-taking core (``orchestration.turns.step``) with what the pipeline observed and carries out
the actions it returns; it decides nothing itself. Its parts:

* the dialogue LLM (``DialogueLLM``: one persistent KV cache) runs on one dedicated thread: the
  user's words are prefilled while they are still speaking and the end-of-turn signal is read
  from the cache after each new transcript; replies are generated there, token by token, and can
  be cancelled between tokens;
* the reply is cut into clauses as it is generated (the first after at most ``first_clause_words``
  words, since the first audio waits for it); each clause goes to Piper on a second thread and its
  audio into ``Playback`` at once, so the first clause plays while the rest is written;
* ``Playback`` says what the user actually heard; a barge-in truncates the agent's turn in the LLM
  cache to exactly that, followed by an interruption marker;
* a tick every ``tick_ms`` turns playback progress and the passing of time into turn events.

Everything the coordinator observes or does goes to ``on_event`` as a plain dict (the event log
of ``duplex converse``, the terminal view of ``duplex talk``, MQTT events) and downstream as
``AgentText``/``TurnEvent`` frames.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from streaming.frames import (
    AgentText,
    FinalText,
    Frame,
    PartialText,
    SpeechEnded,
    SpeechStarted,
    TurnEvent,
    VoiceActivity,
)
from streaming.pipeline import Stage
from streaming.resample import resample

from . import turns as T
from .dialogue import DialogueLLM
from .playback import Playback

log = logging.getLogger(__name__)

#: a clause ends at one of these followed by a space (or the end of the reply)
_CLAUSE_END = re.compile(r"[.!?;:,\u2026]\s")
_SPEAKABLE = re.compile(r"[\w]")


@dataclass
class _Reply:
    id: int
    speculative: bool
    text: str  # the user turn it answers
    cancel: threading.Event = field(default_factory=threading.Event)
    outcome: str = ""  # "", "drop", "stop"
    heard: str = ""
    held: list[tuple[str, np.ndarray]] = field(default_factory=list)  # speculative audio, not yet played
    generated: str = ""
    clauses: int = 0
    done: bool = False  # generation (and its TTS) finished
    llm_done: bool = False
    first_audio: bool = False
    t_start: float = 0.0


def split_clause(buffer: str, first: bool, max_words: int, first_words: int = 3) -> tuple[str, str] | None:
    """The next speakable clause at the start of ``buffer`` and the rest, or None (wait for more).
    The first clause of a reply is cut early (a few words) so that audio can start soon."""
    m = _CLAUSE_END.search(buffer)
    limit = first_words if first else max_words
    if m and len(buffer[: m.end()].split()) >= (1 if first else 2):
        return buffer[: m.end()].strip(), buffer[m.end() :]
    words = list(re.finditer(r"\S+", buffer))
    if len(words) > limit:
        # no punctuation yet: cut after ``limit`` words (a word after them shows the last is whole)
        end = words[limit - 1].end()
        return buffer[:end].strip(), buffer[end:]
    return None


class Coordinator(Stage):
    """The full-duplex coordinator stage. Consumes transcripts and VAD events; forwards every frame
    and adds ``AgentText`` and ``TurnEvent`` frames."""

    def __init__(
        self,
        dialogue: DialogueLLM,
        tts,
        playback: Playback,
        turns: T.TurnConfig | None = None,
        *,
        on_event: Callable[[dict], None] | None = None,
        tick_ms: float = 20.0,
        max_clause_words: int = 12,
        first_clause_words: int = 3,
        answer: bool = True,
        name: str = "coordinator",
    ) -> None:
        super().__init__()
        self.name = name
        #: take turns and answer (dialogue); False: forward every frame and only report what the
        #: player does (interpreter mode: another stage fills the player)
        self.answer = answer
        self.dialogue = dialogue
        self.tts = tts
        self.playback = playback
        self.state = T.initial_state(turns or T.TurnConfig())
        self.on_event = on_event
        self.tick_s = tick_ms / 1000
        self.max_clause_words = max_clause_words
        self.first_clause_words = first_clause_words
        self._llm = ThreadPoolExecutor(1, thread_name_prefix="duplex-llm", initializer=_one_thread)
        self._tts = ThreadPoolExecutor(1, thread_name_prefix="duplex-tts", initializer=_one_thread)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.Task | None = None
        self._replies: dict[int, _Reply] = {}
        self._pending: _Reply | None = None  # the reply the turn core knows about
        self._next_id = 0
        self._eot_busy = False
        self._eot_text: str | None = None
        self._closed = False
        self._vad_direct = False

    # -- pipeline side ----------------------------------------------------------------------

    def tap(self) -> Stage:
        """A stage to put right after VAD: it hands VAD's raw voice activity to the coordinator at
        once, instead of behind the recogniser's queue (a decode in progress would delay a
        barge-in onset by its whole duration); the same frames arriving later through ASR are
        ignored. Segment decisions still come through ASR, in order with their transcripts."""
        return _VADTap(self)

    def observe_vad(self, frame: Frame) -> None:
        self._ensure_ticker()
        self._vad_direct = True
        if not self.answer:
            return
        self._on_vad(frame, self.clock.now())

    def _on_vad(self, frame: Frame, now: float) -> None:
        if isinstance(frame, SpeechStarted):
            self._emit("user_speech_start", now, onset=frame.pts)
            self._step(T.UserSpeechStarted(now, onset=frame.pts))
        elif isinstance(frame, SpeechEnded):
            self._emit("user_speech_end", now, end=frame.pts)
            self._step(T.UserSpeechEnded(now, end=frame.pts))
        elif isinstance(frame, VoiceActivity):
            self._emit("voice", now, speech=frame.speech, at=frame.pts, **({"early": True} if frame.early else {}))
            self._step(T.VoiceActivity(now, frame.speech, early=frame.early))

    async def process(self, frame: Frame) -> None:
        self._ensure_ticker()
        now = self.clock.now()
        if not self.answer:
            if isinstance(frame, FinalText):
                self._emit("final", now, text=frame.text, start=frame.start, end=frame.pts, utterance=frame.utterance)
            await self.push(frame)
            return
        if isinstance(frame, (SpeechStarted, SpeechEnded)) or (isinstance(frame, VoiceActivity) and not self._vad_direct):
            self._on_vad(frame, now)
        elif isinstance(frame, PartialText):
            self._emit("partial", now, stable=frame.stable, unstable=frame.unstable)
            self._step(T.UserText(now, frame.stable, frame.unstable, final=False))
            self._want_eot()
        elif isinstance(frame, FinalText):
            self._emit("final", now, text=frame.text, start=frame.start, end=frame.pts, utterance=frame.utterance)
            self._step(T.UserText(now, frame.text, "", final=True))
            self._want_eot()
        await self.push(frame)

    async def flush(self) -> None:
        # end of input: let a reply that is already playing finish, then stop ticking
        deadline = self.clock.now() + 30.0
        while (self.playback.busy() or self._pending is not None) and self.clock.now() < deadline:
            await asyncio.sleep(self.tick_s)

    async def aclose(self) -> None:
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
        for r in self._replies.values():
            r.cancel.set()
        self._llm.shutdown(wait=True, cancel_futures=True)
        self._tts.shutdown(wait=True, cancel_futures=True)
        await super().aclose()

    # -- control from outside (the session API, MQTT commands) -----------------------------

    @property
    def speaking(self) -> bool:
        """The agent holds the floor: a reply is pending or playing, or its audio is queued."""
        return self._pending is not None or self.state.mode is T.Mode.SPEAK or self.playback.busy()

    def interrupt(self, reason: str = "interrupt") -> bool:
        """Stop the agent now, as a barge-in does (``StopSpeaking``): playback is cleared, the reply
        cancelled and its turn in the dialogue cut to the words the user heard (a ``barge_in``
        ``TurnEvent`` with ``reason``); the turn core goes back to listening. A speculative reply
        nobody has heard is left alone. Returns False when the agent was not speaking."""
        self._ensure_ticker()
        now = self.clock.now()
        r = self._pending
        if self.state.mode is T.Mode.SPEAK or (r is not None and not r.speculative):
            self._do(T.StopSpeaking(reason, heard=self.state.heard), now)
            self.state = T._to_listen(self.state, keep_user=False)
            return True
        if self.playback.busy():  # an aside (a backchannel) is playing
            self.playback.clear(now)
            return True
        return False

    def say(self, text: str) -> int:
        """Speak ``text`` as the agent's own turn (a scripted prompt, an announcement), now: a turn
        in progress is stopped first, as by ``interrupt``. It goes into the dialogue as an agent
        turn (``DialogueLLM.agent_said``) and is spoken clause by clause like a reply, with the same
        ``AgentText`` and ``TurnEvent`` frames; the user can barge in on it (the dialogue then
        keeps what was heard). Returns its reply number (see ``finished``)."""
        text = " ".join(text.split())
        if self._closed:
            raise RuntimeError("the conversation is closed")
        self._ensure_ticker()
        if self.speaking:
            self.interrupt("say")
        if self._pending is not None:  # a speculative reply nobody has heard
            self._do(T.DropReply("say"), self.clock.now())
            self.state = T._to_listen(self.state, keep_user=True)
        now = self.clock.now()
        self.state = T._take_turn(self.state, "say", [])  # the StartReply it would ask for is this
        self._next_id += 1
        r = _Reply(self._next_id, False, "", t_start=now)
        self._replies[r.id] = r
        self._pending = r
        self._emit("decision", now, action="Say", reason=f"say {text[:60]!r}")
        self._llm.submit(self._say_job, r, text)
        return r.id

    async def finished(self, reply: int) -> None:
        """Return once reply ``reply`` has played out, been stopped or been dropped."""
        r = self._replies.get(reply)
        while r is not None and not self._closed and (self._pending is r or not (r.done or r.outcome)):
            await asyncio.sleep(self.tick_s)

    def reset(self) -> None:
        """Forget the conversation: whatever plays or is pending is dropped, the turn core starts
        over and the dialogue LLM starts a new conversation."""
        now = self.clock.now()
        for r in self._replies.values():
            if not r.outcome:
                r.outcome = "reset"  # nothing to settle: the dialogue is reset after it
                r.cancel.set()
        self._replies.clear()
        self._pending = None
        self._eot_text = None
        self.playback.clear(now)
        self.state = T.initial_state(self.state.config)
        self._llm.submit(self.dialogue.reset)

    def _say_job(self, r: _Reply, text: str) -> None:
        """LLM thread: the said text into the dialogue, then clause by clause to the TTS thread."""
        said = None
        if not r.cancel.is_set():
            try:
                self.dialogue.agent_said(text)
                said = _Said(self.dialogue)
                buf = text
                while (cut := split_clause(buf, r.clauses == 0, self.max_clause_words)) is not None:
                    clause, buf = cut
                    self._clause(r, clause)
                if buf.strip():
                    self._clause(r, buf.strip())
                r.generated = text
            except Exception as exc:
                self._call(self._error, f"say failed: {exc}")
        self._llm_finished(r, said)

    # -- the turn core ----------------------------------------------------------------------

    def _step(self, event) -> None:
        self.state, actions = T.step(self.state, event)
        for a in actions:
            self._do(a, event.t)

    def _do(self, a, t: float) -> None:
        if not isinstance(a, T.Log):
            self._emit("decision", t, action=type(a).__name__, reason=a.reason)
        if isinstance(a, T.StartReply):
            self._start_reply(a, t)
        elif isinstance(a, T.CommitReply):
            r = self._pending
            if r is not None:
                r.speculative = False
                for text, audio in r.held:
                    self.playback.enqueue(r.id, text, audio)
                r.held.clear()
                if r.done:
                    self.playback.finish(r.id, t)
        elif isinstance(a, T.DropReply):
            r = self._pending
            self._pending = None
            if r is not None:
                r.outcome = "drop"
                r.cancel.set()
                r.held.clear()
                self.playback.clear(t)
                self._llm.submit(self._settle_llm, r)
        elif isinstance(a, T.StopSpeaking):
            r = self._pending
            self._pending = None
            heard = self.playback.clear(t)
            if r is not None:
                r.outcome = "stop"
                r.heard = heard or a.heard
                r.cancel.set()
                self._emit("agent_stopped", t, reply=r.id, heard=r.heard, reason=a.reason)
                self._push_frame(TurnEvent(pts=t, kind="barge_in", reason=a.reason, text=r.heard, reply=r.id))
                self._llm.submit(self._settle_llm, r)
        elif isinstance(a, T.PauseSpeaking):
            self.playback.pause()
        elif isinstance(a, T.ResumeSpeaking):
            self.playback.resume()
        elif isinstance(a, T.Backchannel):
            self._tts.submit(self._speak_aside, a.text)
        elif isinstance(a, T.Log):
            self._emit("log", t, reason=a.reason)

    # -- end of turn signal -----------------------------------------------------------------

    def _want_eot(self) -> None:
        if self.state.mode is not T.Mode.LISTEN or self._pending is not None:
            return  # the cache holds a reply now; the words are classified without the LLM
        text = self.state.turn_text
        if not text.strip():
            return
        self._eot_text = text
        if not self._eot_busy:
            self._eot_busy = True
            self._llm.submit(self._eot_job)

    def _eot_job(self) -> None:
        while True:
            text, self._eot_text = self._eot_text, None
            if text is None or self._closed:
                break
            try:
                scores = self.dialogue.eot_scores(text)
            except Exception as exc:  # never lose the conversation over one reading
                self._call(self._error, f"end-of-turn reading failed: {exc}")
                continue
            self._call(self._on_eot, text, scores.p_sentence_end, scores.p_eot)
        self._eot_busy = False
        if self._eot_text is not None and not self._closed:
            self._eot_busy = True
            self._llm.submit(self._eot_job)

    def _on_eot(self, text: str, p: float, p_raw: float) -> None:
        now = self.clock.now()
        self._emit("eot", now, text=text, p=round(p, 5), p_eot=round(p_raw, 7))
        self._step(T.EotProbability(now, p, text=text))

    # -- replies ----------------------------------------------------------------------------

    def _start_reply(self, a: T.StartReply, t: float) -> None:
        if self._pending is not None and not self._pending.outcome:
            self._pending.outcome = "drop"
            self._pending.cancel.set()
            self._llm.submit(self._settle_llm, self._pending)
        self._next_id += 1
        r = _Reply(self._next_id, a.speculative, a.text or self.state.turn_text, t_start=t)
        self._replies[r.id] = r
        self._pending = r
        self._llm.submit(self._generate, r)

    def _generate(self, r: _Reply) -> None:
        """LLM thread: the reply, clause by clause to the TTS thread."""
        if r.cancel.is_set():
            r.llm_done = True
            return
        try:
            text = r.text.strip()
            if text and text[-1] not in ".?!\u2026":
                text += "."  # the turn is over: a sentence end (a small LLM rambles without one)
            reply = self.dialogue.respond(text=text, should_stop=r.cancel.is_set)
            r_obj = reply
            buf = ""
            for piece in reply:
                buf += piece
                while True:
                    cut = split_clause(buf, r.clauses == 0, self.max_clause_words, self.first_clause_words)
                    if cut is None:
                        break
                    clause, buf = cut
                    self._clause(r, clause)
            if buf.strip() and not r.cancel.is_set():
                self._clause(r, buf.strip())
            r.generated = reply.text
            if reply.stop_reason in ("cap", "loop", "empty"):
                self._call(self._emit, "log", self.clock.now(), reason=f"reply {r.id} ended: {reply.stop_reason}")
        except Exception as exc:
            r_obj = None
            self._call(self._error, f"reply generation failed: {exc}")
        self._llm_finished(r, r_obj)

    def _llm_finished(self, r: _Reply, reply) -> None:
        """LLM thread, after a reply's last token: its audio is complete once the TTS thread gets
        here; the dialogue side is settled now if the reply was already dropped or stopped, else
        kept for when it is."""
        r.llm_done = True
        self._tts.submit(self._tts_done, r)
        if r.outcome:
            self._settle_llm(r, reply)
        else:
            r._reply_obj = reply  # type: ignore[attr-defined]

    def _settle_llm(self, r: _Reply, reply=None) -> None:
        """LLM thread: bring the cache in line with what became of the reply."""
        reply = reply or getattr(r, "_reply_obj", None)
        if reply is None or getattr(r, "_settled", False):
            return
        r._settled = True  # type: ignore[attr-defined]
        try:
            if r.outcome == "drop":
                reply.drop()
            elif r.outcome == "stop":
                reply.close()
                self.dialogue.truncate_agent_turn(r.heard)
        except Exception as exc:
            self._call(self._error, f"could not settle reply {r.id}: {exc}")

    def _clause(self, r: _Reply, text: str) -> None:
        if r.cancel.is_set():
            return
        r.clauses += 1
        self._call(self._on_text, r.id, text)
        self._tts.submit(self._synth, r, text)

    def _synth(self, r: _Reply, text: str) -> None:
        """TTS thread."""
        if r.cancel.is_set() or not _SPEAKABLE.search(text):
            return
        try:
            pieces = [resample(a, self.tts.sample_rate) for a in self.tts.stream(text)]
        except Exception as exc:
            self._call(self._error, f"TTS failed on {text[:40]!r}: {exc}")
            return
        if pieces and not r.cancel.is_set():
            self._call(self._on_audio, r.id, text, np.concatenate(pieces))

    def _tts_done(self, r: _Reply) -> None:
        self._call(self._on_reply_done, r.id)

    def _speak_aside(self, text: str) -> None:
        try:
            audio = np.concatenate([resample(a, self.tts.sample_rate) for a in self.tts.stream(text)])
        except Exception as exc:
            self._call(self._error, f"TTS failed on {text!r}: {exc}")
            return
        self._call(self.playback.enqueue, -1, text, audio)

    # -- back on the event loop -------------------------------------------------------------

    def _on_text(self, rid: int, text: str) -> None:
        self._emit("agent_text", self.clock.now(), reply=rid, text=text)
        self._push_frame(AgentText(pts=self.clock.now(), text=text, reply=rid))

    def _on_audio(self, rid: int, text: str, audio: np.ndarray) -> None:
        r = self._replies.get(rid)
        if r is None or r.outcome:
            return
        now = self.clock.now()
        if not r.first_audio:
            r.first_audio = True
            self._step(T.ReplyReady(now, text))
        if r.speculative and self._pending is r:
            r.held.append((text, audio))
        elif self._pending is r:
            self.playback.enqueue(r.id, text, audio)

    def _on_reply_done(self, rid: int) -> None:
        r = self._replies.get(rid)
        if r is None:
            return
        r.done = True
        now = self.clock.now()
        if not r.first_audio and not r.outcome:
            # nothing speakable came out: the turn core must not wait for audio that never comes
            self._step(T.ReplyReady(now, ""))
        if self._pending is r and not r.speculative:
            self.playback.finish(r.id, now)
            if not r.first_audio:
                self._pending = None

    def log_event(self, kind: str, **data) -> None:
        """Add an event of another stage's to the log, on the coordinator's clock."""
        self._emit(kind, self.clock.now(), **data)

    def _tick(self) -> None:
        now = self.clock.now()
        if not self.answer:
            for e in self.playback.events():
                if e.kind == "start":
                    self._emit("agent_audio_start", e.t, reply=e.reply, latency_from=None)
                elif e.kind == "end":
                    self._emit("agent_audio_end", e.t, reply=e.reply, heard=e.text)
            return
        for e in self.playback.events():
            if e.reply < 0:
                continue
            r = self._replies.get(e.reply)
            if e.kind == "start":
                self._emit("agent_audio_start", e.t, reply=e.reply, latency_from=r.t_start if r else None)
                self._push_frame(TurnEvent(pts=e.t, kind="agent_start", reason="", text="", reply=e.reply))
                self._step(T.AgentAudioStarted(e.t))
            elif e.kind == "words":
                self._step(T.AgentWordsPlayed(e.t, e.text))
            elif e.kind == "end":
                self._emit("agent_audio_end", e.t, reply=e.reply, heard=e.text)
                self._push_frame(TurnEvent(pts=e.t, kind="agent_end", reason="", text=e.text, reply=e.reply))
                if self._pending is r:
                    self._pending = None
                self._step(T.AgentAudioFinished(e.t))
            elif e.kind == "stopped":
                self._emit("agent_audio_stopped", e.t, reply=e.reply, heard=e.text)
        self._step(T.Tick(now))

    async def _tick_loop(self) -> None:
        while not self._closed:
            try:
                self._tick()
            except Exception as exc:  # a bug in one tick must not end the conversation
                log.exception("coordinator tick failed")
                self._error(f"tick failed: {exc}")
            await asyncio.sleep(self.tick_s)

    def _ensure_ticker(self) -> None:
        if self._ticker is None:
            self._loop = asyncio.get_running_loop()
            self._ticker = self._loop.create_task(self._tick_loop(), name="duplex:coordinator-tick")

    # -- plumbing ---------------------------------------------------------------------------

    def _call(self, fn, *args, **kw) -> None:
        """Run ``fn`` on the event loop (from a worker thread)."""
        if self._loop is not None and not self._closed:
            self._loop.call_soon_threadsafe(lambda: fn(*args, **kw))

    def _push_frame(self, frame: Frame) -> None:
        if self._loop is not None and not self._closed:
            self._loop.create_task(self.push(frame))

    def _emit(self, kind: str, t: float, **data) -> None:
        if self.on_event is not None:
            try:
                self.on_event({"t": round(t, 4), "kind": kind, **data})
            except Exception:
                log.exception("event callback failed")

    def _error(self, message: str) -> None:
        log.warning("%s", message)
        self._emit("error", self.clock.now(), message=message)


class _Said:
    """The dialogue side of a said turn, settled like a generated reply: a stop truncates it to what
    was heard (``_settle_llm`` does that); a drop (no audio came) marks it cut off unheard."""

    def __init__(self, dialogue: DialogueLLM) -> None:
        self.dialogue = dialogue

    def close(self) -> None:
        pass

    def drop(self) -> None:
        self.dialogue.truncate_agent_turn("")


class _VADTap(Stage):
    def __init__(self, coordinator: Coordinator) -> None:
        super().__init__()
        self.name = "vad-tap"
        self.coordinator = coordinator

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, VoiceActivity):
            self.coordinator.observe_vad(frame)
        await self.push(frame)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
