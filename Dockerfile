# The gateway as a container image. Build and run from the checkout:
#
#   docker build -t notification-gateway .
#   docker run --rm -p 8000:8000 -p 1883:1883 -p 9001:9001 notification-gateway
#
# Ports: 8000 HTTP and WebSocket (/ws); 1883 MQTT and 9001 MQTT over WebSocket of
# the embedded broker, which runs only when no GATEWAY_MQTT_URL is given (set
# GATEWAY_MQTT_BROKER=none to turn MQTT off). Every setting is a GATEWAY_ variable
# (README.md, "Settings"); the same image runs `gateway worker` and the producers
# (`gateway produce stocks`, `gateway produce fixtures`) when given that command.

# The browser page's MQTT client, pinned by gateway/web/package-lock.json; only its
# browser bundle goes on (the gateway serves it at /vendor/mqtt.min.js).
FROM node:20-slim AS web
WORKDIR /web
COPY gateway/web/package.json gateway/web/package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund --loglevel=error

# Build stage: the package and its dependencies in a virtual environment, which
# alone is copied into the final image (no pip cache, no build files).
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/gateway
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY producers ./producers
COPY clients ./clients
RUN /opt/gateway/bin/pip install .
COPY --from=web /web/node_modules/mqtt/dist/mqtt.min.js \
    /opt/gateway/lib/python3.11/site-packages/gateway/web/node_modules/mqtt/dist/

# Final stage: the interpreter, the environment and an unprivileged user.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /opt/gateway /opt/gateway
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000 \
    GATEWAY_LOG_FORMAT=json
USER 10001
WORKDIR /tmp
EXPOSE 8000 1883 9001
# /healthz answers while the event loop runs; Python's own HTTP client does it,
# so the image needs no curl. Worker and producer containers disable it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_PORT', '8000'), timeout=2)"]
# SIGTERM starts the graceful stop: /readyz 503, clients closed with 1001, exit 0
# within GATEWAY_DRAIN_DELAY + GATEWAY_SHUTDOWN_TIMEOUT seconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve"]
