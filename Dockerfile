# melora-lit on a CUDA PyTorch base image; the image's torch (a CUDA build) is kept as it is.
#   docker build -t melora-lit .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/work/lightning_logs" melora-lit \
#       fit --config /app/configs/glue/rte.yaml --config /app/configs/strategy/ddp.yaml
# Multi-node (torchrun, SLURM, Kubernetes): docs/multinode.md.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY configs ./configs
# Pin the image's torch with a constraint: pip installs the rest around it, and fails rather than
# replace it with a build from PyPI if a dependency ever asks for another torch.
RUN python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt ".[quickstart]" \
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

ENTRYPOINT ["melora-lit"]
# no arguments: the quickstart (MiniLM on BBC News, shipped by the quickstart extra, no hub needed)
CMD ["fit"]
