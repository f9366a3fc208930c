"""Real models, offline: the CTranslate2 conversion is checked against CTranslate2 itself, both
Whisper models transcribe real recordings, the LLM answers and Piper speaks the answer."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from agent.models import KNOWN, ModelResolver, ModelSpec, _offline_files
from fixtures import asterisk, librivox
from streaming.audio_file import read_audio
from streaming.errors import DuplexError
from streaming.models.cache import ModelCache
from streaming.models.ct2 import model_parts, read_ct2
from streaming.models.whisper import log_mel
from streaming.asr.decoder import greedy


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()


@pytest.fixture(scope="module")
def resolver():
    # the per-user cache that scripts/setup prepared (or that this run fills)
    return ModelResolver()


@pytest.fixture(scope="module")
def tiny(resolver):
    return resolver.whisper("whisper:tiny.en")


@pytest.fixture(scope="module")
def base(resolver):
    return resolver.whisper("whisper:base")


def transcribe(bundle, audio, language="en"):
    feats = bundle.model.encode(log_mel(audio, bundle.dims.n_mels, pad_to=480000))
    return greedy(bundle.model, bundle.tokenizer, bundle.rules, feats, bundle.tokenizer.prompt(language), keep_logits=True)


def ct2_dir(name, tmp_path):
    """A folder CTranslate2 can load: the base model's parts are joined (test-only copy)."""
    files = _offline_files(KNOWN[name])
    if len(files["parts"]) == 1:
        return files["assets"]
    d = tmp_path / "ct2"
    d.mkdir()
    with open(d / "model.bin", "wb") as out:
        for p in files["parts"]:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out)
    for f in files["assets"].iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copy(f, d / f.name)
    return d


@pytest.mark.parametrize("name", ["whisper:tiny.en", "whisper:base"])
def test_converted_whisper_matches_ctranslate2(name, resolver, tmp_path):
    """Same mel in, same logits out (within fp16-weight rounding), same greedy transcript."""
    import ctranslate2

    bundle = resolver.whisper(name)
    ct2 = ctranslate2.models.Whisper(str(ct2_dir(name, tmp_path)), device="cpu", compute_type="float32")
    for clip in (librivox("0880"), asterisk("demo-thanks"), librivox("0920")):
        mel = log_mel(read_audio(clip), 80, pad_to=480000)
        ours = transcribe(bundle, read_audio(clip))
        theirs = ct2.generate(
            ctranslate2.StorageView.from_array(mel.unsqueeze(0).numpy()), [bundle.tokenizer.prompt("en")],
            beam_size=1, return_logits_vocab=True,
        )[0]
        assert theirs.sequences_ids[0] == ours.tokens, (ours.text, clip)
        # CTranslate2 reports the (suppressed) logits of every step; compare where it kept them
        ref = np.stack([np.asarray(x) for x in theirs.logits[0]])
        got = torch.stack(ours.logits).numpy()[: len(ref)]
        kept = ref > -1e30
        assert np.abs(ref[kept] - got[kept]).max() < 1e-3
        enc_ref = np.asarray(ct2.encode(ctranslate2.StorageView.from_array(mel.unsqueeze(0).numpy()), to_cpu=True))
        enc = bundle.model.encode(mel).numpy()
        # fp32 sums in a different order over 1500 x 512 outputs: bound the error by the scale
        assert np.abs(enc_ref - enc).max() < 1e-4 * np.abs(enc_ref).max() + 1e-3


@pytest.mark.parametrize(
    "clip,expected",
    [
        (lambda: librivox("0880"), "he was not an ill disposed young man"),
        (lambda: librivox("0920"), None),
        (lambda: asterisk("demo-thanks"), "goodbye thank you for trying out the asterisk open source pbx"),
    ],
)
def test_both_whisper_models_transcribe_real_recordings(tiny, base, clip, expected):
    path = clip()
    hyps = {b.source.split()[0]: words(transcribe(b, read_audio(path)).text) for b in (tiny, base)}
    if expected is None:  # the LibriVox transcription file of the Debian package is the reference
        ref_line = next(line for line in (path.parent / "transcription").read_text().splitlines() if path.stem in line)
        expected = ref_line.split("<s>")[1].split("</s>")[0].strip()
    ref = expected.split()
    import jiwer

    for model, hyp in hyps.items():
        wer = jiwer.wer(" ".join(ref), " ".join(hyp))
        assert wer <= 0.25, (model, hyp)
    assert hyps["whisper:base"] == ref or jiwer.wer(" ".join(ref), " ".join(hyps["whisper:base"])) <= 0.15


def test_multilingual_prompt_and_english_only_refusal(tiny, base):
    assert base.multilingual and not tiny.multilingual
    assert len(base.tokenizer.prompt("es")) == 4 and base.tokenizer.languages["en"] != base.tokenizer.languages["es"]
    with pytest.raises(DuplexError, match="cannot translate"):
        tiny.tokenizer.prompt("en", task="translate")
    with pytest.raises(DuplexError, match="does not know language"):
        base.tokenizer.prompt("xx")


def test_llm_answers_and_piper_speaks_the_answer(resolver, base):
    llm = resolver.llm("llm:smollm2-135m")
    reply = llm.reply([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=40)
    assert "paris" in reply.lower(), reply
    assert llm.stats.new_tokens > 0 and llm.stats.decode_tok_s > 0
    tts = resolver.tts()
    chunks = list(tts.stream(reply))
    assert chunks and all(c.dtype == np.float32 for c in chunks)
    audio = np.concatenate(chunks)
    assert 0.5 < len(audio) / tts.sample_rate < 15 and np.abs(audio).max() > 0.05
    # what Piper said is what the LLM wrote: Whisper hears "Paris" in it
    import soxr

    heard = transcribe(base, soxr.resample(audio, tts.sample_rate, 16000)).text
    assert "paris" in heard.lower(), heard


def test_piper_streams_sentence_by_sentence(resolver):
    tts = resolver.tts()
    chunks = list(tts.stream("Hello there. This is the second sentence, a little longer than the first."))
    assert len(chunks) == 2
    assert list(tts.stream("   ")) == []


def test_ct2_reader_rejects_truncated_files(tmp_path):
    parts = model_parts(_offline_files(KNOWN["whisper:tiny.en"])["assets"])
    cut = tmp_path / "model.bin"
    cut.write_bytes(parts[0].read_bytes()[:100000])
    with pytest.raises(DuplexError, match="not a readable CTranslate2 model"):
        read_ct2([cut])
    # split files read as one: parts of the base model give the same variables as a joined file
    base_parts = _offline_files(KNOWN["whisper:base"])["parts"]
    m = read_ct2(base_parts)
    assert m.spec == "WhisperSpec" and m.get("decoder/embeddings/weight").shape == (51865, 512)


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, caplog):
    r = ModelResolver(ModelCache(tmp_path / "cache"))
    first = r.resolve_folder("whisper:tiny.en")
    weights = first.folder / "model.safetensors"
    with open(weights, "r+b") as f:  # flip bytes in the middle: same size, wrong checksum
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x00garbage\x00")
    with caplog.at_level("WARNING"):
        again = r.resolve_folder("whisper:tiny.en")
    assert "checksum mismatch" in caplog.text
    assert "converted into cache" in again.detail
    assert r.cache.load("whisper-tiny.en", json.loads((again.folder / "manifest.json").read_text())["source"])


def test_interrupted_conversion_leaves_nothing_behind(tmp_path):
    cache = ModelCache(tmp_path / "cache")

    def build(out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.store("whisper-tiny.en", "src", build)
    assert list((tmp_path / "cache").iterdir()) == []


def test_unwritable_cache_still_works_and_says_so(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = ModelResolver(ModelCache(blocker / "cache"))  # cannot be created: its parent is a file
    with caplog.at_level("WARNING"):
        bundle = r.whisper("whisper:tiny.en")
    assert "not writable" in caplog.text and "slower" in caplog.text
    assert "temporary folder" in bundle.source


def test_unknown_and_missing_models_name_what_to_do(monkeypatch):
    r = ModelResolver()
    with pytest.raises(DuplexError, match="unknown model 'whisper:huge'"):
        r.resolve_folder("whisper:huge")
    fake = ModelSpec("whisper:fake", "asr", "x", ("no-such-package",), ("no_such_package",), None, "MIT")
    monkeypatch.setitem(KNOWN, "whisper:fake", fake)
    with pytest.raises(DuplexError, match="pip install no-such-package"):
        r.resolve_folder("whisper:fake")


def test_duplex_models_json_lists_everything_available(duplex_bin):
    import subprocess

    r = subprocess.run([str(duplex_bin), "models", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"whisper:tiny.en", "whisper:base", "llm:smollm2-135m", "tts:piper-joe", "vad:silero"}
    assert all(row["available"] and row["source"] == "package" for row in rows.values())


def test_token_int8_linear_follows_fp32_for_any_number_of_rows():
    """int8 weights per row and int8 activations per token: within 2 % of fp32 for 1 to 1000
    rows (the kernel wants multiples of 8: the layer pads), 2-D and 3-D inputs alike."""
    from streaming.models.quantize import TokenInt8Linear, token_int8_available

    if not token_int8_available():
        pytest.skip("this torch has no CPU int8 matrix multiply")
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 384)
    q = TokenInt8Linear(lin)
    for shape in [(1, 512), (7, 512), (33, 512), (1000, 512), (2, 5, 512)]:
        x = torch.randn(*shape) * torch.linspace(0.1, 3, shape[-1])  # uneven channels, as activations are
        with torch.inference_mode():
            ref, got = lin(x), q(x)
        assert got.shape == ref.shape
        assert float((got - ref).norm() / ref.norm()) < 0.02, shape


def test_row_scaled_int8_linear_keeps_every_token_where_dynamic_int8_flattens_them():
    """int8-tok on a CPU without a quick int8 product: fbgemm's dynamic int8 with each row scaled
    to unit size. One loud token (x 200, as Whisper's encoder has) leaves the others within 3 % of
    fp32, where plain dynamic int8, with one scale for the tensor, loses them."""
    from streaming.models.quantize import RowScaledInt8Linear, quantize_int8

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 384)
    scaled, plain = RowScaledInt8Linear(lin), quantize_int8(torch.nn.Sequential(lin))[0]
    for shape in [(1, 512), (500, 512), (2, 5, 512)]:
        x = torch.randn(*shape) * torch.linspace(0.1, 3, shape[-1])
        x.view(-1, 512)[0] *= 200.0
        with torch.inference_mode():
            ref, got, flat = lin(x), scaled(x), plain(x)
        assert got.shape == ref.shape
        quiet = ref.reshape(-1, 384)[1:]
        if len(quiet):
            err = float((got.reshape(-1, 384)[1:] - quiet).norm() / quiet.norm())
            assert err < 0.03, (shape, err)
            assert float((flat.reshape(-1, 384)[1:] - quiet).norm() / quiet.norm()) > 3 * err
        assert float((got - ref).norm() / ref.norm()) < 0.03, shape


def test_bf16_layers_follow_fp32_and_an_int8_layer_takes_many_rows_in_bf16():
    """Bf16Linear is within bf16 rounding of fp32 (1 %); a WeightInt8Linear with a bf16 copy
    gives a step's one row to the int8 kernel and a prefill's rows to the copy, and both read the
    same int8 weights (within bf16 rounding of each other, not of the unquantised layer alone)."""
    from streaming.models.quantize import BF16_FROM_ROWS, Bf16Linear, WeightInt8Linear, weight_int8_available

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 384)
    b = Bf16Linear(lin)
    for shape in [(1, 512), (500, 512), (2, 5, 512)]:
        x = torch.randn(*shape) * torch.linspace(0.1, 3, shape[-1])
        with torch.inference_mode():
            ref, got = lin(x), b(x)
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert float((got - ref).norm() / ref.norm()) < 0.01, shape
    if not weight_int8_available():
        pytest.skip("this torch has no int8-weight kernel")
    w8 = WeightInt8Linear(lin, bf16_prefill=True)
    x = torch.randn(BF16_FROM_ROWS, 512)
    with torch.inference_mode():
        many = w8(x)  # the bf16 copy
        ones = torch.cat([w8(x[i : i + 1]) for i in range(len(x))])  # the int8 kernel, row by row
        ref = lin(x)
    assert float((many - ones).norm() / ones.norm()) < 0.01
    assert float((many - ref).norm() / ref.norm()) < 0.02


def test_auto_precision_takes_bf16_where_the_cpu_multiplies_it_quickest(resolver, base, monkeypatch):
    """models.asr_precision = "auto": bf16 (encoder and cross-attention keys and values in bf16,
    the decoder's int8 weights with a bf16 copy for prefills) where bf16 products beat int8 and
    float32 ones (AMX), else int8-tok. Whichever it is, Whisper base reads LibriVox as fp32 does."""
    import jiwer

    from streaming.models import whisper_load
    from streaming.models.quantize import Bf16Linear, bf16_fast

    want = "bf16" if bf16_fast() else "int8-tok"
    assert resolver.whisper("whisper:base", "auto").precision == want
    monkeypatch.setattr(whisper_load, "bf16_fast", lambda: True)
    quant = resolver.whisper("whisper:base", "auto")
    assert quant.precision == "bf16"
    assert isinstance(quant.model.model.encoder.layers[-1].fc2, Bf16Linear)
    assert isinstance(quant.model.decoder.cross_kv, Bf16Linear)
    assert quant.model.decoder.layers[0].fc1.weight_bf16 is not None
    audio = read_audio(librivox("0870"))
    ref, got = transcribe(base, audio).text, transcribe(quant, audio).text
    assert jiwer.wer(" ".join(words(ref)), " ".join(words(got))) <= 0.05, (ref, got)


def test_auto_precision_translates_in_bf16_where_the_cpu_has_it_without_amx(resolver, monkeypatch):
    """Where bf16 products run in hardware but int8 ones are quicker (AVX-512 BF16 without AMX),
    "auto" translates in bf16 (int8-tok's translations loop: es->en 21.6 against 23.8 BLEU
    streamed) and transcribes in int8-tok (bf16 there: no better WER, a later final)."""
    from streaming.models import whisper_load

    monkeypatch.setattr(whisper_load, "bf16_fast", lambda: False)
    monkeypatch.setattr(whisper_load, "bf16_native", lambda: True)
    assert resolver.whisper("whisper:base", "auto", translating=True).precision == "bf16"
    assert resolver.whisper("whisper:base", "auto").precision == "int8-tok"
    assert resolver.whisper("whisper:base", "int8-tok", translating=True).precision == "int8-tok"
    monkeypatch.setattr(whisper_load, "bf16_native", lambda: False)
    assert resolver.whisper("whisper:base", "auto", translating=True).precision == "int8-tok"


@pytest.mark.parametrize("bf16_s, fp32_s, native", [
    (0.0084, 0.0276, True),  # Xeon with AMX
    (0.0155, 0.0361, True),  # Zen 4 EPYC: AVX-512 BF16, no AMX
    (0.0500, 0.0361, False),  # emulated: slower than float32
    (0.0300, 0.0361, False),  # converted to float32 on the fly: barely quicker
], ids=["amx", "avx512-bf16", "emulated", "converted"])
def test_bf16_counts_as_native_only_well_below_float32s_time(monkeypatch, bf16_s, fp32_s, native):
    from streaming.models import quantize

    monkeypatch.setattr(quantize, "_bf16_timings", lambda: (bf16_s, fp32_s, None))
    assert quantize.bf16_native.__wrapped__() is native


@pytest.mark.parametrize("int_mm_quick", [None, False], ids=["this-cpu", "no-quick-int8"])
def test_int8_tok_whisper_transcribes_like_fp32(resolver, base, monkeypatch, int_mm_quick):
    """models.asr_precision = "int8-tok" (token-scaled int8 encoder, int8-weight bf16 decoder),
    as this CPU runs it and as a CPU without a quick int8 product does (row-scaled dynamic int8)."""
    import jiwer

    from streaming.models import whisper_load
    from streaming.models.quantize import RowScaledInt8Linear, TokenInt8Linear

    if int_mm_quick is not None:
        monkeypatch.setattr(whisper_load, "token_int8_fast", lambda: int_mm_quick)
    quant = resolver.whisper("whisper:base", "int8-tok")
    assert quant.precision == "int8-tok"
    kind = TokenInt8Linear if whisper_load.token_int8_fast() else RowScaledInt8Linear
    assert isinstance(quant.model.model.encoder.layers[-1].fc2, kind)
    assert isinstance(quant.model.decoder.cross_kv, kind)
    audio = read_audio(librivox("0870"))
    ref, got = transcribe(base, audio).text, transcribe(quant, audio).text
    assert jiwer.wer(" ".join(words(ref)), " ".join(words(got))) <= 0.1, (ref, got)
