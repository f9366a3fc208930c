"""Load Whisper from a transformers-style folder, or convert CTranslate2 weights into one.

A folder holds ``config.json`` (transformers ``WhisperConfig``), ``model.safetensors`` (transformers
parameter names), ``tokenizer.json`` and ``generation_config.json`` (suppressed tokens, alignment
heads). Hub snapshots of ``openai/whisper-*`` have this shape, and our converted cache entries are
written in it, so one loader serves both.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DuplexError
from .ct2 import read_ct2
from .whisper import Whisper, WhisperDims, fuse_cross_kv
from .whisper_ct2 import convert
from .quantize import (
    Bf16Linear,
    RowScaledInt8Linear,
    TokenInt8Linear,
    quantize_int8,
    quantize_logits,
    quantize_row_scaled_int8,
    quantize_token_int8,
    quantize_weight_int8,
    bf16_fast,
    bf16_native,
    quantize_bf16,
    token_int8_fast,
)
from .whisper_text import DecodeRules, WhisperTokenizer

log = logging.getLogger(__name__)


@dataclass
class WhisperBundle:
    model: Whisper
    tokenizer: WhisperTokenizer
    rules: DecodeRules
    dims: WhisperDims
    multilingual: bool
    #: (decoder layer, head) pairs whose cross-attention follows the audio (for word timing)
    alignment_heads: tuple[tuple[int, int], ...]
    #: where the weights came from, for the user
    source: str
    #: what the weights run in: "fp32", "bf16", "int8", "int8-row" or "int8-tok" ("auto" resolved)
    precision: str = "fp32"


def write_folder_from_ct2(parts: Sequence[Path], assets: Path, out: Path) -> None:
    """Convert a CTranslate2 Whisper (``model.bin`` parts plus its config and tokenizer in
    ``assets``) into a transformers-style folder at ``out``."""
    from safetensors.torch import save_file

    ct2 = read_ct2(parts)
    dims, state = convert(ct2, dtype=torch.float16)  # the source is fp16: keep it exact and small
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "converted_from": "ctranslate2"})
    (out / "config.json").write_text(json.dumps(dims.to_hf_config(), indent=1))
    cfg = json.loads((assets / "config.json").read_text())
    multilingual = dims.n_vocab >= 51865
    gen = {
        "suppress_tokens": cfg.get("suppress_ids", []),
        "begin_suppress_tokens": cfg.get("suppress_ids_begin", []),
        "alignment_heads": cfg.get("alignment_heads", []),
        "is_multilingual": multilingual,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1))
    shutil.copyfile(assets / "tokenizer.json", out / "tokenizer.json")


def load_folder(folder: Path, source: str, precision: str = "fp32", *, translating: bool = False) -> WhisperBundle:
    """Whisper from a Hugging Face folder, in ``precision``. ``auto``: the quickest of the accurate
    kernels this CPU has, or, ``translating``, bf16 wherever it is native (``bf16_native``)."""
    from safetensors.torch import load_file

    try:
        cfg = json.loads((folder / "config.json").read_text())
        gen_path = folder / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    except (OSError, ValueError) as exc:
        raise DuplexError(f"cannot read Whisper config in {folder}: {exc}") from None
    dims = WhisperDims.from_hf_config(cfg)
    weights = folder / "model.safetensors"
    if weights.exists():
        state = load_file(str(weights))
    elif (folder / "pytorch_model.bin").exists():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise DuplexError(f"no Whisper weights (model.safetensors) in {folder}")
    model = Whisper(dims)
    model.load_hf_state_dict({k: v.float() for k, v in state.items()})
    model.eval()
    multilingual = bool(gen.get("is_multilingual", dims.n_vocab >= 51865))
    heads = tuple(tuple(h) for h in gen.get("alignment_heads", []))
    if precision == "auto":
        # the quickest of the accurate kernels this CPU has (see bf16_fast and token_int8_fast);
        # a translation takes bf16 where it is native but not quickest. On a Zen 4 EPYC (AVX-512
        # BF16, no AMX), one thread, timed streaming es->en: 23.8 BLEU at RTF 1.02 against int8-tok's
        # 21.6 at 0.97, ending offset p50 1.89 / 1.83 s (int8-tok's looping cost it 0.9x of offline,
        # bf16 0.98x); English transcription there gains nothing from bf16 (base WER 0.050 against
        # 0.048) and its final comes later (412 against 335 ms p50), so it keeps int8-tok
        precision = "bf16" if bf16_fast() or (translating and bf16_native()) else "int8-tok"
    if precision == "bf16":
        # the encoder and the cross-attention keys and values in bf16 (AMX, AVX-512 BF16): quicker
        # than token int8 with AMX, and closer to float32 (encoder output within 0.9 % against
        # 4.7 %); the decoder as in int8-tok, int8 weights for its one-row steps, with a bf16 copy
        # for prefills and beams (BF16_FROM_ROWS)
        fused = fuse_cross_kv(model.decoder)
        quantize_bf16(model.model.encoder)
        quantize_weight_int8(model.model.decoder, bf16_prefill=True)
        model.decoder.cross_kv = Bf16Linear(fused)
        model.decoder.logits_proj = quantize_logits(model.decoder.embed_tokens, bf16_prefill=True)
    elif precision == "int8-tok":
        # the encoder: int8 weights and int8 activations with one scale per token; the decoder (and
        # its output projection): int8 weights, bf16 activations. Dynamic int8 gives activations one
        # scale per tensor, and the encoder's then cost translation most of its quality (es->en
        # 17.8 BLEU against 23.2; fp32 22.6), at 16 % more encoder time than int8-row
        fused = fuse_cross_kv(model.decoder)
        if token_int8_fast():
            model.model.encoder = quantize_token_int8(model.model.encoder)
            # the cross-attention keys and values of an encoder pass: 500 rows (10 s) per layer, where
            # token-scaled int8 in one fused product is 4x quicker than 12 int8-weight/bf16 ones
            # (base: 22 -> 5 ms each decode)
            fused = TokenInt8Linear(fused)
        else:
            # no quick int8 product on this CPU (see token_int8_fast): the same numerics, one scale
            # per token, through PyTorch's dynamic int8 product with each row scaled to unit size
            # (dynamic int8 alone would lose int8-tok's accuracy). Its activations have 7 bits, not
            # 8 (fbgemm's reduced range on AVX2), so the first layer, whose errors every later one
            # carries, stays float32: the encoder output is then within 4.5 % of float32 on 10 s
            # windows of es prompts, 4.2 % on it (all layers: 6.4 %, 7.9 %; token int8: 4.3 %), at
            # 256 ms a pass against 236 ms and float32's 336
            log.info("int8-tok: this CPU multiplies int8 matrices slowly; Whisper's encoder runs row-scaled dynamic int8")
            for layer in model.model.encoder.layers[1:]:
                quantize_row_scaled_int8(layer)
            fused = RowScaledInt8Linear(fused)
        quantize_weight_int8(model.model.decoder)
        model.decoder.cross_kv = fused  # after the swap, which would make a float32 one bf16
        model.decoder.logits_proj = quantize_logits(model.decoder.embed_tokens)
    elif precision == "int8-row":
        # every Linear with one scale per output row, and an int8 copy of the tied output
        # projection (the largest matrix a decoding step reads): offline WER on the English dev
        # files is at fp32's (tiny.en 0.039 against 0.040, base 0.036 against 0.037 on 40 files)
        model = quantize_int8(model)
        model.decoder.logits_proj = quantize_logits(model.decoder.embed_tokens)
    elif precision == "int8":
        # one scale per matrix: what the conversation benchmark was tuned on (with int8-row,
        # tiny.en hears two of its backchannels as words and stops the agent)
        model = quantize_int8(model, per_channel=False)
    elif precision != "fp32":
        raise DuplexError(f"unknown Whisper precision {precision!r} (auto, bf16, fp32, int8, int8-row or int8-tok)")
    return WhisperBundle(
        model=model,
        tokenizer=WhisperTokenizer(folder / "tokenizer.json", multilingual),
        rules=DecodeRules(tuple(gen.get("suppress_tokens") or ()), tuple(gen.get("begin_suppress_tokens") or ())),
        dims=dims,
        multilingual=multilingual,
        alignment_heads=heads,  # type: ignore[arg-type]
        source=source,
        precision=precision,
    )
