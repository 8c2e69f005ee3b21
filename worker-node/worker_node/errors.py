"""Errors raised by the worker node.

WorkerError
├── EngineError            the engine could not start, died, or answered badly
│   └── EngineStartTimeout the engine did not become healthy in time
├── EngineFull             every engine slot stayed busy (back-pressure, not a fault)
├── RegistrationRefused    the coordinator refused our identity or advert
├── ProtocolMismatch       the coordinator speaks another protocol version
└── ConfigError            the node's configuration is unusable
"""


class WorkerError(Exception):
    """Base of every error the worker node raises."""


class EngineError(WorkerError):
    pass


class EngineStartTimeout(EngineError):
    pass


class EngineFull(WorkerError):
    pass


class RegistrationRefused(WorkerError):
    pass


class ConfigError(WorkerError):
    pass


class ProtocolMismatch(WorkerError):
    pass
