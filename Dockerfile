# syntax=docker/dockerfile:1
# spamgpt: one image for both the one-shot trainer and the API server. It carries torchmetrics and the plots extra
# (matplotlib) that only training imports: simpler than a second image without them.
ARG PYTHON_VERSION=3.11.7

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
# The torch release the project is tested with; run.sh reads this line, .ci/run checks the README's pin against it.
ARG TORCH_VERSION=2.13.0
# CPU-only wheels by default (a few hundred MB instead of several GB). For CUDA, build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128   (see docker-compose.gpu.yml)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
# Dependencies before the source, so that a code change reuses this layer: install the project's
# metadata over empty packages (and an empty README, so that editing the README does not invalidate
# this layer either), then drop the project itself and keep its dependencies.
WORKDIR /src
COPY pyproject.toml ./
RUN mkdir training app && touch training/__init__.py app/__init__.py README.md \
    && pip install ".[plots]" && pip uninstall --yes spamgpt
COPY README.md ./
COPY training training
COPY app app
RUN pip install --no-deps . && rm -rf /src

FROM python:${PYTHON_VERSION}-slim-bookworm
RUN useradd --create-home --uid 10001 spamgpt \
    && mkdir -p /models /cache && chown spamgpt:spamgpt /models /cache
COPY --from=build /opt/venv /opt/venv
# The API reads its checkpoint from the models volume; the trainer caches GPT-2's weights in the cache volume (the
# SMS data and the tokenizer are inside the training package).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SPAMGPT_CHECKPOINT_DIR=/models/spamgpt \
    HF_HOME=/cache/huggingface
USER spamgpt
WORKDIR /home/spamgpt
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
# On SIGTERM the server keeps serving with /health 503 for SPAMGPT_DRAIN_DELAY_S (5 s), then stops accepting, lets
# in-flight requests finish for up to app.cli.GRACEFUL_SHUTDOWN_S (20 s), and exits 0. `spamgpt serve` is
# `python -m app`; run.sh, CI and the benchmarks start the same command on loopback.
CMD ["spamgpt", "serve", "--host", "0.0.0.0", "--port", "8000"]
