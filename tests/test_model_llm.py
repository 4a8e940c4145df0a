"""The model's frozen LLM: built on first use, outside the module tree, never in the optimizer or the .nemo."""

import json
import shutil
import tarfile

import pytest
import torch
from conftest import tiny_model_cfg
from nemo.collections.asr.models import ASRModel
from omegaconf import OmegaConf

from nemo_ctcllm.llm import LLMCheckpointError
from nemo_ctcllm.models import EncDecCTCLLMModelBPE
from nemo_ctcllm.objectives import ConfigError
from nemo_ctcllm.parallel import check_layout


def model_with_llm(tokenizer_dir, checkpoint, **llm):
    cfg = tiny_model_cfg(tokenizer_dir, interctc={"blocks": [2], "weights": [0.3]})
    cfg.llm = {"checkpoint": checkpoint, **llm}
    torch.manual_seed(0)
    return EncDecCTCLLMModelBPE(cfg)


def test_llm_is_frozen_and_outside_the_model(tokenizer_dir, tiny_llm, llm_process_group):
    model = model_with_llm(tokenizer_dir, tiny_llm)
    host = model.llm
    assert model.llm is host  # built once
    llm_params = list(host.llm_parameters())
    assert llm_params and all(not p.requires_grad for p in llm_params)
    assert not host.gpt.training
    own = {id(p) for p in model.parameters()}
    assert not any(id(p) in own for p in llm_params)
    assert not any("gpt" in k or "llm" in k for k in model.state_dict())
    model.train()  # switching the ASR model to training leaves the LLM in eval mode
    assert not host.gpt.training
    model.setup_optimization(OmegaConf.create({"name": "adamw", "lr": 1e-3}))
    in_opt = {id(p) for group in model._optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_opt for p in llm_params)
    # gradient flows through the LLM to its inputs, never into its weights
    ids, lengths = host.tokenize(["the cat sat on the mat"])
    x = host.embed(ids).detach().requires_grad_(True)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    host.forward_embeds(x, labels, lengths=lengths)[1].backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in llm_params)


def test_nemo_has_no_llm_tensor_and_restores_without_it(tokenizer_dir, tiny_llm, tmp_path, llm_process_group):
    moved = str(tmp_path / "llm_copy")
    shutil.copytree(tiny_llm, moved)
    model = model_with_llm(tokenizer_dir, moved)
    host_numel = sum(p.numel() for p in model.llm.llm_parameters())
    path = str(tmp_path / "m.nemo")
    model.save_to(path)
    with tarfile.open(path) as tar:
        names = tar.getnames()
        weights = [n for n in names if n.endswith("model_weights.ckpt")]
        assert len(weights) == 1
        state = torch.load(tar.extractfile(weights[0]), map_location="cpu")
    assert set(state) == set(model.state_dict())
    assert sum(t.numel() for t in state.values()) == sum(t.numel() for t in model.state_dict().values())
    assert host_numel > 0 and not any("safetensors" in n for n in names)

    shutil.rmtree(moved)  # the LLM checkpoint is gone: restore and transcribe must not care
    restored = ASRModel.restore_from(path, map_location="cpu")
    restored.eval()
    signal = torch.randn(2, 16000) * 0.1
    with torch.no_grad():
        log_probs, _, _ = restored.forward(input_signal=signal, input_signal_length=torch.tensor([16000, 12000]))
    assert torch.isfinite(log_probs).all()
    with pytest.raises(LLMCheckpointError, match="llm_copy"):
        restored.llm


def test_llm_config_errors(tokenizer_dir):
    cfg = tiny_model_cfg(tokenizer_dir)
    cfg.llm = {"checkpoint": None, "tp": 2}
    with pytest.raises(ConfigError, match=r"model.llm: unknown key\(s\) \['tp'\]"):
        EncDecCTCLLMModelBPE(cfg)
    cfg.llm = {"checkpoint": None, "tensor_model_parallel_size": 0}
    with pytest.raises(ConfigError, match="model.llm.tensor_model_parallel_size must be an integer >= 1"):
        EncDecCTCLLMModelBPE(cfg)
    cfg.llm = {"checkpoint": None}
    model = EncDecCTCLLMModelBPE(cfg)
    with pytest.raises(ConfigError, match="model.llm.checkpoint is not set"):
        model.llm


def test_llm_activation_recompute_key(tokenizer_dir, tiny_llm, llm_process_group):
    cfg = tiny_model_cfg(tokenizer_dir)
    cfg.llm = {"checkpoint": None, "activation_recompute": "yes"}
    with pytest.raises(ConfigError, match="model.llm.activation_recompute must be true or false, got 'yes'"):
        EncDecCTCLLMModelBPE(cfg)
    host = model_with_llm(tokenizer_dir, tiny_llm, activation_recompute=True).llm
    assert host.activation_recompute and host.gpt.config.recompute_granularity == "full"
    assert model_with_llm(tokenizer_dir, tiny_llm).llm.gpt.config.recompute_granularity is None  # default off


def test_host_is_built_at_fit_start(tokenizer_dir, tiny_llm, llm_process_group):
    """Lightning calls on_fit_start on every rank before sanity validation and the first step."""
    model = model_with_llm(tokenizer_dir, tiny_llm)
    assert "_llm_host" not in model.__dict__
    model.on_fit_start()
    assert type(model.__dict__["_llm_host"]).__name__ == "LLMHost"
    no_llm = model_with_llm(tokenizer_dir, None)
    no_llm.on_fit_start()  # no checkpoint: nothing to build, no error
    assert "_llm_host" not in no_llm.__dict__


def test_tp_that_does_not_split_the_llm_is_refused_at_construction(tokenizer_dir, tiny_llm, tmp_path):
    """With a trainer (training), config.json is checked in __init__, before any process group is made."""
    from lightning.pytorch import Trainer

    folder = tmp_path / "llm"
    shutil.copytree(tiny_llm, folder)
    cfg_json = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg_json, "intermediate_size": 99}))
    cfg = tiny_model_cfg(tokenizer_dir)
    cfg.llm = {"checkpoint": str(folder), "tensor_model_parallel_size": 2}
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    with pytest.raises(
        ConfigError,
        match=r"model.llm.tensor_model_parallel_size=2: the LLM's intermediate_size "
        r"\(ffn_hidden_size\)=99 is not divisible by it",
    ):
        EncDecCTCLLMModelBPE(cfg, trainer=trainer)


@pytest.mark.parametrize(
    "world,tp,trainer,message",
    [
        (4, 3, {"devices": 4, "num_nodes": 1}, "does not divide the world size 4"),
        (2, 1, {"devices": 4, "num_nodes": 1}, "trainer.devices x trainer.num_nodes = 4 but the job has 2"),
        (8, 2, {"devices": 4, "num_nodes": 1}, "= 4 but the job has 8"),
    ],
)
def test_parallel_layout_errors(world, tp, trainer, message):
    with pytest.raises(ConfigError, match=message):
        check_layout(world, tp, OmegaConf.create(trainer))


def test_parallel_layout_ok():
    check_layout(8, 2, OmegaConf.create({"devices": 4, "num_nodes": 2}))
    check_layout(3, 3, OmegaConf.create({"devices": "auto"}))
