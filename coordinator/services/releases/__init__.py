"""Models as products: a public model name with versions, the release policy that picks the
version serving each request (weighted canary, sticky A/B, shadow copies), and the automatic
rollback of a version that fails more than its stable predecessor.

    policy   plain values and pure picks (no clock, no I/O)
    health   per-version sliding windows and the rollback rule
    book     the owner of every release's lifecycle (loads, changes, observes, rolls back)
"""
