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


def _launch(prefix, args, out, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "LAUNCH_TEST_OUT": str(out), "OMP_NUM_THREADS": "1"})
    os.makedirs(out, exist_ok=True)
    cmd = [*prefix, str(REPO / "tests" / "launch_worker.py"), *args]
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


def test_torchrun(llm, demo_corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    args = _overrides(demo_corpus, tokenizer_dir, llm, 2, tmp_path / "exp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    prefix += ["--master_addr=127.0.0.1", f"--master_port={port}"]
    _launch(prefix, args, out, tmp_path)
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
