"""torchrun worker for the rank-consistency tests (tests/test_ranks.py): real training steps of the tiny model
on the demo speech, Lightning ``strategy: ddp`` over gloo, 2 processes, faults injected on one rank.

    torchrun --nproc_per_node 2 tests/ranks_worker.py --mode tp|dp --out DIR LLM_CHECKPOINT

``DIR/setup.json`` holds the train manifest and the tokenizer folder. Every case trains a fresh model and
writes what the test compares across ranks to ``DIR/rank<r>.pt`` ({case: result}):

* ``tp`` (LLM at TP=2; the encoder data-parallel over both ranks):
  ``nan``: NaN in rank 1's interctc term at step 1 (the LLM objective runs on both ranks);
  ``empty_<objective>``: semi-supervised batches in which rank 1 has no labelled row at step 0 and no rank has
  one at step 1, for each objective that back-propagates through the LLM or gathers rows across ranks.
* ``dp`` (no LLM): ``nan``: NaN on rank 1 at step 1; ``grad_inf``: a finite loss, an inf gradient on rank 1 at
  step 1; ``stop``: NaN on rank 1 at every step (max_consecutive 2); ``empty_byol``: BYOL with batch-norm passes
  made collectives (as under sync_batchnorm) and rank 1 unlabelled at step 0; ``weight0``: a term with parameters
  at weight 0; ``byol``: BYOL with a skipped step.

A rank that deadlocks makes torchrun overrun the test's hard timeout.
"""

import json
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is first imported

TP_OBJECTIVES = {
    "llm_prefix_clm": {"blocks": [2], "weights": [1.0], "stack": 2, "weight": 0.3},
    "llm_lm_loss": {"weight": 0.3},
    "clip": {"dim": 16, "weight": 0.3},
    "lang_contrastive": {"dim": 16, "weight": 0.3},
}


def train(
    setup: dict,
    objectives: dict,
    steps: int,
    fault=None,
    semi_supervised: bool = False,
    llm=None,
    bad_steps=None,
    **trainer_kw,
) -> dict:
    """Fit the tiny model for ``steps`` steps; ``fault(model, rank)`` patches it first. Returns what the test
    compares across ranks (or the error message a rank stopped with)."""
    import lightning.pytorch as pl
    import torch.distributed as dist
    from conftest import tiny_model_cfg

    from nemo_ctcllm.models import EncDecCTCLLMModelBPE
    from nemo_ctcllm.models.ctc_llm_bpe import NonFiniteLossError

    pl.seed_everything(0)
    cfg = tiny_model_cfg(setup["tokenizer"], train_manifest=setup["train"], **objectives)
    if llm is not None:
        cfg.llm = {"checkpoint": llm, "tensor_model_parallel_size": 2}
    if bad_steps is not None:
        cfg.bad_steps = bad_steps
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
        **trainer_kw,
    )
    model = EncDecCTCLLMModelBPE(cfg, trainer=trainer)
    model.semi_supervised = semi_supervised  # as with an objective that reads unlabelled rows
    labelled_rows = []
    if fault is not None:
        fault(model, dist.get_rank(), labelled_rows)
    out = {}
    try:
        trainer.fit(model)
    except NonFiniteLossError as e:
        out["error"] = str(e)
    opt = trainer.optimizers[0]
    out.update(
        {
            "global_step": trainer.global_step,
            "skipped": model._skipped_steps,
            "updates": model.optimizer_updates,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
            "adam_steps": sorted(int(s.get("step", 0)) for s in opt.state.values()),
            "labelled_rows": labelled_rows,
        }
    )
    if "token_contrastive" in model.objectives:  # the optimizer update count of BYOL's last EMA step
        out["ema_step"] = getattr(model.objectives["token_contrastive"], "_ema_step", None)
    return out


def nan_on_rank1(term: str, at_steps):
    """Fault injection: term ``term`` returns NaN on rank 1 at the given global steps."""

    def fault(model, rank, _):
        if rank != 1:
            return
        obj = model.objectives[term]
        forward = obj.forward

        def faulty(ctx):
            loss, stats = forward(ctx)
            return (loss * float("nan"), stats) if model.global_step in at_steps else (loss, stats)

        obj.forward = faulty

    return fault


def inf_grad_on_rank1(at_steps):
    """Fault injection: a finite loss whose backward gives rank 1 an inf gradient (a hook on the final head's
    weight) at the given global steps; DDP's all-reduce then carries it to every rank."""

    def fault(model, rank, _):
        if rank != 1:
            return
        weight = model.decoder.decoder_layers[0].weight
        weight.register_hook(lambda g: g * float("inf") if model.global_step in at_steps else g)

    return fault


def unlabelled_rows(model, rank, labelled_rows):
    """Step 0: rank 1's rows carry no transcript; step 1: no rank's rows do (semi-supervised batches)."""
    step_context = model.step_context

    def patched(batch, compute_wer):
        if (model.global_step == 0 and rank == 1) or model.global_step == 1:
            batch = (*batch[:3], torch.zeros_like(batch[3]), *batch[4:])  # target_len 0: unlabelled
        ctx = step_context(batch, compute_wer)
        labelled_rows.append(int(ctx.labelled.sum()))
        return ctx

    model.step_context = patched


def unlabelled_rows_and_batchnorm_collectives(model, rank, labelled_rows):
    """:func:`unlabelled_rows`, and every training-mode BatchNorm forward made a collective, as under
    ``sync_batchnorm`` (SyncBatchNorm itself needs GPU modules): a stand-in all-reduce in a forward hook. A rank
    that ran an encoder pass its peers skip would wait there (and the test's timeout would fail it)."""
    import torch.distributed as dist

    unlabelled_rows(model, rank, labelled_rows)

    def collective(module, inputs, output):
        if module.training:
            dist.all_reduce(torch.zeros(1))

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.register_forward_hook(collective)


def run_tp(setup, llm) -> dict:
    from nemo_ctcllm.llm import init_model_parallel

    init_model_parallel(2)
    interctc = {"interctc": {"blocks": [2], "weights": [0.3]}}
    results = {
        "nan": train(
            setup,
            {**interctc, "llm_prefix_clm": TP_OBJECTIVES["llm_prefix_clm"]},
            3,
            nan_on_rank1("interctc_l2", {1}),
            llm=llm,
        )
    }
    for name, block in TP_OBJECTIVES.items():
        # log_every_n_steps=1: every step computes WER (a collective inside torchmetrics' compute, before the fix)
        results[f"empty_{name}"] = train(
            setup, {name: block}, 2, unlabelled_rows, semi_supervised=True, llm=llm, log_every_n_steps=1
        )
    return results


def run_dp(setup) -> dict:
    byol = {"mode": "byol", "weight": 0.1, "proj_dim": 16, "ema_decay": 0.9}
    interctc = {"interctc": {"blocks": [2], "weights": [0.3]}}
    return {  # "stop" last: a fit that raised leaves NeMo's telemetry span open, so no fit may follow it here
        "nan": train(setup, interctc, 3, nan_on_rank1("interctc_l2", {1})),
        "grad_inf": train(setup, interctc, 3, inf_grad_on_rank1({1})),
        "weight0": train(setup, {"token_contrastive": {**byol, "mode": "simclr", "weight": 0.0}}, 2),
        # rank 1 without labelled rows while BYOL's extra encoder passes are collectives (as under sync_batchnorm),
        # and WER is computed every step
        "empty_byol": train(
            setup,
            {"token_contrastive": byol},
            2,
            unlabelled_rows_and_batchnorm_collectives,
            semi_supervised=True,
            log_every_n_steps=1,
        ),
        "byol": train(setup, {"token_contrastive": byol}, 4, nan_on_rank1("token_contrastive", {2})),
        "stop": train(
            setup, interctc, 5, nan_on_rank1("interctc_l2", set(range(10))), bad_steps={"max_consecutive": 2}
        ),
    }


def main() -> None:
    import torch.distributed as dist
    from obj_tp_worker import worker_setup

    args, rank, _ = worker_setup(["tp", "dp"])
    with open(os.path.join(args.out, "setup.json")) as f:
        setup = json.load(f)
    result = run_tp(setup, args.checkpoint) if args.mode == "tp" else run_dp(setup)
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
