"""nemo_ctcllm: NeMo CTC models with intermediate CTC heads and LLM-based training regularizers."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models and data are local; never reach for a hub

from nemo.core.classes import common as _nemo_common  # noqa: E402

# NeMo 3 refuses to instantiate `_target_`s outside an allow-list (UnsafeTargetError on restore_from).
if "nemo_ctcllm." not in _nemo_common.ALLOWED_TARGET_PREFIXES:
    _nemo_common.ALLOWED_TARGET_PREFIXES.append("nemo_ctcllm.")

__version__ = "0.1.0"
