"""The launch modes NeMo users use, with an LLM objective: Lightning's own launcher (``python scripts/train.py
trainer.devices=2``, no torchrun: its child processes have WORLD_SIZE and LOCAL_RANK but no RANK) at TP=2 and TP=1,
and torchrun. Each runs a few steps with one validation, exits 0, and leaves the ranks' parameters equal. Before
the fix the first refused to start ("the job has 1 process(es)") and, at TP=1, its children could not create the
process group ("environment variable RANK expected, but not set"). Hard timeouts turn a hang into a failure."""

import glob
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, make_tiny_llama
from omegaconf import OmegaConf

from nemo_ctcllm.config import ConfigError
from nemo_ctcllm.parallel import check_parallel

TIMEOUT = int(
    os.environ.get("LAUNCH_TEST_TIMEOUT", 600)
)  # a hang guard on a loaded 2-core machine, not a timed assertion


def _overrides(demo_corpus, tokenizer_dir, llm, tp, exp):
    return [
        f"--config-path={REPO / 'conf'}",  # the worker imports scripts/train.py: Hydra needs the absolute path
        "--config-name=conformer_ctc_llm_demo",
        f"model.train_ds.manifest_filepath={demo_corpus['train']}",
        f"model.validation_ds.manifest_filepath={demo_corpus['dev']}",
        "model.test_ds.manifest_filepath=null",
        f"model.tokenizer.dir={tokenizer_dir}",
        "model.train_ds.batch_duration=12",
        "model.train_ds.num_workers=0",
        "model.encoder.n_layers=2",
        "model.encoder.d_model=32",
        "model.encoder.n_heads=2",
        "model.objectives.interctc.blocks=[1]",
        "model.objectives.interctc.weights=[0.3]",
        f"model.llm.checkpoint={llm}",
        f"model.llm.tensor_model_parallel_size={tp}",
        "model.objectives.llm_lm_loss.enabled=true",
        "model.log_prediction=false",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=3",
        "trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.max_time=null",
        "trainer.enable_progress_bar=false",
        f"exp_manager.exp_dir={exp}",
        "exp_manager.create_checkpoint_callback=false",
    ]


def _launch(prefix, args, out, tmp_path, worker="launch_worker.py"):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "LAUNCH_TEST_OUT": str(out), "OMP_NUM_THREADS": "1"})
    os.makedirs(out, exist_ok=True)
    cmd = [*prefix, str(REPO / "tests" / worker), *args]
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log_file:  # a file, not a pipe: the launcher's children inherit it
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launcher and every process it started
            proc.wait()
            pytest.fail(f"{' '.join(prefix)} hung past {TIMEOUT} s:\n{log_path.read_text()[-4000:]}")
    log = log_path.read_text()
    assert proc.returncode == 0, log[-6000:]
    return log


def _same_parameters(out):
    ranks = [torch.load(p, weights_only=False) for p in sorted(glob.glob(str(out / "rank*.pt")))]
    assert len(ranks) == 2
    assert ranks[0]["info"]["world_size"] == ranks[1]["info"]["world_size"] == 2
    assert ranks[0]["info"]["global_step"] == ranks[1]["info"]["global_step"] == 3
    for name, value in ranks[0]["state"].items():
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, ranks[1]["state"][name]), name
    return ranks


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny", num_key_value_heads=2)


@pytest.mark.parametrize("tp", [2, 1])
def test_lightning_launcher(tp, llm, demo_corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    args = _overrides(demo_corpus, tokenizer_dir, llm, tp, tmp_path / "exp")
    log = _launch([sys.executable], args, out, tmp_path)
    ranks = _same_parameters(out)
    assert {r["info"]["env_rank"] for r in ranks} == {None}  # Lightning's children: no RANK, as in the issue
    assert "val_wer" in log or glob.glob(str(tmp_path / "exp" / "**" / "events.out.tfevents.*"), recursive=True)


def _torchrun():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    return prefix + ["--master_addr=127.0.0.1", f"--master_port={port}"]


def test_torchrun(llm, demo_corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    args = _overrides(demo_corpus, tokenizer_dir, llm, 2, tmp_path / "exp")
    _launch(_torchrun(), args, out, tmp_path)
    ranks = _same_parameters(out)
    assert {r["info"]["env_rank"] for r in ranks} == {"0", "1"}


@pytest.mark.parametrize("env", [{}, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}])
def test_check_parallel_leaves_lightnings_launcher_alone(env, monkeypatch, tmp_path):
    """Rank 0 before Lightning starts its children (no launcher variables) and a child (WORLD_SIZE, LOCAL_RANK, no
    RANK) pass; a TP size that cannot divide trainer.devices is refused in both."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    llm = str(make_tiny_llama(tmp_path / "llm", num_key_value_heads=2))
    cfg = OmegaConf.create(
        {"model": {"llm": {"checkpoint": llm, "tensor_model_parallel_size": 2}}, "trainer": {"devices": 2}}
    )
    check_parallel(cfg)
    cfg.trainer.devices = 3
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=2 does not divide the world size 3"):
        check_parallel(cfg)


def test_srun_world_size_is_checked(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    cfg = OmegaConf.create({"model": {}, "trainer": {"devices": 2, "num_nodes": 1}})
    with pytest.raises(ConfigError, match="= 2 but the job has 4 process"):
        check_parallel(cfg)


@pytest.mark.parametrize("launcher", ["torchrun", "lightning"])
def test_sharded_validation(launcher, llm, demo_corpus, tokenizer_dir, tmp_path):
    """2 ranks validate a 7-utterance dev set in batches of 3, each its own shard (rank 0: lines 0 2 4 | 6, rank 1:
    1 3 5 | a filler batch, which keeps the LLM objective's TP=2 gathers in step and is counted nowhere), and report
    the WERs and CTC losses of one process validating the whole set with the same weights."""
    import json

    import lightning.pytorch as pl
    from eval_shards_worker import RecordBatches, model_cfg

    from nemo_ctcllm.data.manifest import read_manifest, write_manifest
    from nemo_ctcllm.models import EncDecCTCLLMModelBPE

    dev = write_manifest(read_manifest(demo_corpus["dev"])[:7], demo_corpus["dev"], str(tmp_path / "dev7.json"))
    setup = {"dev": dev, "tokenizer": tokenizer_dir, "llm": str(llm), "batch_size": 3}
    setup["state"] = str(tmp_path / "state.pt")
    (tmp_path / "setup.json").write_text(json.dumps(setup))

    # one process, the whole dev set, no LLM objective (it changes no WER and no CTC loss)
    torch.manual_seed(0)
    record = RecordBatches()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=[record])
    model = EncDecCTCLLMModelBPE(model_cfg(setup, llm=False), trainer=trainer)
    torch.save(model.state_dict(), setup["state"])
    ref = trainer.validate(model)[0]
    lines = [n for b in record.batches for n in b["audio_lengths"]]  # manifest order
    assert len(lines) == 7 == len(set(lines))  # distinct lengths: they name the utterances below

    out = tmp_path / "out"
    prefix = _torchrun() if launcher == "torchrun" else [sys.executable]
    _launch(prefix, [str(tmp_path / "setup.json")], out, tmp_path, worker="eval_shards_worker.py")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    # each rank validated its own shard, the same number of batches, and counted each utterance once
    assert [[b["utterances"] for b in r["batches"]] for r in ranks] == [[3, 1], [3, 0]]
    counted = [[n for b in r["batches"] if b["utterances"] > 0 for n in b["audio_lengths"]] for r in ranks]
    assert counted == [lines[0::2], lines[1::2]]

    # pooled over the ranks: identical on both, equal to one process
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    metrics = ranks[0]["metrics"]
    for key in ("val_wer", "val/ctc_final_wer", "val/interctc_l1_wer"):
        assert metrics[key] == pytest.approx(ref[key], abs=1e-6), key
    for key in ("val/ctc_final", "val/interctc_l1"):  # utterance-weighted means of batch-mean CTC losses
        assert metrics[key] == pytest.approx(ref[key], rel=1e-4), key
    assert "val/llm_lm_loss" in metrics and torch.isfinite(torch.tensor(metrics["val/llm_lm_loss"]))
    # the mean of the ranks' own WERs (what logging each rank's WER with sync_dist=True gives) differs here (the
    # random final head deletes every word, WER 1 everywhere; the intermediate head's errors vary)
    head = "val/interctc_l1_wer"
    sums = [[sum(b.get(f"{head}_{c}", 0.0) for b in r["batches"]) for c in ("num", "denom")] for r in ranks]
    per_rank = [num / denom for num, denom in sums]
    assert sum(per_rank) / 2 != pytest.approx(metrics[head], abs=1e-6)


def test_eval_shards_cover_every_utterance_once_in_as_many_batches_on_every_rank():
    """For every set size, world size and batch size up to 13 / 4 / 4: each utterance is on exactly one rank, every
    rank has the same number of batches, and a filler only ever forms the last batch on its own."""
    from nemo_ctcllm.data.eval_shards import shard_of

    for n in range(14):
        for world in range(1, 5):
            for batch in range(1, 5):
                shards = [shard_of(n, rank, world, batch) for rank in range(world)]
                assert sorted(i for mine, _ in shards for i in mine) == list(range(n)), (n, world, batch)
                counts = {-(-(len(mine) + filler) // batch) for mine, filler in shards}
                assert len(counts) == 1, (n, world, batch)
                assert all(filler in (0, 1) and len(mine) % batch == 0 for mine, filler in shards if filler)
    assert shard_of(7, 1, 2, 3) == ([1, 3, 5], 1) and shard_of(7, 0, 2, 3) == ([0, 2, 4, 6], 0)
