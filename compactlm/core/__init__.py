"""compactlm.core, the shared kernel every package builds on; it imports no domain package.

errors (the one error type), console (rich output and progress), io (atomic files and folders), config (the one
YAML -> dataclass loader), runs (the one resumable run folder), host (machine, versions, commit).
"""

from compactlm.core.errors import CompactLMError
from compactlm.core.io import atomic_dir, atomic_file, check_output, read_json, write_json
from compactlm.core.runs import Run, claim_run_folder

__all__ = [
    "CompactLMError",
    "Run",
    "atomic_dir",
    "atomic_file",
    "check_output",
    "claim_run_folder",
    "read_json",
    "write_json",
]
