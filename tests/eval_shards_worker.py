"""Worker for tests/test_launch.py::test_sharded_validation: ``trainer.validate`` of the tiny model over 2 processes
(gloo, Lightning ``strategy: ddp``, ``use_distributed_sampler: false`` as in the recipe) with the LLM objective at
TP=2, started by torchrun or by Lightning's own launcher (which re-runs this file in its second process).

    python tests/eval_shards_worker.py SETUP_JSON        (Lightning's launcher)
    torchrun --nproc_per_node 2 tests/eval_shards_worker.py SETUP_JSON

SETUP_JSON holds the dev manifest, tokenizer folder, LLM folder and the weights (a state dict saved by the test).
Each rank writes ``$LAUNCH_TEST_OUT/rank<r>.json``: the metrics ``trainer.validate`` returned, and per validation
batch its audio lengths (the utterances' identity here), its ``val_utterances`` weight and its WER counts per head.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from conftest import tiny_model_cfg

from nemo_ctcllm.models import EncDecCTCLLMModelBPE


class RecordBatches(pl.Callback):
    def __init__(self):
        self.batches = []

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        wer_counts = {k: float(v) for k, v in outputs.items() if k.endswith(("_wer_num", "_wer_denom"))}
        self.batches.append(
            {"audio_lengths": batch[1].tolist(), "utterances": float(outputs["val_utterances"]), **wer_counts}
        )


def model_cfg(setup: dict, llm: bool):
    """The tiny model (2 blocks, d_model 32) with an intermediate head; with ``llm``, plus ``llm_lm_loss`` at TP=2."""
    objectives = {"interctc": {"blocks": [1], "weights": [0.3]}}
    if llm:
        objectives["llm_lm_loss"] = {"weight": 0.3}
    cfg = tiny_model_cfg(setup["tokenizer"], setup["dev"], setup["dev"], **objectives)
    cfg.encoder.n_layers = 2
    cfg.validation_ds.batch_size = setup["batch_size"]
    if llm:
        cfg.llm = {"checkpoint": setup["llm"], "tensor_model_parallel_size": 2}
    return cfg


def main(setup_path: str) -> None:
    with open(setup_path) as f:
        setup = json.load(f)
    record = RecordBatches()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    model = EncDecCTCLLMModelBPE(model_cfg(setup, llm=True), trainer=trainer)
    missing, unexpected = model.load_state_dict(torch.load(setup["state"]), strict=False)
    assert not unexpected and all(k.startswith("objectives.llm_lm_loss.") for k in missing), (missing, unexpected)
    metrics = trainer.validate(model)[0]
    result = {"metrics": {k: float(v) for k, v in metrics.items()}, "batches": record.batches}
    with open(os.path.join(os.environ["LAUNCH_TEST_OUT"], f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
