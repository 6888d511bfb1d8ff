"""Write generated files, or only report those that are not current: the one rule every
generator in scripts/ follows (gen_names.py, gen_role_docs.py), so CI checks them alike."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The repository these scripts belong to.
ROOT = Path(__file__).resolve().parents[1]


def arguments(doc: str) -> tuple[Path, bool]:
    """The repository to work on (--root: another copy; lint.sh proves the check on a stale
    one) and whether only to check (--check)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files not current")
    parser.add_argument("--root", type=Path, help="the repository (default: this one)")
    args = parser.parse_args()
    return (args.root or ROOT).resolve(), args.check


def sync(root: Path, files: dict[str, str], *, check: bool, tool: str, source: str) -> int:
    """Bring each file (path relative to root -> text) up to date; with check, change nothing.

    Returns the exit status: 1 when check finds a file that is not current, else 0.
    """
    stale = []
    for rel, text in files.items():
        path = root / rel
        if path.exists() and path.read_text() == text:
            continue
        stale.append(rel)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"{tool}: wrote {rel}")
    if check and stale:
        print(
            f"{tool}: not current with {source}: {', '.join(stale)} "
            f"(run .venv/bin/python scripts/{tool}.py)",
            file=sys.stderr,
        )
        return 1
    return 0
