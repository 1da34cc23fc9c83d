"""The namespace cluster is a real network: every node is a Ray node at its own address,
and one node's loopback does not reach another's."""
from __future__ import annotations

LISTEN = """
import json, socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
l = socket.socket(); l.bind((sys.argv[1], 0)); l.listen()
print(json.dumps([s.getsockname()[1], l.getsockname()[1]]), flush=True)
sys.stdin.read()
"""

CONNECT = """
import json, socket
def reach(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False
print(json.dumps([reach("127.0.0.1", {lo}), reach("{addr}", {port})]))
"""


def test_every_node_is_a_ray_node_at_its_address(netns_cluster):
    assert netns_cluster.alive_nodes() == {n.address for n in netns_cluster.nodes.values()}


def test_loopback_of_one_node_does_not_reach_another(netns_cluster):
    import json
    import subprocess

    prefill, decode = netns_cluster.nodes["prefill"], netns_cluster.nodes["decode"]
    server = netns_cluster.popen(prefill, ["python3", "-c", LISTEN, prefill.address],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        lo, port = json.loads(server.stdout.readline())
        on_loopback, on_link = netns_cluster.python(decode, CONNECT.format(lo=lo, addr=prefill.address, port=port))
        assert (on_loopback, on_link) == (False, True)
    finally:
        server.kill()
        server.wait(10)
