# One image for every role of a fedsparse deployment: flower-superlink, flower-supernode, flower-superexec
# (which runs the ServerApp and the ClientApps) and `fedsparse run` (the Ray simulation).
#
# Why python:3.11-slim and not flwr/superexec:1.42.0: the project pins flwr 1.42.0, torch 2.14.1 and
# Python >= 3.11 in pyproject.toml, and CI tests exactly that on Python 3.11. Flower's images default to
# Python 3.13 and would be a second, untested combination; building all roles from one image also guarantees
# that SuperLink, SuperNodes and SuperExecs speak the same Flower version (1.42 changed ports and protocols).
# Like Flower's images it runs as the non-root user `app` (UID 49999, HOME=/app).
#
#   docker build -t fedsparse:0.1.0 .                                   # CPU torch (default)
#   docker build -t fedsparse:0.1.0-cuda --build-arg TORCH_INDEX_URL= .  # PyPI's CUDA build of torch
#
# BASE_IMAGE: any Debian-like image with Python 3.11 where `python` and `pip` on PATH are the interpreter to install
# into (deploy/podman-check.sh builds one from Debian's packages with debootstrap, for machines that cannot pull).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Extra index for torch/torchvision: the CPU wheels (no 2 GB of CUDA libraries); empty = PyPI's CUDA wheels.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG APP_UID=49999
# pip's settings for this build only (build arguments are not kept in the image): a mirror or local index
# (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS), a proxy's CA bundle (PIP_CERT), PIP_NO_INDEX.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_NO_INDEX

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    FLWR_HOME=/app/.flwr \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FEDSPARSE_DATA=/data

RUN useradd --uid "${APP_UID}" --create-home --home-dir /app --shell /usr/sbin/nologin app \
 && mkdir -p /app/.flwr /app/state /results /data \
 && chown -R app:app /app /results

# Dependencies first, from pyproject.toml alone, so a source change does not reinstall torch.
COPY pyproject.toml /app/src/pyproject.toml
RUN python -c "import tomllib; \
deps = tomllib.load(open('/app/src/pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(deps))" > /tmp/requirements.txt \
 && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The source (filtered by .dockerignore: no certificates, keys, results or virtualenvs). Editable, so that
# `fedsparse run` finds the apps in /app/src; deployments get the apps from the FAB that `flwr run` sends.
COPY --chown=app:app . /app/src
RUN pip install --no-deps -e /app/src

USER app
WORKDIR /app
# No default process: every compose service names its entrypoint (flower-superlink, flower-supernode, ...).
CMD ["flower-superlink", "--help"]
