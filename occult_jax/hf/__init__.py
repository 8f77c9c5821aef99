"""Hugging Face checkpoint import: `oj.hf.load(path, mesh)` → an occult_jax `Transformer`.

Reads local `config.json` + `*.safetensors` (no torch, no network) of `OlmoeForCausalLM`,
`Qwen2MoeForCausalLM` and `DeepseekV2ForCausalLM`; see docs/hf_import.md.
"""

from occult_jax.hf.families import ARCHITECTURES, Architecture
from occult_jax.hf.loader import architecture, build, load
from occult_jax.hf.safetensors_reader import SafetensorsCheckpoint

__all__ = ["ARCHITECTURES", "Architecture", "SafetensorsCheckpoint", "architecture", "build",
           "load"]
