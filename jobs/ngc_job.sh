#!/usr/bin/env bash
# One 8-GPU NGC (Base Command) batch job: trains the recipe in this project's image (Dockerfile, pushed to your
# NGC registry). docs/scale.md explains each flag; set the variables or pass them in the environment.
#
#   IMAGE=nvcr.io/<org>/<team>/nemo_ctcllm:<tag> DATA_ID=<dataset id> WORKSPACE=<workspace> bash jobs/ngc_job.sh
#
# Mounts: the dataset (manifests, audio, tokenizer) read-only at /data; the workspace (the LLM folder, and the
# experiment directory so that a resubmitted job resumes) read-write at /ws; NGC's result folder at /results.
set -euo pipefail
: "${IMAGE:?set IMAGE to the pushed image, e.g. nvcr.io/<org>/<team>/nemo_ctcllm:<tag>}"
: "${DATA_ID:?set DATA_ID to the NGC dataset id holding train.json, dev.json, audio and the tokenizer}"
: "${WORKSPACE:?set WORKSPACE to an NGC workspace holding llm/ (a Hugging Face LLaMA folder)}"
INSTANCE=${INSTANCE:-dgxa100.80g.8.norm}
GPUS=${GPUS:-8}
TP=${TP:-2}

ngc batch run \
  --name "nemo-ctcllm-train" \
  --image "$IMAGE" \
  --instance "$INSTANCE" \
  --datasetid "$DATA_ID:/data" \
  --workspace "$WORKSPACE:/ws:RW" \
  --result /results \
  --total-runtime 72h \
  --commandline "cd /workspace/nemo_ctcllm && \
torchrun --nproc_per_node $GPUS scripts/train.py --config-name=conformer_ctc_llm \
  model.train_ds.manifest_filepath=/data/train.json model.validation_ds.manifest_filepath=/data/dev.json \
  model.tokenizer.dir=/data/tokenizer_spe_bpe_v256 \
  model.llm.checkpoint=/ws/llm model.llm.tensor_model_parallel_size=$TP \
  trainer.devices=$GPUS trainer.num_nodes=1 trainer.precision=bf16-mixed \
  exp_manager.exp_dir=/ws/nemo_experiments"
