"""CPU int8: dynamic quantisation of linear layers (weights int8, activations quantised on the fly)."""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F


def quantize_int8(model: torch.nn.Module, per_channel: bool = True) -> torch.nn.Module:
    """Dynamic int8 quantisation of every ``nn.Linear`` (weights int8, activations quantised on
    the fly); a tied output projection stays fp32 because it is a matmul, not a Linear (see
    ``quantize_logits``). ``per_channel`` gives each output row of a weight its own scale, as
    CTranslate2 does: on the 40 first English dev files Whisper base's offline WER is 0.039 with
    it, 0.046 with one scale per matrix and 0.037 in fp32, at the same speed."""
    import warnings

    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():
        # torch marks torch.ao.quantization deprecated in favour of torchao; it still works in
        # this torch and its speed and accuracy are measured by `duplex bench models`
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear: qconfig}, dtype=torch.qint8)


def quantize_logits(embedding: torch.nn.Embedding, bf16_prefill: bool = False) -> torch.nn.Module:
    """An int8 copy (one scale per row) of a tied output projection onto ``embedding``'s
    vocabulary, with bf16 activations (``WeightInt8Linear``); fp32 where this torch lacks the
    kernel. For Whisper it is the largest matrix a decoding step reads (base: 51,865 x 512), so a
    step reads a quarter of the bytes. Activations quantised on the fly (dynamic int8) lose too
    much here: Whisper base then translated "La conferencia está ahora desbloqueada" as "The
    conference is on the blockade hour"."""
    vocab, d = embedding.weight.shape
    proj = torch.nn.Linear(d, vocab, bias=False)
    proj.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    if not weight_int8_available():
        return proj
    return WeightInt8Linear(proj, bf16_prefill)


def weight_int8_available() -> bool:
    """Does this torch have the fused CPU kernel for int8 weights with bf16 activations?"""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    try:
        op(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError):
        return False
    return True


#: inputs with at least this many rows go through a ``WeightInt8Linear``'s bf16 copy, where it has
#: one: from about 6 rows a bf16 product (AMX) beats the int8-weight kernel, which is made for a
#: decoding step's one row (a 100-token prefill of Whisper base's output projection: 229 ms
#: against 31 ms; one row: 3.3 ms against 10 ms)
BF16_FROM_ROWS = 8


class WeightInt8Linear(torch.nn.Module):
    """A linear layer with int8 weights (one scale per output row) and bf16 activations, through
    torch's fused kernel. Unlike dynamic quantisation the activations are not quantised: its
    outputs stay within bf16 rounding of fp32 (the LLM's end-of-turn readings agree with fp32),
    while the weights it streams from memory each token are a quarter of fp32's.

    ``bf16_prefill``: keep a bf16 copy of the same (dequantised) weights for inputs of
    ``BF16_FROM_ROWS`` rows or more (a prefill, a beam search's batch), where the CPU multiplies
    bf16 matrices quickly (``bf16_fast``); the int8 kernel is a loop over rows."""

    def __init__(self, linear: torch.nn.Linear, bf16_prefill: bool = False) -> None:
        super().__init__()
        weight, scale = _int8_rows(linear.weight.detach().float())
        self.register_buffer("weight_int8", weight.contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.register_buffer("weight_bf16", (weight.float() * self.scale.float()[:, None]).to(torch.bfloat16)
                             if bf16_prefill else None)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.weight_bf16 is not None and rows.shape[0] >= BF16_FROM_ROWS:
            y = F.linear(rows, self.weight_bf16).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_weight_int8(model: torch.nn.Module, bf16_prefill: bool = False) -> torch.nn.Module:
    """Replace every ``nn.Linear`` (a tied output projection included: it gets its own int8 copy)
    by a ``WeightInt8Linear``, in place. Decoding a small LLM on the CPU is bound by reading its
    weights, so this is about 3x faster per token than fp32 (SmolLM2-135M: 40 -> 13 ms)."""
    return _swap_linears(model, lambda linear: WeightInt8Linear(linear, bf16_prefill))


class Bf16Linear(torch.nn.Module):
    """A linear layer with bf16 weights and activations (float32 in and out), for CPUs that
    multiply bf16 matrices in hardware (Intel AMX: see ``bf16_fast``). Whisper base's encoder so:
    output within 0.9 % of float32 on 10 s windows of Spanish prompts (token int8: 4.7 %), 95 ms a
    pass against token int8's 152 ms and float32's 195 ms on a Xeon with AMX."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16).clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16).clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


def quantize_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``nn.Linear`` by a ``Bf16Linear``, in place."""
    return _swap_linears(model, Bf16Linear)


#: fewest rows torch._int_mm is given (shorter inputs are padded with zero rows)
_INT_MM_MIN_ROWS = 32


class TokenInt8Linear(torch.nn.Module):
    """A linear layer with int8 weights (one scale per output row) and int8 activations with one
    scale per token (row of the input), multiplied in int32 (``torch._int_mm``). PyTorch's dynamic
    quantisation gives the activations one scale per tensor, and in Whisper's encoder a few
    large activations then flatten the rest: Whisper base translated es->en at 17.8 BLEU with it,
    23.2 with this encoder (fp32: 22.6), for 16 % more encoder time."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight, scale = _int8_rows(linear.weight.detach().float())
        self.register_buffer("weight_t", weight.t().contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        n = rows.shape[0]
        q, s = _int8_rows(rows)
        pad = max(_INT_MM_MIN_ROWS, -(-n // 8) * 8) - n  # the kernel wants rows in multiples of 8
        if pad:
            q = torch.cat([q, q.new_zeros(pad, self.in_features)])
        y = torch._int_mm(q, self.weight_t)[:n].float() * s[:, None] * self.scale[None, :]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class RowScaledInt8Linear(torch.nn.Module):
    """``TokenInt8Linear``'s numerics (int8 activations with one scale per token) through PyTorch's
    dynamic int8 product (fbgemm), for CPUs where ``torch._int_mm`` is slow: each row of the input
    is divided by its largest magnitude before the product and the output row multiplied back, so
    the one scale per tensor that dynamic quantisation picks fits every token. Whisper base's
    encoder with every layer so: output within 6.4 % of float32 on 10 s windows of Spanish prompts
    (token int8: 4.3 %, dynamic int8 alone: 22 %), 236 ms a pass against 336 ms in float32 on an
    AVX2-only AMD EPYC."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        plain = torch.nn.Linear(linear.in_features, linear.out_features, bias=False)
        plain.weight = torch.nn.Parameter(linear.weight.detach().float().clone(), requires_grad=False)
        self.product = quantize_int8(torch.nn.Sequential(plain))[0]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.float()
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)
        y = self.product(rows / scale) * scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


def quantize_row_scaled_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``nn.Linear`` by a ``RowScaledInt8Linear``, in place."""
    return _swap_linears(model, RowScaledInt8Linear)


def token_int8_available() -> bool:
    """Does this torch multiply int8 matrices on the CPU (``torch._int_mm``)?"""
    op = getattr(torch, "_int_mm", None)
    if op is None:
        return False
    try:
        op(torch.zeros(32, 64, dtype=torch.int8), torch.zeros(64, 64, dtype=torch.int8))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _quickest(*fns, rounds: int = 5) -> list[float]:
    """Each of ``fns``'s quickest call of ``rounds`` timed calls, after one untimed call of each (a
    kernel's first call pays for its set-up). The calls take turns, round after round, so that a
    moment of load elsewhere on the machine slows one round of them all, not one of them: a probe
    that timed each kernel in turn picked int8 over bf16 once while another process started."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, spent in zip(fns, times):
            t = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - t)
    return [min(spent) for spent in times]


@functools.cache
def token_int8_fast() -> bool:
    """Is ``torch._int_mm`` here at least as quick as a float32 product of the same shape? Where
    the CPU has no int8 dot-product instructions (AVX2 without VNNI, e.g. an AMD EPYC that
    reports only AVX2) torch takes a reference loop: a 10 s window's encoder matrices (1,500 x
    512 x 2,048) then took 2.5 s against 0.055 s in float32. Measured once per process, best of
    five (a few ms where the kernel is quick, about 0.1 s where it is not)."""
    if not token_int8_available():
        return False
    a = torch.randint(-100, 100, (64, 512), dtype=torch.int8)
    b = torch.randint(-100, 100, (512, 512), dtype=torch.int8)
    af, bf = a.float(), b.float()
    int8, fp32 = _quickest(lambda: torch._int_mm(a, b), lambda: af @ bf)
    return int8 <= fp32


@functools.cache
def _bf16_timings() -> tuple[float, float, float | None]:
    """The quickest of five bf16, float32 and int8 (``torch._int_mm``, where that is quick; else
    None) products of one Whisper-encoder-sized shape (1,500 x 512 x 2,048, a 30 s window's first
    feed-forward product in base), s; the margins there are wide, and small products of a few
    hundred rows come out even. Measured once per process, about 0.4 s."""
    a, b = torch.randn(1500, 512), torch.randn(512, 2048)
    ab, bb = a.to(torch.bfloat16), b.to(torch.bfloat16)
    if not token_int8_fast():
        return (*_quickest(lambda: ab @ bb, lambda: a @ b), None)
    qa, qb = a.clamp(-100, 100).to(torch.int8), b.clamp(-100, 100).to(torch.int8)
    return tuple(_quickest(lambda: ab @ bb, lambda: a @ b, lambda: torch._int_mm(qa, qb)))


@functools.cache
def bf16_fast() -> bool:
    """Does this CPU multiply bf16 matrices quicker than int8 ones (where that is quick) and
    float32 ones? Where it has AMX tiles (Intel Xeon since Sapphire Rapids) the product of
    ``_bf16_timings`` takes 8.4 ms in bf16 against 13.7 ms in int8 and 27.6 ms in float32; without
    bf16 instructions torch emulates bf16 and it is the slowest."""
    bf16, fp32, int8 = _bf16_timings()
    return bf16 < min(fp32, int8 if int8 is not None else fp32)


#: a bf16 product this much quicker than float32's, or more, runs in hardware (emulated bf16 is
#: slower than float32; AMX took 0.30 of its time, AVX-512 BF16 without AMX 0.43)
BF16_NATIVE_SHARE = 0.6


@functools.cache
def bf16_native() -> bool:
    """Does this CPU multiply bf16 matrices in hardware, if not always quickest? On a Zen 4 AMD
    EPYC with AVX-512 BF16 and VNNI but no AMX, the product of ``_bf16_timings`` takes 15.5 ms in
    bf16 against 7.9 ms in int8 and 36.1 ms in float32; without bf16 instructions torch emulates
    bf16 and it is slower than float32. Where it is native, bf16 is the precision to translate in
    (``load_folder``'s ``translating``). The same timings as ``bf16_fast``, taken once."""
    bf16, fp32, _ = _bf16_timings()
    return bf16 <= BF16_NATIVE_SHARE * fp32


def quantize_token_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``nn.Linear`` by a ``TokenInt8Linear``, in place (dynamic int8 with one
    scale per row where this torch lacks the kernel)."""
    if not token_int8_available():
        return quantize_int8(model)
    return _swap_linears(model, TokenInt8Linear)


def _swap_linears(model: torch.nn.Module, make) -> torch.nn.Module:
    """Every ``nn.Linear`` in ``model`` replaced, in place, by ``make(linear)``."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, make(child))
    return model


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [rows, n] as int8 with one symmetric scale per row: (values, scales)."""
    scale = x.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8), scale
