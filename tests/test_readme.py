"""The README's Python example runs as written on the committed tiny policy."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(import ibpo_lab\n.*?)```", text, flags=re.S)
    assert blocks, "README lost its runnable example"
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    adv, fixed = ns["adv"], ns["fixed"]
    assert tuple(adv.shape) == (len(fixed.batch), fixed.batch.max_response_len)
    # what the example's comment says: IBPO credit is zero on tokens of failed, repaired trajectories that
    # the repair did not edit
    mask = fixed.batch.edit_mask
    failed = (fixed.batch.rewards < 0.5) & (fixed.batch.repair_success > 0)
    assert (adv[failed] * (1 - mask[failed])).abs().sum() == 0
    # ... and strictly negative on the tokens it did edit (repairs need a correct sibling: no_correct="skip")
    resp = fixed.batch.response_mask.bool()
    edited = mask.bool() & resp
    assert (adv[failed][edited[failed]] < 0).all()
    # correct and unrepaired trajectories: one value (their sequence advantage) on every trained token
    for i in (~failed).nonzero().flatten().tolist():
        row = adv[i][resp[i]]
        assert (row == row[0]).all(), i
    assert set(fixed.table.columns) >= {"verified", "selected"}
