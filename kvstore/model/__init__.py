"""The LLM and everything that runs it: loading, the runner, RoPE, forwards, batching, device placement."""
