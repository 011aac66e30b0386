"""Tiny random-weight decoders with a real tokenizer, for tests and benchmarks (never the service).

They live in the package, not under tests/, so benchmarks can build them without importing tests.
"""

from __future__ import annotations

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from kvstore.model.loader import LoadedModel, tiny_model_config, wrap_model

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France.",
    "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.",
    "Paris is the capital and most populous city of France. The Seine flows through it.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Question: Answer: Passages: You are a helpful assistant. 0123456789 who what when where why how",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer with a chat template, trained in milliseconds."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=600, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny(kind: str = "llama", seed: int = 0, **overrides: object) -> LoadedModel:
    """A tiny random-weight decoder of the given family, fp32, with the test tokenizer."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    cfg = tiny_model_config(kind, vocab_size=640, **overrides)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    return wrap_model(model, tok, name=f"tiny-{kind}")


TINY_FAMILIES: dict[str, dict[str, object]] = {
    "llama": {},
    "qwen2": {},
    "gemma3_text": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"], "head_dim": 16},
}
