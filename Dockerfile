# opensandbox-ingress container image (`make image`, or `build.sh` for
# linux/amd64 + linux/arm64):
#   docker build --build-arg VERSION=$(git describe --tags --always --dirty) \
#     --build-arg GIT_COMMIT=$(git rev-parse HEAD) \
#     --build-arg BUILD_TIME=$(date -u +%Y-%m-%dT%H:%M:%SZ) -t opensandbox/ingress:local .
#
# Two stages: the first builds wheels for the package and its dependencies;
# the final one installs only those wheels on python:3.12-slim (no
# compilers, no tests, no build tools beyond the base image's pip).

FROM python:3.12-slim AS build
WORKDIR /src
COPY setup.cfg setup.py pyproject.toml README.md ./
COPY opensandbox_ingress ./opensandbox_ingress
COPY twisted ./twisted
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels opensandbox-ingress \
    && rm -rf /wheels \
    # twistd scans plugins at start-up; build the cache now, as root, since
    # the runtime user cannot write to site-packages.
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && useradd --system --uid 10001 --no-create-home ingress
COPY examples /examples

# Build metadata, read at start-up by opensandbox_ingress.buildinfo and
# logged as `opensandbox-ingress version=... commit=... built=...`.  Declared
# after the install so a new commit or build time does not invalidate the
# cached dependency layers above.
ARG VERSION=dev
ARG GIT_COMMIT=unknown
ARG BUILD_TIME=unknown
ENV OPENSANDBOX_INGRESS_VERSION=${VERSION} \
    OPENSANDBOX_INGRESS_GIT_COMMIT=${GIT_COMMIT} \
    OPENSANDBOX_INGRESS_BUILD_TIME=${BUILD_TIME}
LABEL org.opencontainers.image.title="opensandbox-ingress" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.created="${BUILD_TIME}" \
      org.opencontainers.image.licenses="Apache-2.0"

USER 10001
EXPOSE 28888
ENTRYPOINT ["twistd", "-n", "--pidfile=", "-l", "-", "opensandbox-ingress"]
