# sidecrypt: mount your config at /etc/sidecrypt/sidecrypt.yaml and certificates/keyring beside it.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install '.[kms,jwt]' && useradd --system --uid 10001 --home /nonexistent sidecrypt

USER 10001
EXPOSE 8443 9901
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status != 200)"
ENTRYPOINT ["sidecrypt", "run", "--config", "/etc/sidecrypt/sidecrypt.yaml"]
