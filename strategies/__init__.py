"""The server's strategy: a lean core (``core.AdapterStrategy``) and stages composed around it.

The core runs Flower's rounds, aggregates decoded replies by kind (``rules.aggregate``, the robust
rule one of its parameters, ``core.MergeRule``) and steps the server (``server_lr``, then the adapter
family's injected ``server_step``). Every other concern is a ``pipeline.Stage`` the core calls at
fixed points of a round, in stack order (``build.build_strategy``):

    OneReplyPerNode -> PrivacyBookkeeping -> ReplyValidation -> CappedWeights -> NormClip

Why stages, not Flower-style wrapper strategies (``DifferentialPrivacyServerSideFixedClipping(inner)``):
those pass ``Message`` objects down, but these concerns act on each reply as it is read (the DP event
is booked between the duplicate check and validation, so a dropped reply still spent budget) and on
decoded deltas (sparse masks, expert counts), which a message would have to be re-encoded to carry. A
stage sees the decoded batch as ``rules.Replies`` and returns one: client-level DP (clip each delta,
one noised sum over a fixed denominator) and secure aggregation (only the sum) are each a stage whose
``bound`` returns the batch as that one sum, with no change to the core.
"""
