"""Layered configuration: the composition root is the only reader of ``configs/``.

Layers, later ones winning: ``configs/default.toml`` → a user file (``--config``,
``$DUPLEX_CONFIG`` or ``~/.config/duplex/config.toml``) → environment variables
``DUPLEX_<SECTION>__<KEY>`` → command-line overrides. The merged tree is validated by pydantic into
frozen dataclasses; any problem becomes a one-line ``ConfigError`` that names the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import dataclasses

from pydantic import Field, TypeAdapter, ValidationError

from orchestration.dialogue import DialogueConfig
from orchestration.turns import TurnConfig
from orchestration.translate import TranslateConfig
from streaming.aec import AECConfig
from streaming.errors import ConfigError
from streaming.asr.recognizer import ASRConfig
from streaming.vad import VADConfig

from .mqtt_protocol import MqttConfig

ENV_PREFIX = "DUPLEX_"


@dataclass(frozen=True)
class AudioConfig:
    #: audio frame length inside the pipeline, ms
    block_ms: Annotated[float, Field(gt=0, le=1000)] = 20.0
    #: input device: "default", an index, or a name fragment
    input_device: str | int = "default"
    #: output device: "default", an index, or a name fragment
    output_device: str | int = "default"
    #: device rate in Hz, 0 for the device default
    device_sample_rate: Annotated[int, Field(ge=0, le=384000)] = 0
    #: file sources: "realtime" or "fast"
    pace: Literal["realtime", "fast"] = "realtime"
    #: recording for `duplex listen` without an input device; "" = bundled demo prompt
    demo_file: str = ""


@dataclass(frozen=True)
class PipelineConfig:
    #: bounded queue length between stages, in data frames
    queue_size: Annotated[int, Field(ge=1, le=100000)] = 64


WhisperPrecision = Literal["auto", "bf16", "fp32", "int8", "int8-row", "int8-tok"]


@dataclass(frozen=True)
class ModelsConfig:
    #: speech recogniser: whisper:tiny.en, whisper:base, or a hub id
    asr: str = "whisper:tiny.en"
    #: numeric precision of Whisper on the CPU, for transcription and translation: auto (bf16 where
    #: the CPU multiplies bf16 quickest, AMX, and for translation wherever it multiplies bf16 in
    #: hardware, AVX-512 BF16 too; else int8-tok), bf16 (bf16 encoder, int8-weight decoder
    #: with a bf16 copy for prefills), int8-tok (token-scaled int8 encoder, int8-weight bf16
    #: decoder), int8-row (per-row weight scales and an int8 output projection), int8 (dynamic
    #: quantisation) or fp32
    asr_precision: WhisperPrecision = "auto"
    #: the same where the agent holds a conversation (talk, converse, serve and the API with the
    #: LLM): the turn-taking was tuned on int8's hypotheses
    conversation_asr_precision: WhisperPrecision = "int8"
    #: coordinator LLM: llm:smollm2-135m, or a hub id of an instruct model
    llm: str = "llm:smollm2-135m"
    #: numeric precision of the LLM on the CPU: w8 (int8 weights, bf16 activations), fp32 or int8 (dynamic)
    llm_precision: Literal["fp32", "w8", "int8"] = "w8"
    #: text-to-speech voice
    tts: str = "tts:piper-joe"
    #: folder for converted weights; "" = $DUPLEX_CACHE_DIR or ~/.cache/duplex/models
    cache_dir: str = ""


@dataclass(frozen=True)
class LogConfig:
    #: log level
    level: Literal["debug", "info", "warning", "error"] = "warning"


@dataclass(frozen=True)
class DuplexConfig:
    audio: AudioConfig = field(default_factory=AudioConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    aec: AECConfig = field(default_factory=AECConfig)
    vad: VADConfig = field(default_factory=VADConfig)
    asr: ASRConfig = field(default_factory=ASRConfig)
    turns: TurnConfig = field(default_factory=TurnConfig)
    dialogue: DialogueConfig = field(default_factory=DialogueConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    translate: TranslateConfig = field(default_factory=TranslateConfig)


_ADAPTER = TypeAdapter(DuplexConfig)
# section tables of DuplexConfig (annotations are strings under `from __future__ import annotations`)
_DATACLASS_FIELDS = {(DuplexConfig, f.name): f.default_factory for f in dataclasses.fields(DuplexConfig)}


def default_config_path() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "_configs" / "default.toml", here.parent / "configs" / "default.toml"):
        if candidate.exists():
            return candidate
    raise ConfigError("configs/default.toml is missing from the installation")


def user_config_path() -> Path | None:
    env = os.environ.get("DUPLEX_CONFIG")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    p = base / "duplex" / "config.toml"
    return p if p.exists() else None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None


def parse_value(text: str) -> Any:
    """A TOML literal (0.6, true, "x", [1, 2]) or, failing that, the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value`` → (``section.key``, value)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    return key, parse_value(value.strip())


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == "DUPLEX_CONFIG":
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        out[f"{section.lower()}.{key.lower()}"] = parse_value(value)
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(parts[:-1])} is not a section")
        node = child
    node[parts[-1]] = value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    user_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    use_user_default: bool = True,
) -> DuplexConfig:
    tree = read_toml(default_config_path())
    path = Path(user_file) if user_file else (user_config_path() if use_user_default else None)
    if path is not None:
        tree = _merge(tree, read_toml(path))
    for key, value in env_overrides(os.environ if environ is None else environ).items():
        _set_dotted(tree, key, value, f"environment variable {ENV_PREFIX}{key.replace('.', '__').upper()}")
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value, f"override {key}")
    return validate(tree)


def validate(tree: Mapping[str, Any]) -> DuplexConfig:
    _check_keys(tree, DuplexConfig, "")
    try:
        return _ADAPTER.validate_python(dict(tree))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _check_keys(tree: Mapping[str, Any], cls: type, prefix: str) -> None:
    """Unknown keys are errors (a typo must not be silently ignored); components' config
    dataclasses stay free of pydantic settings, so the check is done here, once, for all."""
    if not isinstance(tree, Mapping):
        raise ConfigError(f"invalid config: {prefix.rstrip('.') or '(root)'} must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in tree.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"invalid config: unknown key {prefix + key!r} (known here: {known})")
        ftype = fields[key].type
        sub = ftype if dataclasses.is_dataclass(ftype) else _DATACLASS_FIELDS.get((cls, key))
        if sub is not None:
            _check_keys(value, sub, f"{prefix}{key}.")


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "missing":
        return f"invalid config: {loc} is required"
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" = {value!r}"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"invalid config: {loc or '(root)'}{shown}: {msg}{more}"
