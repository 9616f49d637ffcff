# melora-lit on a CUDA PyTorch base image: the image's torch (CUDA build) is kept as it is.
#   docker build -t melora-lit .
#   docker run --gpus all -v $PWD/lightning_logs:/work/lightning_logs melora-lit fit --config /app/configs/glue/rte.yaml
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY configs ./configs
# torch is already in the image and satisfies the dependency range: pip installs no other build
RUN pip install ".[quickstart]"

RUN useradd --create-home --uid 1000 melora && mkdir -p /work && chown melora /work
USER melora
WORKDIR /work
# logs and checkpoints go to ./lightning_logs: mount a volume on /work/lightning_logs
VOLUME ["/work/lightning_logs"]
ENTRYPOINT ["melora-lit"]
CMD ["fit"]
