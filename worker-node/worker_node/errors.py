"""Errors raised by the worker node.

WorkerError
├── EngineError            the engine could not start, died, or answered badly
│   └── EngineStartTimeout the engine did not become healthy in time
├── EngineFull             every engine slot stayed busy (back-pressure, not a fault)
├── AdapterError           a LoRA adapter could not be had or loaded
│   ├── AdapterRefused     its bytes are not the ones its hash names (never loaded)
│   └── AdapterSlotsFull   every adapter slot is in use by running jobs (back-pressure)
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


class AdapterError(WorkerError):
    pass


class AdapterRefused(AdapterError):
    pass


class AdapterSlotsFull(AdapterError):
    pass
