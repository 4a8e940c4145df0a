"""Training objectives: one module per objective, each registering itself under the name of its YAML block
``model.objectives.<name>``. Every module in this package is imported here, so a new objective is one file
(plus its documented YAML block in conf/conformer_ctc_llm.yaml). ``base`` is the interface, ``shared/`` holds
what several objectives use; objective modules import those two, never each other.
"""

import importlib
import pkgutil

from nemo_ctcllm.config import ConfigError  # noqa: F401
from nemo_ctcllm.objectives.base import (  # noqa: F401
    Objective,
    ObjectiveConfig,
    ObjectiveEnv,
    StepContext,
    build_objectives,
    compose_loss,
    register_objective,
    registered_objectives,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.ispkg:
        importlib.import_module(f"{__name__}.{_module.name}")
