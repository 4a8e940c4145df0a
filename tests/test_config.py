"""Configs compose with Hydra overrides; bad values fail at construction with the key named."""

import json
import os
import re

import pytest
from conftest import CONF, tiny_model_cfg
from hydra import compose, initialize_config_dir

from nemo_ctcllm.data.manifest import CheckConfig, check_manifest, read_manifest
from nemo_ctcllm.models import EncDecCTCLLMModelBPE
from nemo_ctcllm.objectives import ConfigError, registered_objectives


def test_recipe_and_demo_compose_with_overrides():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="conformer_ctc_llm")
        demo = compose(
            config_name="conformer_ctc_llm_demo",
            overrides=[
                "model.objectives.interctc.blocks=[2,4]",
                "model.objectives.interctc.weights=[0.1,0.2]",
                "trainer.max_steps=7",
                "model.objectives.interctc.self_conditioning=true",
            ],
        )
    assert cfg.model.encoder.d_model == 256 and cfg.model.encoder.n_layers == 18
    assert list(cfg.model.objectives.interctc.blocks) == [6, 12]
    # the demo is composed from the recipe (Hydra defaults), not a copy: untouched keys come from it
    assert demo.model.encoder.n_layers == 6 and demo.model.encoder.conv_norm_type == cfg.model.encoder.conv_norm_type
    assert list(demo.model.objectives.interctc.blocks) == [2, 4]
    assert demo.model.objectives.interctc.self_conditioning is True
    assert demo.trainer.max_steps == 7


BAD_OBJECTIVES = [
    ({"ctc_final": {"weight": -0.5}}, "model.objectives.ctc_final.weight"),
    ({"ctc_final": {"weight": float("nan")}}, "model.objectives.ctc_final.weight"),
    ({"ctc_final": {"weight": 0.0}}, "every loss weight is 0"),
    ({"ctc_final": {"weight": 1.0, "warmup_steps": -3}}, "model.objectives.ctc_final.warmup_steps"),
    ({"ctc_final": {"wieght": 1.0}}, "unknown key(s) ['wieght']"),
    ({"interctc": {"blocks": [2], "weights": [1.5]}}, "model.objectives.interctc.weights[0]"),
    ({"interctc": {"blocks": [2, 3], "weights": [0.3]}}, "one weight per block"),
    ({"interctc": {"blocks": [4], "weights": [0.3]}}, "block 4 is outside the encoder"),
    ({"interctc": {"blocks": [0], "weights": [0.3]}}, "allowed: integers in [1, 3]"),
    ({"interctc": {"blocks": [2, 2], "weights": [0.3, 0.3]}}, "blocks must be distinct"),
    ({"interctc": {"blocks": [], "weights": []}}, "non-empty list"),
    ({"llm_magic": {"weight": 1.0}}, "unknown objective(s) ['llm_magic']"),
]


@pytest.mark.parametrize("objectives,message", BAD_OBJECTIVES, ids=[m for _, m in BAD_OBJECTIVES])
def test_bad_objective_config_names_the_key(tokenizer_dir, objectives, message):
    cfg = tiny_model_cfg(tokenizer_dir)
    cfg.objectives = objectives
    with pytest.raises(ConfigError) as err:
        EncDecCTCLLMModelBPE(cfg)
    assert message in str(err.value)


def test_unknown_objective_lists_the_registered_ones(tokenizer_dir):
    cfg = tiny_model_cfg(tokenizer_dir)
    cfg.objectives = {"ctc_final": {"weight": 1.0}, "nope": {}}
    with pytest.raises(ConfigError, match="registered objectives") as err:
        EncDecCTCLLMModelBPE(cfg)
    for name in registered_objectives():
        assert name in str(err.value)


def test_nemo_interctc_block_is_redirected(tokenizer_dir):
    cfg = tiny_model_cfg(tokenizer_dir)
    cfg.interctc = {"loss_weights": [0.3], "apply_at_layers": [1]}
    with pytest.raises(ConfigError, match="model.objectives.interctc"):
        EncDecCTCLLMModelBPE(cfg)


def _write(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def test_bad_manifest_lines_are_reported_with_file_and_line(tmp_path, demo_corpus, tokenizer_dir):
    good = read_manifest(demo_corpus["train"])[0]
    wav = good["audio_filepath"]
    manifest = _write(
        tmp_path / "bad.json",
        [
            {"audio_filepath": wav, "duration": good["duration"], "text": good["text"]},  # 1: fine
            {"audio_filepath": str(tmp_path / "missing.wav"), "duration": 1.0, "text": "hello"},  # 2
            {"audio_filepath": wav, "duration": good["duration"], "text": "   "},  # 3: empty text
            {"audio_filepath": wav, "duration": 0.3, "text": "a transcript far too long for a third of a second"},  # 4
            '{"audio_filepath": "x.wav", "duration": ',  # 5: malformed JSON
        ],
    )
    from nemo.collections.common.tokenizers import SentencePieceTokenizer

    tok = SentencePieceTokenizer(os.path.join(tokenizer_dir, "tokenizer.model"))
    # every bad line is reported, each on its own (a malformed line does not hide the others)
    problems = check_manifest(manifest, CheckConfig(tokenizer=tok, frame_shift=0.04))
    assert [re.match(r".*:(\d+): ", p).group(1) for p in problems] == ["2", "3", "4", "5"]
    assert "audio file not found" in problems[0] and "missing.wav" in problems[0]
    assert "empty 'text'" in problems[1]
    assert "transcript too long for the audio" in problems[2]
    assert problems[3] == f"{manifest}:5: malformed JSON (Expecting value)"
