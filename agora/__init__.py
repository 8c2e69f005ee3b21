"""The `agora` command line: the composition root that may import every package."""
