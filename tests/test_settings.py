"""The farm's settings from the environment: every SMARTDIFF_* variable typed and checked."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from smartdiff.farm.settings import FarmSettings


@pytest.fixture
def env(monkeypatch):
    for name in ("AWS_DEFAULT_REGION", "SMARTDIFF_REDIS_URL", "SMARTDIFF_S3_PUBLIC_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_values_come_from_the_environment_with_derived_defaults(env):
    env.setenv("SMARTDIFF_BROKER_URL", "redis://broker:6379/2")
    env.setenv("SMARTDIFF_S3_ENDPOINT", "http://minio:9000")
    env.setenv("SMARTDIFF_LEASE_SECONDS", "12")
    env.setenv("SMARTDIFF_WEBHOOK_ALLOWED_HOSTS", "Hooks.Example.com, *.billing.example.com")
    env.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    settings = FarmSettings.from_env()
    assert settings.redis_url == "redis://broker:6379/2"  # the broker's, unless set
    assert settings.s3_public_endpoint == "http://minio:9000"  # the endpoint's, unless set
    assert settings.s3_region == "eu-west-1"  # boto's own variable, unless SMARTDIFF_S3_REGION is set
    assert settings.lease_seconds == 12
    assert settings.webhook_allowed_hosts == ("hooks.example.com", "*.billing.example.com")
    env.setenv("SMARTDIFF_S3_REGION", "us-west-2")
    env.setenv("SMARTDIFF_S3_PUBLIC_ENDPOINT", "")  # empty means unset, as compose's ${VAR:-} gives
    settings = FarmSettings.from_env()
    assert settings.s3_region == "us-west-2" and settings.s3_public_endpoint == "http://minio:9000"
    assert FarmSettings(s3_region="ap-south-1").s3_region == "ap-south-1"  # arguments first


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("SMARTDIFF_SHUTDOWN", "later", "shutdown"),
        ("SMARTDIFF_OBJECT_KEY_TEMPLATE", "videos/all.mp4", "object_key_template"),
        ("SMARTDIFF_LEASE_SECONDS", "2", "lease_seconds"),
        ("SMARTDIFF_REAPER_SECONDS", "soon", "reaper_seconds"),
        ("SMARTDIFF_GATEWAY_MAX_BODY_BYTES", "100", "gateway_max_body_bytes"),
        ("SMARTDIFF_S3_TIMEOUT_SECONDS", "0", "s3_timeout_seconds"),
    ],
)
def test_a_bad_value_is_refused_naming_the_setting(env, name, value, field):
    env.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        FarmSettings.from_env()
    assert info.value.errors()[0]["loc"] == (field,)


def test_the_codes_the_records_scripts_write_are_the_farms_enums():
    """The Lua scripts of farm.records write states and error codes as text: each one is a member."""
    import inspect
    import re

    from smartdiff.farm import records
    from smartdiff.farm.codes import ErrorCode, JobState

    source = inspect.getsource(records)
    states = set(re.findall(r"'state', '([A-Z_]+)'", source))
    codes = set(re.findall(r"'error_code', '([A-Z_]+)'", source))
    assert states and codes
    assert states <= set(JobState) and codes <= set(ErrorCode)
