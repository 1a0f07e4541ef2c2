"""Rendering run results into pull request comments."""

from __future__ import annotations

from bot.report.comments import ProjectOutcome, redact, render_run_comment, strip_ansi

GITHUB_COMMENT_LIMIT = 65_536


def test_summary_line_per_project_and_folded_output():
    [body] = render_run_comment("plan", "0123456789abcdef", [
        ProjectOutcome("staging", "succeeded", "+2 ~1 -0", "Plan: 2 to add"),
        ProjectOutcome("production", "failed", "terraform plan failed (exit 1)", "Error: boom"),
    ], "", GITHUB_COMMENT_LIMIT)
    assert "**deploybot plan** for `01234567`" in body
    assert "`staging`: +2 ~1 -0" in body
    assert "`production`: terraform plan failed (exit 1)" in body
    assert "<details><summary>Output of <code>staging</code></summary>" in body
    assert "Error: boom" in body


def test_ansi_is_stripped_and_secrets_redacted():
    assert strip_ansi("\x1b[1m\x1b[32mPlan:\x1b[0m ok") == "Plan: ok"
    assert redact("token=abcd1234 and abcd", ["abcd1234", "abcd"]) == "token=*** and ***"


def test_fence_in_output_cannot_close_the_code_block():
    [body] = render_run_comment("plan", "a" * 40, [ProjectOutcome("p", "succeeded", "x", "```\n# Injected")], "", GITHUB_COMMENT_LIMIT)
    assert body.count("```") == 2


def test_long_output_is_split_across_comments_under_the_limit():
    output = "\n".join(f"line {i} " + "x" * 80 for i in range(3000))  # ~270 kB
    bodies = render_run_comment("plan", "b" * 40, [ProjectOutcome("big", "succeeded", "+1 ~0 -0", output)], "", GITHUB_COMMENT_LIMIT)
    assert len(bodies) >= 5
    assert all(len(b) <= GITHUB_COMMENT_LIMIT for b in bodies)
    assert all("`big`: +1 ~0 -0" in b for b in bodies)
    joined = "".join(bodies)
    assert "line 0 " in joined and "line 2999 " in joined
    assert bodies[-1].endswith(f"part {len(bodies)} of {len(bodies)}_")


def test_single_huge_line_is_split_too():
    bodies = render_run_comment("plan", "c" * 40, [ProjectOutcome("p", "failed", "err", "y" * 200_000)], "", GITHUB_COMMENT_LIMIT)
    assert all(len(b) <= GITHUB_COMMENT_LIMIT for b in bodies)
    assert sum(b.count("y") for b in bodies) >= 200_000
