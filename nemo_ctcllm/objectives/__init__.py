"""Training objectives. Importing this package registers the built-in ones.

Each module here defines one objective (an ``Objective`` subclass and a builder registered under the
name of its YAML block ``model.objectives.<name>``).
"""
from nemo_ctcllm.objectives import ctc  # noqa: F401  (registers ctc_final, interctc)
from nemo_ctcllm.objectives.base import (  # noqa: F401
    ConfigError,
    Objective,
    StepContext,
    build_objectives,
    compose_loss,
    register_objective,
    registered_objectives,
)
