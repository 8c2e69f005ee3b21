"""The provider daemon: runs engines, dials out to a coordinator, serves jobs, signs receipts."""

__version__ = "0.1.0"
