"""The CLI drops torch's notice about torchao's enum pytree constants, and nothing else from that logger."""

import logging

from thrifty.runtime.quiet import quiet_known_warnings


def test_only_the_enum_constant_notice_is_dropped(caplog):
    logger = logging.getLogger("torch.utils._pytree")
    quiet_known_warnings()
    quiet_known_warnings()  # idempotent: one filter
    assert len(logger.filters) == len({type(f) for f in logger.filters})
    with caplog.at_level(logging.WARNING, logger="torch.utils._pytree"):
        logger.warning(
            "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as an "
            "opaque value type."
        )
        logger.warning("some other pytree warning")
    assert [r.getMessage() for r in caplog.records] == ["some other pytree warning"]
