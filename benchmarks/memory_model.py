#!/usr/bin/env python
"""Per-GPU memory model of the recipe (conf/conformer_ctc_llm.yaml with llm_prefix_clm on): a planning tool.

It lives in ``benchmarks/`` because nothing in training calls it: it predicts, from shapes, what one training
step holds on one GPU, and is checked against CPU measurements at small shapes (``check``).

    python -m benchmarks.memory_model table            # 1B / 8B x TP 1/2/4/8, the "Memory per GPU" table
    python -m benchmarks.memory_model check            # predicted vs measured CPU peaks: tiny random LLaMAs
                                                       # and SmolLM2-135M (artifacts/llm/smollm2-135m) if there
    torchrun --nproc-per-node 2 -m benchmarks.memory_model check --tp 2 --real ""   # the same at TP=2, gloo
    python -m benchmarks.memory_model fit              # re-fit the LLM working-set constants (FIT_SHAPES)
    python -m benchmarks.memory_model encoder          # re-fit the encoder constants (ENC_POINTS)
    python -m benchmarks.memory_model encoder-check    # the full 18-block encoder at 10 and 20 s (ENC_CHECK)

**LLM activations of one prefix block** (``llm_prefix_clm`` runs the LLM once per block and keeps every
block's graph until the one backward). The LLM runs on the batch gathered over the TP group: T = N * t tokens
(t: this GPU's padded tokens, N: TP size), rows padded to length S. Bytes saved for backward per token and
layer (counted with ``torch.autograd.graph.saved_tensors_hooks`` on megatron's local LLaMA layer; frozen
linears save no input, ``LinearWithFrozenWeight``):

    s_layer = 2 (4H + 4)                       two RMSNorm inputs, kept in fp32, + rstd     (replicated)
            + (4 F / N) b                      fc1 output [T, 2F/N] + two [T, F/N] (SwiGLU)  (split)
            + (3 nq d / N) b                   q, k, v (k, v expanded to the nq heads)       (split)
            + (nq / N) S (4 + b [b != 4])      fp32 softmax + probs in b                     (split)
    final  = 4H + 4 (final norm) + 4 V / N (fp32 softmax of the vocab-parallel loss) + S (bool mask)

with b the LLM's bytes per element (bf16: 2). Peak of one block's forward + backward (bytes / T):

    recompute off:  max( n s_layer + final + b V / N [b != 4],        the loss: bf16 logits beside the fp32 copy
                         n s_layer + S + W_off )                      the last layer's backward
    recompute on:   max( n H b + final + b V / N [b != 4],
                         n H b + S + s_layer + W_on )                 one layer re-run and its backward
    W = c_F (F / N) b + c_S (nq / N) S 4 + c_H4 4 H + c_Hb H b      working set of one layer's backward

c_F, c_S, c_H4, c_Hb (FIT_OFF / FIT_ON below) are non-negative least-squares fits to CPU peaks of one-layer,
vocab-32 tiny models (``fit``); everything else is counted. With K blocks alive, the kept part is K times, the
working set once.

**Encoder** (Conformer, bf16-mixed or fp32): weights + grads + AdamW's two moments = 16 bytes per parameter
(fp32 master weights also under bf16-mixed); activations per encoder frame = e_pre + n_enc (e_lin + e_att S_enc),
S_enc the longest utterance in encoder frames (ENC_* below, fitted on CPU peaks of NeMo's ConformerEncoder at
d_model 256, 4 heads). CTC heads, connectors and the prompts are small (< 1 % at the recipe) and left out.

Every GPU number this prints is a prediction from CPU measurements, not a GPU measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
MiB = 2**20

# Working set of one layer's backward, in units of T (F/N) b, T (nq/N) S 4, T 4H and T H b bytes: `python -m
# benchmarks.memory_model fit` on FIT_SHAPES (one layer, vocab 32, fp32 and bf16) on this project's CPU machine.
FIT_OFF = {"c_F": 1.8, "c_S": 0.0, "c_H4": 5.52, "c_Hb": 1.08}
FIT_ON = {"c_F": 3.78, "c_S": 0.42, "c_H4": 8.09, "c_Hb": 11.97}

# Conformer encoder activations (bytes): `python -m benchmarks.memory_model encoder`, least squares over
# step_peak_mib of ConformerEncoder(d_model 256, 4 heads, dw_striding 4x) forward + backward on CPU (ENC_POINTS:
# 2 and 4 layers, batch 4-16, 4 and 8 s; fp32, and bf16 under torch.autocast as bf16-mixed):
#   per encoder frame: e_pre (subsampling, input side) + layers * (e_lin + e_att * S_enc)
ENC_FP32 = {"e_pre": 234e3, "e_lin": 51.1e3, "e_att": 47.6}
ENC_BF16 = {"e_pre": 123e3, "e_lin": 24.3e3, "e_att": 26.6, "w0": 4.14e6}  # w0: autocast's bf16 weight copies,
# bytes per block (fit_encoder's w0; ~2 B per parameter): in encoder_bytes' states as 2 B per parameter
ENC_D_MODEL, ENC_HEADS = 256, 4  # the shape those were fitted at; scaled by d_model and heads elsewhere


@dataclass(frozen=True)
class LlmShape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True

    @classmethod
    def from_config(cls, cfg: dict) -> "LlmShape":
        """From a Hugging Face LLaMA config.json dict."""
        H, nq = cfg["hidden_size"], cfg["num_attention_heads"]
        return cls(
            layers=cfg["num_hidden_layers"],
            hidden=H,
            ffn=cfg["intermediate_size"],
            heads=nq,
            kv_heads=cfg.get("num_key_value_heads", nq),
            head_dim=cfg.get("head_dim") or H // nq,
            vocab=cfg["vocab_size"],
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_folder(cls, folder) -> "LlmShape":
        return cls.from_config(json.loads((Path(folder) / "config.json").read_text()))

    @property
    def params(self) -> int:
        """P = V H (1 + untied) + n (H (nq + 2 nkv) d + nq d H + 3 H F + 2 H) + H."""
        H, d = self.hidden, self.head_dim
        layer = H * (self.heads + 2 * self.kv_heads) * d + self.heads * d * H + 3 * H * self.ffn + 2 * H
        return self.vocab * H * (1 if self.tied else 2) + self.layers * layer + H


def llm_saved_per_layer(shape: LlmShape, seq: int, tp: int, b: int) -> dict:
    """Bytes per token one layer saves for backward (docstring, s_layer): replicated and TP-split parts."""
    H, F, nq, d = shape.hidden, shape.ffn, shape.heads, shape.head_dim
    split = 4 * F / tp * b + 3 * nq * d / tp * b + nq / tp * seq * (4 + (b if b != 4 else 0))
    return {"replicated": 2 * (4 * H + 4), "split": split}


def llm_block_bytes(shape: LlmShape, tokens: int, seq: int, tp: int, b: int, recompute: bool) -> dict:
    """One prefix block: ``kept`` (bytes held until backward), ``work`` (the extra at its peak), over T = tokens
    (the TP group's gathered, padded tokens), rows of length ``seq``. Peak of K blocks = K kept + work."""
    H, V, n = shape.hidden, shape.vocab, shape.layers
    s = llm_saved_per_layer(shape, seq, tp, b)
    s_layer = s["replicated"] + s["split"]
    final = 4 * H + 4 + 4 * V / tp + seq
    logits_copy = b * V / tp if b != 4 else 0.0
    c = FIT_ON if recompute else FIT_OFF
    W = c["c_F"] * shape.ffn / tp * b + c["c_S"] * shape.heads / tp * seq * 4 + c["c_H4"] * 4 * H + c["c_Hb"] * H * b
    if recompute:  # each layer's input kept; in backward one layer is re-run (s_layer) and back-propagated (W)
        kept = n * H * b + final
        layer_peak = seq + s_layer + W - final  # the loss's tensors (final) are freed by then; the mask is not
    else:
        kept = n * s_layer + final
        layer_peak = seq + W - final
    return {
        "kept": tokens * kept,
        "work": tokens * max(logits_copy, layer_peak),  # the loss's peak, or a layer's backward
        "replicated": tokens * (n * (H * b if recompute else s["replicated"]) + 4 * H + 4 + seq),
    }


def llm_peak_bytes(shape, tokens, seq, tp, b, recompute, blocks=1) -> float:
    """Peak bytes of ``blocks`` prefix blocks' forwards then one backward: blocks * kept + work."""
    r = llm_block_bytes(shape, tokens, seq, tp, b, recompute)
    return blocks * r["kept"] + r["work"]


def encoder_bytes(params: int, frames: int, longest: int, layers: int, d_model: int, heads: int, bf16: bool) -> dict:
    """Encoder: ``states`` = 16 B / parameter (fp32 weight, grad, AdamW m and v; + 2 B for autocast's bf16
    weight copies under bf16-mixed); ``activations`` =
    frames * (e_pre + layers (e_lin + e_att longest)), e_* scaled by d_model / 256 (e_att by heads / 4)."""
    e = ENC_BF16 if bf16 else ENC_FP32
    k = d_model / ENC_D_MODEL
    per_frame = k * e["e_pre"] + layers * (k * e["e_lin"] + heads / ENC_HEADS * e["e_att"] * longest)
    return {"states": (18 if bf16 else 16) * params, "activations": frames * per_frame}


# ----------------------------------------------------------------------------- the recipe


@dataclass
class Recipe:
    """What the memory depends on, with the recipe's defaults (conf/conformer_ctc_llm.yaml)."""

    audio_s: float = 600.0  # model.train_ds.batch_duration: seconds of audio per GPU per step
    max_duration: float = 20.0  # model.train_ds.max_duration: the longest utterance (sets the padded length)
    blocks: int = 3  # len(llm_prefix_clm.blocks)
    stack: int = 8  # llm_prefix_clm.stack
    recompute: bool = False  # model.llm.activation_recompute
    enc_fps: float = 25.0  # 100 mel frames/s / subsampling_factor 4
    text_tps: float = 3.5  # LLM transcript tokens per second of speech (assumed: ~2.7 words/s x 1.3 tokens/word)
    extra_tokens: int = 2  # BOS + EOS per row (instruction "" adds none)
    enc_params: int = 30_000_000  # Conformer-M, d_model 256, 18 layers (about 30 M with the heads)
    enc_layers: int = 18
    enc_d_model: int = 256
    enc_heads: int = 4
    enc_bf16: bool = True  # trainer.precision=bf16-mixed (the recipe's default 32 is fp32: see table notes)
    llm_bytes: int = 2  # bf16 LLM parameters and activations on GPU (LLMHost's default there)

    def row_tokens(self, seconds: float) -> float:
        """LLM row length of an utterance: BOS + ceil(seconds * fps / stack) + transcript + EOS."""
        return math.ceil(seconds * self.enc_fps / self.stack) + seconds * self.text_tps + self.extra_tokens


def recipe_memory(shape: LlmShape, tp: int, r: Recipe) -> dict:
    """Per-GPU breakdown in GB. Rows padded to the longest utterance (buckets keep lengths close; worst case:
    every row max_duration long), so this GPU's LLM tokens t = audio_s / max_duration rows * row length and
    the gathered T = tp * t."""
    seq = math.ceil(r.row_tokens(r.max_duration))
    rows = r.audio_s / r.max_duration
    T = tp * rows * seq
    blk = llm_block_bytes(shape, T, seq, tp, r.llm_bytes, r.recompute)
    enc_frames = r.audio_s * r.enc_fps
    enc = encoder_bytes(
        r.enc_params, enc_frames, r.max_duration * r.enc_fps, r.enc_layers, r.enc_d_model, r.enc_heads, r.enc_bf16
    )
    out = {
        "encoder_states": enc["states"],
        "encoder_activations": enc["activations"],
        "llm_weights": shape.params * r.llm_bytes / tp,
        "llm_act_per_block": blk["kept"],
        "llm_act_replicated_per_block": blk["replicated"],
        "llm_work": blk["work"],
    }
    out["llm_activations"] = r.blocks * blk["kept"] + blk["work"]
    out["total"] = out["encoder_states"] + out["encoder_activations"] + out["llm_weights"] + out["llm_activations"]
    out = {k: v / GB for k, v in out.items()}
    out["llm_tokens_per_block"] = T
    return out


# ----------------------------------------------------------------------------- measurement (CPU)


def measure_llm_peak_mib(folder, batch: int, seq: int, dtype: str, recompute: bool, tp: int = 1) -> float:
    """CPU peak allocation (MiB) of one ``forward_embeds`` + backward to the input embeddings [batch, seq, H],
    by ``benchmarks.bench_step.step_peak_mib``. Builds an :class:`LLMHost` over ``folder`` at TP=``tp`` (tp > 1:
    under torchrun with a gloo group; every rank gets the same batch, as after prefix_clm's gather)."""
    import torch
    from megatron.core import parallel_state

    from benchmarks.bench_step import step_peak_mib
    from nemo_ctcllm.llm import LLMHost

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    host = LLMHost(folder, tp_size=tp, params_dtype=dt, activation_recompute=recompute)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, seq, host.hidden_size, generator=g) * 0.02).to(dt).requires_grad_(True)  # [B, S, H]
    labels = torch.randint(3, host.vocab_size, (batch, seq), generator=g)  # [B, S]

    def step():
        x.grad = None
        host.forward_embeds(x, labels)[1].backward()

    step()  # warm-up: lazy buffers (RoPE tables, megatron's globals) are not the step's
    peak = step_peak_mib(step)
    parallel_state.destroy_model_parallel()
    return peak


def predict_llm_peak_mib(folder, batch, seq, dtype, recompute, tp: int = 1) -> float:
    shape = LlmShape.from_folder(folder)
    return llm_peak_bytes(shape, batch * seq, seq, tp, {"fp32": 4, "bf16": 2}[dtype], recompute) / MiB


# tiny shapes: (hidden, ffn, layers, heads, kv_heads, vocab, batch, seq)
FIT_SHAPES = [
    (64, 96, 1, 4, 2, 32, 4, 64),
    (64, 512, 1, 4, 2, 32, 4, 64),
    (128, 256, 1, 8, 2, 32, 8, 32),
    (64, 128, 1, 2, 2, 32, 4, 128),
    (256, 128, 1, 4, 4, 32, 4, 32),
]
CHECK_SHAPES = [
    (64, 96, 8, 4, 2, 128, 4, 64),
    (96, 384, 4, 6, 2, 1024, 4, 48),
    (128, 256, 6, 8, 4, 512, 8, 32),
    (64, 192, 12, 4, 2, 2048, 2, 96),
]


def tiny_folder(root: Path, s) -> str:
    """A random tiny LLaMA folder of shape ``s`` (tests/conftest.py's make_tiny_llama)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_llama

    H, F, n, nq, nkv, V = s[:6]
    folder = root / f"llama_{H}_{F}_{n}_{nq}_{nkv}_{V}"
    if not (folder / "config.json").is_file():
        make_tiny_llama(
            folder, hidden_size=H, intermediate_size=F, num_hidden_layers=n, num_attention_heads=nq,
            num_key_value_heads=nkv, vocab_size=V, max_position_embeddings=1024,
        )  # fmt: skip
    return str(folder)


def measure_rows(shapes, root: Path, tp: int = 1, real: str = None):
    """Measured and predicted peaks (MiB) for each tiny shape, and for the HF folder ``real`` at batch 2 x 128,
    fp32 and bf16, recompute off and on. Under torchrun (tp > 1) rank 0 writes the folders and prints."""
    import torch.distributed as dist

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    runs = [(tiny_folder(root, s) if rank0 else None, list(s), s[6], s[7]) for s in shapes]  # folder, label, B, S
    if real and (Path(real) / "config.json").is_file():
        runs.append((real, Path(real).name, 2, 128))
    if dist.is_initialized():
        folders = [r[0] for r in runs]
        dist.broadcast_object_list(folders, src=0)
        runs = [(f, *r[1:]) for f, r in zip(folders, runs)]
    rows = []
    for folder, label, B, S in runs:
        for dtype in ("fp32", "bf16"):
            for rec in (False, True):
                m = measure_llm_peak_mib(folder, B, S, dtype, rec, tp)
                p = predict_llm_peak_mib(folder, B, S, dtype, rec, tp)
                rows.append({"shape": label, "tp": tp, "dtype": dtype, "recompute": rec, "measured": m, "predicted": p})
                if rank0:
                    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}))
    return rows


def fit(rows):
    """Non-negative least squares for (c_F, c_S, c_H4, c_Hb) per recompute mode from one-layer, vocab-32 peaks:
    on those the layer phase is the peak, so (measured - counted part) / T = c_F F b + c_S nq S 4 + c_H4 4H +
    c_Hb H b."""
    import numpy as np
    from scipy.optimize import nnls

    out = {}
    for rec in (False, True):
        A, y = [], []
        for r in rows:
            if r["recompute"] != rec:
                continue
            H, F, n, nq, nkv, V, B, S = r["shape"]
            b = {"fp32": 4, "bf16": 2}[r["dtype"]]
            shape = LlmShape(n, H, F, nq, nkv, H // nq, V)
            s = llm_saved_per_layer(shape, S, 1, b)
            s_layer = s["replicated"] + s["split"]
            counted = S + (n * H * b + s_layer if rec else n * s_layer)
            T = B * S
            A.append([F * b, nq * S * 4, 4 * H, H * b])
            y.append(r["measured"] * MiB / T - counted)
        c = nnls(np.array(A, float), np.array(y))[0]
        out["FIT_ON" if rec else "FIT_OFF"] = {k: round(float(v), 2) for k, v in zip(("c_F", "c_S", "c_H4", "c_Hb"), c)}
    return out


def measure_encoder_peak_mib(layers: int, batch: int, seconds: float, bf16: bool) -> float:
    """CPU peak allocation (MiB) of one forward + backward of the recipe's ConformerEncoder (d_model 256, 4
    heads, dw_striding 4x, rel_pos) with ``layers`` blocks on [batch, 80, 100 * seconds] features, under
    torch.autocast(cpu, bf16) when ``bf16`` (trainer.precision=bf16-mixed)."""
    import torch
    from nemo.collections.asr.modules import ConformerEncoder

    from benchmarks.bench_step import step_peak_mib

    torch.manual_seed(0)
    enc = ConformerEncoder(
        feat_in=80, n_layers=layers, d_model=256, subsampling="dw_striding", subsampling_factor=4,
        ff_expansion_factor=4, self_attention_model="rel_pos", n_heads=4, conv_kernel_size=31,
        conv_norm_type="batch_norm", dropout=0.1, dropout_pre_encoder=0.1, dropout_emb=0.0, dropout_att=0.1,
        xscaling=True, untie_biases=True, pos_emb_max_len=5000,
    ).train()  # fmt: skip
    T = int(seconds * 100)
    x, lengths = torch.randn(batch, 80, T), torch.full((batch,), T)  # [B, 80, T], [B]

    def step():  # the grads exist after the warm-up step (counted with the encoder's states, not here)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y, _ = enc(audio_signal=x, length=lengths)  # [B, 256, T/4]
        y.float().pow(2).mean().backward()

    step()
    return step_peak_mib(step)


ENC_POINTS = [(2, 4, 4.0), (4, 4, 4.0), (2, 4, 8.0), (2, 8, 4.0), (2, 16, 4.0), (4, 8, 4.0)]  # layers, batch, s


def fit_encoder():
    """Least squares for w0, e_pre, e_lin, e_att: peak = layers w0 + frames (e_pre + layers (e_lin + e_att S_enc)),
    frames = batch * S_enc encoder frames, S_enc = 25 * seconds; w0: per-layer bytes independent of the batch
    (autocast's bf16 weight copies), reported, not used (2 B per parameter, small at the recipe)."""
    import numpy as np

    out = {}
    for bf16 in (False, True):
        A, y = [], []
        for layers, batch, sec in ENC_POINTS:
            m = measure_encoder_peak_mib(layers, batch, sec, bf16)
            S_enc = 25 * sec
            frames = batch * S_enc
            A.append([layers, frames, frames * layers, frames * layers * S_enc])
            y.append(m * MiB)
            print(json.dumps({"bf16": bf16, "layers": layers, "batch": batch, "seconds": sec, "peak_mib": round(m, 2)}))
        c = np.linalg.lstsq(np.array(A), np.array(y), rcond=None)[0]
        names = ("w0", "e_pre", "e_lin", "e_att")
        out["ENC_BF16" if bf16 else "ENC_FP32"] = {k: float(f"{v:.3g}") for k, v in zip(names, c)}
    return out


ENC_CHECK = [(18, 1, 20.0), (18, 2, 10.0)]  # the recipe's 18 blocks, not in ENC_POINTS


def check_encoder():
    """Measured vs predicted encoder activation peaks (MiB) at ENC_CHECK, fp32 and bf16 autocast."""
    rows = []
    for bf16 in (False, True):
        for layers, batch, sec in ENC_CHECK:
            m = measure_encoder_peak_mib(layers, batch, sec, bf16)
            frames = batch * 25 * sec
            p = encoder_bytes(0, frames, 25 * sec, layers, 256, 4, bf16)["activations"]
            p = (p + (layers * ENC_BF16["w0"] if bf16 else 0)) / MiB  # the bf16 weight copies are in the peak
            rows.append({"bf16": bf16, "layers": layers, "batch": batch, "seconds": sec, "measured": m, "predicted": p})
            print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in rows[-1].items()}))
    return rows


# ----------------------------------------------------------------------------- the table

SHAPE_NAMES = {"llama-3.2-1b": "Llama-3.2-1B", "llama-3.1-8b": "Llama-3.1-8B"}


def table(r: Recipe) -> str:
    from benchmarks.bench_llm_load import SHAPES

    lines = [
        "| LLM | TP | recompute | encoder states | encoder act. | LLM weights | LLM act. / block (replicated) "
        "| LLM working set | LLM act., all blocks | **total GB** |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, name in SHAPE_NAMES.items():
        shape = LlmShape.from_config(SHAPES[key])
        for tp in (1, 2, 4, 8):
            for rec in (False, True):
                r.recompute = rec
                m = recipe_memory(shape, tp, r)
                lines.append(
                    f"| {name} | {tp} | {'on' if rec else 'off'} | {m['encoder_states']:.1f} "
                    f"| {m['encoder_activations']:.1f} | {m['llm_weights']:.1f} "
                    f"| {m['llm_act_per_block']:.1f} ({m['llm_act_replicated_per_block']:.1f}) "
                    f"| {m['llm_work']:.1f} | {m['llm_activations']:.1f} | **{m['total']:.1f}** |"
                )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["table", "check", "fit", "encoder", "encoder-check"])
    ap.add_argument("--audio-s", type=float, default=600.0, help="table: model.train_ds.batch_duration")
    ap.add_argument("--blocks", type=int, default=3, help="table: number of llm_prefix_clm blocks")
    ap.add_argument("--fp32-encoder", action="store_true", help="table: trainer.precision=32")
    ap.add_argument("--tp", type=int, default=1, help="check: TP size (run under torchrun with that many ranks)")
    ap.add_argument("--real", default="artifacts/llm/smollm2-135m", help="check: a real HF LLaMA folder too")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "memory_model_llms", help="tiny LLMs")
    args = ap.parse_args()
    if args.cmd == "table":
        print(table(Recipe(audio_s=args.audio_s, blocks=args.blocks, enc_bf16=not args.fp32_encoder)))
    elif args.cmd == "fit":
        print(json.dumps(fit(measure_rows(FIT_SHAPES, args.root))))
    elif args.cmd == "encoder":
        print(json.dumps(fit_encoder()))
    elif args.cmd == "encoder-check":
        check_encoder()
    else:
        import torch.distributed as dist

        if args.tp > 1:
            dist.init_process_group("gloo")
        rows = measure_rows(CHECK_SHAPES, args.root, args.tp, args.real)
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        print("| shape (H, F, n, nq, nkv, V, B, S) | TP | dtype | recompute | measured MiB | predicted MiB | error |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            err = r["predicted"] / r["measured"] - 1
            print(
                f"| {r['shape'] if isinstance(r['shape'], str) else tuple(r['shape'])} | {r['tp']} | {r['dtype']} "
                f"| {'on' if r['recompute'] else 'off'} | {r['measured']:.2f} | {r['predicted']:.2f} | {err:+.0%} |"
            )


if __name__ == "__main__":
    main()
