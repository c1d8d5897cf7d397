# The Secure Key Manager image: key server, system-key server, sidecar, CLI and the demo app.
#
#   docker build -t skm:latest .                              # from a public Python image
#   docker build --build-arg BASE_IMAGE=skm-base -t skm .     # from any Debian-like image with python3 + venv
#
# Wheels put in ./wheels/ of the build context (e.g. `pip wheel . -w wheels`) are installed
# without any index; otherwise the project and its dependencies come from PyPI.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

COPY . /src
RUN set -eu; \
    python3 -m venv /opt/skm; \
    if ls /src/wheels/*.whl >/dev/null 2>&1; then \
        /opt/skm/bin/pip install --no-cache-dir --no-index --find-links /src/wheels secure-key-manager; \
    else \
        /opt/skm/bin/pip install --no-cache-dir /src; \
    fi; \
    mkdir -p /opt/skm/docker /etc/skm /run/skm /var/lib/skm /var/lib/skm-systemkey; \
    cp /src/docker/*.py /src/docker/*.sh /opt/skm/docker/; \
    cp /src/docker/config/*.toml /etc/skm/; \
    chmod 700 /var/lib/skm /var/lib/skm-systemkey; \
    rm -rf /src

ENV PATH=/opt/skm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
EXPOSE 8443 8444 8445
CMD ["skm", "--help"]
