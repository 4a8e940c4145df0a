"""``llm_prefix_clm``: soft prompts from encoder blocks, frozen-LLM causal-LM loss on the transcript.

Gradient path (encoder + connectors, never the LLM), overfitting one batch, padding invariance, TP=2 vs
TP=1 (torchrun, gloo), export, config errors, and SmolLM2 preferring the true transcript.
"""

import dataclasses
import random
import shutil

import pytest
import torch
from conftest import LLM_CORPUS, encoder_gradient, overfit, tiny_model_cfg
from obj_tp_worker import CLM_INSTRUCTION, asr_batch, clm_inputs, launch

from nemo_ctcllm.export import strip_for_inference
from nemo_ctcllm.llm import LLMHost
from nemo_ctcllm.models import EncDecCTCLLMModelBPE
from nemo_ctcllm.objectives import ConfigError, compose_loss
from nemo_ctcllm.objectives.llm_prefix_clm import stack_frames
from nemo_ctcllm.objectives.shared.prefix import build_sequences, prefix_clm

KEY = "model.objectives.llm_prefix_clm"


def make(tokenizer_dir, checkpoint, ctc_weight=1.0, **block):
    block = {"blocks": [2, 4], "weights": [0.5, 1.0], "stack": 2, **block}
    cfg = tiny_model_cfg(tokenizer_dir, llm_prefix_clm=block)
    cfg.objectives.ctc_final.weight = ctc_weight
    cfg.llm = {"checkpoint": checkpoint}
    torch.manual_seed(0)
    return EncDecCTCLLMModelBPE(cfg)


def llm_grads(model):
    return [p.grad for p in model.llm.llm_parameters() if p.grad is not None]


def test_stack_frames_zeroes_padding_and_rounds_up():
    x = torch.arange(2 * 5 * 1, dtype=torch.float).reshape(2, 5, 1) + 1  # [B=2, T=5, D=1]
    out, lengths = stack_frames(x, torch.tensor([5, 3]), 2)
    assert out.shape == (2, 3, 2) and lengths.tolist() == [3, 2]
    assert out[0].flatten().tolist() == [1, 2, 3, 4, 5, 0]
    assert out[1].flatten().tolist() == [6, 7, 8, 0, 0, 0]  # frames 3, 4 of row 1 are padding


def test_sequence_layout(tokenizer_dir, tiny_llm, llm_process_group):
    host = make(tokenizer_dir, tiny_llm).llm
    prompt = torch.randn(2, 3, host.hidden_size)
    embeds, labels, lengths = build_sequences(host, prompt, torch.tensor([3, 1]), ["hello world", "the cat"], "hello")
    # [BOS | prompt | "hello" | text | EOS]: 1 + 3 + 1 + 2 + 1 and 1 + 1 + 1 + 2 + 1
    assert lengths.tolist() == [8, 6] and embeds.shape == (2, 8, host.hidden_size)
    torch.testing.assert_close(embeds[0, 1:4], prompt[0])
    ids, _ = host.tokenize(["hello world", "the cat"], add_bos=False, add_eos=True)
    assert labels[0].tolist() == [-100] * 4 + ids[0].tolist() + [-100]  # text+EOS predicted from pos 4..6
    assert labels[1].tolist() == [-100] * 2 + ids[1].tolist() + [-100] * 3
    torch.testing.assert_close(embeds[0, 0], host.embed(torch.tensor([[1]]))[0, 0])  # BOS first


def test_gradient_reaches_encoder_and_connectors_not_llm(tokenizer_dir, tiny_llm, llm_process_group):
    """This term alone: ctc_final at weight 0 is evaluated and logged but adds nothing to the total."""
    model = make(tokenizer_dir, tiny_llm, ctc_weight=0.0, connector="mlp")
    assert model.cfg.objectives.llm_prefix_clm.llm_hidden_size == 64  # read from the LLM folder, written back
    model.train()
    ctx = model.step_context(asr_batch(model, LLM_CORPUS[:3]), compute_wer=False)
    term = model.objectives["llm_prefix_clm"]
    assert term.capture_blocks == [2, 4] and set(ctx.layers) == {2, 4}
    total, logs = compose_loss(model.objectives, ctx, step=0, prefix="train")
    loss = logs["train/llm_prefix_clm"]
    torch.testing.assert_close(loss, 0.5 * logs["train/llm_prefix_clm_clm_l2"] + logs["train/llm_prefix_clm_clm_l4"])
    assert 1.0 < float(logs["train/llm_prefix_clm_clm_l2"]) < 10.0 and "train/ctc_final" in logs
    torch.testing.assert_close(total.detach(), loss)  # the total is this term alone
    total.backward()
    for name, p in term.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert encoder_gradient(model) > 0
    assert llm_grads(model) == []


def test_gradient_matches_finite_differences(tokenizer_dir, tiny_llm, llm_process_group):
    """d loss / d block outputs (two connectors, weights 0.5 and 1, an instruction, a padded row) against central
    differences along three random directions and the gradient's own.

    Everything is float64 (block outputs, connectors, the LLM's weights) except megatron's cross entropy, which
    casts the logits to float32 (megatron/core/tensor_parallel/cross_entropy.py), so the loss (about 7) carries
    float32 rounding of about 1e-6: the step (3e-2) and the tolerance are sized for that (measured errors up to
    2.3e-5 on derivatives of 1.6e-3 to 4.6e-2). torch.autograd.gradcheck cannot be used: megatron's cross entropy
    backward overwrites its saved softmax, so the graph cannot be backpropagated twice."""
    model = make(tokenizer_dir, tiny_llm, blocks=[2, 4], weights=[0.5, 1.0], connector="mlp", instruction="hello")
    term = model.objectives["llm_prefix_clm"].double()
    with torch.no_grad():
        ctx = model.step_context(asr_batch(model, LLM_CORPUS[:2]), compute_wer=False)
    host = LLMHost(tiny_llm, tp_size=1, params_dtype=torch.float64)
    ctx = dataclasses.replace(ctx, env=dataclasses.replace(ctx.env, llm=lambda: host))  # the float64 LLM
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 2])
    x = [torch.randn(2, 32, 3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2)]  # [B, D, T]

    def loss_of(x2, x4):
        return term(dataclasses.replace(ctx, layers={2: (x2, lengths), 4: (x4, lengths)}))[0]

    grads = torch.autograd.grad(loss_of(*x), x)
    assert all(gr[1, :, 2].abs().max() == 0 for gr in grads)  # row 1's padding frame
    norm = sum(gr.pow(2).sum() for gr in grads).sqrt()
    directions = [[torch.randn(v.shape, dtype=v.dtype, generator=g) for v in x] for _ in range(3)]
    directions.append([gr / norm for gr in grads])
    eps = 3e-2
    for d in directions:
        with torch.no_grad():
            plus = loss_of(*[v + eps * u for v, u in zip(x, d)])
            minus = loss_of(*[v - eps * u for v, u in zip(x, d)])
        analytic = sum((gr * u).sum() for gr, u in zip(grads, d))
        torch.testing.assert_close((plus - minus).double() / (2 * eps), analytic, atol=1e-4, rtol=1e-2)


def test_overfits_one_batch(tokenizer_dir, tiny_llm, llm_process_group):
    """20 Adam steps on this objective alone lower it. The encoder runs once; its block output is optimised as
    a free tensor with the connector (the encoder's gradient is checked above; re-running it is slow on CPU)."""
    model = make(tokenizer_dir, tiny_llm, blocks=[3], weights=[1.0])
    model.train()
    term = model.objectives["llm_prefix_clm"]
    with torch.no_grad():
        ctx = model.step_context(asr_batch(model, LLM_CORPUS[:3]), compute_wer=False)
    out, length = ctx.layers[3]
    feats = torch.nn.Parameter(out.clone())  # [B, D, T]
    ctx = dataclasses.replace(ctx, layers={3: (feats, length)})
    losses, _ = overfit(lambda: term(ctx), [feats, *term.parameters()], steps=20, lr=1e-2)
    assert losses[-1] < 0.93 * losses[0] and losses[-1] == min(losses), losses  # a random tiny LLM: ~-10%
    assert llm_grads(model) == []


def _alone(ctx, i, block):
    """The context of utterance i alone: its valid frames and target tokens only."""
    out, length = ctx.layers[block]
    n, u = int(length[i]), int(ctx.target_len[i])
    return dataclasses.replace(
        ctx,
        layers={block: (out[i : i + 1, :, :n], length[i : i + 1])},
        targets=ctx.targets[i : i + 1, :u],
        target_len=ctx.target_len[i : i + 1],
    )


def test_padding_invariance(tokenizer_dir, tiny_llm, llm_process_group):
    model = make(tokenizer_dir, tiny_llm, blocks=[2], weights=[1.0], stack=3, instruction="hello")
    model.eval()
    texts = LLM_CORPUS[:4]
    batch = asr_batch(model, texts)
    term = model.objectives["llm_prefix_clm"]
    with torch.no_grad():
        ctx = model.step_context(batch, compute_wer=False)
        out, length = ctx.layers[2]
        garbage = out.clone()
        for i, n in enumerate(length.tolist()):
            garbage[i, :, n:] = 1e3  # padding frames must never reach the prompt
        batched = term.utterance_losses(dataclasses.replace(ctx, layers={2: (garbage, length)}), 2)  # [B]
        for i in range(len(texts)):
            torch.testing.assert_close(term.utterance_losses(_alone(ctx, i, 2), 2)[0], batched[i], atol=1e-5, rtol=1e-5)
        # and end to end: the utterance through the encoder on its own
        signal, signal_len, targets, target_len = batch
        n, u = int(signal_len[2]), int(target_len[2])
        ctx2 = model.step_context((signal[2:3, :n], signal_len[2:3], targets[2:3, :u], target_len[2:3]), False)
        torch.testing.assert_close(term.utterance_losses(ctx2, 2)[0], batched[2], atol=1e-4, rtol=1e-4)
        # the batch loss is the token-level mean of the utterance losses
        _, labels, _ = build_sequences(
            model.llm, torch.zeros(4, 1, 64), torch.ones(4, dtype=torch.long), texts, "hello"
        )
        counts = (labels != -100).sum(1).float()
        loss, _ = term(dataclasses.replace(ctx, layers={2: (garbage, length)}))
        torch.testing.assert_close(loss, (batched * counts).sum() / counts.sum())


def test_tp2_matches_tp1_on_the_concatenated_batch(tokenizer_dir, tiny_llm, tmp_path, llm_process_group):
    if torch.cuda.is_available():
        pytest.skip("the worker runs gloo on CPU")
    host = make(tokenizer_dir, tiny_llm).llm  # TP=1 in this process
    results = launch("clm", tiny_llm, tmp_path)
    inputs = [clm_inputs(r, host.hidden_size) for r in range(2)]
    P = max(p.shape[1] for p, _, _ in inputs)
    prompt = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, P - p.shape[1])) for p, _, _ in inputs])
    prompt.requires_grad_(True)
    prompt_len = torch.cat([n for _, n, _ in inputs])
    texts = [t for _, _, ts in inputs for t in ts]
    utt, loss = prefix_clm(host, prompt, prompt_len, texts, CLM_INSTRUCTION)
    loss.backward()
    offset = 0
    for r, (res, (p, _, _)) in enumerate(zip(results, inputs)):
        rows = slice(offset, offset + p.shape[0])
        offset += p.shape[0]
        assert res["llm_grads"] == 0
        torch.testing.assert_close(res["loss"], loss.detach(), atol=1e-5, rtol=1e-5, msg=f"rank {r} loss")
        torch.testing.assert_close(res["utt"], utt.detach()[rows], atol=1e-5, rtol=1e-5, msg=f"rank {r} utt")
        # every TP rank sees the same loss on the gathered batch: its own prompt gets N x the TP=1 gradient
        torch.testing.assert_close(
            res["grad"], 2 * prompt.grad[rows, : p.shape[1]], atol=1e-6, rtol=1e-4, msg=f"rank {r} grad"
        )
        assert res["grad"].abs().sum() > 0


def test_export_drops_connectors_and_restore_needs_no_llm(tokenizer_dir, tiny_llm, tmp_path, llm_process_group):
    from nemo.collections.asr.models import ASRModel

    moved = str(tmp_path / "llm_copy")
    shutil.copytree(tiny_llm, moved)
    model = make(tokenizer_dir, moved, connector="mlp")
    path = str(tmp_path / "train.nemo")
    model.save_to(path)
    shutil.rmtree(moved)  # the LLM is gone: the .nemo still builds its connectors (llm_hidden_size saved)
    restored = ASRModel.restore_from(path, map_location="cpu")
    assert restored.cfg.objectives.llm_prefix_clm.llm_hidden_size == 64
    torch.testing.assert_close(restored.state_dict(), model.state_dict())

    plain = EncDecCTCLLMModelBPE(tiny_model_cfg(tokenizer_dir))
    assert any(k.startswith("objectives.llm_prefix_clm.") for k in restored.state_dict())
    assert strip_for_inference(restored)
    assert not any(k.startswith("objectives.") for k in restored.state_dict())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(restored) == count(plain)


BAD = [
    ({"blocks": [2], "weights": [1.0], "stak": 2}, f"{KEY}: unknown key(s) ['stak']"),
    ({"blocks": [2], "weights": [1.0], "stack": 0}, f"{KEY}.stack must be an integer >= 1"),
    ({"blocks": [5], "weights": [1.0]}, f"{KEY}.blocks: block 5 is outside the encoder; allowed: integers in [1, 4]"),
    ({"blocks": [0], "weights": [1.0]}, f"{KEY}.blocks: block 0 is outside the encoder"),
    ({"blocks": [], "weights": []}, f"{KEY}.blocks must be a non-empty list"),
    ({"blocks": [2, 3], "weights": [1.0]}, f"{KEY}.weights must have one weight per block"),
    ({"blocks": [2], "weights": [2.0]}, f"{KEY}.weights[0]"),
    ({"blocks": [2], "weights": [1.0], "connector": "rnn"}, f"{KEY}.connector must be one of ['linear', 'mlp']"),
    ({"blocks": [2], "weights": [1.0], "llm_hidden_size": 0}, f"{KEY}.llm_hidden_size must be null or an integer"),
    ({"blocks": [2], "weights": [1.0]}, "model.llm.checkpoint is not set"),
]


@pytest.mark.parametrize("block,message", BAD, ids=[m.split(KEY)[-1][:40] for _, m in BAD])
def test_config_errors_name_the_key(tokenizer_dir, block, message):
    cfg = tiny_model_cfg(tokenizer_dir, llm_prefix_clm=block)
    with pytest.raises(ConfigError) as err:
        EncDecCTCLLMModelBPE(cfg)
    assert message in str(err.value)


def test_missing_llm_folder_and_explicit_hidden_size(tokenizer_dir, tmp_path):
    cfg = tiny_model_cfg(tokenizer_dir, llm_prefix_clm={"blocks": [2], "weights": [1.0]})
    cfg.llm = {"checkpoint": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError, match=r"model.llm.checkpoint: cannot read the LLM config.*nowhere"):
        EncDecCTCLLMModelBPE(cfg)
    cfg = tiny_model_cfg(tokenizer_dir, llm_prefix_clm={"blocks": [4], "weights": [1.0], "llm_hidden_size": 48})
    model = EncDecCTCLLMModelBPE(cfg)  # no LLM needed to construct
    assert model.objectives["llm_prefix_clm"].connectors["4"].proj.out_features == 48


def test_smollm2_prefers_the_true_transcript(smollm2_dir, llm_process_group):
    """Same random soft prompt: the real sentence has a lower CLM loss than its words scrambled."""
    from nemo_ctcllm.llm import LLMHost

    host = LLMHost(smollm2_dir, tp_size=1, params_dtype=torch.float32)
    true = [
        "the quick brown fox jumps over the lazy dog",
        "i would like a cup of coffee please",
        "she went to the market to buy some bread",
        "the weather is nice today so we went for a walk",
        "he opened the door and walked into the room",
        "we are going to learn how to speak french",
    ]
    rng = random.Random(0)
    scrambled = []
    for t in true:
        words = t.split()
        while " ".join(words) == t:
            rng.shuffle(words)
        scrambled.append(" ".join(words))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, 6, host.hidden_size, generator=g) * host.embed(torch.tensor([[100]])).std()
    prompt = prompt.expand(len(true), -1, -1)  # the same prompt for every sentence
    lengths = torch.full((len(true),), 6)
    with torch.no_grad():
        loss_true, _ = prefix_clm(host, prompt, lengths, true, "Transcribe:")
        loss_scr, _ = prefix_clm(host, prompt, lengths, scrambled, "Transcribe:")
    assert (loss_true < loss_scr).all(), (loss_true, loss_scr)
