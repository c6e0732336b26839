"""Pure reconcile logic: object + observed children in, next status + actions out.

Sits between the thin kopf handlers (which observe and apply) and the pure builders in
``kubelora.resources``: handlers > reconcile > resources > api. Nothing here calls the API.
"""
