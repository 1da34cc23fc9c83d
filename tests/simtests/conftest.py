"""Small clusters with idealised cost models (tests/simtests/support.py), built in code."""
import pytest

from scenarios.controller import Settings
from scenarios.spec import parse_specs
from simtests.cluster import Cluster
from tests.simtests.support import profile, scenario


@pytest.fixture
def make_cluster():
    def make(*scenarios, model=None, settings=Settings()):
        specs = parse_specs({"scenarios": list(scenarios) or [scenario()]})
        m = model or profile()
        return Cluster(specs, {s.name: m for s in specs}, settings)

    return make
