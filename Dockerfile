# opensandbox-ingress container image.
#   docker build --build-arg VERSION=1.2.3 --build-arg GIT_COMMIT=$(git rev-parse HEAD) \
#     --build-arg BUILD_TIME=$(date -u +%Y-%m-%dT%H:%M:%SZ) -t opensandbox/ingress:local .
FROM python:3.12-slim AS build
WORKDIR /src
COPY setup.cfg setup.py pyproject.toml README.md ./
COPY opensandbox_ingress ./opensandbox_ingress
COPY twisted ./twisted
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
ARG VERSION=dev
ARG GIT_COMMIT=unknown
ARG BUILD_TIME=unknown
ENV OPENSANDBOX_INGRESS_VERSION=${VERSION} \
    OPENSANDBOX_INGRESS_GIT_COMMIT=${GIT_COMMIT} \
    OPENSANDBOX_INGRESS_BUILD_TIME=${BUILD_TIME} \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    # twistd scans plugins at start-up; build the cache now, as root, since
    # the runtime user cannot write to site-packages.
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && useradd --system --uid 10001 --no-create-home ingress
COPY examples /examples
USER 10001
EXPOSE 28888
ENTRYPOINT ["twistd", "-n", "--pidfile=", "-l", "-", "opensandbox-ingress"]
