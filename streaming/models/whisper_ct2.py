"""CTranslate2 Whisper weights -> our (transformers-layout) PyTorch state dict.

CTranslate2 fuses the self-attention Q, K and V projections into one ``linear_0`` (and the cross-
attention K and V into ``linear_1``), stores layer norms as gamma/beta, and keeps fp16. Key
projections have no bias in Whisper; CTranslate2 stores zeros there, which we check and drop.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DuplexError
from .ct2 import CT2Model
from .whisper import WhisperDims


def dims_from_ct2(m: CT2Model) -> WhisperDims:
    if m.spec != "WhisperSpec":
        raise DuplexError(f"expected a CTranslate2 Whisper model, found {m.spec}")
    n_enc = sum(1 for k in m.variables if k.startswith("encoder/layer_") and k.endswith("ffn/linear_0/weight"))
    n_dec = sum(1 for k in m.variables if k.startswith("decoder/layer_") and k.endswith("ffn/linear_0/weight"))
    emb = m.get("decoder/embeddings/weight")
    return WhisperDims(
        n_mels=int(m.get("encoder/conv1/weight").shape[1]),
        n_vocab=int(emb.shape[0]),
        d_model=int(emb.shape[1]),
        encoder_layers=n_enc,
        encoder_heads=int(m.get("encoder/num_heads")),
        decoder_layers=n_dec,
        decoder_heads=int(m.get("decoder/num_heads")),
        ffn_dim=int(m.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(m.get("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(m.get("decoder/position_encodings/encodings").shape[0]),
    )


def convert(m: CT2Model, dtype: torch.dtype = torch.float16) -> tuple[WhisperDims, dict[str, torch.Tensor]]:
    dims = dims_from_ct2(m)
    d = dims.d_model
    out: dict[str, torch.Tensor] = {}

    def put(name: str, arr: np.ndarray) -> None:
        out[name] = torch.from_numpy(np.array(arr)).to(dtype)

    def norm(dst: str, src: str) -> None:
        put(f"{dst}.weight", m.get(f"{src}/gamma"))
        put(f"{dst}.bias", m.get(f"{src}/beta"))

    def linear(dst: str, src: str) -> None:
        put(f"{dst}.weight", m.get(f"{src}/weight"))
        put(f"{dst}.bias", m.get(f"{src}/bias"))

    def split(dst: str, names: tuple[str, ...], src: str) -> None:
        w, b = m.get(f"{src}/weight"), m.get(f"{src}/bias")
        for i, n in enumerate(names):
            put(f"{dst}.{n}.weight", w[i * d : (i + 1) * d])
            bias = b[i * d : (i + 1) * d]
            if n == "k_proj":
                if np.any(bias != 0):
                    raise DuplexError("CTranslate2 Whisper has a non-zero key bias; not a Whisper layout")
                continue
            put(f"{dst}.{n}.bias", bias)

    for side in ("encoder", "decoder"):
        n_layers = dims.encoder_layers if side == "encoder" else dims.decoder_layers
        put(f"model.{side}.embed_positions.weight", m.get(f"{side}/position_encodings/encodings"))
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(n_layers):
            dst, src = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            split(f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"), f"{src}/self_attention/linear_0")
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                w, b = m.get(f"{src}/attention/linear_1/weight"), m.get(f"{src}/attention/linear_1/bias")
                if np.any(b[:d] != 0):
                    raise DuplexError("CTranslate2 Whisper has a non-zero cross-attention key bias")
                put(f"{dst}.encoder_attn.k_proj.weight", w[:d])
                put(f"{dst}.encoder_attn.v_proj.weight", w[d:])
                put(f"{dst}.encoder_attn.v_proj.bias", b[d:])
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    put("model.decoder.embed_tokens.weight", m.get("decoder/embeddings/weight"))
    return dims, out
