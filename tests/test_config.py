"""Layered config: defaults, user file, environment, overrides; errors name the key."""

import pytest

from agent.config import DuplexConfig, default_config_path, load_config, parse_override
from streaming.errors import ConfigError


def test_default_toml_matches_the_dataclass_defaults():
    # every tunable is in configs/default.toml, and the file agrees with the code
    assert load_config(use_user_default=False, environ={}) == DuplexConfig()
    text = default_config_path().read_text()
    import dataclasses

    for section in dataclasses.fields(DuplexConfig):
        for f in dataclasses.fields(section.default_factory()):
            assert f"\n{f.name} = " in text, f"{section.name}.{f.name} missing from default.toml"


def test_layers_in_order(tmp_path):
    user = tmp_path / "user.toml"
    user.write_text("[vad]\nthreshold = 0.7\nmin_speech_ms = 100\n[audio]\npace = 'fast'\n")
    cfg = load_config(user, environ={"DUPLEX_VAD__THRESHOLD": "0.8", "DUPLEX_VAD__NEG_THRESHOLD": "0.4"})
    assert cfg.vad.threshold == 0.8 and cfg.vad.neg_threshold == 0.4  # env beats the file
    assert cfg.vad.min_speech_ms == 100 and cfg.audio.pace == "fast"
    cfg = load_config(user, {"vad.threshold": 0.9}, environ={"DUPLEX_VAD__THRESHOLD": "0.8"})
    assert cfg.vad.threshold == 0.9  # the command line beats the environment


def test_user_file_from_environment(tmp_path, monkeypatch):
    user = tmp_path / "u.toml"
    user.write_text("[pipeline]\nqueue_size = 7\n")
    monkeypatch.setenv("DUPLEX_CONFIG", str(user))
    assert load_config(environ={}).pipeline.queue_size == 7


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"vad.threshold": 1.5}, "vad.threshold = 1.5"),
        ({"vad.treshold": 0.5}, "unknown key 'vad.treshold'"),
        ({"nosuch.key": 1}, "unknown key 'nosuch'"),
        ({"audio.pace": "slow"}, "audio.pace = 'slow'"),
        ({"vad.neg_threshold": 0.9}, "neg_threshold must not exceed threshold"),
        ({"pipeline.queue_size": "many"}, "pipeline.queue_size"),
        ({"vad.webrtc_aggressiveness": 4}, "vad.webrtc_aggressiveness = 4"),
        ({"log.level": "loud"}, "log.level"),
    ],
)
def test_invalid_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides, use_user_default=False, environ={})
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_bad_files_and_env(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[vad\nthreshold=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, environ={})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.toml", environ={})
    with pytest.raises(ConfigError, match="vad.threshold"):
        load_config(environ={"DUPLEX_VAD__THRESHOLD": "high"}, use_user_default=False)


def test_override_syntax():
    assert parse_override("vad.threshold=0.6") == ("vad.threshold", 0.6)
    assert parse_override("audio.input_device=USB Mic") == ("audio.input_device", "USB Mic")
    assert parse_override("audio.input_device=3") == ("audio.input_device", 3)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("threshold")


def test_conversations_have_their_own_pre_roll_and_precision():
    """Transcription and translation default to auto (bf16 on AMX, else int8-tok) with a 300 ms pre-roll; a conversation
    runs int8 without one, and a user may change either pair on its own."""
    cfg = load_config(use_user_default=False)
    assert (cfg.models.asr_precision, cfg.asr.preroll_ms) == ("auto", 300.0)
    assert (cfg.models.conversation_asr_precision, cfg.asr.in_conversation().preroll_ms) == ("int8", 0.0)
    talk = load_config(use_user_default=False, overrides={"asr.conversation_preroll_ms": 120})
    conv = talk.asr.in_conversation()
    assert conv.preroll_ms == 120 and talk.asr.preroll_ms == 300
    assert conv == talk.asr.__class__(**{**talk.asr.__dict__, "preroll_ms": 120.0, "draft": False})
    assert talk.asr.draft, "transcription decodes with a draft; a conversation's dynamic int8 does not"
