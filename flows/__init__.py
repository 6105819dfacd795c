"""Prefect flows of the feedback loop: the only package that imports prefect.

``flows.storage`` (the run store: a local folder or an S3 prefix), ``flows.stages`` (each stage as a plain
function over a run store), ``flows.loop`` (Prefect tasks and flows over the stages; the deployments of
``prefect.yaml`` point at them) and ``flows.server`` (the guarded temporary Prefect server of the CLI).
"""
