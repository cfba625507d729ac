"""Encode Siemens CSA2 ("SV10") headers, as Siemens scanners put in private tag (0029,1010).

Layout (little endian): ``b"SV10"``, 4 unused bytes, the number of tags (uint32) and a check value
(uint32, 77). Each tag: a 64-byte NUL-padded name, value multiplicity (int32), a 4-byte VR,
syngo data type (int32), number of items (int32) and a check value (int32, 77 or 205). Each item:
four int32 (the item length is the second), then the value as NUL-terminated text, padded to a
multiple of 4 bytes. Every value is text, whatever its VR.
"""

import struct
from collections.abc import Sequence

_SYNGO_TYPES = {"IS": 6, "FD": 4, "DS": 3, "UL": 9, "US": 10, "SL": 7, "LO": 19, "SH": 22, "CS": 16}


def _format_value(value: float | int | str) -> str:
    if isinstance(value, float):
        return f"{value:.8f}"
    return str(value)


def _encode_item(text: str) -> bytes:
    payload = text.encode("ascii") + b"\x00"
    length = len(payload)
    padding = (-length) % 4
    return struct.pack("<4i", length, length, 77, length) + payload + b"\x00" * padding


def encode_csa2(tags: dict[str, tuple[str, Sequence[float | int | str]]]) -> bytes:
    """Encode ``{name: (vr, values)}`` into a CSA2 header.

    >>> header = encode_csa2({"NumberOfImagesInMosaic": ("US", [48])})
    >>> header[:4]
    b'SV10'
    """
    parts = [b"SV10", b"\x04\x03\x02\x01", struct.pack("<2I", len(tags), 77)]
    for name, (vr, values) in tags.items():
        vm = len(values)
        parts.append(
            struct.pack(
                "<64si4s3i",
                name.encode("ascii"),
                vm,
                vr.encode("ascii"),
                _SYNGO_TYPES.get(vr, 19),
                vm,
                77,
            )
        )
        parts.extend(_encode_item(_format_value(v)) for v in values)
    return b"".join(parts)
