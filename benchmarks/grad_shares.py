#!/usr/bin/env python
"""Each objective's push on the encoder at a given set of weights: the table behind "which terms act?".

Builds the model of a config with the chosen objectives on (their YAML defaults, or the evidence benchmark's
arm settings), optionally starting from a trained ``.nemo`` (as ``init_from_nemo_model`` does: every matching
weight; the objectives' own heads stay freshly initialised, as at fine-tuning step 0), then on a few real batches
differentiates each weighted term alone with the model's own ``_grad_shares`` (the code behind
``model.grad_shares``). Reported per term, mean over batches [min, max]: |g_i| / |g_ctc_final| over the encoder's
parameters (independent of which other terms are on), the share |g_i| / Σ_j |g_j| among the terms on, and the
cosine with ``ctc_final``'s gradient.

    python -m benchmarks.grad_shares --tokenizer T --manifest M --terms recipe --json docs/results/grad_shares_demo.json
    python -m benchmarks.grad_shares --tokenizer T --manifest M --terms evidence --init base.nemo --json ...

``--terms``: ``recipe`` (every objective block of the config at its YAML weight; ``token_contrastive`` in its
YAML mode), ``evidence`` (the arms of ``benchmarks/evidence/run.py`` at their settings, ``simclr`` for
``token_contrastive``), or a comma-separated list of objective blocks at their YAML defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmarks.bench_step import REPO, build, load_batch

NEEDS_MLM = "mlm"  # reads model.objectives.mlm.model_dir: on only with --mlm-dir
SKIP_IN_RECIPE = {"ctc_final", "interctc"}  # the CTC heads are always on


def portable(arg: str) -> str:
    """A command-line argument with this machine's folders left out (paths outside the repository: file name)."""
    key, sep, value = arg.rpartition("=") if arg.startswith("-") and "=" in arg else ("", "", arg)
    if os.path.isabs(value):
        value = os.path.relpath(value, REPO) if value.startswith(REPO + os.sep) else f"<{os.path.basename(value)}>"
    return key + sep + value


def term_overrides(cfg_objectives, terms: str, mlm_dir: str) -> List[str]:
    """Hydra overrides turning the chosen objectives on."""
    from benchmarks.evidence.run import ARMS

    if terms == "evidence":
        out: List[str] = []
        for arm in ARMS.values():
            name = arm.objective()
            if name is None or name == "llm_pseudo_label" or arm.name == "byol" or (name == NEEDS_MLM and not mlm_dir):
                continue  # the pseudo-label arms have no term of their own; byol shares simclr's block
            out += arm.overrides
    else:
        names = [n for n in cfg_objectives if n not in SKIP_IN_RECIPE] if terms == "recipe" else terms.split(",")
        unknown = [n for n in names if n not in cfg_objectives]
        if unknown:
            raise SystemExit(f"--terms: unknown objective blocks {unknown}; known: {sorted(cfg_objectives)}")
        names = [n for n in names if n != NEEDS_MLM or mlm_dir]
        out = [f"model.objectives.{n}.enabled=true" for n in names]
    if mlm_dir:
        out.append(f"model.objectives.mlm.model_dir={mlm_dir}")
    return out


def init_from(model, path: str) -> Dict[str, int]:
    """Copy every weight of the ``.nemo`` at ``path`` whose name and shape match (init_from_nemo_model's rule)."""
    from nemo.collections.asr.models import ASRModel

    src = ASRModel.restore_from(path, map_location="cpu").state_dict()
    own = model.state_dict()
    match = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(match, strict=False)
    fresh = sorted(k for k in own if k not in match)
    outside = [k for k in fresh if not k.startswith("objectives.")]  # anything but an objective's own head
    return {"loaded": len(match), "fresh": len(fresh), "fresh_outside_objectives": outside}


def measure(model, batches) -> Dict[str, Dict[str, List[float]]]:
    """Per term: its weight, |g_i|/|g_ctc_final|, share and cosine on every batch."""
    from nemo_ctcllm.objectives import compose_loss

    out: Dict[str, Dict[str, List[float]]] = {}
    for batch in batches:
        ctx = model.step_context(batch, compute_wer=False)
        weighted: Dict[str, torch.Tensor] = {}
        compose_loss(model.objectives, ctx, step=10**6, prefix="train", weighted=weighted)  # past any warm-up
        logs = model._grad_shares(weighted, ctx)
        ref = float(logs["train/grad_norm/ctc_final"])
        for name in model.objectives:
            row = out.setdefault(name, {"ratio": [], "share": [], "cos": []})
            row["ratio"].append(float(logs[f"train/grad_norm/{name}"]) / ref)
            row["share"].append(float(logs[f"train/grad_share/{name}"]))
            row["cos"].append(float(logs.get(f"train/grad_cos/{name}", float("nan"))))
        model.zero_grad(set_to_none=True)
    return out


def table(rows: Dict[str, Dict[str, List[float]]], weights: Dict[str, float]) -> str:
    def cell(xs, scale=1.0, fmt="{:.2f}"):
        m = statistics.mean(xs) * scale
        return f"{fmt.format(m)} [{fmt.format(min(xs) * scale)}, {fmt.format(max(xs) * scale)}]"

    lines = [
        "| term | weight | ‖g‖ / ‖g_ctc_final‖ % | share of Σ‖g‖ % | cos with ctc_final |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(rows, key=lambda n: -statistics.mean(rows[n]["ratio"])):
        r = rows[name]
        lines.append(
            f"| {name} | {weights.get(name, float('nan')):g} | {cell(r['ratio'], 100, '{:.3g}')} |"
            f" {cell(r['share'], 100, '{:.3g}')} | {cell(r['cos'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-name", default="conformer_ctc_llm_demo")
    ap.add_argument("--override", action="append", default=[], help="Hydra override (repeatable)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--manifest", required=True, help="real audio with text; batches drawn from it")
    ap.add_argument("--terms", default="recipe")
    ap.add_argument("--init", default=None, help="a trained .nemo to start from (fine-tuning step 0)")
    ap.add_argument("--llm", default=os.path.join(REPO, "artifacts", "llm", "smollm2-135m"))
    ap.add_argument("--mlm-dir", default=None, help="the mlm objective's masked LM (without it mlm is left off)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import nemo_ctcllm  # noqa: F401

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        base = compose(config_name=args.config_name, overrides=[f"model.tokenizer.dir={args.tokenizer}"]).model
        overrides = term_overrides(base.objectives, args.terms, args.mlm_dir)
        cfg = compose(
            config_name=args.config_name,
            overrides=[
                f"model.tokenizer.dir={args.tokenizer}",
                f"model.llm.checkpoint={args.llm}",
                *overrides,
                *args.override,
            ],
        ).model
    objectives = OmegaConf.to_container(cfg.objectives, resolve=True)
    model = build(cfg, objectives)  # seed 0, train mode
    loaded = init_from(model, args.init) if args.init else None
    model.train()
    weights = {n: float(getattr(o, "weight", float("nan"))) for n, o in model.objectives.items()}
    batches = []
    for i in range(args.batches):
        signal, lens, texts = load_batch(args.manifest, args.batch_size, seed=i)
        ids = [model.tokenizer.text_to_ids(t) for t in texts]
        targets = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)  # [B, U]
        for j, t in enumerate(ids):
            targets[j, : len(t)] = torch.tensor(t)
        batches.append((signal, lens, targets, torch.tensor([len(t) for t in ids])))
    torch.manual_seed(0)
    rows = measure(model, batches)
    text = table(rows, weights)
    print(text)
    if args.json:
        result = {
            "command": "python -m benchmarks.grad_shares "
            + " ".join(map(portable, sys.argv[1:] if argv is None else argv)),
            "config": args.config_name,
            "terms": args.terms,
            "overrides": overrides + args.override,
            "init": os.path.basename(args.init) if args.init else None,
            "init_weights": loaded,
            "batches": args.batches,
            "batch_size": args.batch_size,
            "weights": weights,
            "per_batch": rows,
            "table": text,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
