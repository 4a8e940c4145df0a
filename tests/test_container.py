"""The container and the jobs users submit: the Dockerfile's base image, .dockerignore, and the NGC and Slurm job
scripts, which must run the README's training command under torchrun (docs/scale.md)."""

import re
import shlex
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
JOBS = [REPO / "jobs" / "ngc_job.sh", REPO / "jobs" / "slurm_train.sbatch"]

# NeMo Speech image tag -> the nemo_toolkit it holds. Source: NVIDIA-NeMo/Speech, docs/source/starthere/install.rst
# ("The latest prebuilt NeMo Speech image is the 26.07.00 NGC container"; the same page pins the container's
# stack: Python 3.13, PyTorch 2.12, CUDA 13.2) and its docker/Dockerfile (uv venv /opt/venv). A new tag is added
# here when the Dockerfile moves to it, after checking its nemo_toolkit version.
NEMO_SPEECH_IMAGES = {"26.07.00": Version("3.0.0")}


def shell_commands(text: str) -> list[list[str]]:
    """Shell words of every command in ``text``: comments dropped, backslash continuations joined."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def readme_training_command() -> list[str]:
    """The README's training command: `python scripts/train.py --config-name=conformer_ctc_llm ...`."""
    blocks = re.findall(r"^```(?:bash|sh)\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.M | re.S)
    for words in (w for block in blocks for w in shell_commands(block)):
        if words[:3] == ["python", "scripts/train.py", "--config-name=conformer_ctc_llm"]:
            return words[1:]
    raise AssertionError("README.md has no `python scripts/train.py --config-name=conformer_ctc_llm` command")


def override_keys(words: list[str]) -> set[str]:
    return {w.split("=", 1)[0] for w in words if "=" in w and not w.startswith("-")}


def torchrun_command(path: Path) -> tuple[dict[str, str], list[str]]:
    """(torchrun options, the training command after them) of the job script; for the NGC job, from its
    --commandline string."""
    commands = shell_commands(path.read_text())
    for words in commands:
        if words[:3] == ["ngc", "batch", "run"]:
            cmdline = words[words.index("--commandline") + 1]
            commands = [shlex.split(part) for part in cmdline.split("&&")]
            break
    for words in commands:
        if "torchrun" in words:
            words = words[words.index("torchrun") + 1 :]
            start = words.index("scripts/train.py")
            opts, i = {}, 0
            while i < start:
                opts[words[i].lstrip("-")] = words[i + 1]
                i += 2
            return opts, words[start:]
    raise AssertionError(f"{path.name}: no torchrun command")


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_runs_the_readme_training_command_under_torchrun(path):
    readme = readme_training_command()
    opts, train = torchrun_command(path)
    assert train[:2] == readme[:2], f"{path.name} runs {train[:2]}, the README {readme[:2]}"
    overrides = dict(w.split("=", 1) for w in train[2:] if "=" in w)
    missing = override_keys(readme) - set(overrides)
    assert not missing, f"{path.name} lacks the README's overrides {sorted(missing)}"
    # one process per GPU, and Lightning told the same layout (scripts/train.py refuses a mismatch)
    assert overrides["trainer.devices"] == opts["nproc_per_node"]
    assert overrides["trainer.num_nodes"] in ("1", opts.get("nnodes"))
    assert overrides["trainer.precision"] == "bf16-mixed"
    assert "model.llm.tensor_model_parallel_size" in overrides and "model.llm.checkpoint" in overrides


def test_slurm_job_uses_every_node_and_a_rendezvous():
    opts, train = torchrun_command(JOBS[1])
    text = JOBS[1].read_text()
    assert opts["nnodes"] == "$SLURM_NNODES" and opts["rdzv_backend"] == "c10d"
    assert "--ntasks-per-node=1" in text  # one torchrun per node, which starts the node's GPU processes
    assert "--container-image" in text and "--container-mounts" in text


def test_ngc_job_names_image_instance_and_mounts():
    words = next(w for w in shell_commands(JOBS[0].read_text()) if w[:3] == ["ngc", "batch", "run"])
    flags = {w for w in words if w.startswith("--")}
    assert {"--image", "--instance", "--datasetid", "--workspace", "--result", "--commandline"} <= flags


def dockerfile_base_image() -> str:
    text = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    base = re.search(r"^FROM (\S+)", text, flags=re.M).group(1)
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)


def test_base_image_is_nemo_speech_matching_pyproject():
    image = dockerfile_base_image()
    name, _, tag = image.rpartition(":")
    assert name == "nvcr.io/nvidia/nemo-speech", f"{image}: not NVIDIA's NeMo Speech image"
    assert tag in NEMO_SPEECH_IMAGES, f"{image}: tag not in the verified list {sorted(NEMO_SPEECH_IMAGES)}"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    nemo = next(Requirement(d) for d in deps if Requirement(d).name == "nemo_toolkit")
    assert NEMO_SPEECH_IMAGES[tag].major == 3
    assert nemo.specifier.contains(NEMO_SPEECH_IMAGES[tag]), (
        f"{image} holds nemo_toolkit {NEMO_SPEECH_IMAGES[tag]}, outside pyproject's {nemo.specifier}"
    )


def test_dockerfile_keeps_the_image_packages():
    text = (REPO / "Dockerfile").read_text()
    assert "pip list --format=freeze" in text and "pip freeze" not in text.replace("`pip freeze`", "")
    assert re.search(r"import megatron\.core.*\|\|.*megatron-core", text, flags=re.S)  # only when missing
    assert "-c /tmp/image-packages.txt -e" in text


def test_dockerignore_excludes_history_weights_and_data():
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in [".git", "artifacts/", "demo_data/", "nemo_experiments/", "*.nemo", ".whl/", "*.safetensors"]:
        assert needed in patterns, f".dockerignore does not exclude {needed}"
