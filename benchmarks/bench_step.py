#!/usr/bin/env python
"""Training-step cost of objectives, as ratios to NeMo's plain EncDecCTCModelBPE, measured side by side.

Every variant gets the same weights where they overlap, the same real audio batch (from a manifest) and the
same optimizer; steps (forward + backward + AdamW step) are interleaved round-robin so that machine noise
hits all variants alike. Prints a table of median step time and its ratio to plain CTC, and of the peak
memory one step allocates (profiler allocation events; weights already held, e.g. the frozen LLM, are not
counted) and its ratio.

    python -m benchmarks.bench_step --manifest demo_data/train_manifest.json \
        --tokenizer artifacts/tokenizers/tokenizer_spe_bpe_v128 --steps 20

Encoder variants (same objectives, other config) are compared the same way with ``--arch``:

    python -m benchmarks.bench_step ... --variants interctc \
        --arch nodrop=model.encoder.dropout=0,model.encoder.dropout_pre_encoder=0,model.encoder.dropout_att=0
"""

import argparse
import json
import os
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "plain": None,  # NeMo's EncDecCTCModelBPE
    "ours_ctc_only": {"ctc_final": {"weight": 1.0}},
    "interctc": {"ctc_final": {"weight": 0.7}, "interctc": {"blocks": [3], "weights": [0.3]}},
    "interctc_selfcond": {
        "ctc_final": {"weight": 0.7},
        "interctc": {"blocks": [3], "weights": [0.3], "self_conditioning": True},
    },
    "interctc_llm_prefix_clm": {  # needs --override model.llm.checkpoint=<LLM folder>
        "ctc_final": {"weight": 0.7},
        "interctc": {"blocks": [3], "weights": [0.3]},
        "llm_prefix_clm": {"weight": 0.3, "blocks": [3, 6], "weights": [0.5, 0.5], "stack": 8},
    },
    "interctc_clip": {  # needs --override model.llm.checkpoint=<LLM folder>
        "ctc_final": {"weight": 0.7},
        "interctc": {"blocks": [3], "weights": [0.3]},
        "clip": {"weight": 0.1},
    },
    "interctc_simclr": {
        "ctc_final": {"weight": 0.7},
        "interctc": {"blocks": [3], "weights": [0.3]},
        "token_contrastive": {"mode": "simclr", "weight": 0.1},
    },
    "interctc_byol": {
        "ctc_final": {"weight": 0.7},
        "interctc": {"blocks": [3], "weights": [0.3]},
        "token_contrastive": {"mode": "byol", "weight": 0.1},
    },
    "interctc_joint_lm": {
        "ctc_final": {"weight": 0.7},
        "interctc": {"blocks": [3], "weights": [0.3]},
        "joint_lm": {"weight": 0.3},
    },
    # Hypothesis-side objectives (need --override model.llm.checkpoint=<LLM folder>): N-best search + LLM
    # scoring of N hypotheses per utterance every step. Step-time ratio for N = 4, 8, 16:
    #   --variants plain,llm_rescoring_n4,llm_rescoring_n8,llm_rescoring_n16
    **{
        f"llm_rescoring_n{n}": {"ctc_final": {"weight": 1.0}, "llm_rescoring": {"weight": 0.5, "nbest": n}}
        for n in (4, 8, 16)
    },
    "llm_reward_sample4": {"ctc_final": {"weight": 1.0}, "llm_reward": {"weight": 0.05, "num_samples": 4}},
    "llm_pseudo_label_n8": {"ctc_final": {"weight": 1.0}, "llm_pseudo_label": {"weight": 0.3, "nbest": 8}},
    "interctc_llm_lm_loss": {  # needs --override model.llm.checkpoint=<LLM folder>
        "ctc_final": {"weight": 0.7},
        "interctc": {"blocks": [3], "weights": [0.3]},
        "llm_lm_loss": {"weight": 0.1, "instruction": "Repeat:"},
    },
    "interctc_llm_lm_loss_fluency": {  # needs --override model.llm.checkpoint=<LLM folder>
        "ctc_final": {"weight": 0.7},
        "interctc": {"blocks": [3], "weights": [0.3]},
        "llm_lm_loss": {"weight": 0.1, "target": "hypothesis"},
    },
    "interctc_mlm": {  # the masked LM of `python scripts/train_mlm.py --out artifacts/mlm/bert-mlm-wordnet`
        "ctc_final": {"weight": 0.7},
        "interctc": {"blocks": [3], "weights": [0.3]},
        "mlm": {"weight": 0.1, "model_dir": os.path.join(REPO, "artifacts", "mlm", "bert-mlm-wordnet")},
    },
    "interctc_lang_contrastive": {  # needs --override model.llm.checkpoint=<LLM folder>
        "ctc_final": {"weight": 0.7},
        "interctc": {"blocks": [3], "weights": [0.3]},
        "lang_contrastive": {"weight": 0.1},
    },
}
# Not a model: the LLM's own forward + backward-to-inputs on exactly the sequences interctc_llm_prefix_clm
# feeds it (one pass per connector) -- the floor of that objective's extra cost over interctc.
FLOOR = "llm_prefix_clm_floor"
DEFAULT_VARIANTS = "plain,ours_ctc_only,interctc,interctc_selfcond"


def load_batch(manifest, n, seed=0):
    import soundfile as sf

    from nemo_ctcllm.data.manifest import read_manifest, resolve_audio_path

    entries = read_manifest(manifest)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(entries), generator=g)[:n].tolist()
    audio = [
        torch.tensor(sf.read(resolve_audio_path(entries[i]["audio_filepath"], manifest), dtype="float32")[0])
        for i in idx
    ]
    lens = torch.tensor([len(a) for a in audio])
    signal = torch.zeros(n, int(lens.max()))
    for i, a in enumerate(audio):
        signal[i, : len(a)] = a
    return signal, lens, [entries[i]["text"] for i in idx]


def build(cfg, objectives):
    from nemo.collections.asr.models import EncDecCTCModelBPE

    from nemo_ctcllm.models import EncDecCTCLLMModelBPE

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(cfg):
        for key in ("train_ds", "validation_ds", "test_ds"):
            cfg.pop(key)  # batches come from load_batch
        if objectives is None:
            cfg.pop("objectives")
        else:
            cfg.objectives = objectives
    torch.manual_seed(0)
    model = EncDecCTCModelBPE(cfg) if objectives is None else EncDecCTCLLMModelBPE(cfg)
    model.train()
    return model


def step_fn(model, batch, plain):
    signal, lens, targets, target_len = batch
    if plain:
        log_probs, enc_len, _ = model.forward(input_signal=signal, input_signal_length=lens)
        return model.loss(log_probs=log_probs, targets=targets, input_lengths=enc_len, target_lengths=target_len)
    from nemo_ctcllm.objectives import compose_loss

    ctx = model.step_context(batch, compute_wer=False)
    weighted = {} if getattr(model, "_grad_share_every", 0) else None  # model.grad_shares: a logging step
    loss = compose_loss(model.objectives, ctx, step=10**6, prefix="train", weighted=weighted)[0]
    if weighted is not None:
        model._grad_shares(weighted, ctx)
    return loss


def llm_floor_step(model, batch):
    """A step function running only the LLM part of ``model``'s llm_prefix_clm on this batch's sequences."""
    from nemo_ctcllm.objectives.shared.prefix import build_sequences
    from nemo_ctcllm.objectives.shared.tensors import transcripts

    term = model.objectives["llm_prefix_clm"]
    with torch.no_grad():
        ctx = model.step_context(batch, compute_wer=False)
        seqs = [
            build_sequences(model.llm, *term.prompt(ctx, k), transcripts(ctx), term.instruction) for k in term.blocks
        ]  # per connector: embeds [B, L, H], labels [B, L], lengths [B]

    def step():
        for embeds, labels, lengths in seqs:
            x = embeds.detach().requires_grad_(True)
            _, loss = model.llm.forward_embeds(x, labels, lengths=lengths)
            loss.backward()

    return step


def step_peak_mib(step) -> float:
    """Peak CPU memory allocated by PyTorch during one call of ``step()`` above what was allocated before it
    (activations, gradients, optimizer state growth; not the weights already held), from the profiler's
    allocation events in time order: each op's own allocations at its start, frees where they happen."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    timeline = []
    for e in prof.events():
        mem = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if mem:
            timeline.append((e.time_range.start if mem > 0 else e.time_range.end, mem))
    current = peak = 0
    for _, mem in sorted(timeline):
        current += mem
        peak = max(peak, current)
    return peak / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-name", default="conformer_ctc_llm_demo")
    p.add_argument("--override", action="append", default=[], help="Hydra override (repeatable)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, first is the baseline; from {list(VARIANTS)}"
    )
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="run every step under torch.autocast(bfloat16), as trainer.precision=bf16-mixed does",
    )
    p.add_argument(
        "--arch",
        action="append",
        default=[],
        metavar="NAME=OVERRIDE[,OVERRIDE...]",
        help="extra variant: the first --variants entry's objectives with these Hydra overrides",
    )
    args = p.parse_args()

    import nemo_ctcllm  # noqa: F401

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))

    def config(extra=()):
        with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
            return compose(
                config_name=args.config_name,
                overrides=[f"model.tokenizer.dir={args.tokenizer}", *args.override, *extra],
            ).model

    names = [n for n in args.variants.split(",") if n != FLOOR]
    floor = FLOOR in args.variants.split(",")
    if floor and "interctc_llm_prefix_clm" not in names:
        p.error(f"--variants {FLOOR} needs interctc_llm_prefix_clm too")
    models = {n: build(config(), VARIANTS[n]) for n in names}
    plain = {n: VARIANTS[n] is None for n in names}
    for spec in args.arch:
        name, _, overrides = spec.partition("=")
        models[name] = build(config(overrides.split(",")), VARIANTS[names[0]])
        plain[name] = plain[names[0]]
    names = list(models)
    signal, lens, texts = load_batch(args.manifest, args.batch)
    tok = models[names[0]].tokenizer
    ids = [tok.text_to_ids(t) for t in texts]
    targets = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for i, t in enumerate(ids):
        targets[i, : len(t)] = torch.tensor(t)
    batch = (signal, lens, targets, torch.tensor([len(t) for t in ids]))
    opts = {n: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4) for n, m in models.items()}

    def one_step(n):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = step_fn(models[n], batch, plain=plain[n])
        loss.backward()
        opts[n].step()
        opts[n].zero_grad(set_to_none=True)

    steps = {n: (lambda n=n: one_step(n)) for n in names}
    if floor:
        steps[FLOOR] = llm_floor_step(models["interctc_llm_prefix_clm"], batch)
        names.append(FLOOR)
    times = {n: [] for n in names}
    for it in range(args.warmup + args.steps):
        for n in names:
            t0 = time.perf_counter()
            steps[n]()
            dt = time.perf_counter() - t0
            if it >= args.warmup:
                times[n].append(dt)
    peaks = {n: step_peak_mib(steps[n]) for n in names}
    base = statistics.median(times[names[0]])
    audio_s = float(lens.sum()) / 16000
    print(f"batch: {args.batch} utterances, {audio_s:.1f} s of audio; {args.steps} timed steps each, interleaved")
    print(f"{'variant':<26} {'median s/step':>14} {'ratio':>7} {'step peak MiB':>14} {'ratio':>7} {'params (M)':>11}")
    results = {}
    for n in names:
        med = statistics.median(times[n])
        params = sum(q.numel() for q in models[n].parameters() if q.requires_grad) / 1e6 if n in models else 0.0
        peak_ratio = peaks[n] / peaks[names[0]]
        results[n] = {
            "median_s": med,
            "ratio": med / base,
            "params_m": params,
            "peak_mib": peaks[n],
            "peak_ratio": peak_ratio,
        }
        print(f"{n:<26} {med:>14.3f} {med / base:>7.3f} {peaks[n]:>14.0f} {peak_ratio:>7.2f} {params:>11.2f}")
    if floor and "interctc" in times:
        extra = statistics.median(times["interctc_llm_prefix_clm"]) - statistics.median(times["interctc"])
        results[FLOOR]["objective_extra_s"] = extra
        print(
            f"llm_prefix_clm costs {extra:.3f} s/step over interctc; its floor (LLM fwd + bwd-to-inputs on the "
            f"same sequences) is {statistics.median(times[FLOOR]):.3f} s: "
            f"{extra / statistics.median(times[FLOOR]):.2f}x the floor"
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {"batch": args.batch, "audio_s": audio_s, "steps": args.steps, "bf16": args.bf16, "results": results},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
