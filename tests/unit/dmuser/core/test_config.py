"""Config.build: options, then environment variables, then defaults; the switch
``block_devices`` (``serve --block-devices``) and its refusal without root."""

from __future__ import annotations

import pytest

from dmuser.cli import build_parser
from dmuser.core.config import Config, parse_bool


def test_block_devices_default_is_on_as_root_only() -> None:
    assert Config.build({}, {}).block_devices is False
    assert Config.build({}, {}, root=True).block_devices is True
    assert Config.build({}, {"DMUSER_BLOCK_DEVICES": "0"}, root=True).block_devices is False
    assert Config.build({"block_devices": False}, {}, root=True).block_devices is False


@pytest.mark.parametrize("text,value", [("1", True), ("on", True), ("Yes", True),
                                        ("true", True), ("0", False), ("off", False),
                                        ("False", False)])
def test_switch_from_the_environment(text: str, value: bool) -> None:
    assert Config.build({}, {"DMUSER_BLOCK_DEVICES": text}).block_devices is value


def test_option_wins_over_the_environment() -> None:
    assert Config.build({"block_devices": False},
                        {"DMUSER_BLOCK_DEVICES": "1"}).block_devices is False


def test_bad_switch_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="DMUSER_BLOCK_DEVICES"):
        Config.build({}, {"DMUSER_BLOCK_DEVICES": "maybe"})
    with pytest.raises(ValueError):
        parse_bool("2")


def test_serve_option_alone_turns_it_on_and_takes_a_value() -> None:
    parser = build_parser()
    assert parser.parse_args(["serve"]).block_devices is None
    assert parser.parse_args(["serve", "--block-devices"]).block_devices is True
    # the background start passes the resolved value on as text
    assert parser.parse_args(["serve", "--block-devices", "False"]).block_devices is False
    assert parser.parse_args(["serve", "--no-block-devices"]).block_devices is False


def test_block_devices_refused_without_root(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: object) -> None:
    from dmuser import daemon

    monkeypatch.setattr(daemon.os, "geteuid", lambda: 1000)
    d = daemon.Daemon(f"{tmp_path}/mnt", f"{tmp_path}/s.sock", Config(block_devices=True))
    with pytest.raises(daemon.StartupError, match="--block-devices needs root"):
        d.run()


def test_cli_flags_of_the_kernel_verbs() -> None:
    parser = build_parser()
    assert parser.parse_args(["create", "v", "-r", "--table", "0 8 zero"]).readonly is True
    assert parser.parse_args(["reload", "v", "--readonly", "--table", "0 8 zero"]).readonly
    assert parser.parse_args(["suspend", "v", "--nolockfs"]).nolockfs is True
    assert parser.parse_args(["resume", "v", "--nolockfs"]).nolockfs is True
    assert parser.parse_args(["remove", "v", "--deferred"]).deferred is True
    assert parser.parse_args(["suspend", "v"]).nolockfs is False
