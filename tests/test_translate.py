"""Interpreter and captions modes: the simultaneous policy (tables), real Apertium, real Whisper base
translating recorded Spanish, Piper speaking a translation, and bad input."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf

from fixtures import asterisk, fixture, ASTERISK
from orchestration.interpreter import REPLY_BASE, Interpreter, TranslatedText, asr_task
from orchestration.simultaneous import SimultaneousConfig, SimultaneousPolicy
from orchestration.translate import Apertium, TranslateConfig, TranslatorSet, UnsupportedPair
from streaming.errors import DuplexError
from streaming.frames import ErrorFrame, FinalText, PartialText, Word
from streaming.testing import run_frames

ES = ASTERISK.parent / "es_MX_f_Allison"


def es(name: str):
    return fixture(ES / f"{name}.wav")


def P(stable: str, unstable: str = "", pts: float = 0.0, utt: int = 1) -> PartialText:
    return PartialText(pts=pts, utterance=utt, stable=stable, unstable=unstable)


def F(text: str, pts: float = 9.0, utt: int = 1, continued: bool = False, language: str = "") -> FinalText:
    return FinalText(pts=pts, utterance=utt, text=text, continued=continued, language=language,
                     words=(Word("x", pts - 0.5, pts - 0.1, 0.9),))


def replay(policy, events, captions=False):
    st = policy.init_state()
    out = []
    for e in events:
        segs = policy.partial(st, e) if isinstance(e, PartialText) else policy.final(st, e, captions=captions)
        out.append([(s.text, s.supersedes) if s.supersedes else s.text for s in segs])
    return out


# ------------------------------------------------------------------------- policy tables


CLAUSE_TABLE = [
    # (partial stable text or final, segments emitted at that event)
    (P("", " Please"), []),
    (P("Please press", " one to"), []),
    (P("Please press one,", " then two"), ["Please press one,"]),  # a clause of >= 3 words
    (P("Please press one, then", " two."), []),
    (P("Please press one, then two.", " Thanks"), []),  # 2 words: too short for a clause of its own
    (P("Please press one, then two. Thanks for", " calling"), []),
    (F("Please press one, then two. Thanks for calling."), ["then two. Thanks for calling."]),
]


def test_clause_policy_table():
    policy = SimultaneousPolicy(SimultaneousConfig(policy="clause", min_words=3, max_words=12))
    events, expected = zip(*CLAUSE_TABLE)
    assert replay(policy, events) == list(expected)


def test_clause_policy_emits_at_max_words_without_punctuation():
    policy = SimultaneousPolicy(SimultaneousConfig(policy="clause", max_words=4))
    got = replay(policy, [P("one two three"), P("one two three four five"), F("one two three four five six")])
    assert got == [[], ["one two three four five"], ["six"]]


def test_wait_k_policy_table():
    policy = SimultaneousPolicy(SimultaneousConfig(policy="wait-k", wait_k=2))
    got = replay(policy, [P("a"), P("a b"), P("a b c"), P("a b c d e"), F("a b c d e f")])
    assert got == [[], ["a b"], [], ["c d e"], ["f"]]


def test_final_policy_waits_for_the_final():
    policy = SimultaneousPolicy(SimultaneousConfig(policy="final"))
    assert replay(policy, [P("a b c, d e f."), F("a b c, d e f.")]) == [[], ["a b c, d e f."]]


def test_emitted_segments_are_never_revised_but_captions_may_supersede():
    policy = SimultaneousPolicy(SimultaneousConfig(policy="wait-k", wait_k=2))
    # the final pass rewrote an already emitted word ("to" -> "two")
    events = [P("press to", " now"), F("press two now")]
    assert replay(policy, events) == [["press to"], ["now"]]  # speech: the rest only
    assert replay(policy, events, captions=True) == [["press to"], ["now", ("press two now", (0, 1))]]  # the whole final replaces both


def test_a_final_that_took_back_early_words_is_aligned_not_counted():
    """The final pass may rewrite early stable words into a different number of words: what was
    already said is found by alignment, so the rest is neither repeated nor cut."""
    policy = SimultaneousPolicy(SimultaneousConfig(policy="wait-k", wait_k=5))
    events = [P("but do not want the", " whole"), F("but though on the whole except in Italy")]
    assert replay(policy, events) == [["but do not want the"], ["whole except in Italy"]]
    events = [P("is not why", " your"), F("ask not what your country")]
    assert replay(SimultaneousPolicy(SimultaneousConfig(policy="wait-k", wait_k=3)), events) == [
        ["is not why"], ["your country"]]


def test_utterances_and_continued_segments_restart_the_count():
    policy = SimultaneousPolicy(SimultaneousConfig(policy="wait-k", wait_k=2))
    got = replay(policy, [P("a b"), F("a b c", continued=True), P("d e"), F("d e"),  # one long utterance, cut
                          P("x y", utt=2), F("x y z.", utt=2)])
    assert got == [["a b"], ["c"], ["d e"], [], ["x y"], ["z."]]


def test_a_window_after_a_cut_does_not_say_again_the_words_before_the_cut():
    """A long utterance's next window starts a little before the last committed word's end, and
    a translation may say that audio's words again: the repeat (two words or more, the window's
    first words against the last before the cut) counts as said, from partials or from a final."""
    policy = SimultaneousPolicy(SimultaneousConfig(policy="clause", min_words=3))
    before = "Number 7 or 9 for the decrease, or the volume of your eye,"
    got = replay(policy, [P(before, " or"), F(before, continued=True),
                          P("", " or the volume"),
                          P("or the volume of your eye to go out.", " Please"),
                          P("or the volume of your eye to go out. Please, press one,", " to"),
                          F("or the volume of your eye to go out. Please, press one, to activate.")])
    assert got == [[before], [], [], ["to go out."],
                   ["Please, press one,"], ["to activate."]]
    # nothing committed in the new window: its final alone
    got = replay(policy, [F(before, continued=True), F("your eye, to go out.")])
    assert got == [[before], ["to go out."]]
    # one word is not a repeat, nor are words that follow a new utterance rather than a cut
    assert replay(policy, [F(before, continued=True), F("eye drops are sold here.")])[1] == ["eye drops are sold here."]
    assert replay(policy, [F(before), F("or the volume of your eye, again.", utt=2)])[1] == [
        "or the volume of your eye, again."]


def test_source_end_is_when_the_last_word_was_first_heard():
    policy = SimultaneousPolicy(SimultaneousConfig(policy="wait-k", wait_k=2))
    st = policy.init_state()
    policy.partial(st, P("", " one two", pts=1.0))  # both words first heard at 1.0
    policy.partial(st, P("one", " two three", pts=1.4))
    (seg,) = policy.partial(st, P("one two", " three", pts=1.8))
    assert seg.text == "one two" and seg.source_end == 1.0
    (fin,) = policy.final(st, F("one two three", pts=2.5))
    assert fin.final and fin.source_end == pytest.approx(2.4)  # the last word's end


def test_policy_needs_a_state():
    with pytest.raises(ValueError):
        SimultaneousPolicy().partial(None, P("a"))


# ------------------------------------------------------------------------------ engines


@pytest.fixture(scope="module")
def apertium():
    ap = Apertium()
    if not ap.available:
        pytest.fail("apertium is not installed: run scripts/setup")
    return ap


def test_apertium_lists_its_modes_and_translates(apertium):
    pairs = apertium.pairs()
    assert {("es", "en"), ("en", "es"), ("fr", "es")} <= pairs
    out = apertium.translate("La conferencia está ahora desbloqueada.", "es", "en").lower()
    assert "conference" in out and "now" in out
    # no direct French-English mode: chained through Spanish
    assert apertium.route("fr", "en") == ["fr-es", "spa-eng"]
    assert "conference" in apertium.translate("La conférence est terminée.", "fr", "en").lower()
    assert apertium.translate("   ", "es", "en") == ""


def test_unsupported_pair_is_one_line_naming_installed_pairs(apertium):
    ts = TranslatorSet.from_config(TranslateConfig(), whisper_languages=("en", "es", "fr"))
    with pytest.raises(UnsupportedPair) as exc:
        ts.for_pair("es", "de")
    msg = str(exc.value)
    assert "\n" not in msg and "es -> de" in msg and "es->en" in msg and "whisper: 2 languages -> en" in msg
    assert ts.for_pair("es", "en").name == "whisper"
    assert ts.for_pair("es", "en", speech=False).name == "apertium"
    assert ts.for_pair("en", "en").name == "identity"
    routed = TranslatorSet.from_config(TranslateConfig(routes={"*-en": "apertium"}), whisper_languages=("en", "es"))
    assert routed.for_pair("es", "en").name == "apertium"
    assert asr_task(ts, "auto", "en") == "translate" and asr_task(ts, "en", "es") == "transcribe"


def test_cli_unsupported_pair(duplex_bin):
    r = subprocess.run([str(duplex_bin), "translate", str(es("conf-muted")), "--source", "es", "--target", "de"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("duplex: error:") and "apertium: " in lines[0] and "es->en" in lines[0]


# ------------------------------------------------------------------- the interpreter stage


async def test_interpreter_stage_captions_with_apertium_and_a_language_it_lacks(apertium):
    ts = TranslatorSet.from_config(TranslateConfig(), whisper_languages=())
    interp = Interpreter(ts, TranslateConfig(mode="captions", source="auto", target="en", policy="wait-k", wait_k=3))
    frames = [P("La conferencia está", " ahora", pts=1.0), F("La conferencia está ahora desbloqueada.", pts=2.0, language="es"),
              P("Guten Tag", utt=2), F("Guten Tag.", utt=2, language="de")]
    out = await run_frames([interp], frames)
    texts = [f for f in out if isinstance(f, TranslatedText)]
    errors = [f for f in out if isinstance(f, ErrorFrame)]
    # auto source and a text engine: held until the final names the language, then translated at once
    assert len(texts) == 1 and "conference" in texts[0].text.lower() and texts[0].source_language == "es"
    assert texts[0].engine == "apertium" and texts[0].reply == 1
    assert len(errors) == 1 and "de -> en" in errors[0].message and "es->en" in errors[0].message
    # everything else went through untouched
    assert sum(isinstance(f, (PartialText, FinalText)) for f in out) == len(frames)


async def test_interpreter_mode_speaks_each_translation(apertium):
    from agent.models import ModelResolver
    from orchestration.playback import Playback

    tts = ModelResolver().tts()
    playback = Playback()
    ts = TranslatorSet.from_config(TranslateConfig(), whisper_languages=())
    interp = Interpreter(ts, TranslateConfig(source="es", target="en"), tts=tts, playback=playback)
    interp.set_mode("dialogue")
    out = await run_frames([interp], [F("Hola.", utt=1)])
    assert not any(isinstance(f, TranslatedText) for f in out)  # dialogue: nothing translated
    interp.set_mode("interpreter", target="en", source="es")
    out = await run_frames([interp], [F("La conferencia está ahora desbloqueada.", utt=2, language="es")])
    assert any(isinstance(f, TranslatedText) for f in out)
    audio = playback.pull(16000 * 10, 0.0)
    assert np.abs(audio).max() > 0.01
    kinds = {(e.kind, e.reply) for e in playback.events()}
    assert ("start", REPLY_BASE + 2) in kinds and ("end", REPLY_BASE + 2) in kinds
    assert "conference" in playback.heard(REPLY_BASE + 2).lower()


def test_set_mode_refuses_unknown_modes_and_pairs(apertium):
    ts = TranslatorSet.from_config(TranslateConfig(), whisper_languages=())
    interp = Interpreter(ts)
    with pytest.raises(Exception, match="unknown mode"):
        interp.set_mode("karaoke")
    with pytest.raises(UnsupportedPair, match="installed"):
        interp.set_mode("captions", target="ja", source="es")
    with pytest.raises(Exception, match="needs a voice"):
        interp.set_mode("interpreter", target="en", source="es")
    assert interp.mode == "dialogue"


# -------------------------------------------------------------- real speech, real Whisper


@pytest.fixture(scope="module")
def base():
    import torch

    from agent.models import ModelResolver

    torch.set_num_threads(1)
    return ModelResolver().whisper("whisper:base", "int8")


def _translate(bundle, path, source, target, routes=None, pace="fast"):
    from agent.config import load_config
    from agent.translate_cmd import plan, translate_streaming, translators_for

    cfg = load_config(use_user_default=False)
    tcfg = replace(cfg.translate, source=source, target=target, routes=routes or {})
    ts = translators_for(tcfg, bundle)
    asr = plan(ts, cfg.asr, source, target)
    return asyncio.run(translate_streaming(path, bundle, cfg, asr, ts, tcfg, pace))


def test_spanish_recording_translated_to_english(base):
    # "Lo siento, no fue posible crear una conexión con el servidor de demostración de Digium..."
    # (a 4 s prompt such as confbridge-unlocked is too short to test on: Whisper base's
    # streamed translation of it changes with where the window starts)
    r = _translate(base, es("demo-nogo"), "es", "en")
    assert r.engine == "whisper" and r.source_language == "es"
    text = r.text.lower()
    assert "connection" in text and "server" in text and "console" in text, text
    d = r.as_dict()
    assert set(d) >= {"file", "source_language", "source_text", "text", "segments", "audio_seconds", "processing_seconds"}
    assert d["segments"] and all(set(s) >= {"text", "emitted_at", "source_end"} for s in d["segments"])
    assert all(0 < s["source_end"] <= d["audio_seconds"] + 0.05 for s in d["segments"])


def test_a_menu_whose_final_loops_after_the_speech_is_said_once(base):
    """es "conf-usermenu" ("... 7 o 9 para el volumen suyo, u 8 para salir."): the final's decodes
    after the committed clauses read the last clause and then loop, and the loop guard cuts them;
    the one sampled at temperature 1.0 did not loop but said the clause four times in fragments
    ("Number 7, or 9, for youVolumen Studio. Or number 8, for withinplay. Number 7, ..."). The cut
    text, far more likely, is kept: every number of the menu is said once."""
    text = _translate(base, es("conf-usermenu"), "es", "en").text
    names = {"1": "one", "4": "four", "6": "six", "7": "seven", "9": "nine", "8": "eight"}

    def said(n):  # "8" or "number eight": which one depends on the step grid, which follows the load
        return len(re.findall(rf"\b(?:{n}|number {names[n]})\b", text, re.IGNORECASE))

    assert all(said(n) <= 1 for n in names) and said("8") == 1 and text.isascii(), text


def test_spanish_through_apertium_keeps_the_source_text(base):
    r = _translate(base, es("conf-muted"), "es", "en", routes={"es-en": "apertium"})  # "Está usted ahora en modo mudo."
    assert r.engine == "apertium" and "modo" in (r.source_text or "").lower()
    assert "now" in r.text.lower()


def test_silence_and_wrong_language(base, tmp_path):
    silence = tmp_path / "silence.wav"
    sf.write(silence, np.zeros(16000 * 2, np.float32), 16000)
    r = _translate(base, silence, "es", "en")
    assert r.text == "" and r.segments == []
    # English speech while Spanish is pinned: no crash, still English out
    r = _translate(base, asterisk("demo-thanks"), "es", "en")
    assert r.text.strip()
    # English speech, auto source, Spanish target: detected, then Apertium en->es
    r = _translate(base, asterisk("demo-thanks"), "auto", "es")
    assert r.source_language == "en" and r.engine == "per-utterance" and r.text.strip() and not r.warnings


def test_a_translated_final_that_fails_is_sampled_again(base, monkeypatch):
    """Whisper's temperature fallback in the streaming final of a translation (final_fallback =
    "auto"): the final's first decode, a beam search (clause_final_beam_size) on a 30 s window
    (clause_final_min_encode_s), is cut by the loop guard, so it is decoded again at temperature
    0.2, and that sampled final is what the utterance says. A transcription's final is one greedy
    decode on a 10 s window, never resampled."""
    import streaming.asr.recognizer as R
    from streaming.asr.recognizer import ASRConfig, StreamingRecognizer
    from streaming.audio_file import read_audio

    real_decode, real_beam, real_mel = R.decode, R.beam_decode, R.log_mel
    decodes: list = []
    pads: list = []

    def greedy_always_loops(*args, temperature=0.0, **kw):
        decodes.append(temperature)
        d = real_decode(*args, temperature=temperature, **kw)
        return replace(d, hit_limit=True) if temperature == 0 else d

    def beam_always_loops(*args, **kw):
        decodes.append(f"beam {args[6]}")
        return replace(real_beam(*args, **kw), hit_limit=True)

    def mel(audio, n_mels, pad_to=None):
        pads.append(pad_to / 16000 if pad_to else None)
        return real_mel(audio, n_mels, pad_to=pad_to)

    monkeypatch.setattr(R, "decode", greedy_always_loops)
    monkeypatch.setattr(R, "beam_decode", beam_always_loops)
    monkeypatch.setattr(R, "log_mel", mel)
    audio = read_audio(es("demo-nogo"))  # "Lo siento, no fue posible crear una conexión con el servidor..."
    finals = {}
    for task in ("translate", "transcribe"):
        decodes.clear()
        rec = StreamingRecognizer(base, ASRConfig(task=task, language="es"))
        s = rec.init_state()
        rec.start(s, 0.0)
        rec.push(s, audio, 0.0, hypothesise=False)  # no partials: the final decodes the whole utterance
        pads.clear()
        finals[task] = " ".join(f.text for f in rec.end(s, len(audio) / 16000) if isinstance(f, FinalText))
        finals[task, "decodes"], finals[task, "pad"] = list(decodes), pads[-1]
    assert finals["translate", "decodes"] == ["beam 5", 0.2] and finals["translate", "pad"] == 30.0, finals
    text = finals["translate"].lower()
    assert "connection" in text and "server" in text, text  # the sampled final is still the translation
    # the transcription stays Spanish, whatever a word comes out as (int8 on an AMX CPU heard
    # "servidor" as "server door", bf16 on an AMD EPYC "consola" as "cansola")
    spanish = set(re.findall(r"\w+", finals["transcribe"].lower()))
    assert finals["transcribe", "decodes"] == [0.0] and finals["transcribe", "pad"] == 10.0, finals
    assert len(spanish & {"siento", "posible", "conexión", "servidor", "demostración", "puede", "información",
                          "problema", "consola"}) >= 5, finals
    # (words of the English translation only: "server" is also what int8 makes of "servidor")
    assert not spanish & {"sorry", "connection", "possible", "information", "the"}, finals


def test_bench_replay_every_step_runs_each_step_whatever_the_load():
    """``bench translate --systems streaming-steps``: the replay charges no compute, so a
    recogniser slower than real time still hypothesises on every block (the timed replay skips
    the steps it is behind on, and with them its hypotheses follow the machine's load)."""
    import time

    from agent.bench_translate import replay

    class SlowRecognizer:
        def init_state(self):
            return {"asked": []}

        def push(self, state, chunk, pts, hypothesise=True):
            state["asked"].append(hypothesise)
            time.sleep(0.03)  # slower than the 20 ms blocks
            return []

        def finish(self, state):
            self.state = state
            return []

    class NoVAD:
        def init_state(self):
            return None

        def step(self, state, chunk, pts):
            return []

    audio = np.zeros(16000, np.float32)  # 50 blocks
    asked = {}
    for charge in (True, False):
        rec = SlowRecognizer()
        run = replay(rec, NoVAD(), audio, SimultaneousPolicy(), charge=charge)
        asked[charge] = rec.state["asked"]
        assert run.compute_s >= 50 * 0.03
    assert len(asked[False]) == 50 and all(asked[False])
    assert sum(asked[True]) < 40, asked[True]  # behind after the first block: most steps skipped


def test_paired_bootstrap_tells_one_word_from_a_worse_system():
    """bench translate's significance test: a word changed in one file more than the other
    system is noise, a system wrong on every file is not."""
    from agent.bench_translate import paired_p

    refs = [f"to hear message {i} press {i}" for i in range(20)]
    listen = lambda files: [r.replace("hear", "listen to") if i in files else r for i, r in enumerate(refs)]  # noqa: E731
    worse = [f"mark number {i} for the message" for i in range(20)]
    assert paired_p(refs, listen({0}), listen({1, 2})) > 0.1
    assert paired_p(refs, refs, worse) < 0.01


def test_the_streaming_ratio_interval_covers_the_ratio_and_narrows_with_agreeing_files():
    """bench translate's interval of the streaming/offline BLEU ratio: a system equal to offline
    gives exactly 1; one that loses a word in every file lies below 1 on every resample; one that
    loses words in a single file gives an interval that reaches up to 1 (the other files agree)."""
    from agent.bench_translate import ratio_interval

    refs = [f"to hear message {i} press {i} now" for i in range(20)]
    drop = lambda files: [r.replace("to hear ", "") if i in files else r for i, r in enumerate(refs)]  # noqa: E731
    assert ratio_interval(refs, refs, refs) == [1.0, 1.0]
    lo, hi = ratio_interval(refs, refs, drop(set(range(20))))
    assert lo <= hi < 1.0
    lo, hi = ratio_interval(refs, refs, drop({3}))
    assert lo < 0.97 and hi == 1.0


def test_a_files_runs_at_each_lead_are_resampled_together():
    """bench translate --lead-ms: every file runs once per lead, and the bootstrap resamples files,
    a file's runs together. Two identical runs per file are then the same corpus twice over, so the
    interval is exactly the one-run interval; drawn run by run it would be narrower."""
    from agent.bench_translate import by_file, ratio_interval

    refs = [f"to hear message {i} press {i} now" for i in range(20)]
    other = [r.replace("to hear ", "") if i in (3, 7, 11) else r for i, r in enumerate(refs)]
    twice = lambda texts: [t for t in texts for _ in range(2)]  # noqa: E731
    once = ratio_interval(refs, refs, other)
    assert once[0] < once[1]
    assert ratio_interval(twice(refs), twice(refs), twice(other), runs=2) == once
    assert ratio_interval(twice(refs), twice(refs), twice(other), runs=1) != once
    assert by_file(["a b", "c", "d", "e f"], 2) == ["a b c", "d e f"]


def test_lead_runs_are_timed_on_the_files_own_clock_and_bad_leads_are_one_line():
    from agent.bench_translate import Run, parse_leads, unlead

    r = unlead(Run("hello there", [(1.5, 1.2), (2.0, 1.4)], 0.3, 3.1), 0.1)
    assert [x for w in r.word_times for x in w] == pytest.approx([1.4, 1.1, 1.9, 1.3]) and r.audio_s == pytest.approx(3.0)
    assert parse_leads(None) == (0.0,) and parse_leads("0, 20,60") == (0.0, 20.0, 60.0)
    for bad in ("0,x", "0,0", "-5", ","):
        with pytest.raises(DuplexError, match="--lead-ms"):
            parse_leads(bad)


MONOLOGUE = ("followme/options", "vm-opts-full", "dictate/play_help", "demo-nogo")  # 6, 13, 14 and 15 s


def test_a_speaker_who_never_pauses_is_translated_whole_offline(base):
    """Four Spanish prompts, their speech joined by 150 ms gaps (``bench translate --monologue``):
    47 s without a pause, decoded offline in two windows. The second must not copy the first
    one's menu pattern: with the previous window's text as context, bf16 Whisper said "Press Unit
    10 to send messages back. Press Unit 11 ..." for 29 s of other prompts and lost the last
    sentence ("... en la consola de Asterisk")."""
    from agent.bench_translate import Row, monologue
    from agent.config import load_config
    from agent.transcribe import transcribe_offline
    from streaming.asr.decoder import COMPRESSION_LIMIT, compression_ratio

    row, audio = monologue([Row(es(n), 0.0, n, "", "") for n in MONOLOGUE], "es")
    assert 40 < len(audio) / 16000 < 50
    asr = replace(load_config(use_user_default=False).asr, task="translate", language="es")
    offline = transcribe_offline(row.path, base, asr, audio=audio).text
    assert "console" in offline.lower() and compression_ratio(offline) <= COMPRESSION_LIMIT, offline


def test_a_window_that_repeats_itself_only_with_context_is_decoded_without_it(base, monkeypatch):
    """Offline decoding: where a window's text compresses beyond Whisper's 2.4 and the window was
    decoded with the previous one's text as context, it is decoded again without the context; the
    bare text stands unless it repeats itself too (an IVR menu does: the audio repeats). Whisper's
    decoder is faked here, the windows and the encoder are real."""
    import agent.transcribe as T
    from agent.bench_translate import Row, monologue
    from streaming.asr.decoder import Decoded, compression_ratio
    from streaming.asr.recognizer import ASRConfig

    _, audio = monologue([Row(es(n), 0.0, n, "", "") for n in MONOLOGUE], "es")
    tok = base.tokenizer
    loop = "Press 10 to send messages back. Press 11 to send messages back. " * 4
    plain = "I am afraid I was unable to create a connection."
    assert compression_ratio(loop) > 2.4 > compression_ratio(plain)
    for bare_text, expected in ((plain, ["first window.", plain]), (loop, ["first window.", loop.strip()])):
        calls = []

        def fake(model, tok_, feats, prompt, filters, max_tokens=224, beam_size=1):
            context = prompt[0] == tok.sot_prev
            calls.append(context)
            text = "first window." if not calls[:-1] else (loop if context else bare_text)
            return Decoded(tok.encode(" " + text), [-0.1] * 3, prompt, text=text)

        monkeypatch.setattr(T, "decode_with_fallback", fake)
        monkeypatch.setattr(T, "word_timings", lambda *a, **k: [])
        tr = T.transcribe_offline("monologue.wav", base, ASRConfig(task="translate", language="es"), audio=audio)
        # window 1 (no context yet), window 2 with its context, window 2 again without
        assert calls == [False, True, False], calls
        assert tr.text == " ".join(expected), tr.text
