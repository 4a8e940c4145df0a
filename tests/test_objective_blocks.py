"""Each objective's block is declared once (a dataclass in its module); the recipe's YAML blocks agree with those
declarations except where this file says why."""

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_ctcllm.objectives import registered_objectives
from nemo_ctcllm.objectives.base import ObjectiveConfig, objective_schema

RECIPE = Path(__file__).resolve().parents[1] / "conf" / "conformer_ctc_llm.yaml"

# (objective, key) -> why the recipe's value differs from the declared default. `enabled: false` (every optional
# objective is off in the recipe, on by writing its block) and `weight` (the recipe's loss mix; the default 1.0
# makes a bare block a full-weight term) differ by design and are checked separately below.
RECIPE_CHOICES = {
    ("interctc", "blocks"): "the recipe's 18-block encoder gets heads at blocks 6 and 12; there is no default depth",
    ("interctc", "weights"): "one weight per recipe block",
    ("llm_prefix_clm", "blocks"): "a connector after blocks 6, 12 and 18 of the recipe's encoder",
    ("llm_prefix_clm", "weights"): "one weight per recipe block",
    ("llm_prefix_clm", "stack"): "the recipe stacks 8 frames per prompt vector; the declared default 4 is kept so "
    "that a block without the key builds as before",
    ("llm_lm_loss", "instruction"): "'Repeat:' separates right from wrong hypotheses better than '' on SmolLM2 "
    "(measured; the YAML comment says so); the default adds no text",
}


def recipe_blocks():
    return OmegaConf.to_container(OmegaConf.load(RECIPE).model.objectives, resolve=True)


def declared_defaults(name):
    schema = objective_schema(name)
    return {f.name: getattr(schema(), f.name) for f in dataclasses.fields(schema)}


def test_every_registered_objective_has_a_recipe_block_and_a_schema():
    assert sorted(recipe_blocks()) == registered_objectives()
    for name in registered_objectives():
        assert issubclass(objective_schema(name), ObjectiveConfig) and dataclasses.is_dataclass(objective_schema(name))


@pytest.mark.parametrize("name", sorted(recipe_blocks()))
def test_recipe_block_equals_its_declared_defaults(name):
    block, defaults = recipe_blocks()[name], declared_defaults(name)
    assert set(block) <= set(defaults), f"keys the schema does not declare: {set(block) - set(defaults)}"
    differ = {k for k, v in block.items() if v != defaults[k] or type(v) is not type(defaults[k])}
    optional = name not in ("ctc_final", "interctc")
    assert (block.get("enabled") is False) == optional  # the two CTC terms are on, every other one off
    assert 0.0 < block.get("weight", defaults["weight"]) <= 1.0
    documented = {k for (n, k) in RECIPE_CHOICES if n == name}
    assert differ - {"enabled", "weight"} == documented


def test_recipe_lists_every_declared_key():
    """The recipe documents every objective-specific key of every block (the common ones are described once,
    above the blocks)."""
    common = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    for name, block in recipe_blocks().items():
        assert set(declared_defaults(name)) - common - set(block) == set(), name


def test_every_logged_value_is_on_the_losss_device():
    """NeMo all-reduces every logged validation value, and NCCL refuses a CPU tensor: the warm-up weight and every
    stat (a python number, a CPU tensor) must come out of compose_loss on the loss's device. 'meta' stands in for a
    GPU."""
    import torch

    from nemo_ctcllm.objectives.base import Objective, StepContext, compose_loss

    class Term(Objective):
        def forward(self, ctx):
            loss = ctx.log_probs.sum() * 0
            return loss, {"count": 3, "share": torch.tensor(0.5), "acc": loss.detach()}

    meta = torch.empty(2, 5, 4, device="meta")
    ctx = StepContext(
        env=None,
        signal=meta[:, :, 0],
        signal_len=meta[:, 0, 0],
        encoded=meta,
        encoded_len=meta[:, 0, 0],
        log_probs=meta,
        targets=meta[:, :, 0],
        target_len=meta[:, 0, 0],
        training=False,
    )
    terms = torch.nn.ModuleDict({"t": Term("t", weight=0.5, warmup_steps=10)})
    total, logs = compose_loss(terms, ctx, step=3, prefix="val")
    assert set(logs) == {"val/t", "val/weight/t", "val/t_count", "val/t_share", "val/t_acc"}
    assert {v.device.type for v in logs.values()} == {"meta"} and total.device.type == "meta"
