"""A timeout on every request mdu makes to the Hugging Face Hub.

huggingface_hub (0.x, on `requests`) sends most API calls (`create_repo`,
`create_commit`, `repo_info`, ...) without a timeout, so a Hub that accepts
the connection and never answers would hang a command forever. mdu installs a
session factory whose sessions give every request that names no timeout of
its own this one: `--timeout` where a command has it, else the environment
variable MDU_HUB_TIMEOUT, else DEFAULT_TIMEOUT_S. It bounds the connection and
each wait for data, not a whole upload: a large file that keeps moving is
never cut off.
"""

from __future__ import annotations

import math
import os
from typing import Optional

from mdu_cli.errors import ConfigError

DEFAULT_TIMEOUT_S = 60.0
TIMEOUT_VARIABLE = "MDU_HUB_TIMEOUT"

_installed: Optional[float] = None


def hub_timeout(explicit: Optional[float] = None) -> float:
    """The timeout in seconds: the explicit value, else MDU_HUB_TIMEOUT, else the default."""
    if explicit is not None:
        value, source = explicit, "--timeout"
    elif os.environ.get(TIMEOUT_VARIABLE):
        source = TIMEOUT_VARIABLE
        try:
            value = float(os.environ[TIMEOUT_VARIABLE])
        except ValueError:
            raise ConfigError(f"{TIMEOUT_VARIABLE}={os.environ[TIMEOUT_VARIABLE]!r} is not a number of seconds") from None
    else:
        return DEFAULT_TIMEOUT_S
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{source} must be a number of seconds > 0 (got {value})")
    return value


def bound_hub_requests(explicit: Optional[float] = None) -> float:
    """Make every later Hub request of this process time out; returns the timeout."""
    global _installed
    timeout = hub_timeout(explicit)
    if _installed == timeout:
        return timeout
    from huggingface_hub import configure_http_backend

    try:  # the library's own factory keeps its request ids and offline mode
        from huggingface_hub.utils._http import _default_backend_factory as default_factory
    except ImportError:  # pragma: no cover - a layout this version range does not have
        import requests

        default_factory = requests.Session

    def factory():
        session = default_factory()
        send = session.request

        def request(method, url, *args, **kwargs):
            if kwargs.get("timeout") is None and len(args) < 7:  # timeout is the 7th after the url
                kwargs["timeout"] = timeout
            return send(method, url, *args, **kwargs)

        session.request = request
        return session

    configure_http_backend(backend_factory=factory)
    _installed = timeout
    return timeout


def is_timeout(err: BaseException) -> bool:
    """Whether a request timed out, here or in the chain of errors behind this
    one (the Hub client rewraps errors: a timed-out download can surface as
    "not in the cache")."""
    import requests

    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, (requests.Timeout, TimeoutError)):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False
