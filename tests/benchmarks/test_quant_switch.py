"""benchmarks.quant_switch runs (--quick) and prints what it measured: the switch on codes against its floor
(checked inside against the reference path) and the sizes of adapters of codes."""

from __future__ import annotations

from benchmarks.quant_switch import main


def test_quick_run_prints_switch_and_size_rows(capsys):
    main(["--quick", "--formats", "int8", "fp8_e4m3"])
    out = capsys.readouterr().out
    switch = [line.split() for line in out.splitlines() if line.startswith(("int8 ", "fp8_e4m3"))]
    assert [r[0] for r in switch] == ["int8", "fp8_e4m3", "fp8_e4m3+bf16copy"]
    for r in switch:
        assert float(r[1]) > 0 and float(r[4]) > 0  # switch ms, floor ms
    assert switch[1][6] != "-" and switch[2][6] == "-"  # the torch-ops refresh timed where no mirror wrote the copy
    assert float(switch[2][3]) > float(switch[1][3])  # the copy's lines join the floor
    sizes = [line.split() for line in out.splitlines() if line.startswith(("rand ", "block "))]
    assert len(sizes) == 6
    for _, _, changed, _, per_nnz, delta_file in sizes:
        assert 0 < float(changed) <= 1 and float(per_nnz) < float(delta_file)
