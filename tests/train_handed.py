"""What the ``train`` command hands the library's ``train``: the configurations, with the fit stopped before it starts
(a user error the command ends in one line), for tests of the command's defaults that need no fit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

STOPPED = "stopped before the fit"


@contextmanager
def handed_to_train(monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """Within the block, each ``train`` command appends the ``TrainConfig`` it built and ends with :data:`STOPPED`."""
    import semclip_batch.fewshot.train as train_module
    from semclip_batch.errors import ConfigError

    handed: list = []

    def stop(cfg, **_kwargs):
        handed.append(cfg)
        raise ConfigError(STOPPED)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train", stop)
        yield handed
