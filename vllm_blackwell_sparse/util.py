"""Small helpers shared by the vLLM glue modules."""

import logging

_warned: set[tuple[str, str]] = set()


def get_logger(module_name: str) -> logging.Logger:
    """A logger that prints like vLLM's own: vLLM configures only the ``vllm`` logger
    (its handler, format and level), so ours live under it (``vllm.<module>``)."""
    from vllm.logger import init_logger

    return init_logger(f"vllm.{module_name}")


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log ``message`` as a warning on ``logger`` the first time it is seen in this process."""
    key = (logger.name, message)
    if key not in _warned:
        _warned.add(key)
        logger.warning("vllm-blackwell-sparse: %s", message)
