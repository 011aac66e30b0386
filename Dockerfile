# kvrag API with the packaged models. One file, two variants:
#   docker build -t kvrag .                                (CPU: torch's CPU wheels, fp32)
#   docker build --build-arg VARIANT=cuda -t kvrag:cuda .  (CUDA: PyPI's torch, which bundles the CUDA runtime;
#                                                           run with `docker run --gpus all`; bf16 on the GPU)
# Converted model weights go to /models, a volume: a new container reuses them instead of converting again.
FROM python:3.11-slim

ARG VARIANT=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    KVRAG_DATA_DIR=/data KVRAG_MODEL_CACHE_DIR=/models HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

WORKDIR /app
# torch first, from the index the variant needs: the default index would pull the multi-GB CUDA build into
# the CPU image. (The CUDA image keeps faiss-cpu: faiss-gpu installs the same module; README, GPU search.)
RUN case "$VARIANT" in \
      cpu) pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 ;; \
      cuda) pip install torch==2.13.0 ;; \
      *) echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1 ;; \
    esac
# The SDK first: the server depends on kvrag-client (a path install, not on an index).
COPY client ./client
RUN pip install './client[mcp]'
COPY pyproject.toml README.md requirements-models.txt ./
COPY kvstore ./kvstore
COPY server ./server
COPY migrations ./migrations
COPY kvrag ./kvrag
RUN pip install . && pip install --no-deps -r requirements-models.txt

RUN useradd --create-home --uid 10001 kvrag && mkdir -p /data /models && chown kvrag /data /models
USER kvrag
VOLUME ["/data", "/models"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz')"
# Not loopback: the server refuses to start unless KVRAG_ADMIN_KEY is set.
CMD ["kvrag", "serve", "--host", "0.0.0.0", "--port", "8000"]
