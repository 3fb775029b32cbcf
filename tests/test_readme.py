"""The README's promises a new user relies on first (issue 13, item 15): the setup command installs into
a fresh virtual environment, the test command is CI's and says how long it takes, and the claim that an
image depends only on its seed and class carries the one-level caveat where it is made."""
import re

from conftest import REPO


def _first_block() -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"```bash\n(.*?)```", text, re.S).group(1)


def test_first_command_sets_up_a_fresh_environment_and_runs_offline():
    setup = [ln for ln in _first_block().splitlines() if ln.strip() and not ln.startswith("#")][0]
    assert setup.startswith("python -m venv .venv && . .venv/bin/activate && ")
    assert "pip install torch==2.13.0" in setup and "--random-weights" in setup  # no download needed


def test_test_command_is_cis_and_says_how_long_it_takes():
    block = _first_block()
    assert "python -m pytest -q" in block and "python -m pytest -q" in (REPO / ".ci" / "run").read_text()
    assert re.search(r"about \d+ minutes on a 2-core machine", block)


def test_seed_claim_carries_the_pixel_caveat():
    text = (REPO / "README.md").read_text()
    claim = text.index("depend only on" if "depend only on" in text else "depends only on")
    assert "one level" in text[claim:claim + 400]
