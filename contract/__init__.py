"""The contract between the control plane and the ranks, owned by neither.

The control plane (orchestrator/, k8s/) and the ranks (trainers/, offload/) both import this package; it
imports neither. It holds the job spec and its validation (`contract.spec`)."""
