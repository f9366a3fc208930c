"""The embedding API: DuplexAgent around one Session, with real models and recorded speech: a
transcripts-only agent, and a full-duplex conversation (Whisper, SmolLM2, Piper)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import jiwer
import numpy as np
import pytest

from agent.api import DuplexAgent, config_from
from agent.config import load_config
from agent.session import AgentAudio, AgentText, Metrics, SharedModels, TurnEvent
from fixtures import librivox
from streaming.audio_file import read_audio
from streaming.errors import ConfigError
from streaming.frames import FinalText, PartialText, SpeechEnded, SpeechStarted
from streaming.resample import resample

RATE = 16000
SCENARIO_AUDIO = Path(__file__).resolve().parent.parent / "agent" / "data" / "scenarios" / "audio"


def words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()).replace("mr ", "mister ")


@pytest.fixture(scope="module")
def models():
    m = SharedModels.load(load_config(use_user_default=False, environ={}), tts=True)
    yield m
    m.close()


async def until(cond, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def test_agent_transcribes_any_format_speaks_and_obeys(models):
    speech = read_audio(librivox("0870"))
    audio = np.concatenate([np.zeros(RATE // 4, np.float32), speech, np.zeros(RATE, np.float32)])
    # a 44.1 kHz stereo int16 source: the agent converts
    stereo = (np.repeat(resample(audio, RATE, 44100)[:, None], 2, axis=1) * 32767).astype(np.int16)
    events: list = []
    async with DuplexAgent.from_config({"asr": {"hotwords": ["Dashwood"]}}, models=models) as agent:
        async def collect():
            async for ev in agent.events():
                events.append(ev)

        collector = asyncio.create_task(collect())
        for i in range(0, len(stereo), 4410):
            await agent.push_audio(stereo[i : i + 4410], sample_rate=44100)
        await agent.flush()
        finals = [e for e in events if isinstance(e, FinalText)]
        assert len(finals) == 1 and finals[0].utterance == 1
        ref = "and mister john dashwood had then leisure to consider how much there might be prudently in his power to do for them"
        assert jiwer.wer(ref, words(finals[0].text)) <= 0.2 and "Dashwood" in finals[0].text
        kinds = [type(e) for e in events]
        assert kinds.index(SpeechStarted) < kinds.index(PartialText) < kinds.index(SpeechEnded) < kinds.index(FinalText)
        assert isinstance(events[kinds.index(FinalText) + 1], Metrics)

        # say, cut short by interrupt
        n = len(events)
        say = asyncio.create_task(agent.say("This is the first sentence. Here comes a second one. And a third one, quite long, follows."))
        await until(lambda: any(isinstance(e, AgentAudio) for e in events[n:]), 20, "agent audio")
        assert await agent.interrupt()
        assert await say == 1
        spoken = events[n:]
        assert isinstance(spoken[0], AgentText) and spoken[1] == TurnEvent(kind="agent_start", reply=1, pts=0.0)
        stop = [e for e in spoken if isinstance(e, TurnEvent) and e.kind in ("agent_end", "barge_in")]
        assert len(stop) == 1 and stop[0].kind == "barge_in" and stop[0].reason == "interrupt"
        audio_out = [e for e in spoken if isinstance(e, AgentAudio)]
        assert audio_out[0].sample_rate == 22050 and sum(a.seconds for a in audio_out) < 5.0
        assert not agent.session.speaking and not await agent.interrupt()

        # reset drops half an utterance; the next one is numbered on
        n = len(events)
        half = read_audio(librivox("0880"))
        await agent.push_audio(np.concatenate([np.zeros(RATE // 4, np.float32), half[: len(half) // 2]]))
        await agent.reset()
        await agent.flush()
        assert not [e for e in events[n:] if isinstance(e, (FinalText, PartialText))]
        await agent.push_audio(np.concatenate([half, np.zeros(RATE, np.float32)]))
        await agent.flush()
        after = [e for e in events[n:] if isinstance(e, FinalText)]
        assert len(after) == 1 and after[0].utterance == 2 and "disposed" in words(after[0].text).replace("old sposed", "ill disposed")

        # modes are stored for the coordinator; the English-only model refuses other languages
        await agent.set_mode("interpreter", "es")
        assert (agent.session.mode, agent.session.target) == ("interpreter", "es")
        with pytest.raises(ValueError, match="needs a target"):
            await agent.set_mode("interpreter")
        with pytest.raises(ValueError, match="unknown mode"):
            await agent.set_mode("karaoke")
        with pytest.raises(ValueError, match="English-only"):
            await agent.set_language("fr")
        await agent.set_language("en")
        assert await agent.set_hotwords(["Asterisk, PBX", " asterisk "]) == ("Asterisk", "PBX")
        await agent.finish()
        await asyncio.wait_for(collector, 5)  # events() ended after finish()
        with pytest.raises(RuntimeError, match="no more audio"):
            await agent.push_audio(np.zeros(160, np.float32))


def test_config_sources(tmp_path):
    assert config_from({"asr.language": "en", "vad": {"threshold": 0.6}}).vad.threshold == 0.6
    p = tmp_path / "c.toml"
    p.write_text("[asr]\nstep_ms = 300\n")
    assert config_from(p).asr.step_ms == 300
    with pytest.raises(ConfigError, match="unknown key 'asr.bogus'"):
        config_from({"asr": {"bogus": 1}})
    with pytest.raises(ConfigError, match="not inside a section"):
        config_from({"threshold": 0.6})


# ------------------------------------------------------------------------------- a conversation


@pytest.fixture(scope="module")
def dialogue_models():
    m = SharedModels.load(load_config(use_user_default=False, environ={}), llm=True)
    yield m
    m.close()


async def test_conversation_question_reply_interrupt_and_say(dialogue_models):
    """A recorded question, pushed like a microphone: the final transcript, then the agent's reply as
    text and as real-time 16 kHz audio; interrupt() cuts it and the dialogue keeps what was heard;
    say() is spoken and remembered."""
    question = read_audio(SCENARIO_AUDIO / "q_weather.wav")  # "What's the weather usually like in Spain in the spring?"
    audio = np.concatenate([np.zeros(RATE // 4, np.float32), question, np.zeros(RATE, np.float32)])
    seen: list[tuple[float, object]] = []
    async with DuplexAgent.from_config({"dialogue": {"max_new_tokens": 24}}, models=dialogue_models) as agent:
        assert agent.dialogue and agent.session.mode == "dialogue"
        # a conversation's recogniser: int8 and no pre-roll (transcription's int8-tok and 300 ms)
        assert agent.session.asr_config.preroll_ms == 0.0
        assert agent.models.whisper.precision == "int8"

        async def collect():
            async for ev in agent.events():
                seen.append((time.monotonic(), ev))

        collector = asyncio.create_task(collect())
        events = lambda kind: [e for _, e in seen if isinstance(e, kind)]  # noqa: E731
        t0 = time.monotonic()
        for i in range(0, len(audio), 320):  # 20 ms blocks at real-time pace
            await agent.push_audio(audio[i : i + 320])
            await asyncio.sleep(max(0.0, t0 + (i + 320) / RATE - time.monotonic()))
        await until(lambda: len(events(AgentAudio)) >= 30 and events(FinalText), 25, "the final and 0.6 s of the reply")

        final = events(FinalText)[0]
        assert jiwer.wer("what's the weather usually like in spain in the spring", words(final.text)) <= 0.3, final.text
        # the reply that plays (a speculative one may have been generated and dropped before it)
        kinds = [type(e) for _, e in seen]
        start = kinds.index(TurnEvent)
        first = seen[start][1]
        assert first.kind == "agent_start" and start < kinds.index(AgentAudio)
        reply = first.reply
        assert "".join(t.text for t in events(AgentText) if t.reply == reply).strip()
        blocks = events(AgentAudio)[:30]
        assert all(b.sample_rate == RATE and b.num_samples == 320 and b.reply == reply for b in blocks)
        assert np.all(np.diff([b.pts for b in blocks]) >= 0.02 - 1e-6)  # 20 ms apart on the session clock, or more
        arrived = [t for t, e in seen if isinstance(e, AgentAudio)][:30]
        assert arrived[-1] - arrived[0] >= 0.35, "agent audio comes in real time, not in a burst"
        assert max(float(np.abs(b.samples).max()) for b in blocks) > 0.05
        # the session timed the answer from the end of the user's voice (the question ends 0.25 s
        # + its length into the audio; the voice-off mark is VAD's, within a hop or two of that)
        lat = list(agent.session.reply_latencies)
        assert lat and 0 < lat[0] < 5000, lat

        # interrupt(): a barge-in on the reply; no more of its audio; the dialogue keeps what was heard
        assert await agent.interrupt()
        await until(lambda: any(e.kind == "barge_in" for e in events(TurnEvent)), 5, "the barge-in event")
        cut = next(e for e in events(TurnEvent) if e.kind == "barge_in")
        assert cut.reply == reply and cut.reason == "interrupt"
        n_audio = len(events(AgentAudio))
        await asyncio.sleep(0.2)
        assert len(events(AgentAudio)) <= n_audio + 1
        # (the LLM's thread cuts the turn once the reply's generation has stopped)
        await until(lambda: "[interrupted]" in agent.session.dialogue_llm.text, 10, "the truncated agent turn")
        dialogue = agent.session.dialogue_llm.text
        assert "spring" in dialogue.lower(), dialogue
        assert cut.text and cut.text.split()[0] in dialogue

        # say(): spoken as the next reply, played to its end, and part of the dialogue
        n = len(seen)
        said_reply = await agent.say("Goodbye for now.")
        assert said_reply > reply
        said = [e for _, e in seen[n:]]
        assert [(e.kind, e.reply) for e in said if isinstance(e, TurnEvent)] == [("agent_start", said_reply), ("agent_end", said_reply)]
        assert " ".join(e.text for e in said if isinstance(e, AgentText)) == "Goodbye for now."
        voice = np.concatenate([e.samples for e in said if isinstance(e, AgentAudio) and e.reply == said_reply])
        assert 0.5 < len(voice) / RATE < 4.0
        dialogue = agent.session.dialogue_llm.text
        assert dialogue.index("Goodbye for now.") > dialogue.index("[interrupted]"), dialogue
        await agent.finish()
        await asyncio.wait_for(collector, 5)
    from agent.transcribe import transcribe_offline
    import soundfile as sf
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "said.wav"
        sf.write(path, voice, RATE)
        heard = words(transcribe_offline(path, dialogue_models.whisper, agent.cfg.asr).text)
    # Piper's voice varies from run to run; tiny.en has heard "Goodbye" as "bye bye"
    assert re.search(r"bye\b.*\bfor now", heard), heard


async def test_captions_with_a_target_are_translated_text_without_speech(models):
    """set_mode("captions", target="es") on a transcripts-only agent: each English utterance
    comes as its transcript and as Spanish TranslatedText (Apertium), nothing is spoken; without a
    target, captions are the transcripts alone again."""
    from orchestration.interpreter import TranslatedText

    speech = read_audio(librivox("0870"))
    audio = np.concatenate([np.zeros(RATE // 4, np.float32), speech, np.zeros(RATE, np.float32)])
    events: list = []
    async with DuplexAgent.from_config({"translate": {"source": "en"}}, models=models) as agent:
        with pytest.raises(ValueError, match="ja"):
            await agent.set_mode("captions", target="ja")
        await agent.set_mode("captions", target="es")
        assert (agent.session.mode, agent.session.target) == ("captions", "es")

        async def collect():
            async for ev in agent.events():
                events.append(ev)

        collector = asyncio.create_task(collect())
        await agent.push_audio(audio)
        await agent.flush()
        await until(lambda: any(isinstance(e, TranslatedText) and e.final for e in events), 10, "the final caption")
        finals = [e for e in events if isinstance(e, FinalText)]
        captions = [e for e in events if isinstance(e, TranslatedText) and not e.supersedes]
        assert len(finals) == 1 and captions and all(c.target_language == "es" for c in captions)
        text = " ".join(c.text for c in captions).lower()
        assert "dashwood" in text and ("tenía" in text or "poder" in text or "para" in text), text
        assert not [e for e in events if isinstance(e, (AgentAudio, TurnEvent))], "captions are never spoken"

        n = len(events)
        await agent.set_mode("captions")
        await agent.push_audio(audio)
        await agent.flush()
        assert [e for e in events[n:] if isinstance(e, FinalText)]
        assert not [e for e in events[n:] if isinstance(e, TranslatedText)]
        await agent.finish()
        await asyncio.wait_for(collector, 5)


async def test_interpreter_mode_switched_at_run_time_translates_and_speaks(dialogue_models):
    """set_mode("interpreter", target="es") on a conversation: the next English utterance is not
    answered but translated (Apertium en->es) and spoken as an agent turn; an unsupported pair is
    refused with one line; back in dialogue mode the agent answers again."""
    from orchestration.interpreter import REPLY_BASE, TranslatedText

    question = read_audio(SCENARIO_AUDIO / "q_museum.wav")  # "What time does the museum open on Sundays?"
    audio = np.concatenate([np.zeros(RATE // 4, np.float32), question, np.zeros(RATE, np.float32)])
    seen: list = []
    cfg = {"translate": {"source": "en"}, "dialogue": {"max_new_tokens": 16}}
    async with DuplexAgent.from_config(cfg, models=dialogue_models) as agent:
        with pytest.raises(ValueError, match="ja"):
            await agent.set_mode("interpreter", target="ja")
        await agent.set_mode("interpreter", target="es")

        async def collect():
            async for ev in agent.events():
                seen.append(ev)

        collector = asyncio.create_task(collect())
        t0 = time.monotonic()
        for i in range(0, len(audio), 320):
            await agent.push_audio(audio[i : i + 320])
            await asyncio.sleep(max(0.0, t0 + (i + 320) / RATE - time.monotonic()))
        kinds = lambda k: [e for e in seen if isinstance(e, k)]  # noqa: E731
        await until(lambda: kinds(TranslatedText) and len([a for a in kinds(AgentAudio) if a.reply >= REPLY_BASE]) >= 10,
                    20, "the translation and its voice")
        text = " ".join(t.text for t in kinds(TranslatedText)).lower()
        assert "museo" in text, text
        assert all(a.reply >= REPLY_BASE for a in kinds(AgentAudio)), "the dialogue did not answer"
        assert any(e.kind == "agent_start" and e.reply >= REPLY_BASE for e in kinds(TurnEvent))
        await agent.finish()
        await asyncio.wait_for(collector, 5)
