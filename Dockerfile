# Conveyor: one image for the API, the workers and the migrations.
#   docker build -t conveyor .
#   docker run conveyor                      # the API on port 8000
#   docker run conveyor conveyor worker      # a worker
#   docker run conveyor conveyor migrate     # apply migrations (idempotent)
# With the `otel` extra: tracing is on once the OTEL_* variables ask for it (README, Tracing).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system conveyor && useradd --system --gid conveyor --home-dir /app conveyor

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
RUN pip install ".[otel]" && rm -rf build

USER conveyor
EXPOSE 8000
CMD ["conveyor", "api", "--host", "0.0.0.0", "--port", "8000"]
