"""How a block's KV is stored: the format, quantization, and the presets that name a codec."""
