"""mesh.placement on the session's local Ray: what no node has free, named as an operator
reads it; nothing when a node has it all."""
from __future__ import annotations

import re

from mesh.placement import unmet


def test_what_no_node_has_free(ray_cluster):
    assert unmet({"num_cpus": 0}) is None
    assert unmet({"num_cpus": 0, "resources": {"pdmesh_absent": 1}}) == "pdmesh_absent 1 (at most 0 free on a node)"
    assert re.fullmatch(r"CPU 10000 \(at most \d+(\.\d+)? free on a node\)", unmet({"num_cpus": 10_000}))
