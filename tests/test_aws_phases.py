"""The bot gives terraform each phase's own short-lived role credentials (moto stands in for AWS)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.test_aws_credentials import REGION, Moto, bot_environment, moto  # noqa: F401  (fixtures)
from tests.world import World, staging_change


@pytest.fixture
def world(tmp_path: Path, moto: Moto) -> Iterator[World]:  # noqa: F811
    world = World(tmp_path / "world", extra_config={"aws": {
        "plan_role_arn": moto.plan_role_arn, "apply_role_arn": moto.apply_role_arn,
        "region": REGION, "endpoint_url": moto.endpoint}})
    yield world
    world.stop()


def test_apply_runs_with_the_apply_role_and_names_who_caused_it(world: World, moto: Moto, tmp_path: Path):  # noqa: F811
    seen = world.state_dir / "apply-env.txt"  # a dir every sandboxed job of the world may write
    files = staging_change(world)
    files["staging/env.tf"] = ('resource "null_resource" "env" {\n'
                               f'  provisioner "local-exec" {{ command = "env | grep ^AWS_ > {seen}" }}\n}}\n')
    number = world.open_pr("aws", files)
    world.wait_comment(number, "**deploybot plan**")
    world.forge.approve(number, "dave")
    world.comment(number, "bob", "deploybot apply")
    applied = world.wait_comment(number, "**deploybot apply**")
    assert "`staging`: applied" in applied
    env = dict(line.split("=", 1) for line in seen.read_text().splitlines())
    assert env["AWS_REGION"] == REGION
    arn = moto.caller_arn(env)
    assert "assumed-role/deploybot-apply/deploybot-apply-acme-infrastructure-live-pr1-bob" in arn
    assert env["AWS_SECRET_ACCESS_KEY"] not in applied  # and never shown
