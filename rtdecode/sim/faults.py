"""The simulated scanner's write plan, and the faults that can be injected into it.

A fault is written ``KIND@INDEX`` or ``KIND@INDEX:VALUE``; INDEX counts volumes from 0 in the order
the scanner acquires them. What each fault does, and what ingest is expected to make of it:

==========  =========================================================  ================================
fault       written                                                    ingest outcome
==========  =========================================================  ================================
truncate    only VALUE (default 0.6) of the file, never completed      quarantined after the incomplete
                                                                       timeout; index reported MISSING
slow        in chunks over VALUE x TR (default 0.8), the file closed   delivered once, complete
            and reopened between chunks
duplicate   a second identical copy under another name, just after     one volume; DUPLICATE reported
reorder     the next volume written first, in this one's slot, and     both delivered in order;
            this one a tenth of a TR later                             OUT_OF_ORDER reported
drop        never written                                              MISSING reported
late        written VALUE TRs late (default 3)                         MISSING, then delivered with
                                                                       late=True and LATE reported
restart     the run restarts here at the console: new series number,   RUN_ENDED for the old series,
            numbering from 1, data replayed from the start             RUN_STARTED for the new run
corrupt     random bytes in place of the file                          quarantined (not a volume)
==========  =========================================================  ================================

``jitter`` (seconds, not a per-volume fault) moves every write by a uniform random amount in
[-jitter, +jitter]; volumes are delivered in order all the same.
"""

import dataclasses
import random

FAULT_KINDS = ("truncate", "slow", "duplicate", "reorder", "drop", "late", "restart", "corrupt")
_DEFAULT_VALUES = {"truncate": 0.6, "slow": 0.8, "late": 3.0}
GROWING_FILE_FAULTS = ("slow", "restart")


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    index: int
    value: float | None = None

    @property
    def amount(self) -> float | None:
        return self.value if self.value is not None else _DEFAULT_VALUES.get(self.kind)

    def __str__(self) -> str:
        return f"{self.kind}@{self.index}" + (f":{self.value:g}" if self.value is not None else "")


def parse_fault(text: str) -> Fault:
    """``"late@12:4"`` -> ``Fault("late", 12, 4.0)``; errors name the text and the rule."""
    kind, at, rest = text.partition("@")
    if not at or kind not in FAULT_KINDS:
        raise ValueError(f"--fault {text!r}: expected KIND@INDEX[:VALUE] with KIND one of {', '.join(FAULT_KINDS)}")
    index_text, colon, value_text = rest.partition(":")
    try:
        index = int(index_text)
        value = float(value_text) if colon else None
    except ValueError:
        raise ValueError(f"--fault {text!r}: INDEX must be an integer and VALUE a number") from None
    if index < 0:
        raise ValueError(f"--fault {text!r}: INDEX must be 0 or more")
    if value is not None and not value > 0:
        raise ValueError(f"--fault {text!r}: VALUE must be positive")
    if kind == "truncate" and value is not None and value >= 1:
        raise ValueError(f"--fault {text!r}: a truncate fraction must be below 1")
    return Fault(kind, index, value)


@dataclasses.dataclass(frozen=True)
class PlannedWrite:
    """One file (or one volume's files) the simulated scanner writes.

    ``at_s`` is scanner time (seconds from the start of the run, before ``--speed``);
    ``source_index`` picks the volume of the source run; ``acquired_s`` is when the scanner acquired
    it (``volume_number``'s slot), which differs from ``at_s`` for late or reordered writes.
    """

    at_s: float
    acquired_s: float
    source_index: int
    series_number: int
    volume_number: int
    mode: str = "normal"  # normal, truncate, slow, corrupt
    amount: float | None = None
    copy: int = 0  # 1 for the second file of a duplicate


def plan_writes(
    n_volumes: int,
    tr_s: float,
    faults: list[Fault],
    first_series: int = 1,
    jitter_s: float = 0.0,
    seed: int = 0,
) -> list[PlannedWrite]:
    """The ordered list of writes for one simulated session."""
    by_index = {}
    for fault in faults:
        if fault.index >= n_volumes:
            raise ValueError(f"--fault {fault.kind}@{fault.index}: only {n_volumes} volumes are written")
        by_index.setdefault(fault.index, []).append(fault)
    rng = random.Random(seed)
    writes: list[PlannedWrite] = []
    series, run_start = first_series, 0
    for index in range(n_volumes):
        kinds = {f.kind: f for f in by_index.get(index, [])}
        if "restart" in kinds and index > 0:
            series, run_start = series + 1, index
        acquired_s = index * tr_s
        write = PlannedWrite(
            at_s=acquired_s + (rng.uniform(-jitter_s, jitter_s) if jitter_s else 0.0),
            acquired_s=acquired_s,
            source_index=index - run_start,
            series_number=series,
            volume_number=index - run_start + 1,
        )
        if "drop" in kinds:
            continue
        for mode in ("truncate", "slow", "corrupt"):
            if mode in kinds:
                write = dataclasses.replace(write, mode=mode, amount=kinds[mode].amount)
        if "late" in kinds:
            write = dataclasses.replace(write, at_s=write.at_s + kinds["late"].amount * tr_s)
        writes.append(write)
        if "duplicate" in kinds:
            writes.append(dataclasses.replace(write, at_s=write.at_s + 0.1 * tr_s, copy=1))
    _swap_reordered(writes, [f.index for f in faults if f.kind == "reorder"], tr_s)
    return sorted(writes, key=lambda w: w.at_s)


def _swap_reordered(writes: list[PlannedWrite], indices: list[int], tr_s: float) -> None:
    position = {round(w.acquired_s / tr_s): i for i, w in enumerate(writes) if w.copy == 0}
    for index in indices:
        if index in position and index + 1 in position:
            a, b = position[index], position[index + 1]
            slot_s = writes[a].at_s
            writes[b] = dataclasses.replace(writes[b], at_s=slot_s)
            writes[a] = dataclasses.replace(writes[a], at_s=slot_s + 0.1 * tr_s)
