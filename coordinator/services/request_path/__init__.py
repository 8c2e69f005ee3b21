"""The request path: one client request from admission to release.

    api (openai_routes) ──► RequestPath.begin() ──► Fulfilment (owns the request)
                                                     │ admit, hold, route
                                                     │ attempts: first, failover, continuation
                                                     │ relay (token frames → SSE)
                                                     │ settle (check now, post in background)
                                                     ▼ release
                            Dispatcher ──► WorkerLink.open_job(job) -> JobStream

Modules import each other directly; this file imports nothing (the registry imports `link`).
"""
