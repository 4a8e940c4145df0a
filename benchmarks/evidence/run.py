#!/usr/bin/env python
"""The evidence benchmark (issue 22): how much of the decode-time LLM gain can each objective move into the
LLM-free greedy model, fine-tuning a converged base on a domain of words it has not heard?

    python -m benchmarks.evidence.run base   --work W      # demo corpus, tokenizer, base training, base.json
    python -m benchmarks.evidence.run domain --work W      # the target domain (benchmarks/evidence/domain.py)
    python -m benchmarks.evidence.run label  --work W      # the unlabelled audio labelled once by the base
    python -m benchmarks.evidence.run mlm    --work W      # the mlm arm's masked LM over the base's BPE pieces
    python -m benchmarks.evidence.run arm    --work W --arms control,pl_greedy --seeds 0,1,2,3,4   # dev only
    python -m benchmarks.evidence.run arm    --work W --arms mlm --seeds 0 --weight 1   # dev tuning (or --lr)
    python -m benchmarks.evidence.run test   --work W --arms control,pl_greedy --seeds 0,1   # test, once per final arm
    python -m benchmarks.evidence.run report --work W      # tables and plots -> docs/RESULTS.md
    python -m benchmarks.evidence.run quick  --work W      # every stage on a tiny corpus and model (~3 min)

Every stage is resumable: training resumes from its last checkpoint (exp_manager), a finished arm or score is
skipped. Each arm fine-tunes the base's training ``.nemo`` (``init_from_nemo_model``; the same bytes for every
arm, its sha256 in base.json) for the same number of steps with the same per-seed data order (the recipe's
deterministic loader); an arm's result file holds its dev WER (for every choice) and, after ``test``, its test
scores. Semi-supervised arms train on the adaptation set plus as much unlabelled audio (labelled offline by the
base: ``label``; or online by ``llm_pseudo_label``), in batches twice as long, so that every step sees the
control's amount of human-labelled audio plus the same amount of machine-labelled audio.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

from benchmarks.ablation import (
    REPO,
    dev_curve,
    git_commit,
    on,
    portable_command,
    sitting_id,
    train_step_seconds,
)

CONFIG = "conformer_ctc_llm_demo"
BASE_NAME = "Conformer-CTC-LLM-demo"  # the demo config's name: the base's experiment folder
TOKENIZER = "tokenizers/tokenizer_spe_bpe_v128"  # under --work
LLM_DEFAULT = os.path.join(REPO, "artifacts", "llm", "smollm2-135m")
# The LLM decoder of the reference row and of the pl_llm labels: section 6's middle setting (N = 8, λ = 0.5: within
# 0.3 points of the best rescored dev WER there), not tuned here.
RESCORE = {"nbest": 8, "llm_weight": 0.5}

# The current run's result files (docs/results/<this>): the first run, with the base stopped at 62 minutes, is
# docs/results/evidence.
RESULTS_DEFAULT = "evidence_converged"
# The base: the demo architecture on the 10,000-utterance corpus until dev WER stalls for 3 validations, the cosine
# ends (max_steps) or 110 minutes of training (Lightning's timer counts across a resume), whichever comes first.
BASE = {
    "train_utterances": 10000,
    "max_steps": 8400,
    "max_time": "00:01:50:00",
    "patience": 3,
}
# Fine-tuning: the same for every arm, ~4.6 passes over the 500-utterance adaptation set. The peak learning rate
# is the control's best dev WER (seed 0) of 1e-3, 3e-4 and 1e-4 on the converged base (docs/results/
# evidence_converged/tune/; the first run used 1e-3 untuned).
FINETUNE = {"steps": 200, "lr": 3e-4, "warmup": 20, "batch_duration": 24}


@dataclass
class Arm:
    name: str
    overrides: List[str]
    data: str = "adapt"  # adapt | semi (adapt + unlabelled audio) | pl_greedy / pl_llm (adapt + offline labels)
    llm: bool = False  # reads model.llm.checkpoint
    mlm: bool = False  # reads model.objectives.mlm.model_dir (the mlm stage's masked LM)
    note: str = ""

    def objective(self) -> Optional[str]:
        """The objective the arm turns on (its ``model.objectives.<name>`` block), None for the control and the
        pseudo-label arms."""
        found = [o.split(".")[2] for o in self.overrides if re.fullmatch(r"model\.objectives\.\w+\.enabled=true", o)]
        return found[0] if found else None

    def weight(self) -> Optional[float]:
        """The weight of the arm's objective (None: the control and the pseudo-label arms have none)."""
        found = [float(o.split("=", 1)[1]) for o in self.overrides if WEIGHT_KEY.fullmatch(o.split("=", 1)[0])]
        return found[0] if found else None

    def with_weight(self, weight: float) -> "Arm":
        """The same arm with its objective at ``weight`` (dev tuning, ``--weight``)."""
        if self.weight() is None:
            raise ValueError(f"--weight: arm {self.name} has no objective weight to tune")
        overrides = [
            f"{o.split('=', 1)[0]}={weight:g}" if WEIGHT_KEY.fullmatch(o.split("=", 1)[0]) else o
            for o in self.overrides
        ]
        return replace(self, overrides=overrides)


WEIGHT_KEY = re.compile(r"model\.objectives\.\w+\.weight")


def _pl(ranker: str) -> List[str]:
    return on("llm_pseudo_label", weight=0.3, ranker=ranker, labelled="false", unlabelled="true", nbest=8)


ARMS: Dict[str, Arm] = {
    a.name: a
    for a in [
        Arm("control", [], note="final + intermediate CTC on the labelled adaptation set"),
        # semi-supervised, offline: the unlabelled audio labelled once by the base (label stage), then plain
        # fine-tuning on adapt + those labels (Kahn et al. 2020's recipe, one round)
        Arm("pl_greedy", [], data="pl_greedy", note="self-training: the base's greedy transcripts as labels"),
        Arm("pl_llm", [], data="pl_llm", note="the base's N-best ranked with the LLM as labels"),
        # semi-supervised, online (llm_pseudo_label): labels drawn every step from the model being trained
        Arm("self_train", _pl("acoustic"), data="semi", note="online: top acoustic hypothesis, no LLM"),
        Arm("llm_pseudo_label", _pl("llm"), data="semi", llm=True, note="online: LLM-ranked N-best"),
        Arm("llm_rescoring", on("llm_rescoring", weight=0.5, nbest=4), llm=True, note="MWER under LLM rescoring"),
        Arm("clip", on("clip", weight=0.1), llm=True, note="utterance-level contrastive to the LLM's text"),
        Arm("lang_contrastive", on("lang_contrastive", weight=0.1), llm=True, note="soft hypothesis vs text"),
        Arm("llm_lm_loss", on("llm_lm_loss", weight=0.1), llm=True, note="LLM loss of the soft hypothesis"),
        Arm("joint_lm", on("joint_lm", weight=0.3), note="a small LM head on the encoder (no LLM)"),
        Arm("simclr", on("token_contrastive", mode="simclr", weight=0.1), note="frame InfoNCE between two views"),
        Arm("byol", on("token_contrastive", mode="byol", weight=0.1), note="BYOL between two views"),
        Arm("mlm", on("mlm", weight=0.1), mlm=True, note="a masked LM over the ASR pieces reads the soft hypothesis"),
        # the costliest LLM objectives (9-15x a plain step on 2 CPU cores, RESULTS section 2) act on every 4th step
        Arm(
            "llm_prefix_clm",
            on("llm_prefix_clm", weight=0.3, blocks="[3,6]", weights="[0.5,0.5]", stack=8, every_n_steps=4),
            llm=True,
            note="the LLM predicts the transcript from encoder blocks 3 and 6 as a prefix, every 4th step",
        ),
        Arm(
            "llm_reward",
            on("llm_reward", weight=0.05, num_samples=4, every_n_steps=4),
            llm=True,
            note="REINFORCE with the LLM's score of sampled CTC paths as reward, every 4th step",
        ),
    ]
}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # a killed stage never leaves half a result


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _train(cmd: Sequence[str], exp_dir: str, threads: Optional[int]) -> float:
    """Run scripts/train.py (appending to <exp_dir>/train.log); returns the wall seconds; raises on failure."""
    os.makedirs(exp_dir, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.time()
    with open(os.path.join(exp_dir, "train.log"), "a") as out:
        proc = subprocess.run(list(cmd), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {os.path.join(exp_dir, 'train.log')}")
    return time.time() - start


def _checkpoint(exp_dir: str, name: str) -> str:
    found = glob.glob(os.path.join(exp_dir, name, "checkpoints", f"{name}.nemo"))
    if not found:
        raise RuntimeError(f"no {name}.nemo under {exp_dir}")
    return found[0]


class Paths:
    """Where each stage reads and writes under --work (and the result files under --results)."""

    def __init__(self, work: str, results: str, lr: Optional[float] = None, weight: Optional[float] = None):
        self.work, self.results = os.path.abspath(work), os.path.abspath(results)
        # a dev-tuning run (a peak lr other than FINETUNE's, an objective weight other than the arm's): its own
        # folder and <results>/tune/ file, tagged "_lr0.0003", "_w1" or both
        self.tag = (f"_lr{lr:g}" if lr is not None else "") + (f"_w{weight:g}" if weight is not None else "")
        self.corpus = os.path.join(self.work, "demo_data")
        self.tokenizer = os.path.join(self.work, TOKENIZER)
        self.base_exp = os.path.join(self.work, "base")
        self.base_nemo = os.path.join(self.work, "base.nemo")
        self.domain = os.path.join(self.work, "domain")
        self.base_json = os.path.join(self.results, "base.json")
        self.domain_json = os.path.join(self.results, "domain.json")
        self.mlm = os.path.join(self.work, "mlm")  # the mlm arm's teacher (the mlm stage)
        self.mlm_corpus = os.path.join(self.work, "mlm_sentences.txt")

    def manifest(self, split: str) -> str:
        return os.path.join(self.domain, f"{split}_manifest.json")

    def arm_exp(self, arm: str, seed: int) -> str:
        return os.path.join(self.work, "arms", f"{arm}{self.tag}_s{seed}")

    def pl_manifest(self, kind: str) -> str:
        return os.path.join(self.domain, f"{kind}_manifest.json")

    def arm_json(self, arm: str, seed: int) -> str:
        if self.tag:
            return os.path.join(self.results, "tune", f"{arm}{self.tag}_s{seed}.json")
        return os.path.join(self.results, f"{arm}_s{seed}.json")


# ----------------------------------------------------------------------------------------------- base


def stop_reason(log_text: str) -> str:
    """Which criterion ended the base's training, from Lightning's messages in its log (the last one: a base
    resumed after a time limit appends to the same log)."""
    reasons = {
        "did not improve in the last": "early stopping: dev WER did not improve for the patience's validations",
        "Time limit reached": "time limit",
        "` reached.": "max_steps (the cosine schedule's end)",
    }
    found = [(log_text.rfind(k), v) for k, v in reasons.items() if k in log_text]
    return max(found)[1] if found else "unknown (see the training log)"


def prepare_corpus(p: Paths, train_utterances: int) -> None:
    """The base's demo corpus and BPE-128 tokenizer (each skipped when present)."""
    if not os.path.isfile(os.path.join(p.corpus, "params.json")):
        from demo.corpus import make_demo_corpus

        make_demo_corpus(p.corpus, num_train=train_utterances, seed=0, relative_paths=True)
    if not os.path.isfile(os.path.join(p.tokenizer, "tokenizer.model")):
        from nemo_ctcllm.data.tokenizer import build_bpe_tokenizer

        build_bpe_tokenizer([os.path.join(p.corpus, "train_manifest.json")], os.path.dirname(p.tokenizer), 128)


def base_stage(p: Paths, base: dict, extra: Sequence[str] = (), threads: Optional[int] = None, log=print) -> dict:
    """The base model (skipped when present: trained here, or copied in with its record); writes base.json."""
    cmd = [
        sys.executable,
        os.path.join(REPO, "scripts", "train.py"),
        f"--config-name={CONFIG}",
        f"demo_dir={p.corpus}",
        "seed=0",
        f"model.tokenizer.dir={p.tokenizer}",
        f"trainer.max_time={base['max_time']}",
        f"trainer.max_steps={base['max_steps']}",
        f"exp_manager.exp_dir={p.base_exp}",
        "+exp_manager.create_early_stopping_callback=true",
        "+exp_manager.early_stopping_callback_params.monitor=val_wer",
        f"+exp_manager.early_stopping_callback_params.patience={base['patience']}",
        *extra,
    ]
    log_path = os.path.join(p.base_exp, "train.log")
    if os.path.isfile(p.base_nemo) and not os.path.isfile(log_path) and os.path.isfile(p.base_json):
        # a base copied in (docs/results/evidence_converged/base.nemo): keep its record, check it is the same bytes
        recorded = _read_json(p.base_json)
        if _sha256(p.base_nemo) != recorded["sha256"]:
            raise RuntimeError(f"{p.base_nemo}: sha256 differs from the one {p.base_json} records")
        return recorded
    if not os.path.isfile(p.base_nemo):
        wall = _train(cmd, p.base_exp, threads)
        shutil.copyfile(_checkpoint(p.base_exp, BASE_NAME), p.base_nemo)
        log(f"base trained in {wall / 60:.1f} min (this sitting)")
    curve = dev_curve(p.base_exp)
    with open(log_path, errors="replace") as f:
        text = f.read()
    logged = re.findall(r"global step (\d+)", text)  # the checkpoint callback's lines
    steps = int(logged[-1]) if logged else (int(curve[-1][0]) if curve else 0)
    stopped_by = stop_reason(text)
    if stopped_by.startswith("max_steps"):  # the steps after the last validation count too (the .nemo is the last)
        steps = base["max_steps"]
    result = {
        "command": portable_command(cmd, p.work),
        "commit": git_commit(),
        "sha256": _sha256(p.base_nemo),
        "bytes": os.path.getsize(p.base_nemo),
        "dev_curve": curve,
        "best_dev_wer": min(v for _, v in curve) if curve else None,
        "steps": steps,
        "stopped_by": stopped_by,
        "settings": base,
    }
    if os.path.isfile(p.base_json) and "domain_dev" in _read_json(p.base_json):  # written by base_dev_score
        result["domain_dev"] = _read_json(p.base_json)["domain_dev"]
    _write_json(p.base_json, result)
    return result


def domain_stage(p: Paths, sizes: Optional[dict] = None, min_unseen: float = 0.25) -> dict:
    """The target domain from the base corpus (skipped when complete); writes domain.json."""
    from benchmarks.evidence.domain import DEFAULT_SIZES, base_from_manifests, build_domain
    from demo.corpus import SPLITS

    if not os.path.isfile(os.path.join(p.domain, "params.json")):
        paths = [os.path.join(p.corpus, f"{s}_manifest.json") for s in SPLITS]
        base = base_from_manifests(paths[0], [x for x in paths[1:] if os.path.isfile(x)])
        build_domain(p.domain, base, sizes or DEFAULT_SIZES, min_unseen, progress=sys.stdout.isatty())
    stats = _read_json(os.path.join(p.domain, "stats.json"))
    stats["test_unseen_coverage"] = unseen_coverage(p)
    _write_json(p.domain_json, stats)
    return stats


def unseen_coverage(p: Paths) -> dict:
    """Of the test's word tokens the base never heard: the share whose word a fine-tuning arm hears in its
    transcripts (adapt) or in its unlabelled audio (the lines the semi-supervised arms use)."""
    from benchmarks.evidence.stats import vocabulary
    from nemo_ctcllm.evaluate import normalize_text

    sel = _read_json(os.path.join(p.domain, "sentences.json"))
    seen = base_vocabulary(p)
    adapt = vocabulary(normalize_text(s) for s in sel["adapt"])
    unlabelled = vocabulary(normalize_text(s) for s in sel["unlabelled"][: len(sel["adapt"])])
    tokens = [w for s in sel["test"] for w in normalize_text(s).split() if w not in seen]
    share = lambda words: round(sum(w in words for w in tokens) / max(1, len(tokens)), 4)  # noqa: E731
    return {
        "tokens": len(tokens),
        "in_adapt": share(adapt),
        "in_used_unlabelled": share(unlabelled),
        "in_either": share(adapt | unlabelled),
    }


def _adapt_and_unlabelled(p: Paths):
    """(adapt manifest lines, the first len(adapt) unlabelled manifest lines): the semi-supervised arms' audio."""
    with open(p.manifest("adapt"), encoding="utf-8") as f:
        adapt = [line for line in f if line.strip()]
    with open(p.manifest("unlabelled"), encoding="utf-8") as f:
        unlabelled = [line for line in f if line.strip()][: len(adapt)]
    return adapt, unlabelled


def _write_lines(path: str, lines: Sequence[str]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def semi_manifest(p: Paths) -> str:
    """adapt + the same number of unlabelled lines (the first ones), for the online semi-supervised arms."""
    path = os.path.join(p.domain, "semi_manifest.json")
    if not os.path.isfile(path):
        adapt, unlabelled = _adapt_and_unlabelled(p)
        _write_lines(path, adapt + unlabelled)
    return path


def label_stage(p: Paths, llm: str, nbest: int = RESCORE["nbest"], log=print) -> dict:
    """Label the unlabelled audio of the semi-supervised arms (the first len(adapt) lines) once with the base:
    its greedy transcript (self-training) and its N-best ranked a + λ·l with the LLM (the reference row's
    decoder). Writes pl_greedy_manifest.json and pl_llm_manifest.json (adapt + the labelled lines; an empty
    label is dropped) and labels.json: each labelling's WER against the sentences the audio speaks (held out of
    every manifest; used only here, to measure the labels) and its time."""
    from nemo.collections.asr.models import ASRModel

    from nemo_ctcllm.decoding.llm_rerank import rescore_manifest
    from nemo_ctcllm.evaluate import normalize_text, score, transcribe_manifest
    from nemo_ctcllm.llm import LLMHost

    out = os.path.join(p.results, "labels.json")
    if os.path.isfile(out) and all(os.path.isfile(p.pl_manifest(k)) for k in ("pl_greedy", "pl_llm")):
        return _read_json(out)
    base_dev_score(p)  # exports the base (base_inference.nemo)
    adapt, lines = _adapt_and_unlabelled(p)
    unl = os.path.join(p.domain, "unlabelled_used_manifest.json")
    _write_lines(unl, lines)
    truth = _read_json(os.path.join(p.domain, "sentences.json"))["unlabelled"][: len(lines)]
    model = ASRModel.restore_from(os.path.join(p.work, "base_inference.nemo"), map_location="cpu")
    start = time.time()
    greedy = [r["pred_text"] for r in transcribe_manifest(model, unl)]
    t_greedy = time.time() - start
    start = time.time()
    ranked = rescore_manifest(model, LLMHost(llm, tp_size=1), unl, nbest, RESCORE["llm_weight"])
    t_llm = time.time() - start
    result = {"utterances": len(lines), "nbest": nbest, "llm_weight": RESCORE["llm_weight"]}
    for kind, texts, seconds in (("pl_greedy", greedy, t_greedy), ("pl_llm", ranked, t_llm)):
        rows = [{"text": normalize_text(t), "pred_text": h} for t, h in zip(truth, texts)]
        kept = []
        for line, text in zip(lines, texts):
            if normalize_text(text):
                kept.append(json.dumps({**json.loads(line), "text": normalize_text(text), "pseudo_label": kind}))
        _write_lines(p.pl_manifest(kind), adapt + [k + "\n" for k in kept])
        s = score(rows)
        result[kind] = {"label_wer": s["wer"], "label_cer": s["cer"], "kept": len(kept), "seconds": round(seconds, 1)}
        log(f"{kind}: label WER {100 * s['wer']:.2f} %, {len(kept)} of {len(lines)} kept, {seconds:.0f} s")
    _write_json(out, result)
    return result


# ----------------------------------------------------------------------------------------------- mlm teacher

# The mlm arm's masked LM: section 9's recipe (scripts/train_mlm.py, a 0.45 M BERT) over the base's BPE pieces, for
# a fixed number of steps (not minutes: the same teacher on any machine), on the shipped sentences minus the
# domain's dev and test sentences: the teacher never reads what the arm is selected or scored on.
MLM_STEPS = 2000


def mlm_sentences(p: Paths) -> List[str]:
    """The shipped sentences the mlm arm's teacher may read: all but the domain's dev and test sentences."""
    from demo.corpus import load_sentences, normalize_text

    sel = _read_json(os.path.join(p.domain, "sentences.json"))
    held = {normalize_text(s) for s in sel["dev"] + sel["test"]}
    return [s for s in load_sentences() if normalize_text(s) not in held]


def mlm_stage(p: Paths, steps: int = MLM_STEPS, threads: Optional[int] = None, log=print) -> dict:
    """Train the mlm arm's masked LM once (skipped when present); writes <results>/mlm.json."""
    out, corpus = p.mlm, p.mlm_corpus
    script = os.path.join(REPO, "scripts", "train_mlm.py")
    cmd = [sys.executable, script, "--out", out, "--corpus", corpus, "--asr-tokenizer", p.tokenizer]
    cmd += ["--steps", str(steps), "--max-minutes", "100000"]  # steps, not minutes, end it
    if not os.path.isfile(os.path.join(out, "mlm_eval.json")):
        _write_lines(corpus, [s + "\n" for s in mlm_sentences(p)])
        wall = _train(cmd, out, threads)
        log(f"mlm teacher trained in {wall / 60:.1f} min")
    metrics = _read_json(os.path.join(out, "mlm_eval.json"))
    metrics.pop("args")  # the same as the command, with this machine's paths
    result = {
        "command": portable_command(cmd, p.work, script="scripts/train_mlm.py"),
        "commit": git_commit(),
        "corpus": "demo/sentences.txt minus the domain's dev and test sentences",
        **metrics,
    }
    _write_json(os.path.join(p.results, "mlm.json"), result)
    return result


def _mlm_dir(p: Paths) -> str:
    if not os.path.isfile(os.path.join(p.mlm, "mlm_eval.json")):
        raise RuntimeError(f"arm mlm: no masked LM in {p.mlm}; run the mlm stage first")
    return p.mlm


# ----------------------------------------------------------------------------------------------- arms


def objective_curve(exp: str, arm: Arm) -> Optional[List[List[float]]]:
    """[[step, the arm's own term on dev], ...] at the fine-tuning's validations: was the objective optimised at
    all? (A null in WER means something else when the term itself did not move.)"""
    return dev_curve(exp, f"val/{arm.objective()}") if arm.objective() else None


def arm_command(p: Paths, arm: Arm, seed: int, finetune: dict, llm: str, extra: Sequence[str]) -> List[str]:
    if arm.data == "adapt":
        train = p.manifest("adapt")
    elif arm.data == "semi":
        train = semi_manifest(p)
    else:
        train = p.pl_manifest(arm.data)
        if not os.path.isfile(train):
            raise RuntimeError(f"arm {arm.name}: no {train}; run the label stage first")
    # every arm but the control trains on half labelled, half (pseudo-)labelled-by-the-model audio: batches twice
    # as long give every step the control's amount of human-labelled audio
    batch = finetune["batch_duration"] * (1 if arm.data == "adapt" else 2)
    return [
        sys.executable,
        os.path.join(REPO, "scripts", "train.py"),
        f"--config-name={CONFIG}",
        f"demo_dir={p.corpus}",
        f"seed={seed}",
        f"name={arm.name}",
        f"init_from_nemo_model={p.base_nemo}",
        f"model.tokenizer.dir={p.tokenizer}",
        f"model.train_ds.manifest_filepath={train}",
        f"model.train_ds.batch_duration={batch}",
        f"model.validation_ds.manifest_filepath={p.manifest('dev')}",
        "model.test_ds.manifest_filepath=null",  # scored here, after export
        "trainer.max_time=null",
        f"trainer.max_steps={finetune['steps']}",
        f"model.optim.lr={finetune['lr']}",
        f"model.optim.sched.warmup_steps={finetune['warmup']}",
        f"exp_manager.exp_dir={p.arm_exp(arm.name, seed)}",
        "exp_manager.checkpoint_callback_params.save_top_k=1",
        *([f"model.llm.checkpoint={llm}"] if arm.llm else []),
        *([f"model.objectives.mlm.model_dir={_mlm_dir(p)}"] if arm.mlm else []),
        *extra,
        *arm.overrides,
    ]


def _score(model, manifest: str, out: str, seen: set, llm_host=None) -> dict:
    """Greedy WER/CER (+ unseen/seen word recall) of ``model`` on ``manifest``; with ``llm_host`` also the N-best
    LLM-rescored decoding (the reference row)."""
    from benchmarks.evidence.stats import word_recall
    from nemo_ctcllm.evaluate import evaluate, normalize_text

    kw = dict(llm_host=llm_host, **RESCORE) if llm_host is not None else {}
    result = evaluate(model, manifest, out_path=out, **kw)
    with open(out, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    refs = [normalize_text(r["text"]) for r in rows]
    result["word_recall"] = word_recall(refs, [normalize_text(r["pred_text"]) for r in rows], seen)
    if llm_host is not None:
        rescored = [normalize_text(r["pred_text_llm"]) for r in rows]
        result["llm_rescored"]["word_recall"] = word_recall(refs, rescored, seen)
    return result


def base_vocabulary(p: Paths) -> set:
    from benchmarks.evidence.stats import vocabulary
    from nemo_ctcllm.evaluate import normalize_text

    with open(os.path.join(p.corpus, "train_manifest.json"), encoding="utf-8") as f:
        return vocabulary(normalize_text(json.loads(line)["text"]) for line in f if line.strip())


def arm_stage(
    p: Paths,
    arm: Arm,
    seed: int,
    finetune: dict,
    llm: str,
    extra: Sequence[str] = (),
    threads: Optional[int] = None,
    log=print,
) -> dict:
    """Fine-tune, export and score on dev one arm and seed (skipped when its result exists; one made before
    results recorded the objective's dev curve gains it while its training folder is still there)."""
    from nemo.collections.asr.models import ASRModel

    from nemo_ctcllm.export import export_for_inference

    path = p.arm_json(arm.name, seed)
    if os.path.isfile(path):
        result = _read_json(path)
        if "objective_curve" not in result and os.path.isdir(p.arm_exp(arm.name, seed)):
            result["objective_curve"] = objective_curve(p.arm_exp(arm.name, seed), arm)
            _write_json(path, result)
        return result
    if not os.path.isfile(p.base_nemo):
        raise RuntimeError(f"no base model at {p.base_nemo}: run the base stage first")
    exp = p.arm_exp(arm.name, seed)
    cmd = arm_command(p, arm, seed, finetune, llm, extra)
    commit = git_commit()
    wall = _train(cmd, exp, threads)
    infer = os.path.join(exp, "inference.nemo")
    export_for_inference(_checkpoint(exp, arm.name), infer)
    model = ASRModel.restore_from(infer, map_location="cpu")
    dev = _score(model, p.manifest("dev"), os.path.join(exp, "dev.predictions.jsonl"), base_vocabulary(p))
    log(f"{arm.name} s{seed}: dev WER {100 * dev['wer']:.2f}")
    result = {
        "arm": arm.name,
        "seed": seed,
        "note": arm.note,
        "data": arm.data,
        "overrides": arm.overrides,
        "finetune": finetune,
        "command": portable_command(cmd, p.work),
        "commit": commit,
        "sitting": sitting_id(),
        "threads": threads,
        "wall_s_last_sitting": round(wall, 1),
        "train_step_s_mean": train_step_seconds(exp),
        "dev_curve": dev_curve(exp),
        "objective_curve": objective_curve(exp, arm),
        "base_sha256": _sha256(p.base_nemo),
        "metrics": {"dev": dev},
    }
    _write_json(path, result)
    return result


def test_stage(p: Paths, arm: str, seed: int, llm: Optional[str] = None, log=print) -> dict:
    """Score a finished arm on both test splits (once: a split already scored is skipped). With ``llm`` (the
    control only) each test split is also decoded with N-best LLM rescoring: the reference row."""
    from nemo.collections.asr.models import ASRModel

    path = p.arm_json(arm, seed)
    result = _read_json(path)
    if llm and arm != "control":
        raise ValueError(f"the LLM-rescored reference is the control's; not scored for {arm}")
    todo = [
        s
        for s in ("test_seen", "test_unseen")
        if s not in result["metrics"] or (llm and "llm_rescored" not in result["metrics"][s])
    ]
    if not todo:
        return result
    host = None
    if llm:
        from nemo_ctcllm.llm import LLMHost

        host = LLMHost(llm, tp_size=1)
    exp = p.arm_exp(arm, seed)
    model = ASRModel.restore_from(os.path.join(exp, "inference.nemo"), map_location="cpu")
    seen = base_vocabulary(p)
    for split in todo:
        out = os.path.join(exp, f"{split}.predictions.jsonl")
        start = time.time()
        result["metrics"][split] = _score(model, p.manifest(split), out, seen, llm_host=host)
        result["metrics"][split]["seconds"] = round(time.time() - start, 1)
        log(f"{arm} s{seed} {split}: WER {100 * result['metrics'][split]['wer']:.2f}")
        _write_json(path, result)
    return result


def base_dev_score(p: Paths) -> dict:
    """The base itself (no fine-tuning) on the domain's dev set: how far the domain is from what it knows."""
    from nemo.collections.asr.models import ASRModel

    from nemo_ctcllm.export import export_for_inference

    base = _read_json(p.base_json)
    if "domain_dev" not in base:
        infer = os.path.join(p.work, "base_inference.nemo")
        export_for_inference(p.base_nemo, infer)
        model = ASRModel.restore_from(infer, map_location="cpu")
        out = os.path.join(p.work, "base_dev.predictions.jsonl")
        base["domain_dev"] = _score(model, p.manifest("dev"), out, base_vocabulary(p))
        _write_json(p.base_json, base)
    return base


# ----------------------------------------------------------------------------------------------- report


# ----------------------------------------------------------------------------------------------- main


QUICK_MODEL = [
    "model.encoder.n_layers=4",
    "model.encoder.d_model=32",
    "model.encoder.n_heads=2",
    "model.train_ds.num_workers=0",
    "trainer.log_every_n_steps=1",
    "model.log_prediction=false",
    "trainer.enable_progress_bar=false",
]
QUICK_BASE = {"train_utterances": 24, "max_steps": 6, "max_time": "00:00:10:00", "patience": 3}
QUICK_FINETUNE = {"steps": 3, "lr": 1e-3, "warmup": 1, "batch_duration": 12}
QUICK_DOMAIN = {"test": 4, "dev": 4, "adapt": 6, "unlabelled": 6}
# joint_lm: an objective arm (no LLM), so the objective's dev curve and its table run end to end too
QUICK_RUNS = [("control", (0, 1)), ("pl_greedy", (0, 1)), ("pl_llm", (0,)), ("joint_lm", (0,))]


def quick(p: Paths, llm: str, log=print) -> str:
    """Every stage on a tiny corpus and model: checks the pipeline end to end, not the objectives."""
    from demo.corpus import load_sentences, make_demo_corpus
    from nemo_ctcllm.data.tokenizer import build_bpe_tokenizer_from_texts

    if not os.path.isfile(os.path.join(p.corpus, "params.json")):
        make_demo_corpus(
            p.corpus,
            num_train=24,
            num_dev=6,
            num_test=4,
            num_test_unseen_engine=2,
            seed=0,
            workers=2,
            progress=False,
            relative_paths=True,
        )
    build_bpe_tokenizer_from_texts(load_sentences(), os.path.dirname(p.tokenizer), 128)
    base_stage(p, QUICK_BASE, [*QUICK_MODEL, "model.train_ds.batch_duration=12"], log=log)
    domain_stage(p, QUICK_DOMAIN)
    label_stage(p, llm, log=log)
    for arm, seeds in QUICK_RUNS:
        for seed in seeds:
            arm_stage(p, ARMS[arm], seed, QUICK_FINETUNE, llm, QUICK_MODEL, log=log)
            test_stage(p, arm, seed, llm if arm == "control" else None, log=log)
    tuning = {**QUICK_FINETUNE, "lr": QUICK_FINETUNE["lr"] / 3}  # a dev-tuning run (--lr): the tuning table
    tuned = Paths(p.work, p.results, lr=tuning["lr"])
    arm_stage(tuned, ARMS["control"], 0, tuning, llm, QUICK_MODEL, log=log)
    from benchmarks.evidence.report import report

    return report(p, os.path.join(p.work, "report.md"), os.path.join(p.work, "plots"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["base", "domain", "label", "mlm", "arm", "test", "report", "quick"])
    ap.add_argument("--work", required=True, help="models, corpora and experiment folders (outside the repository)")
    ap.add_argument(
        "--results",
        help="result files (default: docs/results/evidence_converged; quick: <work>/results); the report's"
        " section in docs/RESULTS.md and its plots are named after this folder",
    )
    ap.add_argument("--arms", default="control", help=f"comma-separated, from {sorted(ARMS)}")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--llm", default=LLM_DEFAULT, help="the LLM folder (default: the prepared SmolLM2)")
    ap.add_argument("--rescore", action="store_true", help="test stage, control: also the LLM-rescored reference")
    ap.add_argument(
        "--lr",
        type=float,
        help="dev tuning: fine-tune at this peak learning rate instead of FINETUNE's; the runs go to"
        " <work>/arms/<arm>_lr<lr>_s<seed> and <results>/tune/ (the report's tuning table), not into the arms' tables",
    )
    ap.add_argument(
        "--weight",
        type=float,
        help="dev tuning: the arm's objective at this weight instead of its ARMS setting; the runs go to"
        " <work>/arms/<arm>_w<weight>_s<seed> and <results>/tune/, like --lr's",
    )
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each training (two at once: 1)")
    ap.add_argument("override", nargs="*", help="extra Hydra overrides for every arm's training")
    args = ap.parse_args(argv)
    results = args.results or (
        os.path.join(args.work, "results")
        if args.stage == "quick"
        else os.path.join(REPO, "docs", "results", RESULTS_DEFAULT)
    )
    p = Paths(args.work, results, lr=args.lr, weight=args.weight)
    finetune = {**FINETUNE, "lr": args.lr} if args.lr is not None else FINETUNE
    if args.stage == "quick":
        print(quick(p, args.llm))
        return
    if args.stage == "base":
        prepare_corpus(p, BASE["train_utterances"])
        print(json.dumps({k: v for k, v in base_stage(p, BASE, threads=args.threads).items() if k != "dev_curve"}))
        return
    if args.stage == "domain":
        print(json.dumps(domain_stage(p)["splits"], indent=1))
        return
    if args.stage == "label":
        print(json.dumps(label_stage(p, args.llm), indent=1))
        return
    if args.stage == "mlm":
        print(json.dumps(mlm_stage(p, threads=args.threads), indent=1))
        return
    if args.stage == "report":
        from benchmarks.evidence.report import report

        name = os.path.basename(os.path.normpath(p.results))  # evidence (the first run), evidence_converged
        print(report(p, os.path.join(REPO, "docs", "RESULTS.md"), os.path.join(REPO, "docs", "results"), name))
        return
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        ap.error(f"--arms: unknown arm(s) {unknown}; known: {sorted(ARMS)}")
    arms = [ARMS[a] for a in args.arms.split(",")]
    if args.weight is not None:
        untunable = [a.name for a in arms if a.weight() is None]
        if untunable:
            ap.error(f"--weight: arm(s) {untunable} have no objective weight to tune")
        arms = [a.with_weight(args.weight) for a in arms]
    if args.stage == "test" and p.tag:
        ap.error("--lr/--weight: a tuning run is scored on dev only; test scores the final configurations")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.stage == "arm":
        base_dev_score(p)  # once: the base on the domain's dev set, before any fine-tuning
    for arm in arms:
        for seed in seeds:
            if args.stage == "arm":
                arm_stage(p, arm, seed, finetune, args.llm, args.override, threads=args.threads)
            else:
                test_stage(p, arm.name, seed, args.llm if args.rescore else None)


if __name__ == "__main__":
    main()
