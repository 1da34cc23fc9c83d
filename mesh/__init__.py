"""The serving mesh: the engine and the Ray actors that run it."""
import os

# torch-npu, once installed, makes `import torch` fail on hosts without CANN
# unless its autoload is off; mesh.engine.device imports it explicitly instead.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
