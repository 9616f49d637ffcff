"""Every private Lightning member melora-lit touches, in this one place.

Lightning keeps no promise about names that start with an underscore: an upgrade can rename or
drop them. So nothing else in melora-lit reaches into ``trainer._x`` or ``loop._y``: it calls the
small functions below, each of which says why no public API does the job. ``pyproject.toml``
pins Lightning to the range these were tested with, and ``tests/test_lightning_private.py``
checks that every member listed in :data:`PRIVATE_MEMBERS` still exists, with a message naming
the one that disappeared.
"""

from __future__ import annotations

#: (where, attribute) of each private member used below; the test checks each one.
PRIVATE_MEMBERS: list[tuple[str, str]] = []
