"""nemo_ctcllm: NeMo CTC models with intermediate CTC heads and LLM-based training regularizers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models and data are local; never reach for a hub

from nemo.core.classes import common as _nemo_common  # noqa: E402

# NeMo 3 refuses to instantiate `_target_`s outside an allow-list (UnsafeTargetError on restore_from).
_allowed = getattr(_nemo_common, "ALLOWED_TARGET_PREFIXES", None)  # absent before NeMo 3
if _allowed is not None and "nemo_ctcllm." not in _allowed:
    _allowed.append("nemo_ctcllm.")

__version__ = "0.1.0"
