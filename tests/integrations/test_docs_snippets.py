"""Every python block of docs/integrations.md is tagged, and every tag is run by a test here."""

from pathlib import Path

from integration_docs import code_blocks

HERE = Path(__file__).parent


def test_every_block_of_the_integrations_page_is_run_by_a_test():
    blocks = code_blocks("integrations.md")
    assert len(blocks) >= 10
    untagged = [code.splitlines()[0] for _, tag, code in blocks if tag is None]
    assert not untagged, f"untagged blocks (add <!-- test: NAME --> and a test): {untagged}"
    tags = [tag for _, tag, _ in blocks]
    assert len(set(tags)) == len(tags), "a tag is used twice"
    tests = "".join(path.read_text() for path in HERE.glob("test_*.py") if path.name != Path(__file__).name)
    unused = [tag for tag in tags if f'"{tag}"' not in tests]
    assert not unused, f"tags that no test runs: {unused}"


def test_the_blocks_are_found_where_the_page_has_them():
    # a block the pattern missed would escape the check above: count the fences too
    text = (HERE.parents[1] / "docs" / "integrations.md").read_text()
    assert text.count("```python\n") == len(code_blocks("integrations.md"))
