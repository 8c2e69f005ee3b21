from __future__ import annotations

from protocol import codegen


def test_committed_grpc_stubs_are_current() -> None:
    """Regenerate with `python -m protocol.codegen` after editing protocol/proto/*.proto."""
    assert codegen.stale_files() == []
