"""Process-group set-up for training with an LLM: encoder data-parallel, LLM tensor-parallel.

``scripts/train.py`` calls :func:`init_parallel` before the model is built. Under ``torchrun`` it creates the
default process group (nccl on GPU, gloo on CPU) so that megatron's ``parallel_state`` can split it into
tensor-parallel groups of ``model.llm.tensor_model_parallel_size`` consecutive ranks; Lightning's DDP finds
the group already initialised and uses it. The encoder is replicated on every rank and trained
data-parallel over all ranks; each TP group holds one copy of the LLM, sharded N ways.

Invariant: every rank of a TP group must feed the LLM identical inputs, or the TP all-reduces silently mix
different utterances. The data loader shards by global rank (each rank its own utterances), so an objective
that feeds the LLM must make its inputs identical within the TP group itself, e.g. by all-gathering them
over ``parallel_state.get_tensor_model_parallel_group()`` and keeping the gradient of its own slice.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from nemo_ctcllm.config import ConfigError, read_llm_block


def _device_count(trainer_cfg: DictConfig) -> Optional[int]:
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, int) and devices > 0:
        return devices * int(trainer_cfg.get("num_nodes", 1))
    if not isinstance(devices, (int, str)):  # a list of device ids
        return len(devices) * int(trainer_cfg.get("num_nodes", 1))
    return None  # "auto" / -1: decided by the launcher


def check_layout(world_size: int, tp_size: int, trainer_cfg: DictConfig) -> None:
    """World size, trainer devices and the LLM's TP size (validated by ``read_llm_block``) must agree; raise a
    message naming the keys."""
    expected = _device_count(trainer_cfg)
    if expected is not None and expected != world_size:
        raise ConfigError(
            f"trainer.devices x trainer.num_nodes = {expected} but the job has {world_size} process(es); "
            "launch with `torchrun --nproc_per_node <trainer.devices> --nnodes <trainer.num_nodes> "
            "scripts/train.py ...`"
        )
    if world_size % tp_size != 0:
        raise ConfigError(
            f"model.llm.tensor_model_parallel_size={tp_size} does not divide the world size {world_size}; "
            f"allowed: divisors of {world_size}"
        )


def init_parallel(cfg: DictConfig) -> None:
    """Check the job's layout, then initialise torch.distributed and megatron parallel_state when the model has an
    LLM.

    The check reads only the config and the launcher's ``WORLD_SIZE``, so under torchrun every rank refuses a
    mismatch alike, before any process group exists (no rank is left waiting for the others). Without a
    launcher and without an LLM, Lightning starts the ``trainer.devices`` processes itself (no check needed).
    """
    llm = read_llm_block(cfg.model.get("llm"))
    has_llm = bool(llm["checkpoint"])
    launched = "WORLD_SIZE" in os.environ  # torchrun, Slurm via Lightning, or a process Lightning started
    if not (has_llm or launched):
        return
    tp = llm["tensor_model_parallel_size"] if has_llm else 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(world, tp, cfg.trainer)
    if not has_llm or world == 1:
        return  # the LLM host creates a single-process group itself when it is first built
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    from nemo_ctcllm.llm import init_model_parallel

    init_model_parallel(tp)
