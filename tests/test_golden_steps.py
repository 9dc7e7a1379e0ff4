"""Moving code must not move a number: a fresh recording of every CPU preset's first steps (losses, gradient
norms, weights, 1-/2-step samples; ``tests/golden_steps.py``) against the committed one, bit-exact on the
machine that recorded it and within rtol 1e-4 elsewhere."""
import copy
import json

import pytest

import golden_steps as gs


@pytest.fixture(scope="module")
def golden():
    with open(gs.GOLDEN) as f:
        return json.load(f)


def test_every_preset_steps_as_recorded(golden):
    fresh = gs.record()
    exact = golden["fingerprint"] == fresh["fingerprint"]
    diff = gs.differences(golden, fresh, exact=exact)
    assert not diff, (f"{'bit-exact' if exact else 'rtol 1e-4'} comparison with {gs.GOLDEN}:\n" + "\n".join(diff[:20]))


def test_the_comparison_sees_one_ulp_and_a_missing_case(golden):
    moved = copy.deepcopy(golden)
    step = moved["cases"]["sct"]["steps"][1]
    x = float.fromhex(step["loss"])
    step["loss"] = (x + abs(x) * 2.0 ** -52).hex()           # one unit in the last place
    assert gs.differences(golden, moved, exact=True) == [f"cases.sct.steps[1].loss: {x!r} != {float.fromhex(step['loss'])!r}"]
    assert gs.differences(golden, moved, exact=False) == []   # within rtol on another machine
    step["loss"] = (x * 1.01).hex()
    assert len(gs.differences(golden, moved, exact=False)) == 1
    del moved["cases"]["scd"]
    assert any("keys" in d for d in gs.differences(golden, moved, exact=False))
