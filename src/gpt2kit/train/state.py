"""Run state."""

from __future__ import annotations

TRAINER_STATE = "trainer.pt"
TRAINER_STATE_VERSION = 1
