"""ftc-operator: the FineTuneComparison controller.

A level-triggered controller: every reconcile reads the whole state afresh (the comparison, its Jobs and
their pods), decides what should exist, and makes it so; an event only says which comparison to look at
again, never what changed. It runs on kopf, which watches the comparisons (`handlers.py`: an
``@kopf.on.event`` handler, no finalizers, nothing patched by kopf), and on informers of its own
(`cache.py`: LIST + WATCH of the Jobs and pods ftc made, selected by label on the server side; kopf
filters labels in the client, so every pod of the cluster would reach it). Both feed one work queue
(`workqueue.py`).

Layers, each importing only those below it (.importlinter holds it):

- handlers: kopf registration, startup, the periodic resync;
- workqueue, reconcile: one pass per comparison at a time; a pass reads, plans, applies, writes status;
- cache, kube: the informers' view of the cluster, and the API calls;
- planning (decision, step_inputs, rendering, fairness, resolve, comparison, observe, config): pure
  functions from models to a `Plan` that carries the rendered objects, so the reconciler only applies.
"""
