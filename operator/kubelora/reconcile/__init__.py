"""Pure reconciliation logic: observed objects in, decisions and statuses out. No API calls, no kopf.

Sits beside ``resources`` (which builds manifests) and below ``handlers`` (which fetch, apply and patch).
"""
