"""scripts/train.py end to end on real demo audio: Hydra + exp_manager + Lightning, intermediate heads logged
to TensorBoard, a .nemo written, exported and evaluated by the scripts a user runs."""

import glob
import json
import os
import subprocess
import sys

from conftest import REPO


def run(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_train_export_evaluate(tmp_path, demo_corpus, tokenizer_dir):
    exp = tmp_path / "exp"
    run(
        [
            "scripts/train.py",
            "--config-name=conformer_ctc_llm_demo",
            f"model.train_ds.manifest_filepath={demo_corpus['train']}",
            f"model.validation_ds.manifest_filepath={demo_corpus['dev']}",
            f"model.test_ds.manifest_filepath={demo_corpus['dev']}",
            f"model.tokenizer.dir={tokenizer_dir}",
            "model.train_ds.batch_duration=12",
            "model.train_ds.num_workers=0",
            "model.encoder.n_layers=3",
            "model.encoder.d_model=32",
            "model.encoder.n_heads=2",
            "model.objectives.interctc.blocks=[1,2]",
            "model.objectives.interctc.weights=[0.2,0.1]",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "trainer.limit_train_batches=2",
            "trainer.log_every_n_steps=1",
            "model.log_prediction=false",
            f"exp_manager.exp_dir={exp}",
        ],
        timeout=600,
    )
    nemo_files = glob.glob(str(exp / "**" / "*.nemo"), recursive=True)
    assert len(nemo_files) == 1, nemo_files

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in glob.glob(str(exp / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(events)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for tag in [
        "train/ctc_final",
        "train/interctc_l1",
        "train/interctc_l2",
        "train_loss",
        "val_wer",
        "val/interctc_l1_wer",
        "val/interctc_l2_wer",
        "val/ctc_final",
    ]:
        assert tag in tags, f"{tag} not logged; got {sorted(tags)}"

    out = run(["scripts/export.py", "--src", nemo_files[0], "--dst", str(tmp_path / "infer.nemo")])
    assert "EncDecCTCModelBPE" in out
    out = run(
        [
            "scripts/evaluate.py",
            "--model",
            str(tmp_path / "infer.nemo"),
            "--manifest",
            demo_corpus["dev"],
            "--out-dir",
            str(tmp_path / "eval"),
            "--batch-size",
            "4",
        ]
    )
    summary = json.load(open(tmp_path / "eval" / "summary.json"))
    assert summary["dev_manifest"]["utterances"] == 8
    preds = open(tmp_path / "eval" / "dev_manifest.predictions.jsonl").read().splitlines()
    assert len(preds) == 8 and all("pred_text" in json.loads(p) for p in preds)
