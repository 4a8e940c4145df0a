"""Reliability: bad manifest lines (each case named), skipping them, non-finite losses, config errors, and a
training run killed with SIGKILL that resumes onto the uninterrupted run's loss curve."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from conftest import REPO, load_script, tiny_model_cfg
from omegaconf import OmegaConf

from nemo_ctcllm.data.manifest import ManifestError, read_manifest
from nemo_ctcllm.models import EncDecCTCLLMModelBPE
from nemo_ctcllm.objectives import ConfigError
from nemo_ctcllm.training import check_training_data

validate_manifest = load_script(REPO / "scripts" / "validate_manifest.py")


def _write(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory, demo_corpus):
    """One manifest with one line per kind of bad input (and two good lines); {reason: line number}."""
    tmp = tmp_path_factory.mktemp("bad")
    good = read_manifest(demo_corpus["train"])[:2]
    audio, sr = soundfile.read(good[0]["audio_filepath"])
    soundfile.write(tmp / "stereo.wav", np.stack([audio, audio], 1), sr)
    soundfile.write(tmp / "8k.wav", audio[::2], sr // 2)
    soundfile.write(tmp / "short.wav", audio[: sr // 2], sr)  # 0.5 s of audio
    (tmp / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    ok = {k: good[0][k] for k in ("audio_filepath", "duration", "text")}
    cases = [
        ("good", ok),
        ("missing 'audio_filepath'", {"duration": 1.0, "text": "hello"}),
        ("audio file not found", {**ok, "audio_filepath": str(tmp / "gone.wav")}),
        ("missing or non-numeric 'duration'", {**ok, "duration": "long"}),
        ("duration 0 s outside", {**ok, "duration": 0}),
        ("duration 1000000.0 s outside", {**ok, "duration": 1e6}),
        ("unreadable audio", {**ok, "audio_filepath": str(tmp / "corrupt.wav")}),
        ("2 channels, expected 1", {**ok, "audio_filepath": str(tmp / "stereo.wav")}),
        (f"sample rate {sr // 2} Hz, expected {sr} Hz", {**ok, "audio_filepath": str(tmp / "8k.wav")}),
        ("but the file holds 0.50 s (truncated?)", {**ok, "audio_filepath": str(tmp / "short.wav"), "duration": 2.0}),
        ("missing 'text' (unlabelled lines are not enabled)", {k: ok[k] for k in ("audio_filepath", "duration")}),
        ("empty 'text'", {**ok, "text": "  "}),
        ("characters the tokenizer does not know", {**ok, "text": "caf\u00e9 \u4f60\u597d"}),
        ("transcript too long for the audio", {**ok, "duration": 0.3}),
        ("malformed JSON", '{"audio_filepath": "x.wav", "duration": '),
        ("expected a JSON object, got list", "[1, 2]"),
        ("good", {k: good[1][k] for k in ("audio_filepath", "duration", "text")}),
    ]
    manifest = _write(tmp / "bad.json", [line for _, line in cases])
    return manifest, [reason for reason, _ in cases]


def test_validate_manifest_names_every_bad_line(bad_corpus, tokenizer_dir, tmp_path, capsys):
    manifest, reasons = bad_corpus
    clean = tmp_path / "clean.json"
    code = validate_manifest.main(
        [manifest, "--tokenizer", tokenizer_dir, "--frame-shift", "0.04", "--write-clean", str(clean)]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    expected = [(str(i), r) for i, r in enumerate(reasons, 1) if r != "good"]
    got = [re.match(rf"{re.escape(manifest)}:(\d+): (.*)", line).groups() for line in out]
    assert [n for n, _ in got] == [n for n, _ in expected]  # every bad line, in order, and nothing else
    for (_, message), (_, reason) in zip(got, expected):
        assert reason in message
    kept = read_manifest(str(clean))
    assert len(kept) == 2 and all(os.path.isabs(e["audio_filepath"]) for e in kept)
    # the same file with unlabelled lines allowed: the text-less line is fine now
    validate_manifest.main([manifest, "--tokenizer", tokenizer_dir, "--allow-unlabelled"])
    assert not any("missing 'text'" in line for line in capsys.readouterr().out.splitlines())


def _lhotse_train_ds(manifest, seed: int = 0, **overrides):
    """The recipe's lhotse train_ds (conf/conformer_ctc_llm.yaml: duration bucketing, seeds, concurrent_bucketing)
    sized for the 24-utterance test corpus (45 s of audio): 6 s batches, 7-9 per epoch; buffers smaller than the
    corpus, so that bucketing really draws from a partial buffer."""
    ds = OmegaConf.load(REPO / "conf" / "conformer_ctc_llm.yaml").model.train_ds
    ds.update(
        {
            "manifest_filepath": manifest,
            "sample_rate": 16000,
            "batch_duration": 6,
            "num_buckets": 2,
            "bucket_buffer_size": 8,
            "shuffle_buffer_size": 8,
            "num_workers": 0,
            "pin_memory": False,
            "seed": seed,
            "shard_seed": seed,
            **overrides,
        }
    )
    return ds


def _train_cfg(tokenizer_dir, train, dev, tmp_path, **overrides):
    """The full training config (trainer, exp_manager, data_checks) around the tiny model."""
    base = OmegaConf.load(REPO / "conf" / "conformer_ctc_llm.yaml")
    base.model = tiny_model_cfg(tokenizer_dir, train_manifest=train, val_manifest=dev)
    base.trainer.update(
        {
            "devices": 1,
            "accelerator": "cpu",
            "strategy": "auto",
            "max_steps": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "sync_batchnorm": False,
        }
    )
    base.exp_manager.exp_dir = str(tmp_path / "exp")
    for key, value in overrides.items():
        OmegaConf.update(base, key, value, force_add=True)
    return base


def test_training_refuses_bad_lines_or_skips_and_counts_them(bad_corpus, demo_corpus, tokenizer_dir, tmp_path):
    manifest, reasons = bad_corpus
    cfg = _train_cfg(tokenizer_dir, manifest, demo_corpus["dev"], tmp_path)
    with pytest.raises(ManifestError) as err:
        check_training_data(cfg, log_dir=str(tmp_path))
    assert len(err.value.problems) == len(reasons) - 2
    assert "data_checks.skip_bad_utterances=true" in str(err.value)

    cfg.data_checks = {"skip_bad_utterances": True}
    counts = check_training_data(cfg, log_dir=str(tmp_path))
    assert counts["train_ds_bad"] == len(reasons) - 2 and counts["train_ds_kept"] == 2
    assert counts["validation_ds_bad"] == 0
    checked = cfg.model.train_ds.manifest_filepath
    assert checked != manifest and len(read_manifest(checked)) == 2
    skipped = (tmp_path / "checked_manifests" / "skipped_lines.txt").read_text().splitlines()
    assert len(skipped) == len(reasons) - 2 and all(line.startswith(f"{manifest}:") for line in skipped)
    assert cfg.model.validation_ds.manifest_filepath == demo_corpus["dev"]  # untouched: nothing bad there

    # and the model trains on what is left

    model = EncDecCTCLLMModelBPE(cfg.model)
    trainer = _quiet_trainer(max_steps=2)
    trainer.fit(model)
    assert trainer.global_step == 2


@pytest.mark.parametrize(
    "block, message",
    [
        ({"skip_bad_utterances": "yes"}, "data_checks.skip_bad_utterances must be true or false"),
        ({"min_duration": -1}, r"data_checks.min_duration must be a finite number in \[0.0"),
        ({"skip_bad": True}, r"data_checks: unknown key\(s\) \['skip_bad'\]; allowed keys"),
    ],
)
def test_bad_data_checks_block(block, message, demo_corpus, tokenizer_dir, tmp_path):
    cfg = _train_cfg(tokenizer_dir, demo_corpus["train"], demo_corpus["dev"], tmp_path, data_checks=block)
    with pytest.raises(ConfigError, match=message):
        check_training_data(cfg, log_dir=str(tmp_path))


# ------------------------------------------------------------------ non-finite losses
class _StepRecorder:
    """Parameters and AdamW step counts after every optimizer step."""

    def __init__(self):
        self.params, self.adam_steps = [], []


def _fit_with_nan(tokenizer_dir, demo_corpus, nan_at, max_steps, **bad_steps):
    import lightning.pytorch as pl

    cfg = tiny_model_cfg(
        tokenizer_dir,
        train_manifest=demo_corpus["train"],
        val_manifest=demo_corpus["dev"],
        interctc={"blocks": [2], "weights": [0.3]},
    )
    cfg.bad_steps = bad_steps
    torch.manual_seed(0)
    model = EncDecCTCLLMModelBPE(cfg)
    term = model.objectives["interctc_l2"]
    forward = term.forward

    def faulty(ctx):  # fault injection in one term: the guard is what is under test
        loss, stats = forward(ctx)
        return (loss * float("nan"), stats) if model.global_step in nan_at else (loss, stats)

    term.forward = faulty
    rec = _StepRecorder()

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            rec.params.append([p.detach().clone() for p in pl_module.parameters()])
            opt = trainer.optimizers[0]
            rec.adam_steps.append(sum(int(s.get("step", 0)) for s in opt.state.values()))

    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=[Record()],
        gradient_clip_val=1.0,
    )
    return model, trainer, rec


def test_nan_in_one_term_skips_the_step_and_training_goes_on(tokenizer_dir, demo_corpus, caplog):
    model, trainer, rec = _fit_with_nan(tokenizer_dir, demo_corpus, nan_at={1}, max_steps=4)
    trainer.fit(model)
    assert trainer.global_step == 4 and model._skipped_steps == 1 and model.optimizer_updates == 3
    for before, after in zip(rec.params[0], rec.params[1]):  # step 1 (the NaN one) changed nothing
        assert torch.equal(before, after)
    assert not torch.equal(rec.params[1][0], rec.params[2][0])  # step 2 trains again
    assert rec.adam_steps[1] == rec.adam_steps[0] and rec.adam_steps[2] > rec.adam_steps[1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_persistent_nan_stops_training_with_a_clear_message(tokenizer_dir, demo_corpus):
    from nemo_ctcllm.models.ctc_llm_bpe import NonFiniteLossError

    model, trainer, _ = _fit_with_nan(
        tokenizer_dir, demo_corpus, nan_at=set(range(100)), max_steps=10, max_consecutive=3
    )
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite loss in term\(s\) \['interctc_l2'\] at step 2.*"
        r"3 consecutive steps \(model.bad_steps.max_consecutive=3\)",
    ):
        trainer.fit(model)
    model, trainer, _ = _fit_with_nan(tokenizer_dir, demo_corpus, nan_at={0}, max_steps=2, skip=False)
    with pytest.raises(NonFiniteLossError, match="model.bad_steps.skip is false"):
        trainer.fit(model)


def test_bad_steps_block_is_validated(tokenizer_dir):
    cfg = tiny_model_cfg(tokenizer_dir)
    cfg.bad_steps = {"max_consecutive": 0}
    with pytest.raises(ConfigError, match=r"model.bad_steps.max_consecutive must be an integer >= 1, got 0"):
        EncDecCTCLLMModelBPE(cfg)


def test_ctc_infeasible_utterances_are_counted():
    from nemo_ctcllm.objectives.ctc import ctc_infeasible

    targets = torch.tensor([[1, 2, 3, 0], [4, 4, 4, 4], [5, 5, 0, 0]])
    target_len = torch.tensor([3, 4, 2])
    # needs 3, 4 + 3 repeats = 7, 2 + 1 = 3 frames
    assert ctc_infeasible(targets, target_len, torch.tensor([3, 6, 3])).tolist() == [False, True, False]
    assert ctc_infeasible(targets, target_len, torch.tensor([2, 7, 2])).tolist() == [True, False, True]


def test_missing_or_mismatched_llm_folder_fails_at_construction(tokenizer_dir, tmp_path):
    import lightning.pytorch as pl

    cfg = tiny_model_cfg(tokenizer_dir)
    cfg.llm = {"checkpoint": str(tmp_path / "no_llm_here")}
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    with pytest.raises(ConfigError, match=r"model.llm.checkpoint=.*no_llm_here: LLM checkpoint folder not found"):
        EncDecCTCLLMModelBPE(cfg, trainer=trainer)
    EncDecCTCLLMModelBPE(cfg)  # restoring (no trainer) needs no LLM until an objective asks for it


# ------------------------------------------------------------------ SIGKILL and resume
def _tb_losses(log_dir: Path) -> dict:
    """{step: train_loss} from every TensorBoard event file under log_dir (later files win)."""
    losses = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        losses.update(_tb_losses_file(events))
    return losses


def _tb_losses_file(events: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train_loss")} if "train_loss" in acc.Tags()["scalars"] else {}


def _quiet_trainer(**kwargs):
    """An in-process CPU trainer without logger, checkpoints, progress bar or validation."""
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        **kwargs,
    )


def _run_train(cfg, tmp_path, name, kill_when=None, returncode=0):
    folder = tmp_path / name
    folder.mkdir()
    OmegaConf.save(cfg, folder / "cfg.yaml")
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), f"--config-path={folder}", "--config-name=cfg"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if kill_when is None:
        try:
            out, _ = proc.communicate(timeout=600)  # a hang guard, not a timed assertion
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"scripts/train.py did not exit within 600 s:\n{out[-3000:]}")
        assert proc.returncode == returncode, out[-3000:]
        return out
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        found = kill_when()
        if found:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return found
        time.sleep(0.05)
    out = proc.stdout.read() if proc.stdout else ""
    pytest.fail(f"the run ended before a checkpoint appeared: {out[-3000:]}")


def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(demo_corpus, tokenizer_dir, tmp_path):
    """24 utterances / batch 4 = 6 steps per epoch; checkpoints every 4 steps; killed at the first one (mid
    epoch 0), resumed with exp_manager.resume_if_exists: steps after the checkpoint give the same losses as a
    run that was never killed (same optimizer, scheduler, BYOL target, step and batch position)."""

    def cfg_for(exp):
        cfg = _train_cfg(tokenizer_dir, demo_corpus["train"], demo_corpus["dev"], tmp_path)
        cfg.model.objectives.token_contrastive = {"mode": "byol", "weight": 0.1, "proj_dim": 16, "ema_decay": 0.9}
        cfg.model.optim.sched = {"name": "CosineAnnealing", "warmup_steps": 3, "min_lr": 1e-5}
        cfg.model.validation_ds.batch_size = 8
        cfg.trainer.update({"max_steps": 14, "val_check_interval": 1.0, "check_val_every_n_epoch": 1})
        cfg.exp_manager.update(
            {"exp_dir": str(tmp_path / exp), "resume_if_exists": True, "resume_ignore_no_checkpoint": True}
        )
        cfg.exp_manager.checkpoint_callback_params.update(
            {
                "every_n_train_steps": 4,
                "every_n_epochs": None,
                "save_top_k": -1,
                "always_save_nemo": False,
                "monitor": "step",
                "mode": "max",
                "save_last": True,
            }
        )
        return cfg

    _run_train(cfg_for("straight"), tmp_path, "straight")
    reference = _tb_losses(tmp_path / "straight")
    assert sorted(reference) == list(range(14))

    def checkpoint_written():
        """The newest step checkpoint, once its '-last' copy (written second, same content) is complete."""
        ckpts = {p.name: p for p in (tmp_path / "killed").rglob("*.ckpt")}
        top = sorted((p for n, p in ckpts.items() if "-last" not in n), key=lambda p: p.stat().st_mtime)
        last = [p for n, p in ckpts.items() if "-last" in n]
        if top and last and last[0].stat().st_size == top[-1].stat().st_size:
            return top[-1]
        return None

    killed = _run_train(cfg_for("killed"), tmp_path, "killed_1", kill_when=checkpoint_written)
    step = int(re.search(r"step=(\d+)", killed.name).group(1))
    assert step in (4, 8), killed.name  # mid epoch (6 batches per epoch)
    _run_train(cfg_for("killed"), tmp_path, "killed_2")  # same exp dir: resumes from the last checkpoint
    resumed = _tb_losses(tmp_path / "killed")
    files = {p.name: sorted(_tb_losses_file(p)) for p in (tmp_path / "killed").rglob("events.out.tfevents.*")}
    # SIGKILL loses whatever TensorBoard events the killed process had not flushed, so some steps before the
    # checkpoint may be missing from its file; every step from the checkpoint on must be there
    assert set(range(step, 14)) <= set(resumed) <= set(range(14)), (files, step, sorted(resumed))
    newest = max((tmp_path / "killed").rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    assert min(_tb_losses_file(newest)) == step  # the second process really resumed there
    for k in range(step, 14):  # every step after the checkpoint was recomputed by the resumed process
        assert resumed[k] == pytest.approx(reference[k], rel=1e-4, abs=1e-5), k
    shutil.rmtree(tmp_path / "straight")


# ------------------------------------------------------------------ portability
def test_tp2_trained_nemo_restores_and_transcribes_without_the_llm(demo_corpus, tokenizer_dir, tmp_path):
    """scripts/train.py under torchrun (2 ranks, gloo, DDP encoder, LLM at TP=2) writes a training .nemo;
    with the LLM folder gone, it restores on one CPU process, transcribes, and exports to plain NeMo."""
    from conftest import make_tiny_llama
    from nemo.collections.asr.models import ASRModel

    from nemo_ctcllm.export import export_for_inference

    llm = make_tiny_llama(tmp_path / "llm", num_key_value_heads=2)
    cfg = _train_cfg(tokenizer_dir, demo_corpus["train"], demo_corpus["dev"], tmp_path)
    cfg.model.objectives.llm_prefix_clm = {"blocks": [2], "weights": [1.0], "stack": 2, "weight": 0.3}
    cfg.model.llm = {"checkpoint": str(llm), "tensor_model_parallel_size": 2}
    cfg.trainer.update(
        {
            "devices": 2,
            "strategy": "ddp",
            "max_steps": 2,
            "use_distributed_sampler": True,
            "val_check_interval": 2,
            "limit_val_batches": 1,
        }
    )
    cfg.exp_manager.checkpoint_callback_params.update({"always_save_nemo": True, "save_top_k": 1})
    folder = tmp_path / "tp2"
    folder.mkdir()
    OmegaConf.save(cfg, folder / "cfg.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(REPO / "scripts" / "train.py"),
        f"--config-path={folder}",
        "--config-name=cfg",
    ]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    nemo = sorted((tmp_path / "exp").rglob("*.nemo"))
    assert len(nemo) == 1, nemo

    shutil.rmtree(llm)  # "a CPU machine with no LLM"
    model = ASRModel.restore_from(str(nemo[0]), map_location="cpu")
    assert type(model).__name__ == "EncDecCTCLLMModelBPE" and "llm_prefix_clm" in model.objectives
    wavs = [e["audio_filepath"] for e in read_manifest(demo_corpus["test"])[:2]]
    hyps = model.transcribe(wavs, batch_size=2, verbose=False)
    assert len(hyps) == 2 and all(isinstance(h.text, str) for h in hyps)
    assert export_for_inference(str(nemo[0]), str(tmp_path / "infer.nemo")).endswith("EncDecCTCModelBPE")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("lhotse", [False, True])
def test_training_loader_resumes_at_the_same_batch(lhotse, demo_corpus, tokenizer_dir):
    """The loader state Lightning stores in its checkpoint puts a fresh loader (a new process) at the next
    batch of the same epoch, for NeMo's map-style and Lhotse loaders."""

    def loader():
        cfg = tiny_model_cfg(tokenizer_dir, train_manifest=demo_corpus["train"])
        if lhotse:
            cfg.train_ds = {
                "manifest_filepath": demo_corpus["train"],
                "sample_rate": 16000,
                "use_lhotse": True,
                "batch_duration": 12,
                "shuffle": True,
                "num_workers": 0,
                "seed": 3,
                "shard_seed": 3,
            }
        model = EncDecCTCLLMModelBPE(cfg)
        dl = model._train_dl
        assert type(dl).__name__ == "ResumableDataLoader"
        return dl

    def epoch(dl, e):
        if hasattr(dl.sampler, "set_epoch"):
            dl.sampler.set_epoch(e)  # as Lightning does
        return [b[3].tolist() for b in dl]  # target lengths identify the batch

    dl = loader()
    first = epoch(dl, 0)
    if hasattr(dl.sampler, "set_epoch"):
        dl.sampler.set_epoch(1)
    it = iter(dl)
    seen = [next(it)[3].tolist() for _ in range(2)]
    state = dl.state_dict()
    rest = [b[3].tolist() for b in it]
    assert len(first) >= 4 and seen + rest != first  # a reshuffled second epoch

    fresh = loader()
    fresh.load_state_dict(state)
    assert epoch(fresh, 1) == rest  # epoch 1 continues after its 2nd batch
    assert len(epoch(fresh, 2)) == len(first) or lhotse  # and the next epoch is whole again


def test_unlabelled_lines_are_accepted_only_for_semi_supervised_training(demo_corpus, tokenizer_dir, tmp_path):
    good = read_manifest(demo_corpus["train"])[:3]
    lines = [{k: e[k] for k in ("audio_filepath", "duration", "text")} for e in good]
    lines[1].pop("text")  # unlabelled
    manifest = _write(tmp_path / "mixed.json", lines)
    cfg = _train_cfg(tokenizer_dir, manifest, demo_corpus["dev"], tmp_path)
    with pytest.raises(ManifestError, match=r"mixed.json:2: missing 'text' \(unlabelled lines are not enabled\)"):
        check_training_data(cfg, log_dir=str(tmp_path))
    cfg.model.objectives.llm_pseudo_label = {"unlabelled": True}
    assert check_training_data(cfg, log_dir=str(tmp_path))["train_unlabelled"] == 1
    lines[1]["text"] = ""  # an empty transcript could not be told from an unlabelled row in the batch
    _write(tmp_path / "mixed.json", lines)
    with pytest.raises(ManifestError, match=r"mixed.json:2: empty 'text' \(''\): remove the 'text' key to mark"):
        check_training_data(cfg, log_dir=str(tmp_path))


# ------------------------------------------------------------------ the lhotse loader: exit and order
@pytest.mark.parametrize("concurrent", [True, False])
def test_training_stopped_mid_epoch_exits(concurrent, demo_corpus, tokenizer_dir, tmp_path):
    """scripts/train.py ends when max_steps stops training mid-epoch. With concurrent bucketing lhotse fills
    its buckets from a non-daemon thread that waits while they are full; left running, it kept the interpreter
    alive forever after "Run finished"."""
    cfg = _train_cfg(tokenizer_dir, demo_corpus["train"], demo_corpus["dev"], tmp_path)
    cfg.model.train_ds = _lhotse_train_ds(demo_corpus["train"], concurrent_bucketing=concurrent)
    cfg.trainer.update({"max_steps": 3, "limit_val_batches": 0, "val_check_interval": 1.0})
    cfg.exp_manager.update({"create_checkpoint_callback": False})
    out = _run_train(cfg, tmp_path, "run")  # fails (after killing it) if the process does not exit
    assert "Run finished" in out


def _first_batches_and_losses(tokenizer_dir, demo_corpus, seed: int, steps: int = 20):
    """Train the tiny model on the recipe's lhotse loader for ``steps`` steps (seeded as scripts/train.py does);
    returns ([(audio lengths, transcript ids) per batch], [loss per step])."""
    import lightning.pytorch as pl

    pl.seed_everything(seed, workers=True)
    cfg = tiny_model_cfg(tokenizer_dir, val_manifest=demo_corpus["dev"])
    cfg.train_ds = _lhotse_train_ds(demo_corpus["train"], seed=seed)
    model = EncDecCTCLLMModelBPE(cfg)
    batches, losses = [], []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            signal_len, targets, target_len = batch[1], batch[2], batch[3]
            batches.append((signal_len.tolist(), [t[:n].tolist() for t, n in zip(targets, target_len)]))
            losses.append(outputs["loss"].item())

    trainer = _quiet_trainer(max_steps=steps, callbacks=[Record()])
    trainer.fit(model)
    return batches, losses


def test_a_seed_fixes_the_batches_and_the_losses(demo_corpus, tokenizer_dir):
    """The recipe's loader (duration bucketing from a partial buffer, shuffling) draws the same batches for the
    same seed, so two runs give the same first 20 losses; another seed draws other batches."""
    assert _lhotse_train_ds("x").concurrent_bucketing is False  # the recipe's setting is what runs here
    first = _first_batches_and_losses(tokenizer_dir, demo_corpus, seed=1)
    again = _first_batches_and_losses(tokenizer_dir, demo_corpus, seed=1)
    other = _first_batches_and_losses(tokenizer_dir, demo_corpus, seed=2)
    assert len(first[0]) == 20 and len({len(b[0]) for b in first[0]}) > 1  # 20 steps, bucketed batch sizes
    assert first[0] == again[0] and first[1] == again[1]  # bitwise: same batches, same losses
    assert first[0] != other[0] and first[1] != other[1]


def test_demo_and_ablation_configs_keep_the_deterministic_loader():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        for name in ("conformer_ctc_llm", "conformer_ctc_llm_demo", "conformer_ctc_llm_ablation"):
            assert compose(config_name=name).model.train_ds.concurrent_bucketing is False, name


def _write_many(path, source, entries, times):
    from nemo_ctcllm.data.manifest import write_manifest

    for _ in range(times):
        write_manifest(entries, source, path)


def test_ranks_writing_the_same_checked_manifest_never_show_a_reader_half_a_file(demo_corpus, tmp_path):
    """With skip_bad_utterances every rank writes the same checked manifest: two writer processes rewrite it while
    this process reads it; every read is a whole manifest (before, open(path, 'w') let a reader see a truncated
    file, and ranks could then disagree on the dataset's size)."""
    import multiprocessing as mp

    entries = read_manifest(demo_corpus["train"]) * 20
    path = str(tmp_path / "checked.json")
    _write_many(path, demo_corpus["train"], entries, 1)
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=_write_many, args=(path, demo_corpus["train"], entries, 40)) for _ in range(2)]
    for w in writers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in writers) or reads == 0:
        assert len(read_manifest(path)) == len(entries)
        reads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]  # no temporary file left


def test_on_train_end_alone_stops_the_bucketing_thread(demo_corpus, tokenizer_dir):
    """The exit guard exists twice: the model's on_train_end and scripts/train.py's finally. This is the first
    alone, in-process trainer.fit (no script): stopped mid-epoch by max_steps with concurrent bucketing, no
    non-daemon thread is left behind once fit returns (the interpreter would wait for it forever at exit)."""
    import threading

    before = {t.ident for t in threading.enumerate()}
    cfg = tiny_model_cfg(tokenizer_dir, val_manifest=demo_corpus["dev"])
    cfg.train_ds = _lhotse_train_ds(demo_corpus["train"], concurrent_bucketing=True)
    model = EncDecCTCLLMModelBPE(cfg)
    trainer = _quiet_trainer(max_steps=2)
    trainer.fit(model)
    left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive() and not t.daemon]
    assert not left, [t.name for t in left]


def test_train_script_finally_alone_stops_the_bucketing_thread(demo_corpus, tokenizer_dir, tmp_path):
    """The other exit guard alone: training that fails (a non-finite loss with model.bad_steps.skip=false, after a
    learning rate that blows the weights up) never reaches on_train_end, so only scripts/train.py's finally can
    stop lhotse's bucketing thread; the process exits with the error instead of hanging."""
    cfg = _train_cfg(tokenizer_dir, demo_corpus["train"], demo_corpus["dev"], tmp_path)
    cfg.model.train_ds = _lhotse_train_ds(demo_corpus["train"], concurrent_bucketing=True)
    cfg.model.optim.lr = 1e30
    cfg.model.optim.pop("sched", None)
    cfg.model.bad_steps = {"skip": False}
    cfg.trainer.update({"max_steps": 6, "limit_val_batches": 0, "val_check_interval": 1.0})
    cfg.exp_manager.update({"create_checkpoint_callback": False})
    out = _run_train(cfg, tmp_path, "run", returncode=1)  # fails (after killing it) if the process does not exit
    assert "NonFiniteLossError" in out and "model.bad_steps.skip is false" in out
