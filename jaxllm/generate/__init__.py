"""Generation: the KV-cache sampler (sampling.py), its cache (kv_cache.py) and text in/out (textgen.py).

Used by pretrain and SFT samples, the CLI's `generate`, and RL rollouts.
"""

from jaxllm.generate.sampling import SamplingConfig, generate, generate_arrays
from jaxllm.generate.textgen import generate_texts, read_prompts

__all__ = ["SamplingConfig", "generate", "generate_arrays", "generate_texts", "read_prompts"]
