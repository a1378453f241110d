"""The conditions a user names on the command line (a prompts file, class labels), parsed
without torch: a mistyped option is refused before torch and the model load."""
from __future__ import annotations

from pathlib import Path

from ptqd.errors import UserError


def read_prompt_file(path: Path) -> tuple[str, ...]:
    """One prompt per non-empty line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--prompts {path}: cannot read it ({type(exc).__name__})") from None
    prompts = tuple(line.strip() for line in lines if line.strip())
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in it (one per line)")
    return prompts


def parse_classes(text: str | None, option: str = "--classes") -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated class labels, e.g. 1,7,42") from None
