"""The inference engine: model, paged KV cache, scheduler and sampler, in one process.

Independent of the transport (checked by lint-imports): the actor joins the two.
"""
