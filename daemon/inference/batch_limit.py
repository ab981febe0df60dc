"""The largest batch to form: `max_batch`, or less on a device that runs out of memory there.

A batch that runs out of memory is split in halves until its parts fit (see the batcher).
When the splits end with a request that fails alone, that request explains the failures:
the limit stays. Otherwise the largest part that passed becomes the limit, so that the next
full batches do not run out alike. After PROBE_AFTER full passes at a lowered limit it is
doubled, up to `max_batch`; a doubled limit that runs out again waits twice as many passes
before the next try (at most PROBE_AFTER_MOST), so that a device that never fits
`max_batch` fails fewer and fewer passes. The limit then returns to the size confirmed
before the try, unless parts of that size ran out too (less memory is free now): then the
largest part that passed becomes the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

#: full passes at a lowered limit before it is doubled again
PROBE_AFTER = 50
#: ... at most, however often a doubled limit ran out again
PROBE_AFTER_MOST = 50 * 2**10


@dataclass
class SplitOutcome:
    """What the parts of one batch that ran out of memory did."""

    #: the largest part that passed (0: none)
    largest_passed: int = 0
    #: a single request ran out of memory alone
    lone_failure: bool = False
    #: the smallest batch or part that ran out (0: none yet)
    smallest_failed: int = 0

    def passed(self, size: int) -> None:
        self.largest_passed = max(self.largest_passed, size)

    def failed(self, size: int) -> None:
        self.smallest_failed = min(self.smallest_failed or size, size)


class BatchLimit:
    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.value = max_batch
        self._full_passes = 0
        self._probe_after = PROBE_AFTER
        #: the limit was raised by a try that no full pass has confirmed yet
        self._probing = False
        #: the limit before that try: full passes confirmed it
        self._confirmed = max_batch

    def passed(self, size: int) -> None:
        """A pass of `size` requests ran."""
        if size < self.value:
            return
        if self._probing:  # the raised limit fits
            self._probing = False
            self._probe_after = PROBE_AFTER
        if self.value >= self.max_batch:
            return
        self._full_passes += 1
        if self._full_passes >= self._probe_after:
            self._confirmed = self.value
            self.value = min(self.max_batch, 2 * self.value)
            self._full_passes = 0
            self._probing = True
            log.info("trying larger batches again", batch_limit=self.value)

    def ran_out(self, split: SplitOutcome) -> None:
        """A batch ran out of memory and its parts did as `split` says."""
        if split.lone_failure or not 0 < split.largest_passed < self.value:
            return
        largest = split.largest_passed
        if self._probing:  # the raised limit did not fit: the next try waits longer
            self._probe_after = min(2 * self._probe_after, PROBE_AFTER_MOST)
            self._probing = False
            # parts smaller than the size confirmed before passing say nothing against it;
            # a part of that size running out does
            if not 0 < split.smallest_failed <= self._confirmed:
                largest = max(largest, self._confirmed)
        self.value = largest
        self._full_passes = 0
        log.warning("batches limited after running out of memory", batch_limit=self.value)
