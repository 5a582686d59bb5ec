"""The command table: each ``quantcache`` command, the module of this package that implements it, its help.

Kept apart from the entry point so that a command module can name its siblings' help without
importing the package that is still being imported (see :func:`quantcache.cli._common.command_parser`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COMMANDS", "Command"]


@dataclass(frozen=True)
class Command:
    """Where a command lives (a module of this package) and how ``quantcache --help`` lists it."""

    module: str
    help: str


COMMANDS: dict[str, Command] = {
    "calibrate": Command("calibrate", "collect KV ranges on calibration text and save the INT8 scales"),
    "evaluate": Command("evaluate", "measure the quality cost of saved scales (perplexity, KL, top-1)"),
    "inspect": Command("inspect", "show and validate what a saved state file holds"),
    "suggest-exclude": Command(
        "suggest_exclude", "rank layers by sensitivity and propose an exclude list for a KL budget"
    ),
    "suggest-bits": Command(
        "suggest_bits", "give each layer the scheme its sensitivity earns within an effective-bit budget"
    ),
    "export": Command("export", "write the scales as a checkpoint vLLM, vLLM-Ascend or TensorRT-LLM loads"),
    "import": Command("import_state", "read a serving checkpoint's KV scales into a state evaluate can measure"),
    "bench": Command("bench", "measure decode and prefill speed, KV bytes and peak memory against DynamicCache"),
}
