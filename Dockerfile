# The gateway as a container: `docker build -t gateway . && docker run -p 8000:8000 gateway`
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY producers ./producers
COPY clients ./clients
RUN pip install --no-cache-dir . && useradd --system --uid 10001 gateway

USER gateway
ENV GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000 \
    GATEWAY_LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve"]
