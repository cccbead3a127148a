# The fedq image: the aggregator and a bank's participant worker, CPU PyTorch.
#
#   docker build -t fedq .
#   docker run --rm fedq --help                  # ENTRYPOINT: fedq (see below)
#   docker run ... fedq aggregator run           # the default command (CMD)
#   docker run ... fedq participant run          # a bank
#
# Options come from the environment (FEDQ_SPEC, FEDQ_AMQP_URL, FEDQ_REDIS_URL,
# FEDQ_SIGNING_KEY, FEDQ_HTTP_PORT; FEDQ_PARTICIPANT, FEDQ_DATA,
# FEDQ_METRICS_PORT, ...: `fedq aggregator run --help`), passwords from files
# (FEDQ_AMQP_PASSWORD_FILE, FEDQ_REDIS_PASSWORD_FILE: scripts/container-entrypoint).
# compose.yaml runs the whole federation from this image.
#
# The install step is scripts/bootstrap.sh, the script CI runs (scripts/test sources
# it), with the settings below: tests/test_compose.py checks that this file installs
# through that script only and runs this RUN step, with these settings, into a fresh
# virtual environment on every CI run.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

# What scripts/bootstrap.sh installs: the project with the extras `all` (aggregator,
# participant, simulation; not `dev`, the test and lint tools) into /opt/fedq/venv,
# after torch 2.13.0, the version CI pins, from PyTorch's CPU-only index (no CUDA).
ENV FEDQ_VENV=/opt/fedq/venv \
    FEDQ_EXTRAS=all \
    FEDQ_TORCH=torch==2.13.0 \
    FEDQ_TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /opt/fedq/src
# The build context is filtered by .dockerignore: no certificates, keys, passwords,
# bank data, virtual environments or caches of the checkout.
COPY . .
RUN ["bash", "-c", "source scripts/bootstrap.sh && fedq --version"]
ENV PATH=/opt/fedq/venv/bin:$PATH

# Non-root. /var/lib/fedq is the working directory and the home: a bank's compose
# service mounts its data volume there (data, privacy ledger, secure-aggregation state).
RUN groupadd --system --gid 10001 fedq \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/fedq --create-home \
        --shell /usr/sbin/nologin fedq
USER 10001:10001
WORKDIR /var/lib/fedq

# 9108: the aggregator's /healthz, /metrics and /status; 9109: a participant's /metrics.
EXPOSE 9108 9109

# The aggregator's /healthz (a standby waiting for the writer lease counts as healthy,
# from its /status). A participant's service replaces it with `--healthcheck participant`
# (its /metrics on FEDQ_METRICS_PORT): compose.yaml does.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/opt/fedq/src/scripts/container-entrypoint", "--healthcheck", "aggregator"]

ENTRYPOINT ["python", "/opt/fedq/src/scripts/container-entrypoint"]
CMD ["aggregator", "run"]
