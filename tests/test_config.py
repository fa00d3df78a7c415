"""Settings: every documented one is read, and malformed values get a clear message."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from bot.config import BotConfig, ConfigError
from mgie_engine.errors import BadRequestError, SettingsError
from mgie_engine.settings import EngineSettings, load_env_file

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


@pytest.mark.parametrize("name, value", [
    ("MGIE_DEVICE", "gpu"), ("MGIE_DEVICE", "cuda:x"), ("MGIE_DTYPE", "int8"), ("MGIE_MAX_SIDE", "0"),
    ("MGIE_MAX_SIDE", "99999"), ("MGIE_MAX_BATCH", "x"), ("MGIE_COMPILE", "maybe"), ("MGIE_OFFLOAD", "2"),
    ("MGIE_SAFETY_CHECKER", "yes please"), ("MGIE_COMPILE_CHILD", "sometimes"), ("MGIE_COMPILE_CHILDREN", "17"),
    ("MGIE_COMPILE_SWITCH_INTERVAL", "-0.001"), ("MGIE_COMPILE_SWITCH_INTERVAL", "fast"), ("MGIE_COMPILE_AOT", "auto"),
    ("MGIE_SIZE_STEP", "12"),
])
def test_every_engine_setting_is_checked_when_read(name, value):
    with pytest.raises(SettingsError, match=name):
        EngineSettings.from_env({name: value})


@pytest.mark.parametrize("name, value", [
    ("MGIE_PROGRESS_INTERVAL", "abc"), ("MGIE_PROGRESS_INTERVAL", "0"), ("MGIE_SHUTDOWN_GRACE", "abc"),
    ("MGIE_SHUTDOWN_GRACE", "-1"), ("MGIE_STALL_TIMEOUT", "inf"), ("DISCORD_MESSAGE_CONTENT", "perhaps"),
    ("DISCORD_API_BASE", "discord.com/api"), ("DISCORD_GATEWAY_URL", "https://gateway"), ("MGIE_MAX_BATCH", "x"),
])
def test_every_bot_setting_and_the_engine_ones_raise_the_bot_config_error(name, value):
    with pytest.raises(ConfigError, match=name):
        BotConfig.from_env({"DISCORD_TOKEN": "t", name: value})


def test_good_values_are_read():
    config = BotConfig.from_env({"DISCORD_TOKEN": "t", "MGIE_SHUTDOWN_GRACE": "12.5", "MGIE_PROGRESS_INTERVAL": "0.5",
                                 "MGIE_DEVICE": "cuda:0,cuda:1", "MGIE_COMPILE": "off", "MGIE_OFFLOAD": "TRUE"})
    assert config.shutdown_grace == 12.5 and config.progress_interval == 0.5
    assert config.engine.device == "cuda:0,cuda:1" and not config.engine.compile and config.engine.offload


def test_the_compile_child_and_switch_interval_settings():
    default = EngineSettings.from_env({})
    assert default.compile_child is None and default.compile_switch_interval == 0.0005  # auto; 0.5 ms
    chosen = EngineSettings.from_env({"MGIE_COMPILE_CHILD": "0", "MGIE_COMPILE_SWITCH_INTERVAL": "0"})
    assert chosen.compile_child is False and chosen.compile_switch_interval == 0.0
    assert EngineSettings.from_env({"MGIE_COMPILE_CHILD": "1"}).compile_child is True
    assert EngineSettings.from_env({"MGIE_COMPILE_CHILD": "auto"}).compile_child is None
    assert default.compile_children == 0  # auto: as many children as the free memory holds
    assert default.compile_give_way == 10.0
    assert EngineSettings.from_env({"MGIE_COMPILE_GIVE_WAY": "0"}).compile_give_way == 0.0
    with pytest.raises(SettingsError, match="MGIE_COMPILE_GIVE_WAY"):
        EngineSettings.from_env({"MGIE_COMPILE_GIVE_WAY": "-1"})
    assert EngineSettings.from_env({"MGIE_COMPILE_CHILDREN": "3"}).compile_children == 3


def test_the_size_step_setting():
    assert EngineSettings.from_env({}).size_step is None  # auto
    assert EngineSettings.from_env({"MGIE_SIZE_STEP": "auto"}).size_step is None
    assert EngineSettings.from_env({"MGIE_SIZE_STEP": "24"}).size_step == 24
    assert EngineSettings.from_env({"MGIE_SIZE_STEP": " 256 "}).size_step == 256
    for bad in ("12", "4", "0", "264", "512", "-8", "32.0", "coarse"):
        with pytest.raises(SettingsError, match="MGIE_SIZE_STEP"):
            EngineSettings.from_env({"MGIE_SIZE_STEP": bad})


def test_the_working_step():
    # auto: at most 16 side lengths on a compiling worker; the VAE's own grid elsewhere
    assert EngineSettings(max_side=512).working_step(True, 8) == 32
    assert EngineSettings(max_side=1024).working_step(True, 8) == 64
    assert EngineSettings(max_side=500).working_step(True, 8) == 24
    assert EngineSettings(max_side=128).working_step(True, 8) == 8
    assert EngineSettings(max_side=1024).working_step(False, 8) == 8
    # an explicit step wins, compiling or not, rounded up to the VAE's factor
    assert EngineSettings(size_step=48).working_step(True, 8) == 48
    assert EngineSettings(size_step=48).working_step(False, 8) == 48
    assert EngineSettings(size_step=24).working_step(False, 16) == 32
    assert EngineSettings(max_side=512).working_step(True, 16) == 32
    assert EngineSettings(max_side=128).working_step(True, 16) == 16


def test_dotenv_is_found_from_the_current_directory_up(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("MGIE_TEST_ONLY_SETTING=from-dotenv\n")
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    monkeypatch.delenv("MGIE_TEST_ONLY_SETTING", raising=False)
    assert load_env_file() == tmp_path / ".env"
    assert os.environ.pop("MGIE_TEST_ONLY_SETTING") == "from-dotenv"


def test_metrics_endpoint_settings():
    assert BotConfig.from_env({"DISCORD_TOKEN": "t"}).metrics_port == 0  # unset: no endpoint
    config = BotConfig.from_env({"DISCORD_TOKEN": "t", "MGIE_METRICS_PORT": "9464", "MGIE_METRICS_ADDR": "0.0.0.0"})
    assert (config.metrics_port, config.metrics_addr) == (9464, "0.0.0.0")
    assert BotConfig.from_env({"DISCORD_TOKEN": "t", "MGIE_METRICS_PORT": "9464"}).metrics_addr == "127.0.0.1"
    assert BotConfig.from_env({"DISCORD_TOKEN": "t", "MGIE_METRICS_ADDR": "::1"}).metrics_addr == "::1"
    for name, bad in (("MGIE_METRICS_PORT", "http"), ("MGIE_METRICS_PORT", "70000"), ("MGIE_METRICS_PORT", "-1"),
                      ("MGIE_METRICS_ADDR", "http://0.0.0.0"), ("MGIE_METRICS_ADDR", "a b")):
        with pytest.raises(ConfigError, match=name):
            BotConfig.from_env({"DISCORD_TOKEN": "t", name: bad})
