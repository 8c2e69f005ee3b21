# Coordinator image (CPU only). Not built in CI (no Docker engine on the CI machines).
#   docker build -f docker/coordinator.Dockerfile -t agora-coordinator .
FROM python:3.11-slim
WORKDIR /opt/agora
COPY pyproject.toml README.md ./
COPY protocol protocol
COPY billing billing
COPY coordinator coordinator
COPY worker-node worker-node
COPY agora agora
COPY simulations simulations
RUN pip install --no-cache-dir . psycopg2-binary
ENV PYTHONUNBUFFERED=1 AGORA_COORDINATOR_HOST=0.0.0.0 AGORA_COORDINATOR_DATA_DIR=/data
VOLUME /data
EXPOSE 8080 50051
ENTRYPOINT ["agora", "coordinator"]
