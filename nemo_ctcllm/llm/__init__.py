"""Frozen LLaMA-family LLM hosted in megatron-core (tensor parallel), used by training regularizers.

See :mod:`nemo_ctcllm.llm.host` for the interface and the parallel layout, :mod:`.convert` for the
HF -> megatron model and the per-rank loading of its weights, and :mod:`.compat` for the CPU shims.
"""

from .compat import apply_cpu_patches
from .convert import LlamaSpec, LLMCheckpointError, read_llama_spec
from .host import LLMHost, init_model_parallel, init_single_process_distributed
from .prepare import DEFAULT_DEMO_DIR, prepare_demo_llm

__all__ = [
    "DEFAULT_DEMO_DIR",
    "LLMHost",
    "LLMCheckpointError",
    "LlamaSpec",
    "apply_cpu_patches",
    "init_model_parallel",
    "init_single_process_distributed",
    "prepare_demo_llm",
    "read_llama_spec",
]
