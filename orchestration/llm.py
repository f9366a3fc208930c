"""The coordinator LLM: any transformers causal LM with a chat template.

Weights come as a transformers folder (a hub snapshot, or our cache entry). The offline package
ships SmolLM2-135M-Instruct as GGUF; transformers de-quantises GGUF on load (slowly), so we do it
once and cache the result as safetensors. Nothing here assumes a particular model: the chat
template, special tokens and context length come from the tokenizer and config.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streaming.errors import DuplexError
from streaming.models.quantize import quantize_weight_int8, weight_int8_available

log = logging.getLogger(__name__)


def write_folder_from_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """De-quantise a GGUF checkpoint through transformers and save it as a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise DuplexError(f"cannot load GGUF {gguf_dir / gguf_file}: {exc}") from None
    # transformers refuses save_pretrained on a model loaded from GGUF (it counts as quantised),
    # though the weights are plain fp32 by now: write them ourselves and drop the GGUF marker
    from safetensors.torch import save_model

    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt", "converted_from": "gguf"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(out))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    tok.save_pretrained(str(out))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class ChatLLM:
    model: torch.nn.Module
    tokenizer: object
    source: str
    precision: str = "fp32"
    stats: GenerationStats = field(default_factory=GenerationStats)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def encode_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            i = self.tokenizer.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != self.tokenizer.unk_token_id:
                ids.add(i)
        return {i for i in ids if i is not None}

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], max_new_tokens: int = 128) -> Iterator[str]:
        """Greedy generation with the KV cache, yielding text as soon as it is stable (whole
        characters; multi-byte pieces are held until complete)."""
        from transformers import DynamicCache

        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) + max_new_tokens > self.context_length:
            raise DuplexError(f"prompt of {len(prompt_ids)} tokens does not fit the {self.context_length}-token context")
        stop = self.stop_ids()
        cache = DynamicCache()
        kw = _cache_kw(self.model, cache)
        t0 = time.perf_counter()
        out = self.model(input_ids=torch.tensor([prompt_ids]), **kw)
        t1 = time.perf_counter()
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids), prefill_seconds=t1 - t0)
        generated: list[int] = []
        emitted = ""
        for _ in range(max_new_tokens):
            nxt = int(out.logits[0, -1].argmax())
            if nxt in stop:
                break
            generated.append(nxt)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text
            out = self.model(input_ids=torch.tensor([[nxt]]), **kw)
        self.stats.new_tokens = len(generated)
        self.stats.decode_seconds = time.perf_counter() - t1

    def reply(self, messages: Sequence[dict[str, str]], max_new_tokens: int = 128) -> str:
        return "".join(self.stream(self.encode_chat(messages), max_new_tokens)).strip()


def _cache_kw(model: torch.nn.Module, cache) -> dict:
    """transformers 5.2x renamed ``past_key_values`` to ``cache``; accept either generation."""
    import inspect

    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    return {name: cache, "use_cache": True}


def load_folder(folder: Path, source: str, precision: str = "fp32") -> ChatLLM:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars and messages say what is loading
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise DuplexError(f"cannot load the LLM in {folder}: {exc}") from None
    model.eval()
    if tok.chat_template is None:
        raise DuplexError(f"the LLM in {folder} has no chat template; the coordinator needs an instruct model")
    if precision == "w8" and not weight_int8_available():
        log.warning("this torch has no int8-weight CPU kernel (aten._weight_int8pack_mm): the LLM runs int8 dynamic")
        precision = "int8"
    if precision == "int8":
        from streaming.models.quantize import quantize_int8

        model = quantize_int8(model)
    elif precision == "w8":
        model = quantize_weight_int8(model)
    elif precision != "fp32":
        raise DuplexError(f"unknown LLM precision {precision!r} (fp32, w8 or int8)")
    return ChatLLM(model, tok, source, precision)
