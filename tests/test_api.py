"""The embedding API: DuplexAgent around one Session, with real models and recorded speech."""

from __future__ import annotations

import asyncio
import re

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
        assert isinstance(spoken[0], AgentText) and spoken[1] == TurnEvent(kind="agent_started", turn=1, pts=0.0)
        stop = [e for e in spoken if isinstance(e, TurnEvent) and e.kind == "agent_stopped"]
        assert len(stop) == 1 and stop[0].interrupted
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
