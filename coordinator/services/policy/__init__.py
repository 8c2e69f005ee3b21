"""Policies: what a client's requests may carry to a provider and bring back.

A policy is an ordered list of steps (`steps.Step`, built-in or a plugin found through the
`agora.policy_steps` entry points) run at three points: on the prompt before routing, on the
output before the client sees it (streamed: through a bounded hold-back window), and after
completion. `book.PolicyBook` knows which policy a key or client runs; `run.PolicyRun` is one
request's use of it (its placeholders, its output gates, what it did, for the audit log)."""
