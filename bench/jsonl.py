"""jsonl.py — reading JSON Lines record files (kvhost's, kvbench's) without trusting their bytes.

Owns: the reading rule the bench tools share. Lines are split on b"\\n"; a line that is not UTF-8 (written
by a kvhost older than its U+FFFD repair, or edited by hand) is decoded with errors="replace" — the rule
kvhost's writer applies (host/util/utf8.h), so such a record reads as a repaired one would — and a warning names
FILE:LINE and the first bad byte. A line that is not a JSON object is the caller's to judge: records()
skips it with a warning naming FILE:LINE (a report should still come out of a file with one torn line),
kvbench.py merge refuses it. Standard library only.
"""
import json
import sys


def lines(path, tool):
    """(line number, text) for every non-blank line of path, invalid UTF-8 replaced by U+FFFD (warned)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                text = raw.decode("utf-8", "replace")
                print(f"{tool}: {path}:{n}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}) "
                      "read as U+FFFD", file=sys.stderr)
            text = text.strip()
            if text:
                yield n, text


def records(path, tool):
    """("path:line", record) for every line that is a JSON object; other lines are skipped with a warning."""
    for n, text in lines(path, tool):
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            print(f"{tool}: {path}:{n}: not a JSON record ({e.msg} at column {e.colno}); skipped", file=sys.stderr)
            continue
        if not isinstance(rec, dict):
            print(f"{tool}: {path}:{n}: not a JSON object; skipped", file=sys.stderr)
            continue
        yield f"{path}:{n}", rec
