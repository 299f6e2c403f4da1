"""What the results record of the machine: the CPU's vector and matrix extensions, which decide the kernels (and
the speed) of every engine, beside its name (one name covers machines with and without AVX-512 or AMX)."""

from __future__ import annotations

import pandas as pd
import pytest

from compactlm.bench.report import _environment_line
from compactlm.core import host


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"fpu", "avx", "avx2", "fma"}, "avx2"),
        ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "sse4_2"}, "avx2 avx512f avx512_vnni avx512_bf16"),
        ({"amx_bf16", "avx2", "amx_int8", "avx512f"}, "avx2 avx512f amx_int8 amx_bf16"),
        (set(), "none"),
    ],
)
def test_cpu_extensions_lists_the_kernel_deciding_flags_in_order(monkeypatch, flags, expected):
    monkeypatch.setattr(host, "cpu_flags", lambda: frozenset(flags))
    assert host.cpu_extensions() == expected


def test_the_report_names_the_cpu_extensions_beside_the_cpu():
    frame = pd.DataFrame({"cpu": ["AMD EPYC"] * 2, "cpu_extensions": ["avx2 avx512f avx512_bf16"] * 2, "cpu_count": 2})
    line = _environment_line(frame)
    assert "CPU: AMD EPYC; CPU extensions: avx2 avx512f avx512_bf16; cores: 2" in line
    assert "CPU extensions" not in _environment_line(frame.drop(columns="cpu_extensions"))  # older results
