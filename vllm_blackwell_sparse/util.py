"""Small helpers shared by the vLLM glue modules."""

import logging

_warned: set[tuple[str, str]] = set()


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log ``message`` as a warning on ``logger`` the first time it is seen in this process."""
    key = (logger.name, message)
    if key not in _warned:
        _warned.add(key)
        logger.warning("vllm-blackwell-sparse: %s", message)
