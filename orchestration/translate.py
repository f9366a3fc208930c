"""Translation engines behind one interface, and the choice of engine per language pair.

Three engines, each a ``Translator`` (``translate(text, source, target) -> str``, ``pairs()``):

* ``whisper``: Whisper's own ``translate`` task, speech in any of its languages to English. The
  work happens *inside the recogniser* (``ASRConfig(task="translate")``): the words that reach
  the interpreter are English already, so ``translate`` passes text through. It exists as an
  engine so that one table decides, per pair, whether speech is translated by the recogniser or
  transcribed and then translated as text.
* ``apertium``: the Debian ``apertium`` command (rule-based transfer), one process per call, text
  through stdin, never through a shell, with a timeout. Pairs are the modes ``apertium -l``
  reports; a pair without a direct mode is chained through a pivot language (fr->es->en).
* ``llm``: the coordinator LLM (``orchestration.llm.ChatLLM``) asked for a translation, when a
  model able to translate is configured.

``TranslatorSet.for_pair`` picks the engine: the pair's entry in ``routes`` if any, else the
first engine of ``order`` that has the pair. An unsupported pair is one ``UnsupportedPair`` line
that lists what is installed.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal, Protocol, runtime_checkable

from pydantic import Field

from streaming.errors import DuplexError

from .simultaneous import SimultaneousConfig

log = logging.getLogger(__name__)

#: Apertium names languages with ISO 639-3 codes (``spa-eng``), some older pairs with 639-1
#: (``fr-es``); we speak 639-1 where it exists, as Whisper does
ISO3_TO_1 = {
    "eng": "en", "spa": "es", "fra": "fr", "ita": "it", "cat": "ca", "por": "pt", "glg": "gl", "ron": "ro",
    "deu": "de", "nld": "nl", "oci": "oc", "arg": "an", "eus": "eu", "epo": "eo", "rus": "ru", "ukr": "uk",
    "bel": "be", "swe": "sv", "dan": "da", "nob": "nb", "nno": "nn", "isl": "is", "afr": "af", "kaz": "kk",
    "tat": "tt", "pol": "pl", "ces": "cs", "slk": "sk", "hbs": "sh", "slv": "sl", "mkd": "mk", "bul": "bg",
    "ell": "el", "mlt": "mt", "cym": "cy", "bre": "br", "gle": "ga", "srd": "sc", "hin": "hi", "urd": "ur",
    "ara": "ar", "heb": "he", "fin": "fi", "est": "et", "hun": "hu", "tur": "tr", "ind": "id", "msa": "ms",
}

#: English names, for the LLM's instruction (the code itself means little to a small model)
LANGUAGE_NAMES = {
    "en": "English", "es": "Spanish", "fr": "French", "it": "Italian", "de": "German", "pt": "Portuguese",
    "ca": "Catalan", "gl": "Galician", "nl": "Dutch", "ru": "Russian", "ro": "Romanian", "pl": "Polish",
    "ja": "Japanese", "zh": "Chinese", "ko": "Korean", "ar": "Arabic", "sv": "Swedish", "uk": "Ukrainian",
}

ENGINES = ("whisper", "apertium", "llm")


class UnsupportedPair(DuplexError):
    """No configured engine translates this pair; the message lists the installed pairs."""


@runtime_checkable
class Translator(Protocol):
    #: engine name ("whisper", "apertium", "llm")
    name: str
    #: True when the engine works on speech inside the recogniser (its text input is translated already)
    in_recognizer: bool

    def translate(self, text: str, source: str, target: str) -> str:
        """``text`` in ``source`` rendered in ``target`` (blocking: call it off the event loop)."""

    def pairs(self) -> frozenset[tuple[str, str]]:
        """(source, target) pairs this engine translates, ISO 639-1 codes where they exist."""


@dataclass(frozen=True)
class TranslateConfig:
    #: what the agent does with speech at start-up: "dialogue" (answer it), "interpreter" (translate
    #: and speak) or "captions" (translate, text only); switchable at run time
    mode: Literal["dialogue", "interpreter", "captions"] = "dialogue"
    #: target language of interpreter and captions mode (ISO 639-1)
    target: str = "en"
    #: source language, or "auto" to detect it per utterance
    source: str = "auto"
    #: engines tried in this order for a pair no route names: whisper, apertium, llm
    order: tuple[Literal["whisper", "apertium", "llm"], ...] = ("whisper", "apertium", "llm")
    #: engine per pair, overriding ``order``: {"es-en" = "apertium"}; "*" matches any source or target
    routes: Mapping[str, Literal["whisper", "apertium", "llm"]] = field(default_factory=dict)
    #: when to emit a stable piece of the source: "clause" (punctuation), "wait-k" or "final" (whole utterances)
    policy: Literal["clause", "wait-k", "final"] = "clause"
    #: wait-k: emit once this many stable words are pending
    wait_k: Annotated[int, Field(ge=1, le=50)] = 4
    #: clause: a clause shorter than this many words waits to be joined by the next
    min_words: Annotated[int, Field(ge=1, le=50)] = 3
    #: clause: emit this many pending stable words even without punctuation
    max_words: Annotated[int, Field(ge=1, le=200)] = 12
    #: captions: when the final transcript differs from what was shown, show it again marked as a revision
    revise_captions: bool = True
    #: the apertium executable (a name on PATH or a path)
    apertium_command: str = "apertium"
    #: a pair without its own Apertium mode is chained through this language ("" = no chaining)
    apertium_pivot: str = "es"
    #: one Apertium call may take at most this long, in s
    apertium_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    #: LLM engine: a model name as in models.llm ("" = no LLM engine); needs a capable multilingual model
    llm: str = ""
    #: LLM engine: languages it is trusted with (every pair between two of them)
    llm_languages: tuple[str, ...] = ("en", "es", "fr", "it", "de", "pt")
    #: LLM engine: cap on the tokens of one translation
    llm_max_new_tokens: Annotated[int, Field(ge=8, le=1024)] = 128

    def policy_config(self) -> SimultaneousConfig:
        return SimultaneousConfig(policy=self.policy, wait_k=self.wait_k, min_words=self.min_words,
                                  max_words=self.max_words, revise_captions=self.revise_captions)


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


# ------------------------------------------------------------------------------------ engines


class WhisperTranslate:
    """Whisper's ``translate`` task: speech in ``languages`` to English, done by the recogniser."""

    name = "whisper"
    in_recognizer = True

    def __init__(self, languages: Iterable[str]) -> None:
        self.languages = frozenset(languages)

    def translate(self, text: str, source: str, target: str) -> str:
        if target != "en":
            raise UnsupportedPair(f"Whisper translates into English only, not into {target}")
        return text  # the recogniser decoded English already

    def pairs(self) -> frozenset[tuple[str, str]]:
        return frozenset((s, "en") for s in self.languages if s != "en")


class Apertium:
    """The Debian ``apertium`` command line. Modes are read once (``apertium -l``)."""

    name = "apertium"
    in_recognizer = False

    def __init__(self, command: str = "apertium", pivot: str = "es", timeout_s: float = 10.0) -> None:
        self.command = command
        self.pivot = pivot
        self.timeout_s = timeout_s
        self._modes: dict[tuple[str, str], str] | None = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return shutil.which(self.command) is not None

    def modes(self) -> dict[tuple[str, str], str]:
        """(source, target) -> Apertium mode name, for every direct mode installed."""
        with self._lock:
            if self._modes is None:
                self._modes = self._list_modes()
            return self._modes

    def _list_modes(self) -> dict[tuple[str, str], str]:
        exe = shutil.which(self.command)
        if exe is None:
            return {}
        try:
            out = subprocess.run([exe, "-l"], capture_output=True, text=True, timeout=self.timeout_s,
                                 stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("apertium -l failed: %s", exc)
            return {}
        modes: dict[tuple[str, str], str] = {}
        for line in out.stdout.splitlines():
            mode = line.strip()
            parts = mode.split("-")
            # plain "src-tgt" modes only: "eco-es-fr" (another system), "spa-eng_US" (a variant)
            # and debugging modes ("eng-spa-tagger") are not translation directions we offer
            if len(parts) != 2 or "_" in mode:
                continue
            s, t = (ISO3_TO_1.get(p, p) for p in parts)
            modes.setdefault((s, t), mode)
        return modes

    def route(self, source: str, target: str) -> list[str]:
        """The modes that take ``source`` to ``target``: one, or two through the pivot; [] if none."""
        modes = self.modes()
        if (source, target) in modes:
            return [modes[source, target]]
        p = self.pivot
        if p and (source, p) in modes and (p, target) in modes:
            return [modes[source, p], modes[p, target]]
        return []

    def pairs(self) -> frozenset[tuple[str, str]]:
        langs = {x for pair in self.modes() for x in pair}
        return frozenset((s, t) for s in langs for t in langs if s != t and self.route(s, t))

    def translate(self, text: str, source: str, target: str) -> str:
        route = self.route(source, target)
        if not route:
            raise UnsupportedPair(f"Apertium has no {source}->{target} mode")
        # one line per call: Apertium works line by line, and a newline would split a clause
        out = " ".join(text.split())
        if not out:
            return ""
        for mode in route:
            out = self._run(mode, out)
        # Apertium capitalises the start of its input line; a segment that begins mid-sentence does not
        if text.lstrip()[:1].islower() and out[:1].isupper() and out[1:2].islower():
            out = out[0].lower() + out[1:]
        return out

    def _run(self, mode: str, text: str) -> str:
        exe = shutil.which(self.command)
        if exe is None:
            raise DuplexError(f"{self.command} is not installed (Debian: apt-get install apertium)")
        try:
            # -u: no '*' marks on unknown words (they are passed through as they are)
            r = subprocess.run([exe, "-u", "-f", "txt", mode], input=text + "\n", capture_output=True, text=True,
                               timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise DuplexError(f"apertium {mode} took longer than {self.timeout_s:g} s") from None
        except OSError as exc:
            raise DuplexError(f"cannot run {exe}: {exc.strerror or exc}") from None
        if r.returncode != 0:
            msg = " ".join((r.stderr or r.stdout).split())[:200]
            raise DuplexError(f"apertium {mode} failed (status {r.returncode}): {msg}")
        return " ".join(r.stdout.split())


class LLMTranslate:
    """The coordinator LLM asked for a translation, greedy, one call per segment."""

    name = "llm"
    in_recognizer = False

    def __init__(self, llm, languages: Iterable[str], max_new_tokens: int = 128) -> None:
        self.llm = llm
        self.languages = tuple(languages)
        self.max_new_tokens = max_new_tokens
        self._lock = threading.Lock()  # one model, one caller at a time

    def pairs(self) -> frozenset[tuple[str, str]]:
        return frozenset((s, t) for s in self.languages for t in self.languages if s != t)

    def messages(self, text: str, source: str, target: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": f"You translate {language_name(source)} into {language_name(target)}. "
                                          "Reply with the translation only, nothing else."},
            {"role": "user", "content": text},
        ]

    def translate(self, text: str, source: str, target: str) -> str:
        if (source, target) not in self.pairs():
            raise UnsupportedPair(f"the LLM engine is not configured for {source}->{target}")
        if not text.strip():
            return ""
        with self._lock:
            out = self.llm.reply(self.messages(text, source, target), max_new_tokens=self.max_new_tokens)
        # a small model tends to wrap its answer in quotes or add a second line of commentary
        first = next((line for line in out.splitlines() if line.strip()), "")
        return first.strip().strip('"').strip()


class Identity:
    """Source and target are the same language."""

    name = "identity"
    in_recognizer = False

    def translate(self, text: str, source: str, target: str) -> str:
        return text

    def pairs(self) -> frozenset[tuple[str, str]]:
        return frozenset()


# ------------------------------------------------------------------------------------- choice


class TranslatorSet:
    """The engines that are configured and the rule that picks one per pair."""

    def __init__(self, engines: Mapping[str, Translator], order: Iterable[str] = ENGINES,
                 routes: Mapping[str, str] | None = None) -> None:
        self.engines = dict(engines)
        self.order = tuple(order)
        self.routes = dict(routes or {})
        self.identity = Identity()

    @classmethod
    def from_config(cls, cfg: TranslateConfig, *, whisper_languages: Iterable[str] = (), llm=None) -> "TranslatorSet":
        """``whisper_languages``: the multilingual recogniser's languages (empty when the
        configured model is English-only: no Whisper translation); ``llm``: a loaded ChatLLM."""
        engines: dict[str, Translator] = {}
        langs = tuple(whisper_languages)
        if langs:
            engines["whisper"] = WhisperTranslate(langs)
        ap = Apertium(cfg.apertium_command, cfg.apertium_pivot, cfg.apertium_timeout_s)
        if ap.available:
            engines["apertium"] = ap
        if llm is not None:
            engines["llm"] = LLMTranslate(llm, cfg.llm_languages, cfg.llm_max_new_tokens)
        return cls(engines, cfg.order, cfg.routes)

    def _route(self, source: str, target: str) -> str | None:
        for key in (f"{source}-{target}", f"*-{target}", f"{source}-*", "*-*"):
            if key in self.routes:
                return self.routes[key]
        return None

    def for_pair(self, source: str, target: str, *, speech: bool = True) -> Translator:
        """The engine for ``source`` -> ``target``; ``source`` may be "auto" (the speech engine
        only: text engines need the language). ``speech=False``: text input, Whisper is no option."""
        if source == target:
            return self.identity
        routed = self._route(source, target)
        names = [routed] if routed else list(self.order)
        for name in names:
            eng = self.engines.get(name)
            if eng is None or (eng.in_recognizer and not speech):
                continue
            if source == "auto":
                if eng.in_recognizer and any(t == target for _, t in eng.pairs()):
                    return eng
                continue
            if (source, target) in eng.pairs():
                return eng
        why = f"engine {routed!r} (routes) cannot" if routed else "no engine can"
        raise UnsupportedPair(f"{why} translate {source} -> {target}; installed: {self.describe()}")

    def describe(self) -> str:
        """The installed pairs, one line: "whisper: 98 languages -> en; apertium: en->es, ..."."""
        parts = []
        for name in ENGINES:
            eng = self.engines.get(name)
            if eng is None:
                parts.append(f"{name}: {'not configured' if name != 'apertium' else 'not installed'}")
            elif name == "whisper":
                parts.append(f"whisper: {len(eng.languages) - ('en' in eng.languages)} languages -> en")
            else:
                pairs = sorted(eng.pairs())
                parts.append(f"{name}: " + (", ".join(f"{s}->{t}" for s, t in pairs) if pairs else "no pairs"))
        return "; ".join(parts)
