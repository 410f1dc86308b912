"""tools/profile_inplace.py on a small ResNet: real ONNX Runtime profiles of the runtime's own session and of dense
sessions, parsed per call."""
from __future__ import annotations

import argparse

import pytest
from tools_loader import load_tool

from edgecl.arch import preset

from test_blocked_convs import needs_nchwc


@needs_nchwc
def test_profile_counts_nodes_and_times_of_the_runtimes_own_session(tmp_path):
    tool = load_tool("profile_inplace")
    arch = preset("resnet", (3, 8, 8), width=2)
    args = argparse.Namespace(tasks=3, batches=[1, 4], calls=6)
    lps = tool.profile_shape(arch, "lps", "task", args, str(tmp_path))
    node = tool.profile_shape(arch, "node", "shared", args, str(tmp_path))
    for shape in (lps, node):
        assert shape["blocked_convs"] >= 1
        assert set(shape["call_parts_us"]) == {"bind_task", "bind_output", "bind_input", "check_input", "switch_hit"}
        for row in shape["batches"].values():
            for side in ("inplace", "dense"):
                # the kernels of one run are inside its model_run: a window off by one call would break this
                assert 0 < row[side]["kernels_us"] <= row[side]["model_run_us"]
                assert row[side]["nodes"]["Conv"] >= 1
    # LPS runs the dense graph node for node; node masks add their Mul per factored conv, and the BatchNorms after
    # them stay unfused
    assert all(not row["compare"]["node_count_diff"] for row in lps["batches"].values())
    diff = node["batches"][4]["compare"]["node_count_diff"]
    assert diff.get("Mul", 0) >= 1 and diff.get("BatchNormalization", 0) >= 1
    assert node["batches"][4]["compare"]["per_op_extra_us"]["Mul"] > 0


def test_profile_refuses_too_few_runs(tmp_path):
    tool = load_tool("profile_inplace")
    path = tmp_path / "p.json"
    path.write_text('[{"cat": "Session", "name": "model_run", "ts": 0, "dur": 5}]')
    with pytest.raises(ValueError, match="model_run"):
        tool.read_profile(str(path), calls=2, drop_last=0)
