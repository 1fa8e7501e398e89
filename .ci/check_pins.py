"""Fail, naming each package, if the installed versions are not exactly requirements.txt's pins (`name==version` on
every line): what CI tests is what a newcomer's `pip install -r requirements.txt` gets.

    python .ci/check_pins.py requirements.txt
"""

import sys
from importlib.metadata import PackageNotFoundError, version


def mismatches(requirements: str) -> list[str]:
    problems = []
    for lineno, line in enumerate(open(requirements, encoding="utf-8"), 1):
        spec = line.split("#", 1)[0].strip()
        if not spec:
            continue
        name, pinned = (part.strip() for part in spec.partition("==")[::2])
        if not pinned:
            problems.append(f"{requirements}:{lineno}: {spec} is not pinned to one version (name==version)")
            continue
        try:
            installed = version(name).split("+", 1)[0]  # a local label (2.14.1+cpu) is the same release
        except PackageNotFoundError:
            installed = "not installed"
        if installed != pinned:
            problems.append(f"{requirements}:{lineno}: {name} is pinned to {pinned} but {installed} is installed")
    return problems


if __name__ == "__main__":
    problems = mismatches(sys.argv[1] if len(sys.argv) > 1 else "requirements.txt")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    sys.exit(2 if problems else 0)
