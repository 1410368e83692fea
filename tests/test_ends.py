"""relay.ends: the words a relayed connection ends with, in logs and metric labels."""

import errno

from relay import ends


def test_the_relay_s_own_shortage_is_named_after_its_errno():
    assert ends.local_failure(errno.EMFILE) == "relay-emfile"
    assert ends.local_failure(errno.EADDRNOTAVAIL) == "relay-eaddrnotavail"
    assert ends.local_failure(0) == "relay-error"


def test_a_reset_is_named_after_the_side_that_sent_it():
    assert ends.RESET_BY == ("client-reset", "upstream-reset")  # the engine's sides: 0 the client, 1 the upstream
