#!/usr/bin/env python
"""Train EncDecCTCLLMModelBPE: NeMo's speech_to_text recipe with intermediate CTC heads and LLM regularizers.

    python scripts/train.py --config-name=conformer_ctc_llm \
        model.train_ds.manifest_filepath=train.json model.validation_ds.manifest_filepath=dev.json \
        model.tokenizer.dir=<tokenizer folder>

Hydra overrides work as in NeMo (``trainer.max_steps=1000``, ``model.objectives.interctc.blocks=[6,12]``).
``init_from_nemo_model=<plain CTC .nemo>`` initialises matching weights (e.g. the encoder) from a NeMo model.
Training and validation manifests are checked before the model is built: a bad line stops the run with
file:line and reason, or is skipped and counted with ``data_checks.skip_bad_utterances=true``. A run killed
at any point continues from its last checkpoint with ``exp_manager.resume_if_exists=true`` (same optimizer,
scheduler, BYOL target, step and batch position).
"""

import lightning.pytorch as pl
from nemo.core.config import hydra_runner
from nemo.utils import logging
from nemo.utils.exp_manager import exp_manager
from nemo.utils.trainer_utils import resolve_trainer_cfg
from omegaconf import OmegaConf

from nemo_ctcllm.models import EncDecCTCLLMModelBPE
from nemo_ctcllm.parallel import check_parallel, destroy_parallel
from nemo_ctcllm.training import check_training_data


@hydra_runner(config_path="../conf", config_name="conformer_ctc_llm")
def main(cfg):
    logging.info(f"Hydra config:\n{OmegaConf.to_yaml(cfg)}")
    pl.seed_everything(cfg.get("seed", 0), workers=True)
    check_parallel(cfg)  # a layout the config shows to be wrong fails here, on every rank; nothing is created
    trainer = pl.Trainer(**resolve_trainer_cfg(cfg.trainer))
    log_dir = exp_manager(trainer, cfg.get("exp_manager", None))
    counts = check_training_data(cfg, log_dir=str(log_dir))  # may point cfg.model at checked manifests
    model = EncDecCTCLLMModelBPE(cfg=cfg.model, trainer=trainer)
    for logger in trainer.loggers:
        logger.log_metrics({f"data/{k}": float(v) for k, v in counts.items()}, step=0)
    model.maybe_init_from_pretrained_checkpoint(cfg)
    try:
        trainer.fit(model)
        if cfg.model.get("test_ds") is not None and cfg.model.test_ds.get("manifest_filepath"):
            if model.prepare_test(trainer):
                # test the weights just trained: after a resume, trainer.ckpt_path still names the checkpoint the
                # run started from, which checkpointing may since have replaced
                trainer.ckpt_path = None
                trainer.test(model)
    finally:  # also when training fails: a loader thread left running would keep the process alive
        model.stop_loader_threads()
        destroy_parallel()  # megatron's groups (Lightning destroys its process group at exit)
    logging.info(f"Run finished; logs and .nemo under {log_dir}")


if __name__ == "__main__":
    main()  # noqa pylint: disable=no-value-for-parameter
