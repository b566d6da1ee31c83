"""The docs' code blocks as the tests run them.

A block of ``docs/integrations.md`` is tagged by the HTML comment ``<!-- test: NAME -->`` on the
line before it (invisible in the built site); `snippet` returns its code, and
``test_docs_snippets.py`` checks that every block is tagged and every tag is run by a test.
"""

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"^(?:<!-- test: (?P<tag>[\w-]+) -->\n\n?)?```python\n(?P<code>.*?)^```$", re.M | re.S)
HEADING = re.compile(r"^#+ .*$", re.M)


def code_blocks(page):
    """``[(heading, tag or None, code)]`` of every python block of ``docs/<page>``, in order."""
    text = (DOCS / page).read_text()
    headings = [(m.start(), m.group()) for m in HEADING.finditer(text)]
    blocks = []
    for m in BLOCK.finditer(text):
        heading = max((h for h in headings if h[0] < m.start()), default=(0, ""))[1]
        blocks.append((heading, m["tag"], m["code"]))
    return blocks


def snippet(tag, page="integrations.md"):
    """The code of the block tagged ``tag`` in ``docs/<page>``."""
    found = [code for _, t, code in code_blocks(page) if t == tag]
    assert len(found) == 1, f"{page}: {len(found)} blocks tagged {tag!r}"
    return found[0]


def section_blocks(page, heading):
    """The code of every python block under ``heading`` (its exact line) in ``docs/<page>``."""
    found = [code for h, _, code in code_blocks(page) if h == heading]
    assert found, f"{page}: no python block under {heading!r}"
    return found
