"""Write the flags table of docs/flags.md from server/tributary/flags.py (`--check`: only compare).

The table in code is the one source: the parser, --help, the start-up warnings and this page
all come from it. `make flags-doc` runs this; tests/unit/test_flags.py fails when the page is
stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tributary import flags

DOC = Path(__file__).resolve().parent.parent / "docs" / "flags.md"


def render(text: str) -> str:
    """`text` with the part between the table markers replaced by a fresh rendering."""
    start = text.index(flags.DOC_BEGIN)
    end = text.index(flags.DOC_END) + len(flags.DOC_END) + 1
    return text[:start] + flags.markdown() + text[end:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/flags.md is stale")
    opts = parser.parse_args()
    text = DOC.read_text()
    fresh = render(text)
    if opts.check:
        if fresh != text:
            print(f"{DOC} is stale; run `make flags-doc`")
            return 1
        print(f"{DOC} is up to date")
        return 0
    DOC.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
