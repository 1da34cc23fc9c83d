"""Host memory for KV pools and staging buffers (`hostmem.huge_pages`).

A leaf below every other package (it imports only torch): the engine allocates its KV
pool here and the transport its staging buffers, without either importing the other.
"""
