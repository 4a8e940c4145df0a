"""Training objectives: one module per objective, each registering itself under the name of its YAML block
``model.objectives.<name>``. Every module in this package is imported here, so a new objective is one file
(plus its documented YAML block in conf/conformer_ctc_llm.yaml).
"""
import importlib
import pkgutil

from nemo_ctcllm.objectives.base import (  # noqa: F401
    ConfigError,
    Objective,
    StepContext,
    build_objectives,
    compose_loss,
    register_objective,
    registered_objectives,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
