"""Rank-consistent training (2 processes over gloo, Lightning ``strategy: ddp``): a fault on one rank changes
nothing about which collectives run, every rank skips and counts the same steps, and the replicas stay bitwise
equal. Each torchrun launch runs under a hard timeout, so a deadlock fails the test instead of blocking CI.
The cases are in tests/ranks_worker.py."""

import json

import pytest
import torch
from conftest import make_tiny_llama
from obj_tp_worker import launch
from omegaconf import OmegaConf

from nemo_ctcllm.objectives import ConfigError
from nemo_ctcllm.parallel import check_parallel

TIMEOUT = 900  # a hang guard for a loaded 2-core machine, not a timed assertion


def _run(mode, tmp_path, demo_corpus, tokenizer_dir, llm=None):
    (tmp_path / "setup.json").write_text(json.dumps({"train": demo_corpus["train"], "tokenizer": tokenizer_dir}))
    return launch(mode, llm or "-", tmp_path, timeout=TIMEOUT, worker=__file__.replace("test_ranks", "ranks_worker"))


def _same_on_every_rank(ranks, case):
    """The replicas after a case: same step, counters, optimizer state, parameters (the BYOL target among them)
    and buffers, bit for bit. BatchNorm running statistics are the exception DDP makes on purpose: it broadcasts
    rank 0's at every forward, then each rank updates them with its own batch."""
    first, second = ranks[0][case], ranks[1][case]
    for key in ("global_step", "skipped", "updates", "adam_steps", "error"):
        assert first.get(key) == second.get(key), (case, key, first.get(key), second.get(key))
    for kind in ("params", "buffers"):
        assert first[kind].keys() == second[kind].keys()
        for name, value in first[kind].items():
            if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                assert torch.equal(value, second[kind][name]), (case, name)
    assert all(torch.isfinite(p).all() for p in first["params"].values()), case
    return first


def test_data_parallel_bad_steps_weight_zero_and_byol(tmp_path, demo_corpus, tokenizer_dir):
    ranks = _run("dp", tmp_path, demo_corpus, tokenizer_dir)
    nan = _same_on_every_rank(ranks, "nan")  # NaN on rank 1 at step 1: skipped and counted on both ranks
    assert (nan["global_step"], nan["skipped"], nan["updates"]) == (3, 1, 2) and set(nan["adam_steps"]) == {2}
    grad = _same_on_every_rank(ranks, "grad_inf")  # an inf gradient on rank 1 at step 1: skipped alike, finite
    assert (grad["global_step"], grad["skipped"], grad["updates"]) == (3, 1, 2) and set(grad["adam_steps"]) == {2}
    stop = _same_on_every_rank(ranks, "stop")  # NaN on rank 1 at every step: both stop, with one message
    assert "2 consecutive steps (model.bad_steps.max_consecutive=2)" in stop["error"]
    assert "rank 1: batch 1 (" in stop["error"] and "rank 0:" not in stop["error"]
    empty = _same_on_every_rank(ranks, "empty_byol")  # no rank waits in a SyncBatchNorm or WER collective
    assert (empty["global_step"], empty["skipped"]) == (2, 0)
    assert ranks[1]["empty_byol"]["labelled_rows"] == [0, 0] and ranks[0]["empty_byol"]["labelled_rows"] == [4, 0]
    weight0 = _same_on_every_rank(ranks, "weight0")  # a weight-0 term's parameters are in DDP's graph
    assert weight0["global_step"] == 2
    byol = _same_on_every_rank(ranks, "byol")  # the EMA target (a buffer-free frozen copy) moved alike
    assert (byol["skipped"], byol["updates"]) == (1, 3)
    # the EMA moves once per applied update: before step 3 (step 2 skipped) 2 updates were applied, so its last
    # move was at update 2 (counting global steps instead would say 3)
    assert byol["ema_step"] == 2
    assert any(".target_encoder." in n for n in byol["params"])  # compared above with every parameter


def test_tensor_parallel_bad_step_and_ranks_without_labelled_rows(tmp_path, demo_corpus, tokenizer_dir):
    llm = make_tiny_llama(tmp_path / "llm", num_key_value_heads=2)  # 4 query / 2 KV heads: divisible by TP=2
    ranks = _run("tp", tmp_path, demo_corpus, tokenizer_dir, llm=llm)
    nan = _same_on_every_rank(ranks, "nan")  # rank 1's NaN, while the LLM objective runs on both
    assert (nan["global_step"], nan["skipped"], nan["updates"]) == (3, 1, 2)
    for case in ("llm_prefix_clm", "llm_lm_loss", "clip", "lang_contrastive"):
        result = _same_on_every_rank(ranks, f"empty_{case}")
        assert (result["global_step"], result["skipped"]) == (2, 0), case
        assert ranks[1][f"empty_{case}"]["labelled_rows"] == [0, 0], case  # rank 1: no labelled row
        assert ranks[0][f"empty_{case}"]["labelled_rows"] == [4, 0], case  # rank 0: rows at step 0 only


@pytest.mark.parametrize("rank", [0, 1])
def test_world_size_that_does_not_match_the_trainer_is_refused_on_every_rank(rank, monkeypatch):
    """The check reads only the config and the launcher's environment: each rank refuses alike, before any
    process group exists, with or without an LLM."""
    cfg = OmegaConf.create({"model": {}, "trainer": {"devices": 1, "num_nodes": 1}})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    with pytest.raises(ConfigError, match=r"trainer.devices x trainer.num_nodes = 1 but the job has 2 process"):
        check_parallel(cfg)
    cfg.trainer.devices = 2
    check_parallel(cfg)  # matching layout, no LLM: nothing to set up here (Lightning's DDP does it)
