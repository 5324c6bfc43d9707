"""Drop one known-harmless log line that a new CLI user would otherwise see on every model load.

torchao (installed with the dev extra; transformers imports it while loading a model) registers two enums as
pytree constants, and torch 2.14 logs a deprecation warning for each ("<enum 'KernelPreference'> is an Enum
subclass and is now natively supported by torch.compile ..."). Nothing is wrong and the user can do nothing about
it. The CLI installs this filter on that one logger; library users keep their own logging untouched.
"""

from __future__ import annotations

import logging


_LOGGER = "torch.utils._pytree"
_MESSAGE = "is an Enum subclass and is now natively supported by torch.compile"


class _DropEnumConstantNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _MESSAGE not in record.getMessage()


def quiet_known_warnings() -> None:
    """Install the filter (idempotent)."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _DropEnumConstantNotice) for f in logger.filters):
        logger.addFilter(_DropEnumConstantNotice())
