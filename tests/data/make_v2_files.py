"""How tests/data/v2-*.edgecl and v2-reference.json were made: by the format-2 writer of commit 72eb278, the last to
store one `nodes:GROUP` blob per channel group per task (format 3 packs them). Kept to say what the files hold; run
it only from a checkout of that commit (its tests/ on sys.path), never to refresh the files:

    cd <checkout of 72eb278> && PYTHONPATH=tests python <this file> OUT_DIR
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

import artifact_models as am
from edgecl import artifact
from edgecl.runtime import TaskRuntime
from test_node_segments import CAT
from test_node_segments import _packed as agscl_like  # random weights and masks under AGS-CL's node specs
from torch_nets import shuffle_spec

MODELS = {"v2-cat-node.edgecl": lambda: agscl_like(CAT, 3, 0),
          "v2-shuffle-node.edgecl": lambda: agscl_like(shuffle_spec((1, 8, 8)), 3, 1),
          "v2-cnn-node.edgecl": lambda: am.make("node", seed=2, n_tasks=3),
          "v2-mlp-lps.edgecl": lambda: am.make("lps", seed=3, n_tasks=3)}


def main(out: str) -> None:
    reference = {}
    for name, build in MODELS.items():
        path = os.path.join(out, name)
        artifact.save(build(), path)
        with artifact.load(path) as art:
            assert art.manifest["format_version"] == 2
            hashes = {t: {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in art.materialize(t).items()}
                      for t in range(art.n_tasks)}
            shape = art.arch["input_shape"]
        x = np.random.default_rng(7).standard_normal((5, *shape)).astype(np.float32)
        with TaskRuntime(path) as rt:
            logits = [rt.infer(x, task=t).tolist() for t in range(len(hashes))]
        reference[name] = {"x_seed": 7, "logits": logits, "weights_sha256": hashes}
    with open(os.path.join(out, "v2-reference.json"), "w") as f:
        json.dump(reference, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
