# blockvirt: NBD exports on 10809, management API and /metrics on 9810, data in /data.
#   docker build -t blockvirt .
#   openssl rand -hex 32 > api-token && chmod 644 api-token
#   docker run -p 10809:10809 -p 9810:9810 -v blockvirt-data:/data \
#       -v $PWD/api-token:/run/secrets/api_token:ro blockvirt
# The API listens on 0.0.0.0 inside the container, so it requires that token (the health
# check does not need it).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY blockvirt ./blockvirt
RUN pip install . && rm -rf /src

RUN useradd --system --home-dir /data --shell /usr/sbin/nologin blockvirt \
    && mkdir -p /data && chown blockvirt:blockvirt /data
USER blockvirt
WORKDIR /data
VOLUME ["/data"]
EXPOSE 10809 9810

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9810/api/v1/health', timeout=2)"]

# SIGTERM stops it in order: sessions finish in-flight requests and flush, then storage closes.
STOPSIGNAL SIGTERM
ENTRYPOINT ["blockvirt"]
CMD ["serve", "--data-dir", "/data", "--nbd", "0.0.0.0:10809", "--api", "0.0.0.0:9810", "--api-token-file", "/run/secrets/api_token"]
