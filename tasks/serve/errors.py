"""The serving stage's errors: each says why, with the server's log tail where it has one."""

from __future__ import annotations


class ServeError(RuntimeError):
    """The serving stage failed; the message says why (with the server's log tail)."""


class PortBusyError(ServeError):
    """Something already listens on the configured port."""


class ServerEnvironmentError(ServeError):
    """The configured vLLM command does not exist."""


class ModelNotFoundError(ServeError):
    """The model to serve is not a servable folder (or registry spec)."""


class ServerStartError(ServeError):
    """vLLM exited or did not become healthy in time."""


class SmokeTestError(ServeError):
    """The server runs but answers badly."""


class SLOViolationError(ServeError):
    """The load test missed a configured service-level objective."""
