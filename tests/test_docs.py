"""README promises two commands; CI must run the test one verbatim."""

import re
from pathlib import Path

from relay import ends
from relay.config import SETTINGS

ROOT = Path(__file__).parent.parent


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("## The two commands (fresh Debian machine, as root, from a checkout)")
    return [line.strip() for line in lines[start:] if line.startswith("    ")][:2]


def test_readme_names_setup_plus_demo_then_tests():
    demo, tests = readme_commands()
    assert demo.startswith("scripts/setup && ") and demo.endswith("relay demo")
    assert tests.startswith("scripts/setup && ") and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_the_readme_documents_every_option():
    readme = (ROOT / "README.md").read_text()
    options = [f"--{setting.key}" for setting in SETTINGS if setting.key != "verbose"]
    assert [option for option in options if f"`{option} " not in readme and f"`{option}`" not in readme] == []


def test_the_readme_says_where_a_password_shows():
    """Logs, errors and metrics show `***`, but the command line is readable by every local user."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`***` everywhere" not in readme
    assert "/proc/PID/cmdline" in readme and "--upstream-password-file" in readme


def readme_ends() -> str:
    """README's paragraph listing the words a connection's log line ends with."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("`end` is `closed`")
    return readme[start : readme.index("\n\n", start)]


def test_the_readme_documents_every_end():
    words = [value for name, value in vars(ends).items() if name.isupper() and isinstance(value, str)]
    assert len(words) >= 14  # the module as read, not an empty list
    assert [word for word in words if f"`{word}`" not in readme_ends()] == []


def test_ends_are_written_with_the_words_of_relay_ends():
    """An end word spelled out where a connection ends would escape the check above."""
    # refused:REASON is listed as such
    literal = re.compile(r"""(?:\bfail|ForwardFailed|\.end)\(\s*f?["'](?!refused:)[a-z]""")
    found = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in sorted((ROOT / "relay").rglob("*.py"))
        for line in path.read_text().splitlines()
        if literal.search(line)
    ]
    assert found == []
