"""The KV-aware router: one OpenAI-compatible front door for several kvtrove engine servers.

Each request goes to the engine most likely to hold the KV of its prefix (the router's own prefix
index), unless that engine is much busier than another; engines failing health checks are left out.
"""
