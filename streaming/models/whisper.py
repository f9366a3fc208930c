"""A lean Whisper in PyTorch, with the transformers weights layout.

Why our own module rather than ``WhisperForConditionalGeneration``: the transformers encoder insists
on 3000 mel frames (30 s), and we encode only the audio that exists, slicing the positional
embedding to the real length; and streaming needs direct control of both KV caches. Parameter
names follow transformers (``model.encoder.layers.0.self_attn.q_proj.weight`` ...), so a hub
checkpoint's state dict loads unchanged, and so does our conversion of CTranslate2 weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
FRAMES_PER_SECOND = SAMPLE_RATE // HOP  # 100 mel frames, 50 encoder positions per second


@dataclass(frozen=True)
class WhisperDims:
    n_mels: int
    n_vocab: int
    d_model: int
    encoder_layers: int
    encoder_heads: int
    decoder_layers: int
    decoder_heads: int
    ffn_dim: int
    max_source_positions: int = 1500
    max_target_positions: int = 448

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "WhisperDims":
        return cls(
            n_mels=cfg["num_mel_bins"],
            n_vocab=cfg["vocab_size"],
            d_model=cfg["d_model"],
            encoder_layers=cfg["encoder_layers"],
            encoder_heads=cfg["encoder_attention_heads"],
            decoder_layers=cfg["decoder_layers"],
            decoder_heads=cfg["decoder_attention_heads"],
            ffn_dim=cfg["encoder_ffn_dim"],
            max_source_positions=cfg.get("max_source_positions", 1500),
            max_target_positions=cfg.get("max_target_positions", 448),
        )

    def to_hf_config(self) -> dict:
        """A transformers-compatible config.json (so the cached folder also loads there)."""
        return {
            "architectures": ["WhisperForConditionalGeneration"],
            "model_type": "whisper",
            "num_mel_bins": self.n_mels,
            "vocab_size": self.n_vocab,
            "d_model": self.d_model,
            "encoder_layers": self.encoder_layers,
            "encoder_attention_heads": self.encoder_heads,
            "decoder_layers": self.decoder_layers,
            "decoder_attention_heads": self.decoder_heads,
            "encoder_ffn_dim": self.ffn_dim,
            "decoder_ffn_dim": self.ffn_dim,
            "max_source_positions": self.max_source_positions,
            "max_target_positions": self.max_target_positions,
            "activation_function": "gelu",
            "scale_embedding": False,
            "tie_word_embeddings": True,
        }


# ------------------------------------------------------------------------------------ features

_MEL_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def mel_filters(n_mels: int, device: str = "cpu") -> torch.Tensor:
    key = (n_mels, device)
    if key not in _MEL_CACHE:
        from transformers.audio_utils import mel_filter_bank

        fb = mel_filter_bank(
            num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
            max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney",
        )
        _MEL_CACHE[key] = torch.from_numpy(fb.T.astype(np.float32)).to(device)
    return _MEL_CACHE[key]


def log_mel(audio: np.ndarray | torch.Tensor, n_mels: int = 80, pad_to: int | None = None) -> torch.Tensor:
    """Whisper's log-Mel spectrogram, [n_mels, frames], 100 frames per second.

    ``pad_to`` zero-pads the audio to that many samples first (480000 reproduces Whisper's 30 s
    window). Without it, only the audio that exists is transformed.
    """
    x = torch.as_tensor(audio, dtype=torch.float32)
    if pad_to is not None and x.shape[-1] < pad_to:
        x = F.pad(x, (0, pad_to - x.shape[-1]))
    window = torch.hann_window(N_FFT)
    stft = torch.stft(x, N_FFT, HOP, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = mel_filters(n_mels) @ power
    logm = torch.clamp(mel, min=1e-10).log10()
    logm = torch.maximum(logm, logm.max() - 8.0)
    return (logm + 4.0) / 4.0


# -------------------------------------------------------------------------------------- layers


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        q = self.split(self.q_proj(x))
        # causal masking only matters when several new queries attend to each other; the
        # decoder passes an explicit mask when they also sit on top of a cache
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] > 1)
        b, h, t, dh = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, h * dh))


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = Attention(d, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.kv(h)
        x = x + self.self_attn.attend(h, k, v, causal=False)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = Attention(d, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = Attention(d, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)


@dataclass
class EncoderCache:
    """Chunk-cached encoding state: per layer, the keys and values of positions already final,
    and the encoder output for them. Later chunks attend to these instead of recomputing them
    (earlier positions never see later audio: an approximation of Whisper's full attention)."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    out: torch.Tensor | None = None

    @property
    def positions(self) -> int:
        return 0 if self.out is None else int(self.out.shape[1])


class Encoder(nn.Module):
    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        d = dims.d_model
        self.conv1 = nn.Conv1d(dims.n_mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(dims.max_source_positions, d)
        self.layers = nn.ModuleList(EncoderLayer(d, dims.encoder_heads, dims.ffn_dim) for _ in range(dims.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """[batch, n_mels, frames] -> [batch, ceil(frames / 2), d_model], any length up to 30 s."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        n = x.shape[1]
        if n > self.embed_positions.num_embeddings:
            raise ValueError(f"audio longer than {self.embed_positions.num_embeddings / 50:.0f} s cannot be encoded at once")
        x = x + self.embed_positions.weight[:n]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)

    def forward_cached(self, mel: torch.Tensor, cache: EncoderCache) -> torch.Tensor:
        """Encode a growing input [1, n_mels, frames] reusing ``cache``: only positions after the
        cached ones are computed. Positions whose convolution window reaches past the input end
        are provisional: returned, but recomputed next time. Returns [1, positions, d_model]."""
        frames = mel.shape[-1]
        p0 = cache.positions
        a = max(0, 2 * p0 - 4)  # from here the front-end is exact for positions >= p0 - 1
        if frames - a < 8:
            # (almost) nothing new since the last call: the cached positions are the answer
            return cache.out if cache.out is not None else self.forward(mel)
        x = F.gelu(self.conv1(mel[..., a:]))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x[:, p0 - a // 2 :]
        total = p0 + x.shape[1]
        if total > self.embed_positions.num_embeddings:
            raise ValueError("audio longer than 30 s cannot be encoded at once")
        complete = max(p0, min(total, (frames - 3) // 2 + 1)) - p0
        x = x + self.embed_positions.weight[p0:total]
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            h = layer.self_attn_layer_norm(x)
            k, v = layer.self_attn.kv(h)
            if cache.k:
                k_all, v_all = torch.cat([cache.k[i], k], dim=2), torch.cat([cache.v[i], v], dim=2)
            else:
                k_all, v_all = k, v
            x = x + layer.self_attn.attend(h, k_all, v_all, causal=False)
            x = x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
            new_k.append(k[:, :, :complete])
            new_v.append(v[:, :, :complete])
        out = self.layer_norm(x)
        if complete:
            if cache.k:
                cache.k = [torch.cat([c, n], dim=2) for c, n in zip(cache.k, new_k)]
                cache.v = [torch.cat([c, n], dim=2) for c, n in zip(cache.v, new_v)]
                cache.out = torch.cat([cache.out, out[:, :complete]], dim=1)
            else:
                cache.k, cache.v, cache.out = new_k, new_v, out[:, :complete]
        return torch.cat([cache.out[:, : p0], out], dim=1) if p0 else out


@dataclass
class DecoderCache:
    """Keys and values: self-attention grows per token; cross-attention is computed once per
    encoder pass. ``length`` is the number of tokens already in the self-attention cache."""

    self_k: list[torch.Tensor] = field(default_factory=list)
    self_v: list[torch.Tensor] = field(default_factory=list)
    cross_k: list[torch.Tensor] = field(default_factory=list)
    cross_v: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.self_k else int(self.self_k[0].shape[2])

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens (a forced prefix that is still valid)."""
        self.self_k = [k[:, :, :n] for k in self.self_k]
        self.self_v = [v[:, :, :n] for v in self.self_v]

    def select(self, rows: list[int]) -> None:
        """Keep these rows (beams) of the self-attention keys and values, in this order."""
        index = torch.tensor(rows)
        self.self_k = [k.index_select(0, index) for k in self.self_k]
        self.self_v = [v.index_select(0, index) for v in self.self_v]


class Decoder(nn.Module):
    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        d = dims.d_model
        self.embed_tokens = nn.Embedding(dims.n_vocab, d)
        self.embed_positions = nn.Embedding(dims.max_target_positions, d)
        self.layers = nn.ModuleList(DecoderLayer(d, dims.decoder_heads, dims.ffn_dim) for _ in range(dims.decoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        #: optional separate output projection (an int8 copy of the tied embedding, see
        #: ``streaming.models.quantize.quantize_logits``); None projects onto the embedding
        self.logits_proj: nn.Module | None = None
        #: optional one projection of the encoder output onto every layer's cross-attention keys
        #: and values at once ([.., d] -> [.., layers * 2 * d], see ``fuse_cross_kv``); None:
        #: each layer's own ``k_proj`` and ``v_proj``
        self.cross_kv: nn.Module | None = None

    def cross_cache(self, audio: torch.Tensor) -> DecoderCache:
        cache = DecoderCache()
        if self.cross_kv is not None:
            b, t, d = audio.shape
            kv = self.cross_kv(audio).view(b, t, len(self.layers), 2, d)
            for i, layer in enumerate(self.layers):
                cache.cross_k.append(layer.encoder_attn.split(kv[:, :, i, 0]))
                cache.cross_v.append(layer.encoder_attn.split(kv[:, :, i, 1]))
            return cache
        for layer in self.layers:
            k, v = layer.encoder_attn.kv(audio)
            cache.cross_k.append(k)
            cache.cross_v.append(v)
        return cache

    def forward(self, tokens: torch.Tensor, cache: DecoderCache, collect: list | None = None,
                last: int | None = None, pick: list[int] | None = None) -> torch.Tensor:
        """Run ``tokens`` [batch, n] after the ``cache.length`` cached ones; returns logits
        [batch, n, vocab] and extends the cache in place. With ``collect``, each layer's
        cross-attention weights [batch, heads, n, frames] are appended to it. ``last`` = k: logits
        of the last k tokens only ([batch, k, vocab]; 0: none). The output projection onto the
        51,864-token vocabulary is most of a prefill's cost (tiny.en, 250 tokens: 180 of 190 ms),
        and a prefill needs one row. ``pick``: logits of these of the ``n`` tokens only."""
        offset = cache.length
        n = tokens.shape[1]
        if offset + n > self.embed_positions.num_embeddings:
            raise ValueError("decoder context is full (448 tokens)")
        x = self.embed_tokens(tokens) + self.embed_positions.weight[offset : offset + n]
        mask = None
        if offset and n > 1:
            # new tokens see the whole cache and, causally, each other
            mask = torch.ones(n, offset + n, dtype=torch.bool).tril(offset)
        for i, layer in enumerate(self.layers):
            h = layer.self_attn_layer_norm(x)
            k, v = layer.self_attn.kv(h)
            if offset:
                k = torch.cat([cache.self_k[i], k], dim=2)
                v = torch.cat([cache.self_v[i], v], dim=2)
                cache.self_k[i], cache.self_v[i] = k, v
            else:
                if len(cache.self_k) > i:
                    cache.self_k[i], cache.self_v[i] = k, v
                else:
                    cache.self_k.append(k)
                    cache.self_v.append(v)
            if mask is not None:
                q = layer.self_attn.split(layer.self_attn.q_proj(h))
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                b, hh, t, dh = o.shape
                x = x + layer.self_attn.out_proj(o.transpose(1, 2).reshape(b, t, hh * dh))
            else:
                x = x + layer.self_attn.attend(h, k, v, causal=True)
            h = layer.encoder_attn_layer_norm(x)
            if collect is not None:
                # explicit attention weights, for word alignment (SDPA does not expose them)
                q = layer.encoder_attn.split(layer.encoder_attn.q_proj(h))
                w = torch.softmax(q @ cache.cross_k[i].transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
                collect.append(w)
                o = w @ cache.cross_v[i]
                b, hh, t, dh = o.shape
                x = x + layer.encoder_attn.out_proj(o.transpose(1, 2).reshape(b, t, hh * dh))
            elif cache.cross_k[i].shape[0] == 1 and h.shape[0] > 1:
                # beams over one encoder pass: their queries attend as positions of one row
                # (exact, as cross-attention is not causal; broadcasting the keys is 8x slower)
                b, t, d = h.shape
                o = layer.encoder_attn.attend(h.reshape(1, b * t, d), cache.cross_k[i], cache.cross_v[i], causal=False)
                x = x + o.view(b, t, d)
            else:
                x = x + layer.encoder_attn.attend(h, cache.cross_k[i], cache.cross_v[i], causal=False)
            x = x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
        if last is not None:
            x = x[:, x.shape[1] - min(last, x.shape[1]) :]
        elif pick is not None:
            x = x[:, pick]
        x = self.layer_norm(x)
        if self.logits_proj is not None:
            return self.logits_proj(x)
        return x @ self.embed_tokens.weight.T


def fuse_cross_kv(decoder: Decoder) -> nn.Linear:
    """Every layer's cross-attention key and value projections as one Linear (layer by layer, keys
    then values), so that an encoder pass is projected in one matrix product, not 2 per layer."""
    weights, biases = [], []
    for layer in decoder.layers:
        a = layer.encoder_attn
        weights += [a.k_proj.weight, a.v_proj.weight]
        biases += [torch.zeros(a.k_proj.out_features) if a.k_proj.bias is None else a.k_proj.bias, a.v_proj.bias]
    d = weights[0].shape[1]
    fused = nn.Linear(d, sum(w.shape[0] for w in weights))
    with torch.no_grad():
        fused.weight.copy_(torch.cat(weights))
        fused.bias.copy_(torch.cat(biases))
    return fused


class _Inner(nn.Module):
    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        self.encoder = Encoder(dims)
        self.decoder = Decoder(dims)


class Whisper(nn.Module):
    """``model.encoder`` / ``model.decoder`` as in transformers; the output projection is tied to
    the token embedding (transformers' ``proj_out``)."""

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        self.dims = dims
        self.model = _Inner(dims)

    @property
    def encoder(self) -> Encoder:
        return self.model.encoder

    @property
    def decoder(self) -> Decoder:
        return self.model.decoder

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = {k: v for k, v in state.items() if k != "proj_out.weight"}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"Whisper weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")

    @torch.inference_mode()
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() == 2:
            mel = mel.unsqueeze(0)
        return self.encoder(mel)

