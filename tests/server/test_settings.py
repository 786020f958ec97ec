"""Settings: defaults in the signature, CARPOOL_* variables read in one place,
explicit overrides on top."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from server.app import create_app
from server.cli import uvicorn_config
from server.settings import Settings

ENVIRON = {
    "CARPOOL_HOST": "0.0.0.0",
    "CARPOOL_PORT": "9000",
    "CARPOOL_MODELS_DIR": "/srv/models",
    "CARPOOL_TORCH_THREADS": "3",
    "CARPOOL_MAX_BODY_BYTES": "1024",
    "CARPOOL_DRAIN_TIMEOUT": "2.5",
    "CARPOOL_LOG_LEVEL": "debug",
}


def test_no_variables_give_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()
    assert (Settings().host, Settings().port) == ("127.0.0.1", 8000)
    assert Settings().max_body_bytes == 16 * 1024 * 1024


def test_carpool_variables_set_their_fields_with_their_types() -> None:
    settings = Settings.from_env(ENVIRON)
    assert settings.host == "0.0.0.0"
    assert settings.port == 9000
    assert settings.torch_threads == 3
    assert settings.max_body_bytes == 1024
    assert settings.drain_timeout == 2.5
    assert settings.log_level == "debug"
    assert str(settings.models_dir) == "/srv/models"


def test_carpool_models_dir_becomes_a_path() -> None:
    settings = Settings.from_env({"CARPOOL_MODELS_DIR": "/srv/models"})
    assert isinstance(settings.models_dir, Path)
    assert settings.models_dir == Path("/srv/models")


def test_overrides_win_over_variables() -> None:
    settings = Settings.from_env(ENVIRON, port=1234, models_dir=Path("elsewhere"))
    assert settings.port == 1234
    assert settings.models_dir == Path("elsewhere")
    assert settings.host == "0.0.0.0"


def test_none_overrides_leave_the_variable_or_default_in_place() -> None:
    settings = Settings.from_env({"CARPOOL_PORT": "9000"}, port=None, host=None)
    assert settings.port == 9000
    assert settings.host == "127.0.0.1"


def test_an_empty_variable_counts_as_unset() -> None:
    assert Settings.from_env({"CARPOOL_PORT": ""}).port == 8000


def test_only_the_given_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARPOOL_PORT", "9999")
    assert Settings.from_env({}).port == 8000
    assert Settings.from_env().port == 9999


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("CARPOOL_PORT", "eighty"),
        ("CARPOOL_MAX_BODY_BYTES", "1.5"),
        ("CARPOOL_TORCH_THREADS", " "),
        ("CARPOOL_DRAIN_TIMEOUT", "soon"),
    ],
)
def test_a_bad_number_raises_value_error_naming_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(ValueError, match=variable) as raised:
        Settings.from_env({variable: raw})
    assert repr(raw) in str(raised.value)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


def test_proxy_headers_are_off_unless_proxies_are_named() -> None:
    """Nothing in carpool reads the client's address, so by default no
    request pays for parsing X-Forwarded-*; naming the proxies turns
    uvicorn's proxy-header handling on for exactly those."""
    plain = uvicorn_config(create_app(Settings()), Settings())
    plain.load()
    assert not isinstance(plain.loaded_app, ProxyHeadersMiddleware)

    named = Settings.from_env({"CARPOOL_FORWARDED_ALLOW_IPS": "10.0.0.7,10.0.0.8"})
    behind = uvicorn_config(create_app(named), named)
    behind.load()
    assert isinstance(behind.loaded_app, ProxyHeadersMiddleware)
    assert behind.forwarded_allow_ips == "10.0.0.7,10.0.0.8"
