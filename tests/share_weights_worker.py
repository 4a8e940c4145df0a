"""Share-mode training runs for tests/test_share_weights.py: :func:`fit` trains the tiny model on the demo speech with
Lightning (one process, or under torchrun as below), recording each step's weight and logged gradient share.

    torchrun --nproc_per_node 2 tests/share_weights_worker.py --mode dp --out DIR -

``DIR/setup.json`` holds the train manifest and the tokenizer folder; each rank writes its records and final
parameters to ``DIR/rank<r>.pt``.
"""

import json
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is first imported

TERM = "interctc_l1"  # the share-mode term: an intermediate CTC head after block 1 of 2


def share_cfg(tokenizer, train_manifest, target: float, every: int = 1):
    """The tiny model (2 blocks) with ctc_final (fixed, the reference) and interctc_l1 in share mode."""
    from conftest import tiny_model_cfg

    interctc = {
        "blocks": [1],
        "weights": [1.0],
        "weight": 0.3,
        "weight_mode": "share",
        "target_share": target,
        "min_weight": 0.01,
        "max_weight": 20.0,
        "share_smoothing": 0.5,
    }
    cfg = tiny_model_cfg(tokenizer, train_manifest, interctc=interctc)
    cfg.encoder.n_layers = 2
    cfg.train_ds.shuffle = False  # the same batches in a resumed run without relying on RNG states
    cfg.grad_shares = {"every_n_steps": every}
    return cfg


def fit(cfg, steps: int, devices: int = 1, ckpt_dir=None, save_every=None, resume=None):
    """Train ``steps`` optimizer steps (from ``resume``, a Lightning checkpoint, when given); with ``save_every`` a
    checkpoint ``step=<n>.ckpt`` is written to ``ckpt_dir`` every that many steps. Returns (records, model): one
    record per step, {step, weight: the term's weight after the step's update, logged_weight: train/weight/<term>
    (the weight the step used), share: train/grad_share/<term> (this rank's), batch: its audio lengths}."""
    import lightning.pytorch as pl

    from nemo_ctcllm.models import EncDecCTCLLMModelBPE

    records = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            logged = trainer.callback_metrics
            records.append(
                {
                    "step": trainer.global_step - 1,
                    "weight": module.objectives[TERM].weight,
                    "logged_weight": float(logged[f"train/weight/{TERM}"]),
                    "share": float(logged[f"train/grad_share/{TERM}"]),
                    "batch": batch[1].tolist(),  # the utterances' lengths: which batch it was
                }
            )

    callbacks = [Record()]
    if save_every:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=ckpt_dir, filename="{step}", every_n_train_steps=save_every, save_top_k=-1
            )
        )
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=bool(save_every),
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=callbacks,
    )
    model = EncDecCTCLLMModelBPE(cfg, trainer=trainer)
    trainer.fit(model, ckpt_path=resume)
    return records, model


def main() -> None:
    import torch.distributed as dist
    from obj_tp_worker import worker_setup

    args, rank, _ = worker_setup(["dp"])
    with open(os.path.join(args.out, "setup.json")) as f:
        setup = json.load(f)
    records, model = fit(share_cfg(setup["tokenizer"], setup["train"], target=0.6), steps=6, devices=2)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"records": records, "params": params}, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
