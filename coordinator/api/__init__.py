"""Boundaries: the OpenAI HTTP API, the admin API, and the workers' gRPC endpoint."""
