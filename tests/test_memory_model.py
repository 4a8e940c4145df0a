"""benchmarks/memory_model.py against CPU peaks of tiny random LLaMAs at shapes the model was not fitted on
(its FIT_SHAPES are one-layer, vocab-32 models; these have 4-8 layers and vocab 128-1024)."""

import pytest

from benchmarks.memory_model import (
    FIT_SHAPES,
    LlmShape,
    Recipe,
    measure_llm_peak_mib,
    predict_llm_peak_mib,
    recipe_memory,
    tiny_folder,
)

TOL = 0.15  # the check set's worst error is 5 % (docs/scale.md, "Memory per GPU")

# (hidden, ffn, layers, heads, kv_heads, vocab, batch, seq); not in FIT_SHAPES
EIGHT_LAYERS = (64, 96, 8, 4, 2, 128, 4, 64)
WIDE_VOCAB = (96, 384, 4, 6, 2, 1024, 4, 48)


@pytest.fixture(scope="module")
def measured(tmp_path_factory, llm_process_group):
    """{(shape, dtype, recompute): (measured MiB, predicted MiB)}."""
    root = tmp_path_factory.mktemp("memllm")
    out = {}
    for s, dtype, rec in [
        (EIGHT_LAYERS, "fp32", False),
        (EIGHT_LAYERS, "fp32", True),
        (WIDE_VOCAB, "bf16", False),
    ]:
        assert s not in FIT_SHAPES
        folder = tiny_folder(root, s)
        out[s, dtype, rec] = (
            measure_llm_peak_mib(folder, s[6], s[7], dtype, rec),
            predict_llm_peak_mib(folder, s[6], s[7], dtype, rec),
        )
    return out


def test_prediction_within_tolerance(measured):
    for key, (m, p) in measured.items():
        assert abs(p / m - 1) <= TOL, f"{key}: measured {m:.2f} MiB, predicted {p:.2f} MiB"


def test_recompute_lowers_both_alike(measured):
    (m_off, p_off), (m_on, p_on) = measured[EIGHT_LAYERS, "fp32", False], measured[EIGHT_LAYERS, "fp32", True]
    assert m_on < m_off and p_on < p_off
    # the saving itself, not only its sign
    assert abs((p_off - p_on) / (m_off - m_on) - 1) <= TOL, (m_off, m_on, p_off, p_on)


def test_model_discriminates(measured):
    """The tolerance is tight enough to reject a wrong model: the recompute-off formula applied to the
    recompute-on run, or the LLM's bf16 activations counted as fp32, miss by more than TOL."""
    m_on, _ = measured[EIGHT_LAYERS, "fp32", True]
    from benchmarks.memory_model import MiB, llm_peak_bytes

    H, F, n, nq, nkv, V, B, S = EIGHT_LAYERS
    shape = LlmShape(n, H, F, nq, nkv, H // nq, V)
    assert abs(llm_peak_bytes(shape, B * S, S, 1, 4, False) / MiB / m_on - 1) > TOL
    m_bf16, _ = measured[WIDE_VOCAB, "bf16", False]
    H, F, n, nq, nkv, V, B, S = WIDE_VOCAB
    shape = LlmShape(n, H, F, nq, nkv, H // nq, V)
    assert abs(llm_peak_bytes(shape, B * S, S, 1, 4, False) / MiB / m_bf16 - 1) > TOL


def test_recipe_breakdown_adds_up_and_tp_splits():
    """Counted parts: weights fall as 1/N; the replicated activations grow with the gathered batch."""
    from benchmarks.bench_llm_load import SHAPES

    shape = LlmShape.from_config(SHAPES["llama-3.2-1b"])
    assert abs(shape.params - 1.236e9) < 0.01e9  # docs/llm_host.md: 1.236 B parameters
    assert abs(LlmShape.from_config(SHAPES["llama-3.1-8b"]).params - 8.03e9) < 0.01e9
    m1, m2 = recipe_memory(shape, 1, Recipe()), recipe_memory(shape, 2, Recipe())
    parts = ("encoder_states", "encoder_activations", "llm_weights", "llm_activations")
    assert abs(sum(m1[k] for k in parts) - m1["total"]) < 1e-9
    assert abs(m2["llm_weights"] * 2 - m1["llm_weights"]) < 1e-9
    assert m2["llm_act_replicated_per_block"] == pytest.approx(2 * m1["llm_act_replicated_per_block"])
    assert recipe_memory(shape, 1, Recipe(recompute=True))["total"] < m1["total"]
