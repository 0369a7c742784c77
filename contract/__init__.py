"""The contract between the control plane and the ranks, owned by neither.

The control plane (orchestrator/, k8s/) and the ranks (trainers/, offload/) both import this package; it
imports neither. It holds:

    spec.py      the job spec and its validation (the one gate: YAML, gRPC, and the JSON a rank reads)
    layout.py    the parallel layout (tp, pp, dp) and the rules a model and batch put on it
    rank_env.py  the rank environment: every variable a launcher sets and a rank reads
    job_dirs.py  where a job's files live (job, attempt and checkpoint directories)
    reach.py     what a spec may reach under the server's policy (data roots, test hooks)
    errors.py    FieldViolation and SpecError: bad input, by the field's path
"""
