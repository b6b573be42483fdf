"""`vmm bench` end to end on KVM: the JSON's structure, never its timings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.kvm
def test_bench_quick_boot_exits_json(tmp_path, vmm_kernel_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "vmm.py", "bench", "--quick", "--only", "boot,exits", "--runs", "2", "--json", str(out),
         "--kernel", str(vmm_kernel_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "KVM backend:" in proc.stdout and "CPU:" in proc.stdout
    assert "bench: boot:" in proc.stderr and "bench: exits:" in proc.stderr
    doc = json.loads(out.read_text())
    assert doc["schema"] == "vmm-bench/1"
    assert doc["backend"] in ("VMX", "SVM", "PVM", "UNKNOWN")
    assert doc["cpu_model"] and doc["env"]["backend"]["cpu_model"] == doc["cpu_model"]
    assert list(doc["sections"]) == ["boot", "exits"]
    for name, sec in doc["sections"].items():
        assert sec["status"] == "ok", (name, sec["message"])
        assert sec["rows"], name
        for row in sec["rows"]:
            fig = row["figure"]
            if fig is None:
                continue
            assert {"median", "min", "max", "n", "unit"} <= set(fig)
            assert fig["min"] <= fig["median"] <= fig["max"]
    boot = {r["key"]: r for r in doc["sections"]["boot"]["rows"]}
    for key in ("proc_to_python", "setup_total", "kvm_create_vm", "page_tables", "elf_load",
                "proc_to_first_insn", "to_ready", "proc_to_ready"):
        assert key in boot, key
    from vmm.bench.host_baselines import compiler

    if compiler() is None:  # e.g. inside the SVM test VM (vmm/svm): the C baselines say why they are missing
        assert "no C compiler" in doc["sections"]["boot"]["message"] + doc["sections"]["exits"]["message"]
        return
    assert boot["kvm_create_vm"]["baseline"]["figure"]["n"] == 2
    exits = {r["key"]: r for r in doc["sections"]["exits"]["rows"]}
    assert exits["round_trip"]["figure"]["unit"] == "us"
    assert exits["round_trip"]["figure"]["n"] == 2
    assert "baseline" in exits["round_trip"]  # the C loop, gcc being present here
    assert exits["exits_per_s"]["figure"]["unit"] == "/s"
