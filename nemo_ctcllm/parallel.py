"""Parallel layout for training with an LLM: encoder data-parallel, LLM tensor-parallel.

Who makes what, under every launcher NeMo users use (``torchrun``, Lightning's own launcher for
``python scripts/train.py trainer.devices=N``, ``srun`` under Slurm):

- the default process group is Lightning's: its DDP strategy creates it inside ``trainer.fit`` from the launcher's
  environment (torchrun's ``RANK``/``WORLD_SIZE``, Slurm's ``SLURM_PROCID``/``SLURM_NTASKS``, or the variables
  Lightning sets in the processes it starts itself, which have ``WORLD_SIZE``/``LOCAL_RANK`` but no ``RANK``),
  with its timeout (``DDPStrategy(timeout=...)``, 30 minutes by default, where NCCL's own is 10) and destroys it
  at exit;
- megatron's tensor-parallel groups are made at one point of the life cycle on every rank, whichever launcher:
  ``on_fit_start`` (:func:`setup_llm_parallel`, then the LLM host), after the process group exists and before
  sanity validation and the first step. A one-process job lets the host make a one-process group itself.

:func:`check_parallel` runs in ``scripts/train.py`` before anything else and refuses what the config alone shows to
be wrong; :func:`setup_llm_parallel` checks the real world size. Both raise on every rank alike, before any
collective, so no rank is left waiting.

Invariant: every rank of a TP group must feed the LLM identical inputs, or the TP all-reduces silently mix
different utterances. The data loader shards by global rank (each rank its own utterances), so an objective
that feeds the LLM must make its inputs identical within the TP group itself, e.g. by all-gathering them
over ``parallel_state.get_tensor_model_parallel_group()`` and keeping the gradient of its own slice.
"""

from __future__ import annotations

import os
from typing import Optional

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
            "scripts/train.py ...`, `srun` with one task per device, or `python scripts/train.py` on one node "
            "(Lightning starts the processes)"
        )
    check_tp_divides(world_size, tp_size)


def check_tp_divides(world_size: int, tp_size: int) -> None:
    if world_size % tp_size != 0:
        raise ConfigError(
            f"model.llm.tensor_model_parallel_size={tp_size} does not divide the world size {world_size}; "
            f"allowed: divisors of {world_size}"
        )


def launcher_world_size() -> Optional[int]:
    """The world size an external launcher announced (torchrun: ``WORLD_SIZE`` with ``RANK``; Slurm:
    ``SLURM_NTASKS`` when the job runs under ``srun``); None when Lightning will start the processes itself (its
    children carry ``WORLD_SIZE`` but no ``RANK``: they check in ``on_fit_start``)."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in os.environ and "SLURM_STEP_ID" in os.environ:  # inside an srun step
        return int(os.environ["SLURM_NTASKS"])
    return None


def check_parallel(cfg: DictConfig) -> None:
    """Refuse, from the config and the launcher's environment alone, a layout that cannot work: a launcher's world
    size that is not ``trainer.devices x trainer.num_nodes``, or a TP size that does not divide it. Creates
    nothing (the process group is Lightning's, the TP groups :func:`setup_llm_parallel`'s)."""
    llm = read_llm_block(cfg.model.get("llm"))
    tp = llm["tensor_model_parallel_size"] if llm["checkpoint"] else 1
    world = launcher_world_size()
    if world is not None:
        check_layout(world, tp, cfg.trainer)
    else:
        devices = _device_count(cfg.trainer)
        if devices is not None:
            check_tp_divides(devices, tp)


def setup_llm_parallel(world_size: int, tp_size: int) -> None:
    """On every rank at ``on_fit_start``: check the real layout, then make megatron's TP groups over the process
    group Lightning made (a one-process job: the LLM host makes its own)."""
    check_tp_divides(world_size, tp_size)
    if world_size > 1 and not dist.is_initialized():
        raise RuntimeError(
            f"world size {world_size} but torch.distributed is not initialised: the LLM's groups need the trainer's"
            " process group (trainer.strategy=ddp)"
        )
    if world_size > 1 or dist.is_initialized():
        from nemo_ctcllm.llm import init_model_parallel

        init_model_parallel(tp_size)


def destroy_parallel() -> None:
    """megatron's groups, at the end of a run (the default process group is destroyed by Lightning at exit)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
