# Provider node on NVIDIA GPUs: the official vLLM image plus the agora package.
# Not built in CI (no Docker engine on the CI machines); tests/test_docker.py checks what it can.
#   docker build -f docker/worker.Dockerfile -t agora-worker .
#   docker run --gpus all -v agora:/root/.config/agora agora-worker \
#       --coordinator coordinator.example.org:50051 --model Qwen/Qwen2.5-7B-Instruct
FROM vllm/vllm-openai:v0.24.0
WORKDIR /opt/agora
COPY pyproject.toml README.md ./
COPY protocol protocol
COPY billing billing
COPY coordinator coordinator
COPY worker-node worker-node
COPY agora agora
COPY simulations simulations
# vLLM, torch, fastapi, httpx, prometheus-client... come with the image; add only what it lacks.
RUN pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir "grpcio>=1.85.1" "protobuf>=7.36" cryptography typer rich \
        pydantic-settings sqlmodel alembic tomli-w nvidia-ml-py psutil
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["agora", "worker"]
