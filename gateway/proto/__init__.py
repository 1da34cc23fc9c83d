"""pdmesh.v1 protos and the Python code generated from them (generate.sh)."""
