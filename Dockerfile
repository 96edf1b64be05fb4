# Gray-release gateway container.
#   docker build --build-arg VERSION="$(git describe --tags --always)" -t gray-gateway .
FROM python:3.12-slim

ARG VERSION=dev
ENV GATEWAY_BUILD_VERSION=${VERSION} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-compile . \
 && useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway \
 && mkdir -p /etc/gateway /var/lib/gateway/var \
 && chown -R gateway:gateway /var/lib/gateway
COPY config/gateway.yaml /etc/gateway/gateway.yaml

USER gateway
WORKDIR /var/lib/gateway
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["gateway", "run", "-c", "/etc/gateway/gateway.yaml"]
