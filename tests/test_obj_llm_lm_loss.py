"""``llm_lm_loss``: the soft CTC hypothesis (bridge) read by the frozen LLM.

Gradient path (encoder, never the LLM) for both targets and an intermediate head, overfitting one batch,
padding invariance, TP=2 vs TP=1 (torchrun, gloo), export, config errors, and SmolLM2: the reference is
cheaper after the right hypothesis than after another sentence, a real hypothesis more fluent than scrambled.
"""

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LLM_CORPUS, encoder_gradient, overfit, tiny_model_cfg
from gradcheck import assert_gradient_matches_finite_differences, peaked_context
from obj_tp_worker import asr_batch, launch
from softtext_tp_worker import VARIANTS, softtext_inputs

from nemo_ctcllm.export import strip_for_inference
from nemo_ctcllm.models import EncDecCTCLLMModelBPE
from nemo_ctcllm.objectives import ConfigError, compose_loss
from nemo_ctcllm.objectives.llm_lm_loss import llm_lm_loss
from nemo_ctcllm.objectives.shared.bridge import PieceMap, asr_pieces, bridge

KEY = "model.objectives.llm_lm_loss"
WORKER = Path(__file__).resolve().parent / "softtext_tp_worker.py"


def make(tokenizer_dir, checkpoint, interctc=None, **block):
    objectives = {"llm_lm_loss": block}
    if interctc:
        objectives["interctc"] = {"blocks": [interctc], "weights": [0.5]}
    cfg = tiny_model_cfg(tokenizer_dir, **objectives)
    cfg.llm = {"checkpoint": checkpoint}
    torch.manual_seed(0)
    return EncDecCTCLLMModelBPE(cfg)


def nonblank_batch(model, texts=LLM_CORPUS[:3]):
    """A batch through the random tiny encoder, with the final head's blank logit lowered so that the greedy
    hypothesis is not empty (a random CTC head predicts blank almost everywhere)."""
    with torch.no_grad():
        model.decoder.decoder_layers[0].bias[-1] -= 5.0
    return asr_batch(model, texts)


@pytest.mark.parametrize(
    "target,estimator,head",
    [("reference", "expected", None), ("hypothesis", "gumbel", None), ("reference", "straight_through", 2)],
)
def test_gradient_reaches_encoder_not_llm(tokenizer_dir, tiny_bpe_llm, target, estimator, head, llm_process_group):
    model = make(tokenizer_dir, tiny_bpe_llm, interctc=head, target=target, estimator=estimator, head_block=head)
    model.train()
    if head:
        with torch.no_grad():
            model.objectives[f"interctc_l{head}"].decoder.decoder_layers[0].bias[-1] -= 5.0
    ctx = model.step_context(nonblank_batch(model), compute_wer=False)
    _, logs = compose_loss(model.objectives, ctx, step=0, prefix="train")
    assert float(logs["train/llm_lm_loss_hyp_tokens"]) >= 2 and 0.5 < float(logs["train/llm_lm_loss"]) < 20
    term = model.objectives["llm_lm_loss"]
    loss, _ = term(ctx)  # this term alone
    loss.backward()
    assert encoder_gradient(model) > 0
    if head:  # through the intermediate head only: the final decoder gets nothing from this term
        assert model.objectives[f"interctc_l{head}"].decoder.decoder_layers[0].weight.grad.abs().sum() > 0
        assert model.decoder.decoder_layers[0].weight.grad is None
        assert model.encoder.layers[3].feed_forward1.linear1.weight.grad is None  # above block 2
    else:
        assert model.decoder.decoder_layers[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm.llm_parameters())
    assert list(term.parameters()) == [] and term.state_dict() == {}  # the piece map is never saved


@pytest.mark.parametrize("target,estimator", [("reference", "expected"), ("hypothesis", "gumbel")])
def test_gradient_matches_finite_differences(tokenizer_dir, tiny_bpe_llm, target, estimator, llm_process_group):
    """d loss / d CTC log-probs [B, T, V+1] against central differences along 3 random directions and the
    gradient's own, for each target (the reference after the soft hypothesis and an instruction; the soft
    hypothesis itself) and a smooth estimator (``expected``; ``gumbel`` in training mode, whose noise comes from
    the global RNG, re-seeded before every evaluation).

    Everything is float64 (posteriors, bridge, LLM) except megatron's cross entropy, which casts the logits to
    float32 (see llm_prefix_clm's test): the step (3e-2) and the tolerances are sized for that.
    ``straight_through`` is not here: its forward is the greedy one-hot embedding, piecewise constant in the
    posteriors (a finite difference is 0); its backward is the bridge's (test_bridge.py).

    Catches a ``.detach()`` on the soft embeddings where each target reads them (``prefix_clm``'s prompt in
    ``llm_lm_loss``, the rows of ``hypothesis_clm``) and on the Gumbel relaxation's q (bridge ``soft_embed``)."""
    instruction = "hello" if target == "reference" else ""
    model = make(tokenizer_dir, tiny_bpe_llm, target=target, estimator=estimator, instruction=instruction)
    model.train()
    term = model.objectives["llm_lm_loss"]
    ctx, log_probs = peaked_context(model, tiny_bpe_llm)

    def loss_fn():
        torch.manual_seed(0)  # the same Gumbel noise
        return term(ctx)[0]

    assert_gradient_matches_finite_differences(loss_fn, {"log_probs": log_probs}, eps=3e-2, atol=1e-4, rtol=1e-2)


def test_gumbel_is_deterministic_out_of_training(tokenizer_dir, tiny_bpe_llm, llm_process_group):
    """Validation draws no Gumbel noise: the loss is the ``expected`` estimator's, every time."""
    model = make(tokenizer_dir, tiny_bpe_llm, estimator="gumbel", gumbel_tau=0.5)
    model.eval()
    term = model.objectives["llm_lm_loss"]
    with torch.no_grad():
        ctx = model.step_context(nonblank_batch(model), compute_wer=False)
        first, second = term(ctx)[0], term(ctx)[0]
        term.reader.estimator = "expected"
        expected = term(ctx)[0]
        term.reader.estimator = "gumbel"
        term.train()
        noisy = term(ctx)[0]
    assert first == second == expected and noisy != expected


def test_overfits_one_batch(tokenizer_dir, tiny_bpe_llm, llm_process_group):
    """30 Adam steps on the final head's logits (a free tensor; the encoder's gradient is checked above) lower
    the reference loss: the hypothesis is pushed towards what makes the reference predictable."""
    model = make(tokenizer_dir, tiny_bpe_llm)
    model.train()
    term = model.objectives["llm_lm_loss"]
    with torch.no_grad():
        ctx = model.step_context(nonblank_batch(model), compute_wer=False)
    logits = torch.nn.Parameter(ctx.log_probs.clone())  # [B, T, V+1]
    losses, _ = overfit(
        lambda: term(dataclasses.replace(ctx, log_probs=logits.log_softmax(-1))), [logits], steps=20, lr=0.5
    )
    # a random tiny LLM is near uniform (ln 320 = 5.77): it barely conditions on its input, so only a few %
    assert losses[-1] < 0.98 * losses[0], losses


def test_padding_invariance(tokenizer_dir, tiny_bpe_llm, llm_process_group):
    """Frames past an utterance's length never matter, and the batch loss is the token-level mean of the
    utterances' own losses."""
    model = make(tokenizer_dir, tiny_bpe_llm)
    host = model.llm
    pmap = PieceMap.build(*asr_pieces(model.tokenizer), host.tokenizer, host.embed)
    log_probs, lengths, texts = softtext_inputs(1, model.tokenizer.vocab_size)  # [3, 12, V+1]
    noisy = log_probs.clone()
    for b, n in enumerate(lengths.tolist()):
        noisy[b, n:] = torch.randn(12 - n, noisy.shape[2]).log_softmax(-1)
    with torch.no_grad():
        for target in ("reference", "hypothesis"):

            def loss(lp, lens, txt):
                return llm_lm_loss(host, bridge(lp, lens, pmap), txt, target, pmap.first_token, "hello")

            batched = loss(noisy, lengths, texts)
            torch.testing.assert_close(batched, loss(log_probs, lengths, texts))
            alone = [
                loss(log_probs[b : b + 1, :n], lengths[b : b + 1], texts[b : b + 1])
                for b, n in enumerate(lengths.tolist())
            ]
            soft = bridge(log_probs, lengths, pmap)
            if target == "reference":
                ids = host.tokenizer([" " + t for t in texts], add_special_tokens=False)["input_ids"]
                counts = [len(x) + 1 for x in ids]  # transcript + EOS
            else:
                counts = [int(n) for n in soft.lengths]
            counts = torch.tensor(counts, dtype=torch.float)
            torch.testing.assert_close(batched, (torch.stack(alone) * counts).sum() / counts.sum(), msg=target)


def test_tp2_matches_tp1(tokenizer_dir, tiny_bpe_llm, tmp_path, llm_process_group):
    if torch.cuda.is_available():
        pytest.skip("the worker runs gloo on CPU")
    model = make(tokenizer_dir, tiny_bpe_llm)
    host = model.llm  # TP=1 in this process
    pieces, special = asr_pieces(model.tokenizer)
    (tmp_path / "pieces.json").write_text(json.dumps([pieces, special]))
    results = launch("llm_lm_loss", tiny_bpe_llm, tmp_path, worker=WORKER)
    pmap = PieceMap.build(pieces, special, host.tokenizer, host.embed)
    inputs = [softtext_inputs(r, len(pieces)) for r in range(2)]
    log_probs = torch.cat([lp for lp, _, _ in inputs])  # same T on both ranks
    lengths = torch.cat([n for _, n, _ in inputs])
    texts = [t for _, _, ts in inputs for t in ts]
    for name, (estimator, target) in VARIANTS.items():
        lp = log_probs.clone().requires_grad_(True)
        loss = llm_lm_loss(host, bridge(lp, lengths, pmap, estimator), texts, target, pmap.first_token, "hello")
        loss.backward()
        offset = 0
        for r, res in enumerate(results):
            rows = slice(offset, offset + inputs[r][0].shape[0])
            offset = rows.stop
            torch.testing.assert_close(res[name]["loss"], loss.detach(), atol=1e-5, rtol=1e-5, msg=f"{name} {r}")
            # every TP rank computes the loss of the gathered batch: its own rows get N x the TP=1 gradient
            torch.testing.assert_close(
                res[name]["grad"], 2 * lp.grad[rows], atol=1e-6, rtol=1e-4, msg=f"{name} rank {r} grad"
            )
            assert res[name]["grad"].abs().sum() > 0
    assert all(res["llm_grads"] == 0 for res in results)


def test_export_drops_it_and_restore_needs_no_llm(tokenizer_dir, tiny_bpe_llm, tmp_path, llm_process_group):
    from nemo.collections.asr.models import ASRModel

    moved = str(tmp_path / "llm_copy")
    shutil.copytree(tiny_bpe_llm, moved)
    model = make(tokenizer_dir, moved)
    path = str(tmp_path / "train.nemo")
    model.save_to(path)
    shutil.rmtree(moved)
    restored = ASRModel.restore_from(path, map_location="cpu")
    torch.testing.assert_close(restored.state_dict(), model.state_dict())
    assert "llm_lm_loss" in restored.objectives
    plain = EncDecCTCLLMModelBPE(tiny_model_cfg(tokenizer_dir))
    assert strip_for_inference(restored)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(restored) == count(plain) and set(restored.state_dict()) == set(plain.state_dict())


BAD = [
    ({"estimatr": "expected"}, f"{KEY}: unknown key(s) ['estimatr']"),
    ({"estimator": "reinforce"}, f"{KEY}.estimator must be one of ['expected', 'straight_through', 'gumbel']"),
    ({"gumbel_tau": 0.0}, f"{KEY}.gumbel_tau must be a finite number in (0.0, 100.0]"),
    ({"gumbel_hard": 1}, f"{KEY}.gumbel_hard must be true or false"),
    ({"head_block": 2}, f"{KEY}.head_block must be null (the final CTC head) or one of the interctc blocks []"),
    ({"target": "both"}, f"{KEY}.target must be one of ['reference', 'hypothesis']"),
    ({"instruction": 3}, f"{KEY}.instruction must be a string"),
    ({"target": "hypothesis", "instruction": "x"}, f"{KEY}.instruction is only used with target: reference"),
]


@pytest.mark.parametrize("block,message", BAD, ids=[m.split(KEY)[-1][:40] for _, m in BAD])
def test_config_errors_name_the_key(tokenizer_dir, block, message):
    cfg = tiny_model_cfg(tokenizer_dir, llm_lm_loss=block)
    with pytest.raises(ConfigError) as err:
        EncDecCTCLLMModelBPE(cfg)
    assert message in str(err.value)


def test_missing_llm_is_reported_at_the_first_step(tokenizer_dir):
    model = EncDecCTCLLMModelBPE(tiny_model_cfg(tokenizer_dir, llm_lm_loss={}))
    ctx = model.step_context(asr_batch(model, LLM_CORPUS[:2]), compute_wer=False)
    with pytest.raises(ConfigError, match="model.llm.checkpoint is not set"):
        model.objectives["llm_lm_loss"](ctx)


def one_hot_log_probs(tokenizer, texts, frames_per_piece: int = 2):
    """CTC log-probs that spell ``texts`` (each piece for two frames, a blank between): [B, T, V+1], [B]."""
    V = tokenizer.vocab_size
    rows = []
    for t in texts:
        path = []
        for piece in tokenizer.text_to_ids(t):
            path += [piece] * frames_per_piece + [V]
        rows.append(torch.tensor(path))
    T = max(len(r) for r in rows)
    logits = torch.full((len(texts), T, V + 1), -6.0)
    for b, r in enumerate(rows):
        logits[b, torch.arange(len(r)), r] = 6.0
    return logits.log_softmax(-1), torch.tensor([len(r) for r in rows])


@pytest.fixture(scope="module")
def bpe128(tmp_path_factory):
    """The demo's tokenizer size (SentencePiece BPE 128) trained on the shipped sentences."""
    from nemo.collections.common.tokenizers import SentencePieceTokenizer

    from nemo_ctcllm.data.tokenizer import build_bpe_tokenizer_from_texts

    repo = Path(__file__).resolve().parents[1]
    lines = (repo / "demo" / "sentences.txt").read_text().splitlines()
    folder = build_bpe_tokenizer_from_texts(
        [s for s in lines if s and not s.startswith("#")][:5000], str(tmp_path_factory.mktemp("tok128")), vocab_size=128
    )
    return SentencePieceTokenizer(model_path=str(Path(folder) / "tokenizer.model"))


def test_smollm2_scores_the_right_hypothesis(bpe128, smollm2_dir, llm_process_group):
    """With a 128-piece BPE (the demo's size) and SmolLM2, on average over four sentences: the reference costs
    less after its own (soft) hypothesis than after another sentence's, and a real sentence is more fluent than
    its words scrambled. Measured (nat/token, four sentences): reference after its own hypothesis 3.06, after
    another 4.07 (but 3.18 vs 3.22 for the first one); fluency 7.84 vs 8.62 scrambled. Without an instruction
    between hypothesis and reference the first comparison fails for some sentences, and the LLM reading the
    hypothesis in its *own* tokens copies much better (2.55 vs 4.18 for the first one): with 128 pieces most
    words reach the LLM split into characters, one position per ASR piece (the bridge's approximation)."""
    from nemo_ctcllm.llm import LLMHost

    tok = bpe128
    host = LLMHost(smollm2_dir, tp_size=1, params_dtype=torch.float32)
    pmap = PieceMap.build(*asr_pieces(tok), host.tokenizer, host.embed)
    refs = [
        "the quick brown fox jumps over the lazy dog",
        "she went to the market to buy some bread",
        "he opened the door and walked into the room",
        "we are going to learn how to speak french",
    ]
    other = refs[1:] + refs[:1]
    rng = random.Random(0)
    scrambled = [" ".join(rng.sample(r.split(), len(r.split()))) for r in refs]
    with torch.no_grad():

        def loss(hyps, target, texts, instruction=""):
            lp, n = one_hot_log_probs(tok, hyps)
            return llm_lm_loss(host, bridge(lp, n, pmap), texts, target, pmap.first_token, instruction)

        own = torch.stack([loss([r], "reference", [r], "Repeat:") for r in refs])
        wrong = torch.stack([loss([o], "reference", [r], "Repeat:") for r, o in zip(refs, other)])
        fluent = torch.stack([loss([r], "hypothesis", [r]) for r in refs])
        broken = torch.stack([loss([s], "hypothesis", [s]) for s in scrambled])
    print({"own": own.tolist(), "other": wrong.tolist(), "fluent": fluent.tolist(), "scrambled": broken.tolist()})
    assert own.mean() < wrong.mean()
    assert fluent.mean() < broken.mean()
