"""Build ``shakespeare-instruct.jsonl``: prompt/completion pairs from the two shipped held-out plays.

Three deterministic tasks over the speeches of ``data/shakespeare-heldout/`` (Julius Caesar, Twelfth
Night; public domain, see that directory's README):

* ``Who speaks these words? <line>``  ->  the speaker, as the play names them (``BRUTUS.``)
* ``Which play is this line from? <line>``  ->  ``Julius Caesar.`` or ``Twelfth Night.``
* ``Give the line after: <line>``  ->  the next line of the same speech

Usage: ``python data/instructions/make_instructions.py [OUT.jsonl]`` (default: next to this file).
Every 4th speech, by a hash of its text, is a candidate; records are written in a fixed order.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLAYS = {"julius_caesar_gut.txt": "Julius Caesar", "twelfth_night_gut.txt": "Twelfth Night"}
SPEAKER = re.compile(r"^([A-Z][A-Z' ]+[A-Z])\.\s*$")


def speeches(text: str):
    """(speaker, [lines]) for each speech: a capitalised name line, then lines up to a blank line."""
    name, lines = None, []
    for raw in text.splitlines() + [""]:
        line = raw.strip()
        m = SPEAKER.match(line)
        if m:
            name, lines = m.group(1), []
        elif not line:
            if name and lines:
                yield name, lines
            name, lines = None, []
        elif name and not line.startswith("["):
            lines.append(line)


def _pick(text: str, every: int) -> bool:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") % every == 0


def records():
    src = HERE.parent / "shakespeare-heldout"
    for fname, play in PLAYS.items():
        for speaker, lines in speeches((src / fname).read_text(encoding="utf-8")):
            first = lines[0]
            if len(first) < 20 or not _pick(first, 4):
                continue
            yield {"prompt": f"Who speaks these words? {first}", "completion": f"{speaker.title()}."}
            yield {"prompt": f"Which play is this line from? {first}", "completion": f"{play}."}
            if len(lines) > 1 and len(lines[1]) >= 10:
                yield {"prompt": f"Give the line after: {first}", "completion": lines[1]}


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "shakespeare-instruct.jsonl"
    rows = list(records())
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} records to {out}")


if __name__ == "__main__":
    main()
