"""The client-level canary audit: a whole client with a fixed large update, in or out of the federation.

The real core and ``ClientLevelDP`` stage release one round; the attacker projects the released adapter on
the canary's direction. Against the guarantee the run reports, the attack's epsilon lower bound and its
true-positive rate at 1% false positives stay within what epsilon allows; a server that adds a tenth of
the noise it claims is caught by the same audit, so the check can fail.
"""

from __future__ import annotations

import math

import pytest

from bench.security.client_canary import ClientCanary, within_epsilon

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("actual, caught", [(0.0, False), (0.2, True)])
def test_a_canary_client_is_no_easier_to_detect_than_the_client_level_epsilon_allows(actual, caught):
    canary = ClientCanary(noise_multiplier=2.0, actual_noise_multiplier=actual, runs=600)
    claimed = canary.claimed_epsilon()
    result, (tpr, fpr) = canary.run(seed=3)
    print(f"claimed eps {claimed:.3f}: audit {result}, TPR {tpr:.3f} at FPR {fpr:.3f}")
    assert result.violates(claimed) is caught
    assert within_epsilon(tpr, fpr, canary.runs // 2, claimed, canary.delta) is not caught
    if not caught:
        assert tpr <= math.exp(claimed) * 0.01 + 0.05  # the point estimate too, with room for 300 runs' spread
