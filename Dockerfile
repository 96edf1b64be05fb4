# Gray-release gateway container.
#   docker build --build-arg VERSION="$(git describe --tags --always)" -t gray-gateway .
#
# Two stages: the per-request modules are compiled with mypyc in a builder that
# has a C compiler (setup.py; GATEWAY_COMPILE=1 fails the build rather than fall
# back to pure Python); the runtime image gets only the wheel. The compiled build
# is what benchmarks/RESULTS.md measures. mypy is pinned as _build/gateway_build.py
# pins it for `pip install .`.
#
# The base images are build arguments so the same file builds from local stand-ins
# where no registry is reachable (tests/test_container.py builds Debian ones with
# debootstrap); the defaults are the official Python images.
ARG BUILD_IMAGE=python:3.12
ARG RUN_IMAGE=python:3.12-slim

FROM ${BUILD_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml setup.py README.md MANIFEST.in ./
COPY _build ./_build
COPY gateway ./gateway
RUN pip install "mypy==2.4.1" "setuptools>=68" wheel "mmh3>=4.0" "httptools>=0.6" "prometheus-client>=0.19" \
 && GATEWAY_COMPILE=1 pip wheel --no-build-isolation --no-deps -w /wheels .

FROM ${RUN_IMAGE}

ARG VERSION=dev
ENV GATEWAY_BUILD_VERSION=${VERSION} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

COPY --from=build /wheels /wheels
RUN pip install --no-compile /wheels/*.whl \
 && rm -rf /wheels \
 && useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway \
 && mkdir -p /etc/gateway /var/lib/gateway/var \
 && chown -R gateway:gateway /var/lib/gateway
COPY config/gateway.yaml /etc/gateway/gateway.yaml

USER gateway
WORKDIR /var/lib/gateway
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python3 -c "import sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["gateway", "run", "-c", "/etc/gateway/gateway.yaml"]
