"""Errors raised by the protocol package.

ProtocolError
├── InvalidSignature      a signature does not verify against the claimed key
├── MalformedMessage      bytes that do not decode to the expected canonical structure
└── KeyFileError          a key file is missing, unreadable or has unsafe permissions
"""


class ProtocolError(Exception):
    """Base of every error the protocol package raises."""


class InvalidSignature(ProtocolError):
    pass


class MalformedMessage(ProtocolError):
    pass


class KeyFileError(ProtocolError):
    pass
