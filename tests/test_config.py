"""Config file, environment overrides and secrets from files."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import ConfigError, Secret, load_config


def test_file_environment_and_secret_files(tmp_path: Path):
    (tmp_path / "key.pem").write_text("PRIVATE KEY\n")
    (tmp_path / "config.yaml").write_text(
        "server: {port: 9000, data_dir: data}\n"
        "github: {app_id: 12, private_key_file: key.pem, webhook_secret: from-file}\n"
        "terraform: {plan_env: {AWS_PROFILE: plan}}\n"
        "policy_file: policy.yaml\n"
    )
    config = load_config(tmp_path / "config.yaml", environ={
        "DEPLOYBOT_SERVER__PORT": "9100",
        "DEPLOYBOT_GITHUB__WEBHOOK_SECRET": "from-env",
        "DEPLOYBOT_TERRAFORM__APPLY_ENV": '{"AWS_PROFILE": "apply"}',
        "UNRELATED": "x",
    })
    assert config.server.port == 9100
    assert config.server.data_dir == tmp_path / "data"
    assert config.github.private_key.reveal() == "PRIVATE KEY"
    assert config.github.webhook_secret.reveal() == "from-env"
    assert config.terraform.plan_env == {"AWS_PROFILE": "plan"}
    assert config.terraform.apply_env == {"AWS_PROFILE": "apply"}
    assert config.policy_file == tmp_path / "policy.yaml"
    assert config.server.database_path == tmp_path / "data" / "deploybot.sqlite3"
    assert "from-env" not in repr(config) and "PRIVATE KEY" not in repr(config)


def test_secret_never_shows_itself():
    secret = Secret("hunter22")
    assert "hunter22" not in repr(secret) and "hunter22" not in str(secret) and "hunter22" not in f"{secret}"


@pytest.mark.parametrize("text, message", [
    ("nonsense: {}\n", "unknown config section"),
    ("server: {prot: 1}\n", "server.prot: unknown field"),
    ("server: {port: eighty}\n", "server.port"),
    ("github: {private_key_file: /nonexistent/key}\n", "github.private_key_file"),
    ("terraform: {parallelism: 0}\n", "terraform.parallelism"),
    ("server: {database_url: 'postgres://x'}\n", None),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str | None):
    (tmp_path / "c.yaml").write_text(text)
    if message is None:
        config = load_config(tmp_path / "c.yaml", environ={})
        with pytest.raises(ConfigError, match="database_url"):
            config.server.database_path
        return
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "c.yaml", environ={})
