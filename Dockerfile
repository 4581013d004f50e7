# sidecrypt: mount your config at /etc/sidecrypt/sidecrypt.yaml and certificates/keyring beside it.
# Two stages: wheels are built in the first, the second installs them with no build tools, from
# constraints.txt (every runtime dependency pinned), and runs as an unprivileged user.
FROM python:3.12.8-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
RUN pip wheel --wheel-dir /wheels --constraint constraints.txt '.[kms,jwt]'

FROM python:3.12.8-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-index --find-links /wheels --constraint /tmp/constraints.txt \
      'sidecrypt[kms,jwt]==0.1.0' \
  && rm -rf /wheels /tmp/constraints.txt \
  && useradd --system --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin sidecrypt \
  && install -d -o 10001 -g 10001 -m 0700 /certs

USER 10001:10001
EXPOSE 8443 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["sidecrypt"]
CMD ["run", "--config", "/etc/sidecrypt/sidecrypt.yaml"]
