"""Settings: every documented one is read, and malformed values get a clear message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.config import BotConfig, ConfigError
from mgie_engine.errors import BadRequestError
from mgie_engine.settings import EngineSettings

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_in_env_example_is_read_by_the_code():
    keys = re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), flags=re.M)
    source = "".join(p.read_text() for p in [*ROOT.glob("bot/*.py"), *ROOT.glob("mgie_engine/*.py")])
    assert keys and [k for k in keys if f'"{k}"' not in source] == []


def test_bot_config_reads_the_environment():
    config = BotConfig.from_env({"DISCORD_TOKEN": "s3cr3t-value", "DISCORD_GUILD_IDS": "1, 2", "MGIE_DATA_DIR": "/x",
                                 "DISCORD_MESSAGE_CONTENT": "true", "MGIE_DEVICE": "cpu", "MGIE_MAX_BATCH": "4"})
    assert config.guild_ids == (1, 2) and config.message_content and config.engine.max_batch == 4
    assert config.token == "s3cr3t-value" and "s3cr3t-value" not in repr(config)


@pytest.mark.parametrize("env, message", [
    ({}, "DISCORD_TOKEN is not set"),
    ({"DISCORD_TOKEN": "t", "DISCORD_GUILD_IDS": "abc"}, "DISCORD_GUILD_IDS"),
    ({"DISCORD_TOKEN": "t", "MGIE_MAX_QUEUE": "0"}, "MGIE_MAX_QUEUE"),
])
def test_bad_bot_settings(env, message):
    with pytest.raises(ConfigError, match=message):
        BotConfig.from_env(env)


@pytest.mark.parametrize("env, message", [
    ({"MGIE_MAX_SIDE": "big"}, "MGIE_MAX_SIDE"),
    ({"MGIE_MAX_BATCH": "0"}, "MGIE_MAX_BATCH"),
])
def test_bad_engine_settings(env, message):
    with pytest.raises(BadRequestError, match=message):
        EngineSettings.from_env(env)


def test_device_and_dtype_messages():
    with pytest.raises(BadRequestError, match="MGIE_DEVICE"):
        EngineSettings(device="tpu").torch_device()
    with pytest.raises(BadRequestError, match="MGIE_DTYPE"):
        EngineSettings(dtype="int8").torch_dtype()
