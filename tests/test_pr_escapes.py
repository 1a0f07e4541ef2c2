"""A pull request that tries to escape: out of the clone, into the bot's files, its environment or its comments.

Two halves: `bot.jobs.repo_guard.checkout_problems` on real directories (real git, real
symlinks, real `terraform init`), then end-to-end worlds where the pull request
itself carries the attack. The end-to-end tests marked `needs Worker wiring` are
refused only once the worker calls `checkout_problems` after the checkout.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
from pathlib import Path
from typing import Callable, Iterator

import pytest

from bot.jobs.git import RepoCache
from bot.jobs.repo_guard import (
    MAX_OUTPUT_BYTES,
    MAX_REASONS,
    cap_output,
    checkout_problems,
    installed_module_problems,
    parse_index,
)
from bot.jobs.terraform import NULL_PROVIDER_FILE, Terraform
from bot.report.comments import ProjectOutcome, render_run_comment
from bot.sandbox.forges import FORGES, WEBHOOK_SECRET
from bot.sandbox.trial import REPO, GitRepo, git, project_files, wait_for
from tests.world import TEST_POLICY, World, staging_change, visible

# --------------------------------------------------------------------------- checkouts on disk


def make_checkout(root: Path, files: dict[str, str], links: dict[str, str | Path] | None = None,
                  commit: bool = True) -> Path:
    """A directory with `files` and symlinks (`links`: path -> target), committed with git unless told not to."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for rel, target in (links or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
    if commit:
        git("init", "--quiet", "-b", "main", cwd=root)
        git("add", "--all", cwd=root)
        git("commit", "--quiet", "--allow-empty", "-m", "pull request", cwd=root)
    return root


PROJECT = {
    "staging/main.tf": 'module "app" {\n  source = "../modules/app"\n}\n',
    "modules/app/main.tf": 'module "shared" {\n  source = "../shared"\n}\n',
    "modules/shared/main.tf": 'resource "null_resource" "x" {}\n',
}


def problems(root: Path, project: str = "staging") -> list[str]:
    return checkout_problems(root, Path(project))


def test_a_plain_project_with_local_modules_a_lock_file_and_inner_symlinks_is_fine(tmp_path: Path) -> None:
    root = make_checkout(tmp_path / "co", {
        **PROJECT,
        "staging/.terraform.lock.hcl": 'provider "registry.terraform.io/hashicorp/null" {}\n',
        "common/providers.tf": "# shared by every project\n",
        "production/main.tf": "",
        "staging/templates/user-data.sh": "#!/bin/sh\n",
    }, links={
        "staging/providers.tf": "../common/providers.tf",  # the usual way to share files
        "staging/prod.tf": "../production/main.tf",  # another project: same repository, same review
        "modules/app/templates": "../../staging/templates",
    })
    assert problems(root) == []
    assert checkout_problems(root, root / "staging") == []  # absolute works too


def test_project_dir_that_leads_outside_the_checkout(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "main.tf").write_text("")
    root = make_checkout(tmp_path / "co", PROJECT, links={"escape": outside, "gitdir": ".git"})
    assert problems(root, "escape") == ["the project directory `escape` leads outside the repository"]
    assert problems(root, "../..") == ["the project directory `..` leads outside the repository"]
    assert problems(root, "gitdir") == ["the project directory `gitdir` leads into .git"]
    assert problems(root, "missing") == ["the project directory `missing` is not a directory"]


@pytest.mark.parametrize("where", [
    "staging/state",  # the project itself
    "staging/templates/deep/link",  # a subdirectory of it
    "modules/app/link",  # a module it calls
    "modules/shared/link",  # a module that module calls
])
@pytest.mark.parametrize("target", ["absolute", "relative", "dangling"])
def test_symlink_out_of_the_checkout_is_refused(tmp_path: Path, where: str, target: str) -> None:
    outside = tmp_path / "bot-data"
    outside.mkdir()
    (outside / "deploybot.sqlite3").write_text("the bot's database")
    depth = where.count("/")
    to = {"absolute": outside, "relative": "../" * depth + "../bot-data",
          "dangling": outside / "not-yet-there"}[target]
    root = make_checkout(tmp_path / "co", PROJECT, links={where: to})
    assert problems(root) == [f"`{where}` is a symlink that points outside the repository"]


def test_symlinks_inside_the_checkout_are_followed_and_checked(tmp_path: Path) -> None:
    root = make_checkout(tmp_path / "co", {**PROJECT, "shared-files/readme": ""},
                         links={"staging/files": "../shared-files", "shared-files/passwd": "/etc/passwd",
                                "staging/config": "../.git/config"})
    assert problems(root) == [
        "`staging/config` is a symlink into .git",
        "`shared-files/passwd` is a symlink that points outside the repository",
    ]


def test_symlinked_configuration_file_out_of_the_checkout(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.tf"
    outside.write_text('module "x" {\n  source = "../../../../etc"\n}\n')
    root = make_checkout(tmp_path / "co", PROJECT, links={"staging/extra.tf": outside})
    # Refused for the link; the file behind it is never read.
    assert problems(root) == ["`staging/extra.tf` is a symlink that points outside the repository"]


def test_module_directory_symlinked_out_of_the_checkout(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    files = {k: v for k, v in PROJECT.items() if not k.startswith("modules/shared")}
    root = make_checkout(tmp_path / "co", files, links={"modules/shared": elsewhere})
    assert problems(root) == ["`modules/app/main.tf`: the module source `../shared` leads outside the repository"]


ESCAPING_SOURCES = [
    ('module "x" {\n  source = "../../../../etc"\n}\n', "the module source `../../../../etc` leads outside"),
    ('module "x" {\n  source = "./sub/../../../../x"\n}\n', "the module source `./sub/../../../../x` leads outside"),
    ('module "x" {\n  source = "/etc"\n}\n', "the module source `/etc` is a path on the bot's machine"),
    ('module "x" {\n  source = "~/x"\n}\n', "the module source `~/x` is a path on the bot's machine"),
    ('module "x" {\n  source = "file:///var/lib/deploybot"\n}\n', "is a path on the bot's machine"),
    # Another repository's mirror in the bot's data dir.
    ('module "x" {\n  source = "git::file:///var/lib/deploybot/mirrors/github/acme/secrets.git"\n}\n',
     "is a path on the bot's machine"),
    # Terraform accepts each of these; a naive reader would not see a path at all.
    ('module x {\n  source = "../../../etc"\n}\n', "the module source `../../../etc` leads outside"),  # unquoted label
    ('module "x" { source = "\\u002e\\u002e/\\u002e\\u002e/\\u002e\\u002e/etc" }\n',
     "the module source `../../../etc` leads outside"),
    ('module "x" {\n  source = "./${"../.."}/etc"\n}\n', "a module source must be a plain string"),
    ('module "x" {\n  source = <<EOT\n../../etc\nEOT\n}\n', "a module source must be a plain string"),
    ('module "x" {\n  source = true ? "../../etc" : "./y"\n}\n', "a module source must be a plain string"),
    # A heredoc holding "/*" must not hide the module from a comment-stripping reader.
    ('locals {\n  x = <<EOT\n/*\nEOT\n}\nmodule "x" {\n  source = "../../../etc"\n}\n# */\n',
     "the module source `../../../etc` leads outside"),
]


@pytest.mark.parametrize(("text", "reason"), ESCAPING_SOURCES)
def test_module_source_that_leaves_the_checkout_is_refused(tmp_path: Path, text: str, reason: str) -> None:
    root = make_checkout(tmp_path / "co", {**PROJECT, "modules/shared/evil.tf": text})
    found = problems(root)
    assert len(found) == 1 and found[0].startswith("`modules/shared/evil.tf`: ") and reason in found[0], found


@pytest.mark.parametrize("text", [
    '{"module": {"x": {"source": "../../../etc"}}}',
    '{"module": [{"x": [{"source": "/etc"}]}]}',
    # Repeated keys are more blocks to terraform; json.loads would keep only the last.
    '{"module": {"x": {"source": "../../../etc"}}, "module": {"y": {"source": "./z"}}}',
    '{"module": {"x": {"source": "./${\\"../../..\\"}/etc"}}}',
])
def test_module_source_in_json_configuration(tmp_path: Path, text: str) -> None:
    root = make_checkout(tmp_path / "co", {**PROJECT, "staging/evil.tf.json": text})
    found = problems(root)
    assert len(found) == 1 and found[0].startswith("`staging/evil.tf.json`: "), found


def test_remote_and_commented_out_module_sources_are_left_to_terraform(tmp_path: Path) -> None:
    root = make_checkout(tmp_path / "co", {**PROJECT, "staging/remote.tf": (
        'module "consul" {\n  source  = "hashicorp/consul/aws"\n  version = "0.1.0"\n}\n'
        'module "vpc" {\n  source = "git::https://example.com/vpc.git?ref=v1.2.0"\n}\n'
        '# module "old" { source = "../../../../etc" }\n'
        '/* module "older" { source = "/etc" } */\n'
        'resource "null_resource" "x" {\n'
        '  triggers = { source = "../../../x" }  # not a module\n'
        '  provisioner "local-exec" { command = "echo ${path.module}" }\n}\n'
    )})
    assert problems(root) == []


def test_module_cycles_end(tmp_path: Path) -> None:
    root = make_checkout(tmp_path / "co", {
        "staging/main.tf": 'module "a" {\n  source = "../modules/a"\n}\n',
        "modules/a/main.tf": 'module "b" {\n  source = "../b"\n}\n',
        "modules/b/main.tf": 'module "a" {\n  source = "../a"\n}\nmodule "self" {\n  source = "./loop"\n}\n',
    }, links={"modules/b/loop": "."})
    found = problems(root)
    assert found == ["more than 1000 local module directories (a cycle?)"]


@pytest.mark.parametrize("where", ["staging/.terraformrc", "staging/terraform.rc", "staging/sub/.terraformrc",
                                   "modules/app/terraform.rc"])
def test_terraform_cli_config_files_in_the_repository_are_refused(tmp_path: Path, where: str) -> None:
    root = make_checkout(tmp_path / "co", {**PROJECT, where: 'provider_installation {\n  direct {}\n}\n'})
    assert problems(root) == [f"`{where}`: terraform CLI config files are not accepted in the repository"]


PROVIDER = ".terraform/providers/registry.terraform.io/hashicorp/null/2.1.2/linux_amd64/" + NULL_PROVIDER_FILE


@pytest.mark.parametrize("where", ["staging", "staging/sub", "modules/app"])
def test_committed_terraform_directory_is_refused(tmp_path: Path, where: str) -> None:
    root = make_checkout(tmp_path / "co", {**PROJECT, f"{where}/{PROVIDER}": "#!/bin/sh\n"})
    assert problems(root) == [f"`{where}/.terraform`: a committed .terraform directory "
                              "(it could carry provider binaries or module code)"]


def test_terraform_directory_that_is_a_symlink_or_a_file_is_refused(tmp_path: Path) -> None:
    root = make_checkout(tmp_path / "co", {**PROJECT, "modules/app/.terraform": "not a directory"},
                         links={"staging/.terraform": "../modules/shared"})
    assert problems(root) == [
        "`staging/.terraform`: a committed .terraform directory (it could carry provider binaries or module code)",
        "`modules/app/.terraform`: a committed .terraform directory (it could carry provider binaries or module code)",
    ]


def test_without_git_every_terraform_directory_counts_as_committed(tmp_path: Path) -> None:
    root = make_checkout(tmp_path / "co", {**PROJECT, "staging/.terraform/environment": "default"}, commit=False)
    assert problems(root) == ["`staging/.terraform`: a committed .terraform directory "
                              "(it could carry provider binaries or module code)"]


def test_untracked_terraform_directory_made_by_init_is_not_refused(tmp_path: Path) -> None:
    root = make_checkout(tmp_path / "co", PROJECT)
    made = root / "staging/.terraform/providers/registry.terraform.io/hashicorp/null/2.1.2"
    made.mkdir(parents=True)
    (made / "linux_amd64").symlink_to(tmp_path)  # init links providers into the shared plugin cache
    assert problems(root) == []
    (root / ".git/index").write_bytes(b"garbage")
    assert problems(root) == [
        "the checkout's git index could not be read (not a git index)",
        "`staging/.terraform`: a committed .terraform directory (it could carry provider binaries or module code)",
    ]


@pytest.mark.parametrize(("name", "reason"), [
    ("terraform.d/plugins/registry.terraform.io/hashicorp/null/2.1.2/linux_amd64/" + NULL_PROVIDER_FILE,
     "a committed terraform.d directory (terraform can install providers from it)"),
    ("terraform.tfstate", "committed terraform state (state belongs in the configured backend)"),
    ("terraform.tfstate.backup", "committed terraform state (state belongs in the configured backend)"),
    ("terraform.tfstate.d/prod/terraform.tfstate",
     "committed terraform workspace state (state belongs in the configured backend)"),
])
def test_what_terraform_reads_from_its_working_directory_is_refused_there(
    tmp_path: Path, name: str, reason: str
) -> None:
    root = make_checkout(tmp_path / "co", {**PROJECT, f"staging/{name}": "{}", f"modules/app/{name}": "{}"})
    top = "staging/" + name.split("/")[0]
    # Only in the working directory: a module's copy is never read by terraform.
    assert problems(root) == [f"`{top}`: {reason}"]


def test_reasons_are_inert_markdown_and_capped(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    hostile = "staging/`@org-admins [x](evil) <b>\n"
    links = {hostile: outside, **{f"staging/link{i:02}": outside for i in range(15)}}
    root = make_checkout(tmp_path / "co", PROJECT, links=links, commit=False)
    found = problems(root)
    assert len(found) == MAX_REASONS + 1 and found[-1] == f"and {16 - MAX_REASONS} more"
    assert "`staging/?@org-admins ?x??evil? ?b??` is a symlink that points outside the repository" in found
    assert all(reason.count("`") in (0, 2) and "\n" not in reason for reason in found)


def test_git_index_reader_agrees_with_git_for_every_index_version(tmp_path: Path) -> None:
    root = make_checkout(tmp_path / "co", {**PROJECT, **{f"d{i}/sub/{'x' * i}.tf": "" for i in range(40)},
                                           "staging/.terraform/environment": "default", "ünïcode/f.tf": ""})
    want = [path for path in git("ls-files", "-z", cwd=root).split("\0") if path]
    for version in ("2", "3", "4"):
        git("update-index", "--index-version", version, cwd=root)
        if version == "3":
            git("update-index", "--skip-worktree", "staging/main.tf", cwd=root)  # an extended entry
        data = (root / ".git/index").read_bytes()
        assert data[4:8] == int(version).to_bytes(4, "big")
        assert parse_index(data) == want


# --------------------------------------------------------------------------- with real git and terraform


def test_real_checkout_and_init_pass_and_escaping_modules_are_caught_after_init(
    make_git_repo: Callable[[str], GitRepo], terraform: Terraform, tmp_path: Path
) -> None:
    upstream = make_git_repo("upstream")
    state = tmp_path / "state"
    state.mkdir()
    first = upstream.commit(project_files(state, {"staging": "small"}), "Project", push="main")
    outside = tmp_path / "outside-module"
    outside.mkdir()
    (outside / "main.tf").write_text('output "o" { value = "outside" }\n')
    main_tf = (upstream.work / "staging/main.tf").read_text()
    second = upstream.commit({"staging/main.tf": main_tf + f'\nmodule "abs" {{\n  source = "{outside}"\n}}\n'},
                             "Escape", push="main")
    cache = RepoCache(tmp_path / "cache")

    async def scenario() -> tuple[list[str], list[str], list[str], list[str]]:
        key = "github:acme/infra"
        await cache.fetch(key, upstream.url, first)
        checkout = await cache.checkout(key, first, tmp_path / "work")
        before = checkout_problems(checkout, Path("staging"))
        init = await terraform.init(checkout / "staging")
        assert init.ok, init.output
        # The .terraform that init made (provider links out to the plugin cache) is the bot's own.
        after = checkout_problems(checkout, Path("staging")) + installed_module_problems(checkout, Path("staging"))
        await cache.fetch(key, upstream.url, second)
        checkout = await cache.checkout(key, second, tmp_path / "work")  # reused: .terraform is kept
        escaping = checkout_problems(checkout, Path("staging"))
        init = await terraform.init(checkout / "staging")
        assert init.ok, init.output  # terraform itself links the module in from the bot's disk
        return before, after, escaping, installed_module_problems(checkout, Path("staging"))

    before, after, escaping, installed = asyncio.run(scenario())
    assert before == [] and after == []
    assert len(escaping) == 1 and escaping[0].startswith("`staging/main.tf`: the module source `/")
    assert escaping[0].endswith("is a path on the bot's machine; use ./ or ../ paths inside the repository")
    assert installed == ["module `abs` was installed from outside the repository"]


def test_installed_module_problems_reads_terraforms_manifest(tmp_path: Path) -> None:
    root = make_checkout(tmp_path / "co", PROJECT)
    modules = root / "staging/.terraform/modules"
    modules.mkdir(parents=True)
    (modules / "remote").mkdir()
    (modules / "linked").symlink_to(tmp_path)
    (modules / "modules.json").write_text(
        '{"Modules": [{"Key": "", "Source": "", "Dir": "."},'
        ' {"Key": "app", "Source": "../modules/app", "Dir": "../modules/app"},'
        ' {"Key": "remote", "Source": "hashicorp/consul/aws", "Dir": ".terraform/modules/remote"},'
        ' {"Key": "up", "Source": "../../x", "Dir": "../../x"},'
        ' {"Key": "linked", "Source": "/tmp", "Dir": ".terraform/modules/linked"}]}'
    )
    assert installed_module_problems(root, Path("staging")) == [
        "module `up` was installed from outside the repository",
        "module `linked` was installed from outside the repository",
    ]
    (modules / "modules.json").write_text("{not json")
    assert installed_module_problems(root, Path("staging")) == ["terraform's module manifest could not be read"]


def test_terraform_environment_never_comes_from_the_bots_own(
    terraform: Terraform, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TF_CLI_ARGS", "TF_CLI_ARGS_plan", "TF_CLI_ARGS_apply", "TF_CLI_CONFIG_FILE_X", "TF_DATA_DIR",
                 "TF_VAR_token", "TF_LOG", "GITHUB_TOKEN", "DEPLOYBOT_GITHUB__WEBHOOK_SECRET", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "-from-the-bots-environment")
    env = terraform.environment({"AWS_PROFILE": "plan"})
    assert "-from-the-bots-environment" not in env.values()
    assert not any(name.startswith("TF_CLI_ARGS") for name in env)
    assert set(env) <= {"PATH", "HOME", "TF_IN_AUTOMATION", "TF_INPUT", "CHECKPOINT_DISABLE",
                        "TF_PLUGIN_CACHE_DIR", "TF_CLI_CONFIG_FILE", "AWS_PROFILE"}


# --------------------------------------------------------------------------- output size


def test_cap_output_keeps_the_head_and_the_tail() -> None:
    assert cap_output("short") == "short"
    text = "".join(f"line {i}\n" for i in range(200_000)) + "Plan: 1 to add, 0 to change, 0 to destroy.\n"
    capped = cap_output(text)
    assert len(capped.encode()) < MAX_OUTPUT_BYTES + 200
    assert capped.startswith("line 0\n") and capped.endswith("Plan: 1 to add, 0 to change, 0 to destroy.\n")
    assert "bytes of output left out here" in capped
    wide = "é" * MAX_OUTPUT_BYTES  # two bytes each: never cut inside a character
    assert "\ufffd" not in cap_output(wide)
    with pytest.raises(ValueError):
        cap_output("x", 0)


def test_split_comments_never_exceed_the_limit_even_without_a_footer() -> None:
    limit = 65_536
    head = "**deploybot plan** for `aaaaaaaa`\n\n" + "\n".join(f"- ✅ `p{i}`: x" for i in range(3))
    details = "<details><summary>Output of <code>p0</code></summary>\n\n```\n{}\n```\n</details>"
    first = 30_000
    worst = 0
    for slack in range(0, 40):
        second = limit - len(head) - 4 - len(details.format("y" * first)) - len(details.format("")) - slack
        outcomes = [ProjectOutcome("p0", "succeeded", "x", "y" * first),
                    ProjectOutcome("p1", "succeeded", "x", "y" * second),
                    ProjectOutcome("p2", "succeeded", "x", "z")]
        worst = max(worst, *(len(b) for b in render_run_comment("plan", "a" * 40, outcomes, "", limit)))
    assert worst <= limit


# --------------------------------------------------------------------------- end to end

MakeWorld = Callable[..., World]


def _world_factory(tmp_path: Path, forge: str) -> tuple[Callable[..., World], list[World]]:
    worlds: list[World] = []

    def make(policy_changes: dict | None = None, **kwargs) -> World:
        policy = copy.deepcopy(TEST_POLICY)
        policy["repos"][REPO].update(policy_changes or {})
        world = World(tmp_path / f"world{len(worlds)}", policy, forge=forge, **kwargs)
        worlds.append(world)
        return world

    return make, worlds


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[MakeWorld]:
    """Worlds on the local GitHub (what the checkout guard does is the same for every forge)."""
    make, worlds = _world_factory(tmp_path, "github")
    yield make
    for world in worlds:
        world.stop()


@pytest.fixture(params=sorted(FORGES))
def make_any_world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeWorld]:
    """Worlds on each forge in turn, for what depends on the forge (comment size limits)."""
    make, worlds = _world_factory(tmp_path, request.param)
    yield make
    for world in worlds:
        world.stop()


def plan_comments(world: World, number: int) -> list[str]:
    return [c for c in world.bot_comments(number) if "**deploybot plan**" in c]


def all_parts(comments: list[str]) -> list[str] | None:
    """The comments if the last one posted is the last part of a (possibly split) run comment."""
    if not comments:
        return None
    last = visible(comments[-1])
    if "_part " not in last:
        return comments
    done, _, total = last.rsplit("_part ", 1)[1].rstrip("_").partition(" of ")
    return comments if done == total else None


def no_jobs_ran(world: World) -> bool:
    store = world.store()
    try:
        return not any(store.jobs_with_status(s) for s in ("queued", "running", "waiting", "succeeded", "failed",
                                                           "cancelled", "interrupted"))
    finally:
        store.close()


def test_project_dir_climbing_out_in_a_comment_runs_nothing(make_world: MakeWorld) -> None:
    world = make_world()
    number = world.open_pr("docs", {"README.md": "no terraform here\n"})
    for body, reply in [("deploybot plan -d ../..", 'A directory must not contain ".."'),
                        ("deploybot apply -d staging/../../..", 'A directory must not contain ".."'),
                        ("deploybot plan -d /etc", "A directory must be relative to the repository root"),
                        ("deploybot plan --dir=..", 'A directory must not contain ".."'),
                        ("deploybot plan -p ../..", "No allow-listed project matches")]:
        seen = len(world.bot_comments(number))
        world.comment(number, "alice", body)
        world.wait_comment(number, reply, after=seen)
    world.wait_idle()
    assert plan_comments(world, number) == [] and no_jobs_ran(world)


# The worker checks a project out at <data>/work/<project key>/pr-<n>/<dir>: five levels below the world's root.
UP_TO_THE_WORLD = "../../../../.."


def test_module_source_outside_the_repository_is_refused(make_world: MakeWorld) -> None:
    world = make_world()
    outside = world.root / "outside-module"
    outside.mkdir()
    (outside / "main.tf").write_text('output "stolen" { value = "read-from-outside-the-clone" }\n')
    files = staging_change(world)
    files["staging/escape.tf"] = (f'module "outside" {{\n  source = "{UP_TO_THE_WORLD}/outside-module"\n}}\n'
                                  'output "stolen" { value = module.outside.stolen }\n')
    number = world.open_pr("module-escape", files)
    comment = world.wait_comment(number, "**deploybot plan**")
    assert "read-from-outside-the-clone" not in comment
    assert "❌ `staging`" in comment and "checkout refused" in comment
    assert "`staging/escape.tf`: the module source" in comment and "leads outside the repository" in comment


def test_symlink_to_the_bots_data_dir_is_refused(make_world: MakeWorld) -> None:
    world = make_world()
    world.repo.branch("loot", "main")
    (world.repo.work / "staging/bot-data").symlink_to(world.root / "data")
    files = staging_change(world)
    files["staging/loot.tf"] = ('output "db" {\n'
                                '  value = fileexists("${path.module}/bot-data/deploybot.sqlite3")\n}\n')
    world.repo.commit(files, "Look around", push="loot")
    number = world.forge.open("loot", author="alice")
    comment = world.wait_comment(number, "**deploybot plan**")
    assert "❌ `staging`" in comment and "checkout refused" in comment
    assert "`staging/bot-data` is a symlink that points outside the repository" in comment
    assert "Plan:" not in comment


def test_terraform_cli_config_in_the_project_is_refused(make_world: MakeWorld) -> None:
    world = make_world()
    files = staging_change(world)
    files["staging/.terraformrc"] = 'provider_installation {\n  direct {}\n}\n'
    files["staging/terraform.rc"] = 'plugin_cache_dir = "/tmp"\n'
    number = world.open_pr("rc", files)
    comment = world.wait_comment(number, "**deploybot plan**")
    assert "❌ `staging`" in comment and "checkout refused" in comment
    assert "`staging/.terraformrc`: terraform CLI config files are not accepted" in comment
    assert "`staging/terraform.rc`" in comment


def _h1(files: dict[str, bytes]) -> str:
    """Terraform's `h1:` hash of a provider package (Go's dirhash Hash1)."""
    summary = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files.items()))
    return "h1:" + base64.b64encode(hashlib.sha256(summary.encode()).digest()).decode()


def test_committed_provider_binary_never_runs(make_world: MakeWorld) -> None:
    """Terraform re-uses a provider found in .terraform/ when the lock file's hash matches: a pull
    request that commits both would run its own "provider" during plan, past the server's mirror."""
    world = make_world()
    marker = world.root / "provider-from-the-pull-request-ran"
    fake = f"#!/bin/sh\ntouch {marker}\nexit 1\n".encode()
    files = staging_change(world)
    files["staging/.terraform.lock.hcl"] = (
        'provider "registry.terraform.io/hashicorp/null" {\n  version     = "2.1.2"\n'
        f'  constraints = "2.1.2"\n  hashes = [\n    "{_h1({NULL_PROVIDER_FILE: fake})}",\n  ]\n}}\n')
    world.repo.branch("own-provider", "main")
    world.repo.write(files)
    binary = world.repo.work / "staging" / PROVIDER
    binary.parent.mkdir(parents=True)
    binary.write_bytes(fake)
    binary.chmod(0o755)
    world.repo.commit(message="Bring my own provider", push="own-provider")
    number = world.forge.open("own-provider", author="alice")
    comment = world.wait_comment(number, "**deploybot plan**")
    world.wait_idle()
    assert not marker.exists()
    assert "❌ `staging`" in comment and "checkout refused" in comment
    assert "`staging/.terraform`: a committed .terraform" in comment


def test_terraform_gets_none_of_the_bots_environment(make_world: MakeWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    bot_env = {
        "DEPLOYBOT_SERVER__ADMIN_TOKEN": "admin-token-from-the-bots-environment",
        "GITHUB_TOKEN": "ghp_fromthebotsenvironment0000000000000",
        "GITLAB_TOKEN": "glpat-from-the-bots-environment",
        "AWS_ACCESS_KEY_ID": "AKIAFROMTHEBOTSENV00",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-from-the-bots-environment",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/bots-own-task-role",
        # Any of these reaching terraform would change or break what it does.
        "TF_CLI_ARGS": "-no-such-flag-from-the-bots-environment",
        "TF_CLI_ARGS_plan": "-destroy",
        "TF_CLI_ARGS_apply": "-no-such-flag-from-the-bots-environment",
        "TF_VAR_stolen": "tf-var-from-the-bots-environment",
        "TF_DATA_DIR": "data-dir-from-the-bots-environment",
    }
    for name, value in bot_env.items():
        monkeypatch.setenv(name, value)  # before the in-process bot starts: it is the bot's own environment
    world = make_world()
    dump = world.state_dir / "terraform-env.txt"  # a dir every sandboxed job of the world may write
    files = staging_change(world)
    files["staging/env.tf"] = (
        'variable "stolen" {\n  type    = string\n  default = "nothing"\n}\n'
        'output "stolen" { value = var.stolen }\n'
        'resource "null_resource" "env" {\n'
        f'  provisioner "local-exec" {{ command = "env > {dump} && env" }}\n}}\n'
    )
    number = world.open_pr("read-env", files)
    plan = world.wait_comment(number, "**deploybot plan**")
    assert "✅ `staging`: +3 ~0 -0" in plan  # not a destroy, not a broken command line
    assert 'stolen = "nothing"' in plan
    world.forge.approve(number, "dave")
    world.comment(number, "bob", "deploybot apply")
    applied = world.wait_comment(number, "**deploybot apply**")
    assert "✅ `staging`: applied" in applied and "TF_INPUT=0" in applied  # env's output is in the comment

    seen = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert not [name for name in seen if name.startswith(("DEPLOYBOT_", "GITHUB_", "GITLAB_", "AWS_", "TF_CLI_ARGS",
                                                          "TF_VAR_", "TF_DATA_DIR", "GIT_"))]
    assert set(seen) <= {"PATH", "HOME", "TF_IN_AUTOMATION", "TF_INPUT", "CHECKPOINT_DISABLE", "TF_PLUGIN_CACHE_DIR",
                         "TF_CLI_CONFIG_FILE", "PWD", "OLDPWD", "SHLVL", "_",
                         "TF_TEMP_LOG_PATH", "TF_PANICWRAP_STDERR"}, sorted(seen)  # terraform's own crash log
    key_lines = [line for line in (world.root / "app-private-key.pem").read_text().splitlines() if len(line) >= 16]
    tokens = list(world.forge.fake._tokens)  # the installation tokens the bot was given
    secrets = [v for v in bot_env.values() if len(v) >= 16] + [WEBHOOK_SECRET, *key_lines, *tokens]
    assert tokens and key_lines
    for text in (dump.read_text(), plan, applied):
        assert [s for s in secrets if s in text] == []


def test_huge_plan_output_is_split_under_the_forge_limit(make_any_world: MakeWorld) -> None:
    world = make_any_world()
    files = staging_change(world)
    # One 300,000-character line and 3,000 ordinary ones: about 675 kB of plan output.
    files["staging/big.tf"] = (
        'resource "null_resource" "big" {\n  triggers = merge(\n'
        '    { blob = format("%0300000d", 0) },\n'
        '    { for p in setproduct(range(60), range(50)) :\n'
        '      format("k%02d%02d", p[0], p[1]) => format("%0100d", p[0] * 50 + p[1]) },\n  )\n}\n'
    )
    number = world.open_pr("huge", files)
    world.wait_comment(number, "**deploybot plan**")
    assert world.wait_status(number, "deploybot/plan: staging", "success").startswith("+3 ~0 -0 (plan `")
    comments: list[str] = wait_for(lambda: all_parts(plan_comments(world, number)), 60, "every part of the plan")
    limit = 65_536 if world.forge.name == "github" else 1_000_000
    assert all(len(body) <= limit for body in comments)
    assert 200_000 < sum(len(body) for body in comments) < 320_000  # capped at MAX_OUTPUT_BYTES
    assert "bytes of output left out here" in "".join(comments)
    assert "Plan: 3 to add, 0 to change, 0 to destroy." in comments[-1]
    if world.forge.name == "github":
        assert len(comments) > 1 and visible(comments[0]).endswith(f"_part 1 of {len(comments)}_")
    # The bot is still there for the next command.
    seen = len(world.bot_comments(number))
    world.comment(number, "alice", "deploybot help")
    world.wait_comment(number, "Usage", after=seen)


# --------------------------------------------------------------------------- what an approved apply runs


def test_apply_refuses_a_plan_file_changed_after_review(make_world: MakeWorld) -> None:
    world = make_world()
    number = world.open_pr("resize-staging", staging_change(world))
    world.wait_comment(number, "**deploybot plan**")
    world.wait_idle()
    # No plan file stays on disk (the job's scratch copy goes with its scratch dir): its bytes are in the store.
    wait_for(lambda: not list((world.root / "data").rglob("*.tfplan")), 10, "the job's scratch dir to go")
    store = world.store()
    try:
        with store._db() as db:
            [(head, content)] = [(r[0], bytes(r[1])) for r in db.execute(
                "SELECT head_sha, content FROM plans WHERE pull_number = ?", (number,)).fetchall()]
            assert head == world.head(number) and content.startswith(b"PK")  # terraform's zip
            db.execute("UPDATE plans SET content = ? WHERE pull_number = ?", (content + b"swapped after review", number))
    finally:
        store.close()
    world.forge.approve(number, "dave")
    world.comment(number, "bob", "deploybot apply")
    refused = world.wait_comment(number, "**deploybot apply**")
    assert "apply refused: the saved plan is missing or was changed" in refused
    assert world.state_resources("staging") == 0

